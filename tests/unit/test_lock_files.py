"""The lock files (issue #17): requirements.lock (the image) and requirements-dev.lock (the venv) pin every
transitive dependency with hashes, agree with pyproject.toml's pins and with each other (scripts/lock.sh)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a lock file written by uv with --generate-hashes."""
    out: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = norm(m.group(1))
            assert current not in out, f"{path.name}: {current} twice"
            out[current] = (m.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, n = out[current]
            out[current] = (version, n + 1)
    return out


def pins(deps: list[str]) -> dict[str, str]:
    out = {}
    for d in deps:
        m = PIN.match(d)
        assert m, f"pyproject.toml dependency {d!r} is not pinned with =="
        out[norm(m.group(1))] = m.group(2)
    return out


def test_the_lock_files_pin_pyprojects_versions_with_hashes_and_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = locked(ROOT / "requirements.lock")
    dev = locked(ROOT / "requirements-dev.lock")
    for name, version in pins(project["dependencies"]).items():
        assert runtime.get(name, ("",))[0] == version, (
            f"requirements.lock: {name} is not {version}: run `make lock`"
        )
    for name, version in pins(project["optional-dependencies"]["dev"]).items():
        assert dev.get(name, ("",))[0] == version, (
            f"requirements-dev.lock: {name} is not {version}: run `make lock`"
        )
    for name, (version, _) in runtime.items():
        assert dev.get(name, ("",))[0] == version, (
            f"{name} {version} in requirements.lock, not in requirements-dev.lock"
        )
    unhashed = [n for n, (_, h) in {**runtime, **dev}.items() if h == 0]
    assert unhashed == [], f"no hash for {unhashed}"
    # Transitive ones too: more pins than pyproject names (aiohttp alone brings several).
    assert len(runtime) > len(project["dependencies"]) + 10
