"""`python -m featurestore.cli`: the same as the `featurestore` command."""

import sys

from featurestore.cli import featurestore

sys.exit(featurestore())
