"""deploy/Dockerfile, read as text: there is no Docker engine on the project's machines or in CI,
so the image is never built here; these checks keep the file in step with the package."""

from __future__ import annotations

import json
import re
import tomllib

from deploy_render import DEPLOY, ROOT, dockerfile_instructions, entrypoint, find, pod_spec, workloads

INSTRUCTIONS = dockerfile_instructions()


def _final_stage() -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(INSTRUCTIONS) if word == "FROM"]
    return INSTRUCTIONS[starts[-1] :]


def _arg_default(name: str) -> str:
    for word, rest in INSTRUCTIONS:
        if word == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


def test_every_stage_starts_from_python_3_11_slim() -> None:
    bases = [rest.split()[0] for word, rest in INSTRUCTIONS if word == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: _arg_default(m.group(1)), base) for base in bases]
    assert resolved and set(resolved) == {"python:3.11-slim"}


def test_the_image_runs_featurestore_serve_as_its_console_script() -> None:
    assert entrypoint() == ["featurestore", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["featurestore"] == "featurestore.cli:featurestore"
    assert "featurestore-materialize" in scripts  # the jobs' command


def test_the_package_is_installed_with_its_cpu_extra() -> None:
    runs = " ".join(rest for word, rest in INSTRUCTIONS if word == "RUN")
    assert re.search(r"pip install [\"']?\.\[cpu\][\"']?", runs), runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("faiss-cpu") for dep in extras["cpu"])


def _user() -> tuple[int, int]:
    users = [rest for word, rest in _final_stage() if word == "USER"]
    assert users, "the final stage sets no USER: the server would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and group.isdigit(), "a numeric user:group, so runAsNonRoot can check it"
    return int(user), int(group)


def test_the_image_runs_as_a_non_root_user_that_exists() -> None:
    uid, gid = _user()
    assert uid != 0 and gid != 0
    runs = " ".join(rest for word, rest in _final_stage() if word == "RUN")
    assert re.search(rf"useradd .*--uid {uid}\b", runs) and re.search(rf"--gid {gid}\b", runs), runs
    # The last USER comes after everything that writes into the image.
    last_user = max(i for i, (word, _) in enumerate(INSTRUCTIONS) if word == "USER")
    assert all(word not in ("RUN", "COPY", "ADD") for word, _ in INSTRUCTIONS[last_user:])


def test_the_pods_run_as_the_image_user() -> None:
    uid, gid = _user()
    for source, workload, _ in workloads():
        spec = pod_spec(workload)
        assert spec is not None
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid), source


def test_the_feast_repo_is_baked_with_its_registry_checked_at_build_time() -> None:
    copies = [rest.split() for word, rest in _final_stage() if word == "COPY" and "--from" not in rest]
    assert ["feature_repo", "/srv/feature_repo"] in copies
    env = " ".join(rest for word, rest in _final_stage() if word == "ENV")
    assert "FEATURESTORE_REPO=/srv/feature_repo" in env
    runs = " ".join(rest for word, rest in _final_stage() if word == "RUN")
    assert "test -f /srv/feature_repo/data/registry.db" in runs
    assert "load_registry" in runs  # compiled once at build time: pods start without importing Feast


def test_the_ignore_file_lets_every_copied_path_through() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    kept = {line[1:].strip().rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        part.rstrip("/")
        for word, rest in INSTRUCTIONS
        if word == "COPY" and "--from" not in rest
        for part in rest.split()[:-1]
        if not part.startswith("--")
    }
    assert copied <= kept, f"copied but ignored: {sorted(copied - kept)}"
    assert "feature_repo/data/registry.db" in kept


def test_the_exposed_ports_are_the_servers() -> None:
    exposed = {int(p) for word, rest in INSTRUCTIONS if word == "EXPOSE" for p in rest.split()}
    for _, workload, context in workloads():
        if workload["kind"] != "Deployment":
            continue
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert {p["containerPort"] for p in container["ports"]} == exposed
        config = find(context, "ConfigMap", "featurestore-server")["data"]
        assert {int(config["FEATURESTORE_PORT"]), int(config["FEATURESTORE_METRICS_PORT"])} == exposed


def test_entrypoint_is_exec_form() -> None:
    (rest,) = [rest for word, rest in INSTRUCTIONS if word == "ENTRYPOINT"]
    assert isinstance(json.loads(rest), list)  # shell form would put /bin/sh between SIGTERM and the server
