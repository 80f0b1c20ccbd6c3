"""Every failure of `featurestore` and `featurestore-materialize` is one clear line and a non-zero exit.

Tried as a new user would: a wrong flag, a missing repo, a Redis or PostgreSQL that is
down, a bad URL, a taken port, Ctrl-C. Each case runs the installed command in a
subprocess and checks its stderr: one line, no traceback. `featurestore serve` is the
exception that proves the rule: its stderr is the server's log, so a failed start may
follow INFO records of the start-up; the failure itself is still one ERROR line, the last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from featurestore.embedded import free_port

BIN = Path(sys.executable).parent
FEATURESTORE = str(BIN / "featurestore")
MATERIALIZE = str(BIN / "featurestore-materialize")
ROOT = Path(__file__).resolve().parents[3]


def _run(
    cmd: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=240)


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a failed command wrote on stderr, after checking there is exactly one and the exit code."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    return lines[0]


def serve_failure(done: subprocess.CompletedProcess[str]) -> str:
    """The ERROR line of a `serve` that could not start; every other line is an INFO record of the start-up."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if " featurestore" in line or "featurestore:" in line]
    errors = [line for line in ours if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert [line for line in ours if " INFO " not in line] == errors, done.stderr
    assert done.stderr.splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on (every interface, as `serve` binds by default)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def silent_redis() -> Iterator[tuple[str, threading.Event]]:
    """A "Redis" that accepts connections and never answers: its URL, and an event set on the first connection."""
    connected = threading.Event()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])
                connected.set()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", connected
    server.close()
    for conn in held:
        conn.close()


def _interrupt_when(proc: subprocess.Popen[str], ready: threading.Event | None = None, line: str = "") -> str:
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group) once `ready` is set or `line` printed."""
    out = ""
    if ready is not None:
        assert ready.wait(60)
    while line and line not in out:
        assert proc.stdout is not None
        chunk = proc.stdout.readline()
        assert chunk, out
        out += chunk
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    return out


# featurestore: usage


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "featurestore: error: the following arguments are required: COMMAND (see featurestore --help)"),
        (["--bogus"], "featurestore: error: the following arguments are required: COMMAND"),
        (["nope"], "featurestore: error: argument COMMAND: invalid choice: 'nope'"),
        (["serve", "--bogus"], "featurestore: error: unrecognized arguments: --bogus"),
        (["serve", "--port", "abc"], "featurestore serve: error: argument --port: invalid int value: 'abc'"),
        (["serve", "--index-approximate", "flat"], "featurestore serve: error: argument --index-approximate"),
        (["demo", "--users", "0"], "featurestore demo: error: argument --users: must be at least 1, not 0"),
        (["cache-status", "--top", "x"], "featurestore cache-status: error: argument --top: invalid int value"),
    ],
)
def test_a_wrong_flag_is_one_line_pointing_at_help(argv: list[str], says: str) -> None:
    assert one_line(_run([FEATURESTORE, *argv]), 2).startswith(says)


def test_a_bad_redis_url_is_one_line() -> None:
    line = one_line(_run([FEATURESTORE, "serve", "--redis", "http://127.0.0.1:6379/0"]), 2)
    assert "redis url 'http://127.0.0.1:6379/0' must start with redis://" in line
    line = one_line(_run([FEATURESTORE, "serve", "--redis", "redis://127.0.0.1:port/0"]), 2)
    assert "has a port that is not a number" in line


# featurestore serve: a start that cannot happen


def test_serve_without_a_repo_fails_with_one_error_line(tmp_path: Path, redis_url: str) -> None:
    done = _run([FEATURESTORE, "serve", "--repo", str(tmp_path / "absent"), "--redis", redis_url, "--port", "0"])
    assert f"no feature_store.yaml in {tmp_path / 'absent'}" in serve_failure(done)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_taken_port_fails_with_one_error_line(
    feature_repo: Path, redis_url: str, taken_port: int, workers: int
) -> None:
    serve = [FEATURESTORE, "serve", "--repo", str(feature_repo), "--redis", redis_url]
    done = _run([*serve, "--port", str(taken_port), "--workers", str(workers)])
    assert f"cannot bind gRPC to 0.0.0.0:{taken_port}" in serve_failure(done)  # once, whatever the workers


def test_serve_with_a_taken_metrics_port_fails_with_one_error_line(
    feature_repo: Path, redis_url: str, taken_port: int
) -> None:
    serve = [FEATURESTORE, "serve", "--repo", str(feature_repo), "--redis", redis_url, "--host", "127.0.0.1"]
    done = _run([*serve, "--port", "0", "--metrics-port", str(taken_port)])
    assert f"cannot serve /metrics on port {taken_port}: Address already in use" in serve_failure(done)


def test_cache_status_of_a_server_that_is_not_there_is_one_line() -> None:
    target = f"127.0.0.1:{free_port()}"
    assert one_line(_run([FEATURESTORE, "cache-status", "--target", target]), 1).startswith(
        f"cache-status: {target}: UNAVAILABLE"
    )


# featurestore demo


def test_demo_without_a_repo_is_one_line(tmp_path: Path) -> None:
    line = one_line(_run([FEATURESTORE, "demo", "--once"], cwd=tmp_path), 2)
    assert f"no feature_store.yaml in {tmp_path / 'feature_repo'}: run from the project's folder" in line


def test_demo_on_a_taken_port_is_one_line(taken_port: int, tmp_path: Path) -> None:
    done = _run([FEATURESTORE, "demo", "--once", "--port", str(taken_port), "--data-dir", str(tmp_path)], cwd=ROOT)
    assert f"port {taken_port} is not free" in one_line(done, 2)
    assert not (tmp_path / "redis").exists()  # refused before starting anything


def test_a_failing_demo_step_is_one_line_pointing_at_its_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    (repo / "broken.py").write_text("from feast import Entity\nEntity(name=)\n")  # feast apply cannot import it
    data = tmp_path / "data"
    done = _run([FEATURESTORE, "demo", "--once", "--port", "0", "--repo", str(repo), "--data-dir", str(data)])
    line = one_line(done, 2)
    assert "feast apply failed (exit 1): " in line and line.endswith(f"; see {data / 'demo.log'}")
    assert "Traceback" in (data / "demo.log").read_text()  # the details are kept, out of the way


def test_ctrl_c_during_the_demo_is_one_line_and_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [FEATURESTORE, "demo", "--port", "0", "--users", "200000", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    _interrupt_when(proc, line="==> generating demo data")
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert one_line(done, 130).endswith("featurestore ERROR interrupted")
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # Redis, PostgreSQL and the step's program are gone
        os.killpg(proc.pid, 0)


# featurestore-materialize


def test_materialize_usage_errors_are_one_line() -> None:
    assert one_line(_run([MATERIALIZE]), 2).startswith("featurestore-materialize: error: the following arguments")
    assert "unrecognized arguments: --bogus" in one_line(_run([MATERIALIZE, "incremental", "--bogus"]), 2)
    assert "argument --batch-rows: invalid int value" in one_line(_run([MATERIALIZE, "--batch-rows", "x", "warm"]), 2)
    assert "not an ISO 8601 time" in one_line(_run([MATERIALIZE, "backfill", "--start", "x", "--end", "y"]), 2)


def test_materialize_configuration_errors_are_one_line(tmp_path: Path, feature_repo: Path, redis_url: str) -> None:
    line = one_line(_run([MATERIALIZE, "--repo", str(tmp_path), "incremental"]), 3)
    assert line == f"featurestore-materialize: no feature_store.yaml in {tmp_path}: point --repo at a Feast repo"
    for url, says in (("http://h:1/0", "must start with redis://"), ("redis://h:x/0", "port that is not a number")):
        assert says in one_line(_run([MATERIALIZE, "--repo", str(feature_repo), "--redis", url, "incremental"]), 3)
    done = _run([MATERIALIZE, "--repo", str(feature_repo), "--redis", redis_url, "--views", "nope", "incremental"])
    assert "unknown feature view 'nope'" in one_line(done, 2)


def test_materialize_with_redis_or_postgres_down_is_one_line(feature_repo: Path, redis_url: str, pg_dsn: str) -> None:
    down = f"127.0.0.1:{free_port()}"
    repo = ["--repo", str(feature_repo)]
    done = _run([MATERIALIZE, *repo, "--redis", f"redis://{down}/0", "--dsn", pg_dsn, "incremental"])
    assert f"Redis at redis://{down}/0 is unreachable" in one_line(done, 4)
    done = _run([MATERIALIZE, *repo, "--redis", redis_url, "--dsn", f"postgresql://postgres@{down}/x", "incremental"])
    assert f"PostgreSQL at postgresql://postgres@{down}/x is unreachable" in one_line(done, 4)
    done = _run([MATERIALIZE, *repo, "--redis", f"redis://{down}/0", "warm"])
    assert "Redis is unreachable" in one_line(done, 4)


def test_ctrl_c_of_materialize_is_one_line(
    feature_repo: Path, pg_dsn: str, silent_redis: tuple[str, threading.Event]
) -> None:
    url, connected = silent_redis
    proc = subprocess.Popen(
        [MATERIALIZE, "--repo", str(feature_repo), "--redis", url, "--dsn", pg_dsn, "incremental"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _interrupt_when(proc, ready=connected)
    out, err = proc.communicate(timeout=60)
    line = one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130)
    assert line == "featurestore-materialize: interrupted; watermarks did not move"


def _when_loaded(pid: int, library: str, timeout_s: float = 20.0) -> bool:
    """Wait until process `pid` has mapped a shared library whose path holds `library`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if library in Path(f"/proc/{pid}/maps").read_text():
                return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("command", [FEATURESTORE, MATERIALIZE])
@pytest.mark.parametrize("after_s", [0.0, 0.03, 0.1])
def test_ctrl_c_while_the_command_imports_is_one_line(command: str, after_s: float) -> None:
    """SIGINT once gRPC's extension is loaded (the command is importing its modules: the
    window before main() used to end in a traceback), and a little later."""
    proc = subprocess.Popen([command, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _when_loaded(proc.pid, "cygrpc")
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    if proc.returncode in (0, -signal.SIGINT):  # --help was done: exit 0, or the signal came while Python shut down
        assert "Traceback" not in err and len(err.splitlines()) <= 1, err
    else:
        assert one_line(done, 130).endswith("interrupted")
