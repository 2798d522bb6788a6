"""Dependency audit: CI fails when an installed distribution has a known vulnerability.

``pip-audit`` needs a vulnerability service (PyPI's JSON API, or OSV). Whether one answers is
checked first with a *canary*: ``requests==2.19.0`` has a published advisory (CVE-2018-18074), so a
service that works must report it. If the canary comes back unaudited ("not found on PyPI") or the
service cannot be reached, the test **skips, saying why** — a run that audits nothing must neither
look green nor fail the build for lack of network. Otherwise the whole virtualenv is audited
(``pip freeze``, local version labels like torch's ``+cpu`` stripped) with ``--strict``, exactly as
``make audit`` does, and any finding fails with the tool's report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CANARY = "requests==2.19.0"
CANARY_ADVISORIES = {"PYSEC-2018-28", "GHSA-x84v-xcm2-53pg", "CVE-2018-18074"}
SERVICES = [os.environ.get("SEEMLY_AUDIT_SERVICE", "pypi")]
if SERVICES[0] != "osv":
    SERVICES.append("osv")


def pip_audit() -> str:
    found = shutil.which("pip-audit", path=str(Path(sys.executable).parent)) or shutil.which("pip-audit")
    if found is None:
        pytest.fail("pip-audit is not installed: it is in the 'dev' extra (pip install -e '.[dev]')")
    return found


def audit(
    requirements: Path, service: str, *extra: str, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    command = [
        pip_audit(),
        "-r",
        str(requirements),
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
    ]
    command += ["-s", service, "--timeout", "15", "-f", "json", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def findings(report: str) -> dict[str, list[str]]:
    """{distribution==version: [advisory ids]} of a JSON report; {} if the report is not JSON."""
    try:
        data = json.loads(report)
    except ValueError:
        return {}
    out = {}
    for dep in data.get("dependencies", []):
        ids = [v["id"] for v in dep.get("vulns", [])] + [
            a for v in dep.get("vulns", []) for a in v.get("aliases", [])
        ]
        if ids:
            out[f"{dep['name']}=={dep.get('version')}"] = ids
    return out


def working_service(tmp_path: Path) -> str | None:
    """The first service that reports the canary's advisory; None (with reasons printed) if none does."""
    canary = tmp_path / "canary.txt"
    canary.write_text(CANARY + "\n")
    reasons = []
    for service in SERVICES:
        try:
            done = audit(canary, service, timeout=90)
        except subprocess.TimeoutExpired:
            reasons.append(f"{service}: no answer within 90 s")
            continue
        ids = set(next(iter(findings(done.stdout).values()), []))
        if ids & CANARY_ADVISORIES:
            return service
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{service}: canary {CANARY} not reported ({tail[:160]})")
    pytest.skip(
        "no vulnerability service reachable from this machine, nothing audited: " + "; ".join(reasons)
    )
    return None


def frozen(tmp_path: Path) -> Path:
    lines = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(re.sub(r"\+[A-Za-z0-9.]+$", "", line) for line in lines) + "\n")
    return requirements


def test_installed_dependencies_have_no_known_vulnerability(tmp_path: Path) -> None:
    service = working_service(tmp_path)
    assert service is not None
    requirements = frozen(tmp_path)
    assert "pip-audit==" in requirements.read_text() and "+cpu" not in requirements.read_text()
    done = audit(requirements, service, "--strict")
    found = findings(done.stdout)
    assert not found, f"known vulnerabilities ({service}): {found}\n{done.stderr[-2000:]}"
    assert done.returncode == 0, f"pip-audit --strict failed ({service}):\n{done.stderr[-3000:]}"


def test_freeze_strips_local_versions(tmp_path: Path) -> None:
    text = frozen(tmp_path).read_text()
    assert re.search(r"^torch==[0-9.]+$", text, re.M), "torch is audited under its public version"


def test_findings_read_pip_audit_json() -> None:
    report = {
        "dependencies": [
            {
                "name": "requests",
                "version": "2.19.0",
                "vulns": [{"id": "PYSEC-2018-28", "aliases": ["CVE-2018-18074"]}],
            },
            {"name": "numpy", "version": "2.1.0", "vulns": []},
            {"name": "torch", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        ],
        "fixes": [],
    }
    assert findings(json.dumps(report)) == {"requests==2.19.0": ["PYSEC-2018-28", "CVE-2018-18074"]}
    assert findings("not json") == {}
