"""Print the token file line of a bearer token read from stdin: its SHA-256 and scopes, never the token.

    python -c 'import secrets; print(secrets.token_urlsafe(32))' > recommender.token
    featurestore hash-token --scopes read --name recommender < recommender.token >> tokens.txt

The server (`featurestore serve --auth-tokens tokens.txt`) re-reads the file when it
changes; the client sends the token itself (Client(..., token=...)). From a terminal the
token is asked for without echo. Tokens are at least 16 characters of letters, digits and
-._~+/ (then any =): what a bearer token may hold.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from featurestore.client.core import call_metadata
from featurestore.errors import InvalidArgument
from featurestore.serving.auth import SCOPES, token_line

__all__ = ["MIN_TOKEN_CHARS", "add_arguments", "run"]

MIN_TOKEN_CHARS = 16  # 16 random base64 characters: 96 bits, beyond guessing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scopes", default="read", help=f"comma-separated, of {', '.join(SCOPES)} (default: read)")
    parser.add_argument("--name", default="", help="who holds the token; refused calls are logged with it")


def run(args: argparse.Namespace) -> int:
    """Read one token from stdin and print its line; InvalidArgument (exit 2) for a token too short or malformed."""
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not token:
        raise InvalidArgument("no token on stdin: pipe one in (featurestore hash-token --help shows how to make one)")
    call_metadata(token)  # the same syntax check as the clients'
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidArgument(
            f"a token of fewer than {MIN_TOKEN_CHARS} characters can be guessed: make one with"
            " python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    print(token_line(token, args.scopes.split(","), args.name))
    return 0
