"""The declared dependency minimums exclude versions with known vulnerabilities.

urllib3 < 2.6.0 let a tiny multi-gzipped body decompress far past any size cap
(CVE-2025-66418, CVE-2025-66471); < 2.6.3 also has CVE-2026-21441. requests < 2.32.4
leaks .netrc credentials to other hosts (CVE-2024-47081) and < 2.32.0 keeps
verify=False on a pooled connection (CVE-2024-35195).
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import holysheep_lb

SAFE_MINIMUMS = {"urllib3": Version("2.6.3"), "requests": Version("2.32.4")}
VULNERABLE = {"urllib3": ("1.26.20", "2.0.0", "2.5.0", "2.6.0", "2.6.2"),
              "requests": ("2.28.0", "2.31.0", "2.32.0", "2.32.3")}
SETUP_CFG = Path(holysheep_lb.__file__).resolve().parent.parent / "setup.cfg"


def _install_requires():
    if not SETUP_CFG.exists():
        pytest.skip("not run from a source checkout")
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG, encoding="utf-8")
    lines = parser["options"]["install_requires"].strip().splitlines()
    return {req.name.lower(): req for req in map(Requirement, filter(None, map(str.strip, lines)))}


@pytest.mark.parametrize("name", sorted(SAFE_MINIMUMS))
def test_the_declared_requirement_refuses_every_vulnerable_version(name):
    requirement = _install_requires()[name]
    allowed = [v for v in VULNERABLE[name] if requirement.specifier.contains(v, prereleases=True)]
    assert not allowed, f"{requirement} allows vulnerable versions {allowed}"
    assert requirement.specifier.contains(str(SAFE_MINIMUMS[name]))


@pytest.mark.parametrize("name", sorted(SAFE_MINIMUMS))
def test_the_installed_version_is_not_vulnerable(name):
    from importlib.metadata import version

    assert Version(version(name)) >= SAFE_MINIMUMS[name]
