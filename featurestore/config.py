"""The server's settings: grouped, frozen, validated on construction, read once at the edge.

    settings = Settings(
        repo=Path("feature_repo"),
        redis_url="redis://:secret@10.0.0.5:6379/0",
        server=ServerSettings(port=50051, workers=4),
        cache=CacheSettings(budget_bytes=512 << 20),
    )
    settings.address       # '0.0.0.0:50051'
    settings.models_path   # PosixPath('feature_repo/models.yaml')
    settings               # Settings(repo=..., redis_url='redis://:***@10.0.0.5:6379/0', server=...)

Nothing deeper in the package reads the environment or the command line: the CLI
(featurestore/cli/) builds a `Settings` from flags and environment variables and passes it
down, so a bad setting fails at start-up. Every option is declared once, as a field below
with its default, help text and bounds; `OPTIONS` lists them for the CLI, which builds
`featurestore serve` and its --help from them. A new option is a field in its group,
`field(default=..., metadata=_meta("help text with its unit", ...))`, and an entry
below; tests/unit/test_config.py fails until the entry gives its flag, variable, default
and help text.

Options
-------
Each option is a flag of `featurestore serve` and an environment variable FEATURESTORE_<NAME>,
NAME being the flag without its dashes in upper case (--redis reads FEATURESTORE_REDIS_URL).
A flag wins over the environment, the environment over the default; an empty variable
counts as unset. A value that does not parse or is out of range stops the start with one
line naming the option or the variable (exit code 2). Seconds are floats. A switch (a
flag without a value) is on when given; its variable takes true/false, 1/0, yes/no, on/off.

`Settings` itself:

--repo PATH  FEATURESTORE_REPO  default feature_repo
    The Feast repo folder: feature_store.yaml and its applied registry (and, by default,
    models.yaml).
--redis REDIS_URL  FEATURESTORE_REDIS_URL  default redis://127.0.0.1:6379/0
    The Redis holding the materialized features: redis://[user:password@]host:port/db,
    rediss:// (TLS), unix:// (a socket path), or a Redis Cluster as
    redis+cluster://[user:password@]host:port,host:port,... (rediss+cluster:// for TLS).
    Its password is never printed.

`server` (`ServerSettings`), the gRPC server and its processes:

--host HOST  FEATURESTORE_HOST  default 0.0.0.0
    The interface gRPC listens on (0.0.0.0: every IPv4 interface).
--port N  FEATURESTORE_PORT  default 50051
    The gRPC port, 0 to 65535 (0: any free port; only with one worker).
--workers N  FEATURESTORE_WORKERS  default 1
    Server processes sharing the port (SO_REUSEPORT), one event loop each, 1 to 256; only
    the first one serves /metrics.
--grace-s SECONDS  FEATURESTORE_GRACE_S  default 5 s
    Seconds in-flight calls may take to finish after SIGTERM (health turns NOT_SERVING
    first).
--drain-delay-s SECONDS  FEATURESTORE_DRAIN_DELAY_S  default 2 s
    Seconds between SIGTERM and closing the listener: health answers NOT_SERVING while
    calls are still served, so load balancers and Kubernetes stop sending first; then
    accepted calls get --grace-s to finish. Set it above your health-check interval; a
    second SIGTERM or SIGINT skips what is left of it.
--max-connection-age-s SECONDS  FEATURESTORE_MAX_CONNECTION_AGE_S  default 300 s
    Seconds after which the server asks a client to open a new connection (GOAWAY, calls
    in flight finish within --grace-s), so long-lived clients re-resolve and reach
    replicas added since (0: never).
--metrics-port N  FEATURESTORE_METRICS_PORT  default 0
    The port of the Prometheus /metrics HTTP server, 0 to 65535 (0: no metrics server).
--registry-refresh-s SECONDS  FEATURESTORE_REGISTRY_REFRESH_S  default 30 s
    Seconds between re-reads of the Feast registry and of the models file, so that `feast
    apply` takes effect without a restart (0: never).
--max-rows N  FEATURESTORE_MAX_ROWS  default 10000
    Entity rows allowed in one request, 1 to 10000.
--max-in-flight N  FEATURESTORE_MAX_IN_FLIGHT  default 1000
    Calls one server process runs at once (health and reflection not counted); a call
    beyond it gets RESOURCE_EXHAUSTED at once instead of waiting. 0: no limit.
--redis-timeout-s SECONDS  FEATURESTORE_REDIS_TIMEOUT_S  default 1 s
    The socket timeout of every Redis call in seconds, > 0; a call that takes longer fails
    with UNAVAILABLE.

`cache` (`CacheSettings`), the hot-key row cache (featurestore/cache/hotcache.py):

--cache-bytes N  FEATURESTORE_CACHE_BYTES  default 268435456 (256 MiB)
    The hot-key row cache's budget in bytes, plus a 16 MiB sketch; 0 turns the cache off.
    Under Zipf traffic it serves about 90 percent of rows from memory (bench_hotcache).
--cache-max-staleness-s SECONDS  FEATURESTORE_CACHE_MAX_STALENESS_S  default 5 s
    The longest time in seconds a row rewritten by materialization is still served from
    the cache should the run's announcement be lost (the version poll's lease); > 0 with
    a cache.
--cache-max-age-s SECONDS  FEATURESTORE_CACHE_MAX_AGE_S  default 600 s
    The longest time in seconds any cached row is served after it was read from Redis
    (this covers writes that materialization does not announce); > 0 with a cache.
--hot-publish-s SECONDS  FEATURESTORE_HOT_PUBLISH_S  default 30 s
    Seconds between publications of this server's hot keys to the fleet's hot set (0:
    never).
--warm-budget-s SECONDS  FEATURESTORE_WARM_BUDGET_S  default 10 s
    Seconds start-up may spend warming the cache from the fleet's hot set before health
    turns SERVING.

`index` (`IndexSettings`), the retrieval indexes of embedding views:

--index-refresh-s SECONDS  FEATURESTORE_INDEX_REFRESH_S  default 300 s
    Seconds between checks of every retrieval index against Redis, in case a
    materialization event was lost (0: never).
--index-exact-max N  FEATURESTORE_INDEX_EXACT_MAX  default 50000
    An embedding view with fewer vectors than this gets an exact (flat) index; at and
    above, the --index-approximate one. A count, at least 1.
--index-approximate {hnsw,ivf}  FEATURESTORE_INDEX_APPROXIMATE  default hnsw
    The approximate index of large embedding views: hnsw or ivf.

`inference` (`InferenceSettings`), the models Predict and Rank serve:

--models PATH  FEATURESTORE_MODELS  default unset
    The models file, which declares the ONNX models and their inputs; unset, it is
    models.yaml in the repo. No file there means no models.
--model-threads N  FEATURESTORE_MODEL_THREADS  default 1
    ONNX Runtime intra-op threads of each model, 1 to 256 (a model's intra_op_threads in
    the models file wins). One suits small machines: the server processes already use
    the cores, and more threads per model only contend with them.
--model-poll-s SECONDS  FEATURESTORE_MODEL_POLL_S  default 1 s
    Seconds between checks of the models file and the model files for changes; a
    changed model loads beside the serving one and replaces it once it passed a test run
    (0: only with the registry refresh).

`security` (`SecuritySettings`), TLS, tokens and what is open without them (README
"Security"; featurestore/serving/tls.py and auth.py):

--tls-cert PATH  FEATURESTORE_TLS_CERT  default unset
    The server's certificate chain (PEM). With --tls-key the port speaks TLS only; both
    files are re-read when they change, so new connections get a rotated certificate
    without a restart.
--tls-key PATH  FEATURESTORE_TLS_KEY  default unset
    The private key of --tls-cert (PEM, not encrypted).
--tls-client-ca PATH  FEATURESTORE_TLS_CLIENT_CA  default unset
    Mutual TLS: the CA certificates (PEM) one of which must have signed every client's
    certificate; a client without one is refused in the handshake. Needs --tls-cert;
    re-read when it changes.
--auth-tokens PATH  FEATURESTORE_AUTH_TOKENS  default unset
    The token file: one line per token, `sha256:<hex of the token's SHA-256> <scopes>
    [name]`, scopes read and/or admin (`featurestore hash-token` writes a line). Every
    call but health then needs the metadata `authorization: Bearer <token>`. Re-read
    when it changes.
--auth-token-hashes ENTRIES  FEATURESTORE_AUTH_TOKEN_HASHES  default unset
    Token entries in the token file's format separated by `;`, for deployments that pass
    secrets in the environment: hashes, never the tokens. Adds to --auth-tokens.
--reflection-open  FEATURESTORE_REFLECTION_OPEN  default off
    Serve gRPC reflection without a token when tokens are required (any valid token
    otherwise); without tokens reflection is always open.
--health-port N  FEATURESTORE_HEALTH_PORT  default 0
    A second port, plaintext, that serves only gRPC health, for probes that cannot speak
    TLS (Kubernetes' grpc probe), 0 to 65535 (0: none).
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from featurestore.errors import ConfigError
from featurestore.limits import MAX_ROWS
from featurestore.store.slots import is_cluster_url, parse_cluster_url

__all__ = [
    "GROUPS",
    "MODELS_FILE",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "CacheSettings",
    "IndexSettings",
    "InferenceSettings",
    "Option",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "passwords_in",
    "redact_dsn",
    "redact_text",
    "redact_url",
]

MODELS_FILE = "models.yaml"  # the default models file, next to feature_store.yaml in the repo


# Secrets in connection strings, wherever they appear in a line of text:
# - the password of a URL, scheme://user:PASSWORD@host (up to the last @ of the word: an
#   unencoded @ in a password must not cut the redaction short);
# - a password=VALUE pair: a libpq key=value DSN (quoted or not) or a URL's query string.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^\s'\"]*@")
_PASSWORD_PAIR = re.compile(r"(?P<head>(?<![\w])password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.IGNORECASE)
# A password this short is not searched for as a literal: its stars would garble the text.
_MIN_LITERAL = 4


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every password of a URL or DSN in it replaced by stars, and every one of `secrets`.

    Parameters:
        text: any line: a message, a log record, an exception's text.
        secrets: passwords known to the caller (see `passwords_in`), hidden wherever they
            appear, also outside a URL (a library may quote one alone); those shorter than
            4 characters are left to the patterns.

    Example: redact_text("Redis at redis://:s3cret@10.0.0.5:6379/0 is unreachable")
    gives "Redis at redis://:***@10.0.0.5:6379/0 is unreachable".
    """
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _PASSWORD_PAIR.sub(r"\g<head>***", text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= _MIN_LITERAL:
            text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """`url` with its password replaced by stars, for logs and reprs (also one in its query string).

    Example: redact_url("redis://user:s3cret@10.0.0.5:6379/0") == "redis://user:***@10.0.0.5:6379/0".
    """
    return redact_text(url)


def redact_dsn(dsn: str) -> str:
    """A PostgreSQL DSN with its password replaced by stars, in URL or in key=value form.

    Example: redact_dsn("host=db user=app password='s e'") == "host=db user=app password=***".
    """
    return redact_text(dsn)


def passwords_in(*dsns: str | None) -> tuple[str, ...]:
    """The passwords in Redis URLs and PostgreSQL DSNs, as written and percent-decoded, for `redact_text`.

    Example: passwords_in("redis://:p%40ss@h:6379/0", None, "host=db password=x2y3") == ("p%40ss", "p@ss", "x2y3").
    """
    found: list[str] = []
    for dsn in filter(None, dsns):
        for match in _URL_PASSWORD.finditer(dsn):
            found.append(match.group(0)[len(match.group("head")) : -1])
        for match in _PASSWORD_PAIR.finditer(dsn):
            found.append(match.group(0)[len(match.group("head")) :].strip("'"))
    decoded = [unquote(p) for p in found]
    return tuple(dict.fromkeys(p for pair in zip(found, decoded, strict=True) for p in pair if p))


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the command line and the environment see it (the module docstring lists them).

    Attributes:
        name: e.g. "cache_bytes": the flag is --cache-bytes, the variable FEATURESTORE_CACHE_BYTES,
            and errors name the option so.
        flag: the command-line flag, e.g. "--cache-bytes" ("--redis" for redis_url).
        group: the `Settings` field holding it, e.g. "cache"; "" for `Settings`' own fields.
        attr: its field in that group, e.g. "budget_bytes".
        kind: int, float (seconds), str, Path or bool (a switch: on when its flag is given).
        default: its default value.
        help: what it means, with its unit (the CLI adds the default and the variable).
        choices: the allowed values of a Literal field; empty when any value of `kind` goes.
        bounds: the lowest and highest value of an int.
        above_zero: a float that must be > 0 (the others must be >= 0).
        optional: None is allowed and means what `help` says.
        extra: a further check of the value, raising ConfigError.
    """

    name: str
    flag: str
    group: str
    attr: str
    kind: type[Any]
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    bounds: tuple[int, int] | None = None
    above_zero: bool = False
    optional: bool = False
    extra: Callable[[Any], None] | None = None

    def check(self, value: Any) -> Any:
        """`value` if it is valid for this option (a str becomes a Path); ConfigError naming the option if not.

        Example: OPTIONS_BY_NAME["port"].check(70000) raises
        ConfigError("port must be an integer from 0 to 65535, not 70000").
        """
        if value is None and self.optional:
            return value
        if self.kind is Path:
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{self.name} must be a path, not {value!r}")
            return value if isinstance(value, Path) else Path(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name} must be true or false, not {value!r}")
            return value
        if self.kind is int:
            low, high = self.bounds or (-(2**63), 2**63 - 1)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{self.name} must be an integer from {low} to {high}, not {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{self.name} must be a number of seconds, not {value!r}")
            if self.above_zero and not value > 0:
                raise ConfigError(f"{self.name} must be > 0 seconds, not {value}")
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"{self.name} must be >= 0 seconds, not {value}")
        elif self.choices and value not in self.choices:
            raise ConfigError(f"{self.name} must be {' or '.join(self.choices)}, not {value!r}")
        elif not isinstance(value, str):
            raise ConfigError(f"{self.name} must be a string, not {value!r}")
        if self.extra is not None:
            self.extra(value)
        return value


def _meta(
    help: str,
    *,
    name: str = "",
    flag: str = "",
    bounds: tuple[int, int] | None = None,
    above_zero: bool = False,
    extra: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """The metadata of a settings field: everything its `Option` needs; `name` defaults to the field's."""
    return {
        "option": {"help": help, "name": name, "flag": flag, "bounds": bounds, "above_zero": above_zero, "extra": extra}
    }


def _declare(cls: type[Any]) -> tuple[Option, ...]:
    """The options declared by the fields of `cls` (with group "")."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in fields(cls):
        if "option" not in f.metadata:
            continue
        declared = f.metadata["option"]
        hint, choices, optional = hints[f.name], (), False
        if typing.get_origin(hint) is Literal:
            hint, choices = str, typing.get_args(hint)
        elif type(None) in typing.get_args(hint):
            hint, optional = next(a for a in typing.get_args(hint) if a is not type(None)), True
        name = declared["name"] or f.name
        options.append(
            Option(
                name=name,
                flag=declared["flag"] or "--" + name.replace("_", "-"),
                group="",
                attr=f.name,
                kind=hint,
                default=f.default,
                help=declared["help"],
                choices=choices,
                bounds=declared["bounds"],
                above_zero=declared["above_zero"],
                optional=optional,
                extra=declared["extra"],
            )
        )
    return tuple(options)


def _validate(settings: Any) -> None:
    """Check every option field of `settings` (a frozen dataclass), normalising in place (str -> Path)."""
    for option in _DECLARED[type(settings)]:
        value = getattr(settings, option.attr)
        checked = option.check(value)
        if checked is not value:
            object.__setattr__(settings, option.attr, checked)


def _check_redis_url(url: str) -> None:
    if is_cluster_url(url):
        parse_cluster_url(url)  # ConfigError naming what is wrong, password hidden
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"redis url {redact_url(url)!r} must start with redis://, rediss://, unix:// or redis+cluster://"
        )
    try:
        parts.port  # noqa: B018 - parsed on access; redis-py's ValueError would not name the option
    except ValueError:
        raise ConfigError(f"redis url {redact_url(url)!r} has a port that is not a number from 0 to 65535") from None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The gRPC server and its processes."""

    host: str = field(
        default="0.0.0.0", metadata=_meta("The interface gRPC listens on (0.0.0.0: every IPv4 interface).")
    )
    port: int = field(
        default=50051,
        metadata=_meta("The gRPC port, 0 to 65535 (0: any free port; only with one worker).", bounds=(0, 65535)),
    )
    workers: int = field(
        default=1,
        metadata=_meta(
            "Server processes sharing the port (SO_REUSEPORT), one event loop each, 1 to 256;"
            " only the first one serves /metrics.",
            bounds=(1, 256),
        ),
    )
    grace_s: float = field(
        default=5.0,
        metadata=_meta("Seconds in-flight calls may take to finish after SIGTERM (health turns NOT_SERVING first)."),
    )
    drain_delay_s: float = field(
        default=2.0,
        metadata=_meta(
            "Seconds between SIGTERM and closing the listener: health answers NOT_SERVING while calls are"
            " still served, so load balancers and Kubernetes stop sending first; then accepted calls get"
            " --grace-s to finish. Set it above your health-check interval; a second SIGTERM or SIGINT skips"
            " what is left of it."
        ),
    )
    max_connection_age_s: float = field(
        default=300.0,
        metadata=_meta(
            "Seconds after which the server asks a client to open a new connection (GOAWAY, calls in flight"
            " finish within --grace-s), so long-lived clients re-resolve and reach replicas added since"
            " (0: never)."
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=_meta(
            "The port of the Prometheus /metrics HTTP server, 0 to 65535 (0: no metrics server).", bounds=(0, 65535)
        ),
    )
    registry_refresh_s: float = field(
        default=30.0,
        metadata=_meta(
            "Seconds between re-reads of the Feast registry and of the models file, so that `feast apply`"
            " takes effect without a restart (0: never)."
        ),
    )
    max_rows: int = field(
        default=MAX_ROWS, metadata=_meta(f"Entity rows allowed in one request, 1 to {MAX_ROWS}.", bounds=(1, MAX_ROWS))
    )
    max_in_flight: int = field(
        default=1000,
        metadata=_meta(
            "Calls one server process runs at once (health and reflection not counted); a call beyond it gets"
            " RESOURCE_EXHAUSTED at once instead of waiting. 0: no limit.",
            bounds=(0, 1_000_000),
        ),
    )
    redis_timeout_s: float = field(
        default=1.0,
        metadata=_meta(
            "The socket timeout of every Redis call in seconds, > 0; a call that takes longer fails with UNAVAILABLE.",
            above_zero=True,
        ),
    )

    def __post_init__(self) -> None:
        _validate(self)
        if self.workers > 1 and self.port == 0:
            raise ConfigError("workers > 1 share one port: give an explicit --port, not 0")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The hot-key row cache (featurestore/cache/hotcache.py)."""

    budget_bytes: int = field(
        default=256 << 20,
        metadata=_meta(
            "The hot-key row cache's budget in bytes, plus a 16 MiB sketch; 0 turns the cache off. Under Zipf"
            " traffic it serves about 90 percent of rows from memory (bench_hotcache).",
            name="cache_bytes",
            bounds=(0, 2**62),
        ),
    )
    max_staleness_s: float = field(
        default=5.0,
        metadata=_meta(
            "The longest time in seconds a row rewritten by materialization is still served from the cache"
            " should the run's announcement be lost (the version poll's lease); > 0 with a cache.",
            name="cache_max_staleness_s",
        ),
    )
    max_age_s: float = field(
        default=600.0,
        metadata=_meta(
            "The longest time in seconds any cached row is served after it was read from Redis (this covers"
            " writes that materialization does not announce); > 0 with a cache.",
            name="cache_max_age_s",
        ),
    )
    hot_publish_s: float = field(
        default=30.0,
        metadata=_meta("Seconds between publications of this server's hot keys to the fleet's hot set (0: never)."),
    )
    warm_budget_s: float = field(
        default=10.0,
        metadata=_meta(
            "Seconds start-up may spend warming the cache from the fleet's hot set before health turns SERVING."
        ),
    )

    def __post_init__(self) -> None:
        _validate(self)
        if self.budget_bytes and not (self.max_staleness_s and self.max_age_s):
            raise ConfigError("with a cache, cache_max_staleness_s and cache_max_age_s must be > 0")


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """The retrieval indexes of embedding views (featurestore/retrieval/)."""

    refresh_s: float = field(
        default=300.0,
        metadata=_meta(
            "Seconds between checks of every retrieval index against Redis, in case a materialization event"
            " was lost (0: never).",
            name="index_refresh_s",
        ),
    )
    exact_max: int = field(
        default=50_000,
        metadata=_meta(
            "An embedding view with fewer vectors than this gets an exact (flat) index; at and above, the"
            " --index-approximate one. A count, at least 1.",
            name="index_exact_max",
            bounds=(1, 2**62),
        ),
    )
    approximate: Literal["hnsw", "ivf"] = field(
        default="hnsw",
        metadata=_meta("The approximate index of large embedding views: hnsw or ivf.", name="index_approximate"),
    )

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class InferenceSettings:
    """The models Predict and Rank serve (featurestore/inference/)."""

    models: Path | None = field(
        default=None,
        metadata=_meta(
            f"The models file, which declares the ONNX models and their inputs; unset, it is {MODELS_FILE} in"
            " the repo. No file there means no models."
        ),
    )
    model_threads: int = field(
        default=1,
        metadata=_meta(
            "ONNX Runtime intra-op threads of each model, 1 to 256 (a model's intra_op_threads in the models file"
            " wins). One suits small machines: the server processes already use the cores, and more threads per"
            " model only contend with them.",
            bounds=(1, 256),
        ),
    )
    model_poll_s: float = field(
        default=1.0,
        metadata=_meta(
            "Seconds between checks of the models file and the model files for changes; a changed model loads"
            " beside the serving one and replaces it once it passed a test run (0: only with the registry"
            " refresh)."
        ),
    )

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """TLS, tokens and what is open without them (featurestore/serving/tls.py, auth.py)."""

    tls_cert: Path | None = field(
        default=None,
        metadata=_meta(
            "The server's certificate chain (PEM). With --tls-key the port speaks TLS only; both files are"
            " re-read when they change, so new connections get a rotated certificate without a restart."
        ),
    )
    tls_key: Path | None = field(default=None, metadata=_meta("The private key of --tls-cert (PEM, not encrypted)."))
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_meta(
            "Mutual TLS: the CA certificates (PEM) one of which must have signed every client's certificate;"
            " a client without one is refused in the handshake. Needs --tls-cert; re-read when it changes."
        ),
    )
    auth_tokens: Path | None = field(
        default=None,
        metadata=_meta(
            "The token file: one line per token, `sha256:<hex of the token's SHA-256> <scopes> [name]`,"
            " scopes read and/or admin (`featurestore hash-token` writes a line). Every call but health then"
            " needs the metadata `authorization: Bearer <token>`. Re-read when it changes."
        ),
    )
    auth_token_hashes: str | None = field(
        default=None,
        metadata=_meta(
            "Token entries in the token file's format separated by `;`, for deployments that pass secrets in"
            " the environment: hashes, never the tokens. Adds to --auth-tokens."
        ),
    )
    reflection_open: bool = field(
        default=False,
        metadata=_meta(
            "Serve gRPC reflection without a token when tokens are required (any valid token otherwise);"
            " without tokens reflection is always open."
        ),
    )
    health_port: int = field(
        default=0,
        metadata=_meta(
            "A second port, plaintext, that serves only gRPC health, for probes that cannot speak TLS"
            " (Kubernetes' grpc probe), 0 to 65535 (0: none).",
            bounds=(0, 65535),
        ),
    )

    def __post_init__(self) -> None:
        _validate(self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both (or neither)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @property
    def tls(self) -> bool:
        """Whether the port speaks TLS."""
        return self.tls_cert is not None

    @property
    def auth(self) -> bool:
        """Whether calls need a token (a token file or token hashes are given)."""
        return self.auth_tokens is not None or bool(self.auth_token_hashes)


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Everything `featurestore serve` needs; each group validates itself on construction.

    Parameters:
        repo: the Feast repo folder (with feature_store.yaml and an applied registry).
        redis_url: redis://[:password@]host:port/db (or rediss://, unix://); printed with
            its password hidden.
        server: where and how gRPC serves (`ServerSettings`).
        cache: the hot-key row cache (`CacheSettings`).
        index: the retrieval indexes (`IndexSettings`).
        inference: the models (`InferenceSettings`).
        security: TLS and tokens (`SecuritySettings`).

    The module docstring describes every option; `Settings.from_options` builds one from
    option names, as the command line does.
    """

    repo: Path = field(
        default=Path("feature_repo"),
        metadata=_meta(
            f"The Feast repo folder: feature_store.yaml and its applied registry (and, by default, {MODELS_FILE})."
        ),
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=_meta(
            "The Redis holding the materialized features: redis://[user:password@]host:port/db, rediss://"
            " (TLS), unix:// (a socket path), or a Redis Cluster as"
            " redis+cluster://[user:password@]host:port,host:port,... (rediss+cluster:// for TLS)."
            " Its password is never printed.",
            flag="--redis",
            extra=_check_redis_url,
        ),
    )
    server: ServerSettings = field(default_factory=ServerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    def __post_init__(self) -> None:
        _validate(self)
        for name, group in GROUPS.items():
            if not isinstance(getattr(self, name), group):
                raise ConfigError(f"Settings.{name} must be a {group.__name__}, not {getattr(self, name)!r}")

    def __repr__(self) -> str:
        return (
            f"Settings(repo={self.repo!r}, redis_url={redact_url(self.redis_url)!r}, server={self.server!r},"
            f" cache={self.cache!r}, index={self.index!r}, inference={self.inference!r},"
            f" security={self.security!r})"
        )

    @property
    def address(self) -> str:
        """host:port, where gRPC listens."""
        return f"{self.server.host}:{self.server.port}"

    @property
    def models_path(self) -> Path:
        """The models file: `inference.models`, or models.yaml in the repo when unset."""
        return self.inference.models if self.inference.models is not None else self.repo / MODELS_FILE

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Settings:
        """Settings from option names to values (see `OPTIONS`); options not given keep their defaults.

        Example: Settings.from_options({"redis_url": "redis://r:6379/0", "cache_bytes": 0, "port": 8000})
        gives Settings(redis_url=..., cache=CacheSettings(budget_bytes=0), server=ServerSettings(port=8000)).
        """
        unknown = sorted(set(values) - set(OPTIONS_BY_NAME))
        if unknown:
            raise ConfigError(f"unknown settings {', '.join(unknown)}; the options are {', '.join(OPTIONS_BY_NAME)}")
        own: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in values.items():
            option = OPTIONS_BY_NAME[name]
            (groups[option.group] if option.group else own)[option.attr] = value
        return cls(**own, **{name: GROUPS[name](**kw) for name, kw in groups.items()})


def _groups() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings) if is_dataclass(hints[f.name])}


GROUPS: dict[str, type[Any]] = _groups()
"""The groups of `Settings` by field name: {"server": ServerSettings, "cache": CacheSettings, ...}."""
# Each class's options, read once from its fields (the checks in __post_init__ walk these).
_CLASSES: tuple[type[Any], ...] = (Settings, *GROUPS.values())
_DECLARED: dict[type[Any], tuple[Option, ...]] = {cls: _declare(cls) for cls in _CLASSES}

OPTIONS: tuple[Option, ...] = _DECLARED[Settings] + tuple(
    replace(option, group=group) for group, cls in GROUPS.items() for option in _DECLARED[cls]
)
"""Every option, in the order of the module docstring."""

OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
