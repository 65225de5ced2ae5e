"""requirements.lock pins every dependency both README commands install, agrees with the
hand-kept pins of constraints.txt, names the command that regenerates it, and is what
scripts/install.sh installs under."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def locked() -> dict[str, set[str]]:
    """Each pinned package's versions (one per Python-version marker)."""
    out: dict[str, set[str]] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        out.setdefault(_name(req.name), set()).add(spec.version)
    return out


def test_the_lock_says_how_it_is_made_and_every_line_is_an_exact_pin() -> None:
    head = LOCK.read_text().splitlines()[:6]
    assert any("uv pip compile pyproject.toml" in h for h in head)
    assert any("scripts/lock.sh" in h for h in head)
    assert len(locked()) > 100


def test_every_dependency_of_fedmq_and_its_installed_extras_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in ("test", "flower"):
        wanted += project["optional-dependencies"][extra]
    pins = locked()
    missing = [r for r in wanted if _name(Requirement(r).name) not in pins]
    assert not missing, f"not in requirements.lock (run scripts/lock.sh): {missing}"
    for r in map(Requirement, wanted):
        for version in pins[_name(r.name)]:
            assert r.specifier.contains(version, prereleases=True), (r, version)


def test_the_hand_kept_pins_of_constraints_txt_are_the_locks() -> None:
    pins = locked()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert pins[_name(req.name)] == {spec.version}, line


def test_both_readme_commands_install_under_the_lock() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "-c requirements.lock" in install
    assert "requirements.lock" in install.split("stamp=")[1].splitlines()[0]
    for script in ("try.sh", "test.sh"):
        assert "scripts/install.sh" in (ROOT / "scripts" / script).read_text()
