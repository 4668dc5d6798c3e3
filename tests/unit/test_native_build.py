"""The compiled modules (scripts/build_native.py, mypyc) are built from the .py beside them.

Python imports an extension before the .py of the same name, so an extension built from an older source would
run instead of the code in the tree, silently. The build records each source's sha256 in build/native/
stamp.json; these tests fail as soon as a source, the list or the set of extensions no longer matches it.
Without any extension (nothing built, e.g. the image) the .py run and there is nothing to check.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import build_native  # noqa: E402

REBUILD = "rebuild: make native (or .venv/bin/python scripts/build_native.py)"


def _stamp() -> dict[str, object] | None:
    return json.loads(build_native.STAMP.read_text()) if build_native.STAMP.is_file() else None


def test_no_extension_without_a_stamp() -> None:
    found = build_native.extensions()
    stamp = _stamp()
    if stamp is None or not stamp.get("built"):
        assert not found, (
            f"extensions {[str(p.relative_to(ROOT)) for p in found]} but no build stamp; {REBUILD}"
        )


def test_extensions_built_from_these_sources() -> None:
    stamp = _stamp()
    if stamp is None or not stamp.get("built"):
        pytest.skip("no compiled modules: the .py run")
    recorded = stamp["sources"]
    assert isinstance(recorded, dict)
    listed = build_native.sources()
    assert sorted(recorded) == sorted(listed), (
        f"built from {sorted(recorded)}, scripts/native_modules.txt lists {sorted(listed)}; {REBUILD}"
    )
    for path, sha in recorded.items():
        now = hashlib.sha256((ROOT / path).read_bytes()).hexdigest()
        assert now == sha, f"{path} changed since its extension was built (sha256 {now} != {sha}); {REBUILD}"
    assert stamp["python"] == sys.version.split()[0], (
        f"built for Python {stamp['python']}, running {sys.version.split()[0]}; {REBUILD}"
    )
    # Exactly one extension per listed module, plus the group's shared library: no leftover of an older list.
    names = {p.relative_to(ROOT).as_posix().split(".")[0] for p in build_native.extensions()}
    expected = {p.removesuffix(".py") for p in listed} | {build_native.GROUP.replace(".", "/") + "__mypyc"}
    assert names == expected, f"extensions {sorted(names)}, expected {sorted(expected)}; {REBUILD}"


def test_listed_modules_import_compiled() -> None:
    stamp = _stamp()
    if stamp is None or not stamp.get("built"):
        pytest.skip("no compiled modules: the .py run")
    for path in build_native.sources():
        mod = importlib.import_module(build_native.module_name(path))
        assert mod.__file__ is not None and mod.__file__.endswith(".so"), (
            f"{mod.__name__} imported from {mod.__file__}, not its extension"
        )
