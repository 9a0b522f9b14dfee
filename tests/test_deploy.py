"""deploy/: what can be validated here is (Kubernetes schema, systemd-analyze); each check is
shown to fail on a broken copy, so a pass means something."""

from __future__ import annotations

import copy
import shutil
import subprocess

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (the test extra installs it there)
    import tomli as tomllib

import pytest
import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
K8S_VERSION = "1.33.0"


def _validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kubernetes_manifests_validate_against_the_schema():
    import kubernetes_validate

    docs = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Deployment", "Service"]
    for doc in docs:
        _validate(doc)
    worker = next(d for d in docs if d["metadata"]["name"] == "pyorchestrate-worker")
    broken = copy.deepcopy(worker)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo: strict mode sees it
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_the_manifests_wire_the_keys_and_every_port():
    docs = {d["metadata"]["name"] + "/" + d["kind"]: d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text())}
    worker = docs["pyorchestrate-worker/Deployment"]["spec"]["template"]["spec"]
    assert "--keys" in worker["containers"][0]["args"]
    assert "tcp://pyorchestrate-coordinator:5555" in worker["containers"][0]["args"]
    assert "-m 600" in worker["initContainers"][0]["command"][-1]  # the worker refuses looser secrets
    ports = {p["name"]: p["port"] for p in docs["pyorchestrate-coordinator/Service"]["spec"]["ports"]}
    # bus = events + 1 and pulse = bus + 1, as the coordinator binds
    assert ports == {"control": 5555, "events": 5556, "bus": 5557, "pulse": 5558}
    coordinator = docs["pyorchestrate-coordinator/Deployment"]["spec"]["template"]["spec"]
    container = coordinator["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    # the run marker in a volume (it outlives a restarted container), not the container's /tmp
    state = {e["name"]: e["value"] for e in container["env"]}["PYORCHESTRATE_STATE_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == state)
    assert "emptyDir" in next(v for v in coordinator["volumes"] if v["name"] == mount["name"])


def test_the_coordinator_service_keeps_its_run_marker_across_restarts():
    """PrivateTmp gives each start a new /tmp: the marker must be in the service's state directory."""
    unit = (DEPLOY / "systemd" / "pyorchestrate-coordinator.service").read_text()
    assert "PrivateTmp=yes" in unit and "StateDirectory=pyorchestrate-coordinator" in unit
    assert "Environment=PYORCHESTRATE_STATE_DIR=%S/pyorchestrate-coordinator" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_systemd_units_verify(tmp_path):
    assert len(UNITS) == 2
    result = subprocess.run(["systemd-analyze", "verify", *map(str, UNITS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(UNITS[0].read_text().replace("ExecStart=/bin/sh", "ExecStart=sh-not-an-absolute-path"))
    bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 or bad.stderr.strip()


def test_the_dockerfile_runs_the_worker_command_as_an_unprivileged_user():
    # no container daemon here to build it: check what it names exists
    text = (DEPLOY / "Dockerfile").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["pyorchestrate-worker"]' in text and "pyorchestrate-worker" in scripts
    assert "USER pyorchestrate" in text and "ENV PYORCHESTRATE_KEYS=/keys" in text
