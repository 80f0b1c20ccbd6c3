"""`python -m featurestore.cli`: the same as the `featurestore` command."""

import sys

from featurestore.cli.main import main

sys.exit(main())
