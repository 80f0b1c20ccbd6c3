"""Tokens without a server: the token file's format, constant-time lookup, the keyring's
reloads, the warning for an unprotected bind, the security settings and `featurestore
hash-token`. The interceptor itself runs against a real server in
tests/integration/serving/test_security.py."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from featurestore.cli import main as cli
from featurestore.cli.options import option_values
from featurestore.config import OPTIONS, SecuritySettings, Settings
from featurestore.errors import ConfigError, InvalidArgument
from featurestore.serving.auth import Keyring, Tokens, bind_warning, hash_token, parse_tokens, token_line

READER = "reader-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def line(token: str, scopes: str, name: str = "") -> str:
    return f"{hash_token(token)} {scopes} {name}".strip()


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("test") == "sha256:" + hashlib.sha256(b"test").hexdigest()
    assert token_line("test", ["read", "admin"], "ops") == f"{hash_token('test')} read,admin ops"


def test_a_token_file_parses_with_comments_names_and_scopes() -> None:
    text = f"# the recommender\n\n{line(READER, 'read', 'recommender')}\n  {line(ADMIN, 'admin,read')}  \n"
    reader, admin = parse_tokens(text, "tokens")
    assert reader.name == "recommender" and reader.scopes == {"read"}
    assert admin.scopes == {"read", "admin"}
    assert admin.name == hash_token(ADMIN)[:15]  # unnamed: the hash's prefix, never the token
    assert reader.digest == hashlib.sha256(READER.encode()).digest()
    assert READER not in repr(reader) and reader.digest.hex() not in repr(reader)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"{READER} read", "line 1: expected `sha256:<64 hex digits> <scopes> \\[name\\]`"),
        ("sha256:abc read", "line 1: expected"),
        (f"# ok\n{hash_token(READER)}", "line 2: expected"),
        (f"{hash_token(READER)} read name extra", "expected"),
        (f"{hash_token(READER)} write", "line 1: scopes must be read, admin or read,admin"),
        (f"{hash_token(READER)} read,", "scopes must be"),
        (f"{hash_token(READER)} read bad name!", "expected"),
        (f"{hash_token(READER)} read {'n' * 65}", "a name is 1 to 64"),
        (f"{line(READER, 'read')}\n{line(READER, 'admin')}", "line 2: the same hash as entry 1"),
    ],
    ids=[
        "plaintext",
        "short-hash",
        "no-scopes",
        "extra-field",
        "unknown-scope",
        "empty-scope",
        "bad-name",
        "long-name",
        "duplicate",
    ],
)
def test_a_bad_token_file_names_the_line_never_its_text(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_tokens(text, "token file 'tokens'")
    assert str(info.value).startswith("token file 'tokens', line ")
    assert READER not in str(info.value)  # a pasted token is never echoed


def test_entries_from_the_environment_are_separated_by_semicolons() -> None:
    tokens = parse_tokens(f"{line(READER, 'read', 'a')}; {line(ADMIN, 'admin', 'b')};", "env", separator=";")
    assert [t.name for t in tokens] == ["a", "b"]
    with pytest.raises(ConfigError, match="env, entry 2: scopes"):
        parse_tokens(f"{line(READER, 'read')};{hash_token(ADMIN)} root", "env", separator=";")


def test_find_matches_only_the_exact_token() -> None:
    tokens = Tokens(parse_tokens("\n".join(line(f"token-{i:04d}-0123456789", "read", f"t{i}") for i in range(50)), "t"))
    found = tokens.find("token-0042-0123456789")
    assert found is not None and found.name == "t42"
    assert tokens.find("token-0042-012345678") is None
    assert tokens.find("token-0042-0123456789 ") is None
    assert tokens.find("") is None
    assert Tokens().find(READER) is None


def test_find_compares_every_hash_whatever_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken does not tell which entry matched."""
    tokens = Tokens(parse_tokens("\n".join(line(f"token-{i:04d}-0123456789", "read") for i in range(10)), "t"))
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in ("token-0000-0123456789", "token-0009-0123456789", "unknown"):
        compared.clear()
        tokens.find(presented)
        assert len(compared) == 10, presented


def test_keyring_reloads_a_changed_file_and_keeps_the_old_tokens_when_it_breaks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(line(READER, "read", "reader") + "\n")
    keyring = Keyring(path, line(ADMIN, "admin", "env-admin"))
    keyring.load()
    assert keyring.tokens.find(READER) is not None and keyring.tokens.find(ADMIN) is not None
    assert not keyring.reload()  # unchanged
    new = "another-token-0123456789"
    path.write_text(line(new, "read", "another") + "\n")
    assert keyring.reload()
    assert keyring.tokens.find(READER) is None  # revoked
    assert keyring.tokens.find(new) is not None and keyring.tokens.find(ADMIN) is not None  # env entries stay
    with caplog.at_level(logging.WARNING, logger="featurestore.serving.auth"):
        path.write_text(f"{new} read\n")  # a pasted plaintext token: refused, logged once
        assert not keyring.reload()
        assert not keyring.reload()
        path.unlink()
        assert not keyring.reload()
        assert not keyring.reload()  # still gone: no second line
    assert keyring.tokens.find(new) is not None  # still the last good set
    # warnings only: the INFO "re-read" line is captured too when another test left the root logger at INFO
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2, messages
    assert "line 1: expected" in messages[0] and "still accepting the tokens read before" in messages[0]
    assert "cannot be read: No such file" in messages[1]
    assert all(new not in m for m in messages)
    path.write_text(line(READER, "read") + "\n")
    assert keyring.reload() and keyring.tokens.find(READER) is not None


def test_keyring_refuses_a_missing_or_broken_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"token file .*nope. cannot be read: No such file"):
        Keyring(tmp_path / "nope").load()
    (tmp_path / "bad").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Keyring(tmp_path / "bad").load()
    with pytest.raises(ConfigError, match="auth_token_hashes, entry 1"):
        Keyring(None, "sha256:00 read")


def test_keyring_from_settings_is_none_without_tokens(tmp_path: Path) -> None:
    assert Keyring.from_settings(SecuritySettings()) is None
    keyring = Keyring.from_settings(SecuritySettings(auth_token_hashes=line(READER, "read")))
    assert keyring is not None and len(keyring.tokens) == 1


@pytest.mark.parametrize(
    ("host", "security", "expected"),
    [
        ("127.0.0.1", SecuritySettings(), None),
        ("::1", SecuritySettings(), None),
        ("localhost", SecuritySettings(), None),
        ("0.0.0.0", SecuritySettings(), "has neither TLS nor tokens"),
        ("::", SecuritySettings(), "has neither TLS nor tokens"),
        ("10.1.2.3", SecuritySettings(), "has neither TLS nor tokens"),
        ("features.internal", SecuritySettings(), "has neither TLS nor tokens"),
        ("0.0.0.0", SecuritySettings(tls_cert=Path("c"), tls_key=Path("k")), "has neither tokens nor client cert"),
        ("0.0.0.0", SecuritySettings(auth_token_hashes="x"), "checks tokens without TLS"),
        ("0.0.0.0", SecuritySettings(auth_token_hashes="x", tls_cert=Path("c"), tls_key=Path("k")), None),
        ("0.0.0.0", SecuritySettings(tls_cert=Path("c"), tls_key=Path("k"), tls_client_ca=Path("ca")), None),
    ],
    ids=[
        "v4-loopback",
        "v6-loopback",
        "localhost",
        "any",
        "v6-any",
        "lan",
        "name",
        "tls-only",
        "tokens-only",
        "tls-tokens",
        "mtls",
    ],
)
def test_bind_warning(host: str, security: SecuritySettings, expected: str | None) -> None:
    warning = bind_warning(host, 50051, security)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning and f"{host}:50051" in warning


# The settings group.


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"tls_cert": "c"}, "tls_cert and tls_key go together"),
        ({"tls_key": "k"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca"}, "tls_client_ca \\(mutual TLS\\) needs tls_cert"),
        ({"reflection_open": "yes"}, "reflection_open must be true or false, not 'yes'"),
        ({"health_port": 70000}, "health_port must be an integer from 0 to 65535"),
        ({"auth_tokens": 5}, "auth_tokens must be a path"),
    ],
    ids=["cert-alone", "key-alone", "ca-alone", "switch", "health-port", "token-path"],
)
def test_bad_security_settings_fail_at_construction(values: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_options(values)


def _serve_settings(argv: list[str], environ: dict[str, str]) -> Settings:
    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return Settings.from_options(option_values(commands.choices["serve"].parse_args(argv), OPTIONS, environ))


def test_security_options_from_flags_and_environment() -> None:
    flags = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--reflection-open", "--auth-tokens", "tokens"]
    s = _serve_settings(flags, {"FEATURESTORE_HEALTH_PORT": "8081", "FEATURESTORE_REFLECTION_OPEN": "no"})
    assert (s.security.tls_cert, s.security.tls_key, s.security.auth_tokens) == (
        Path("c.pem"),
        Path("k.pem"),
        Path("tokens"),
    )
    assert s.security.reflection_open is True  # the flag wins over the variable
    assert s.security.health_port == 8081 and s.security.tls and s.security.auth
    for text, expected in (("true", True), ("1", True), ("ON", True), ("off", False), ("0", False)):
        assert _serve_settings([], {"FEATURESTORE_REFLECTION_OPEN": text}).security.reflection_open is expected
    with pytest.raises(InvalidArgument, match="FEATURESTORE_REFLECTION_OPEN: invalid bool value: 'maybe'"):
        _serve_settings([], {"FEATURESTORE_REFLECTION_OPEN": "maybe"})
    assert _serve_settings([], {}).security == SecuritySettings()


# featurestore hash-token


def _hash_token(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main(["hash-token", *argv])


def test_hash_token_prints_the_line_the_server_reads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _hash_token(monkeypatch, READER + "\n", "--scopes", "read,admin", "--name", "ops") == 0
    out = capsys.readouterr().out
    assert out == f"{hash_token(READER)} read,admin ops\n" and READER not in out
    (tmp_path / "tokens").write_text(out)
    keyring = Keyring(tmp_path / "tokens")
    keyring.load()
    found = keyring.tokens.find(READER)
    assert found is not None and found.scopes == {"read", "admin"}


@pytest.mark.parametrize(
    ("stdin", "argv", "match"),
    [
        ("", [], "no token on stdin"),
        ("short\n", [], "fewer than 16 characters"),
        ("has space in the token 0123\n", [], "token= must be a bearer token"),
        (READER, ["--scopes", "write"], "scopes must be read, admin"),
    ],
    ids=["empty", "short", "space", "scope"],
)
def test_hash_token_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    stdin: str,
    argv: list[str],
    match: str,
) -> None:
    with caplog.at_level(logging.ERROR, logger="featurestore"):
        assert _hash_token(monkeypatch, stdin, *argv) == 2
    assert capsys.readouterr().out == ""
    [record] = caplog.records
    assert record.exc_info is None and match in record.getMessage()
    assert stdin.strip() == "" or stdin.strip() not in record.getMessage()
