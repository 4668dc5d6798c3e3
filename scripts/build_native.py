"""Compile the modules of scripts/native_modules.txt with mypyc, in place (issue 16 item 5).

    .venv/bin/python scripts/build_native.py           # build (the Makefile's install step runs it)
    .venv/bin/python scripts/build_native.py --clean   # remove every compiled module: the .py run again

Each module gets an extension next to its .py (services/strategy/signals.cpython-311-*.so), which Python's
import prefers to the .py, plus one shared library for the group (services/native__mypyc.*.so: under a
package, because the editable install maps only the packages, not the repository root). A stale extension
would shadow an edited .py, so the build writes build/native/stamp.json (each source's sha256) and
tests/unit/test_native_build.py fails when a source no longer matches it; the Makefile rebuilds when one
changes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "scripts" / "native_modules.txt"
BUILD = ROOT / "build" / "native"
STAMP = BUILD / "stamp.json"
GROUP = "services.native"  # the shared library: services/native__mypyc.*.so


def sources() -> list[str]:
    """The compiled modules' paths, relative to the repository root."""
    lines = (line.strip() for line in LIST.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions() -> list[Path]:
    """Every compiled module in the tree, whether or not the list still names it."""
    found: list[Path] = []
    for pkg in ("shared", "services", "mpctl"):
        found.extend(sorted((ROOT / pkg).rglob("*.so")))
    return found


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py before anything else, so their extensions are not imported."""

    def __init__(self, modules: dict[str, str]) -> None:
        self.modules = modules

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        rel = self.modules.get(fullname)
        return None if rel is None else importlib.util.spec_from_file_location(fullname, ROOT / rel)


def force_interpreted() -> None:
    """Import the listed modules from their .py even where they are compiled (a benchmark's baseline); call it
    before any of them is imported."""
    loaded = [m for m in (module_name(p) for p in sources()) if m in sys.modules]
    if loaded:
        raise RuntimeError(f"force_interpreted: {loaded} already imported")
    sys.meta_path.insert(0, _SourceFirst({module_name(p): p for p in sources()}))


def compiled_modules() -> list[str]:
    """The listed modules imported from an extension in this process."""
    return [
        m
        for m in (module_name(p) for p in sources())
        if (mod := sys.modules.get(m)) is not None and (mod.__file__ or "").endswith(".so")
    ]


def clean() -> None:
    for so in extensions():
        so.unlink()
    shutil.rmtree(BUILD, ignore_errors=True)


def _build_ext_class() -> type:
    from setuptools.command.build_ext import build_ext

    class BuildExt(build_ext):  # type: ignore[misc]
        """build_ext compiling one extension's C files in parallel: the group's library is most of the build
        (mypyc's multi_file splits it by module), and distutils compiles an extension's files one by one."""

        def build_extension(self, ext: Any) -> None:
            compiler = self.compiler
            if not getattr(compiler, "_mpctl_parallel", False):
                serial = compiler._compile

                def compile_all(
                    sources: list[str],
                    output_dir: str | None = None,
                    macros: Any = None,
                    include_dirs: Any = None,
                    debug: bool = False,
                    extra_preargs: Any = None,
                    extra_postargs: Any = None,
                    depends: Any = None,
                ) -> list[str]:
                    # distutils' CCompiler.compile, with the files spread over the cores.
                    macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                        output_dir, macros, include_dirs, sources, depends, extra_postargs
                    )
                    cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
                    jobs = [(obj, *build[obj]) for obj in objects if obj in build]
                    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                        for f in [
                            pool.submit(serial, o, src, e, cc_args, extra_postargs, pp_opts)
                            for o, src, e in jobs
                        ]:
                            f.result()
                    return list(objects)

                compiler.compile = compile_all
                compiler._mpctl_parallel = True
            super().build_extension(ext)

    return BuildExt


def toolchain_missing() -> str | None:
    """Why no extension can be built here (no C compiler, no Python headers), or None."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(cc) is None:
        return f"no C compiler {cc!r} on PATH"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"no Python headers ({header} is missing)"
    return None


def build() -> None:
    # Imported here: mypy is a development dependency (requirements-dev.lock), --clean works without it.
    from mypyc.build import mypycify
    from setuptools import Distribution

    paths = sources()
    for p in paths:
        if not (ROOT / p).is_file():
            raise SystemExit(f"scripts/native_modules.txt: {p!r} is not a file")
    clean()  # a module dropped from the list must not keep its old extension
    BUILD.mkdir(parents=True)
    missing = toolchain_missing()
    if missing:
        # The .py run as before; the stamp records why, so make does not try again on every call.
        print(f"build_native: not compiling ({missing}); the modules run interpreted", file=sys.stderr)
        STAMP.write_text(json.dumps({"built": False, "reason": missing}, indent=2) + "\n")
        return
    t0 = time.perf_counter()
    os.chdir(ROOT)  # mypycify takes the paths and the mypy configuration (pyproject.toml) from here
    exts = mypycify(
        paths,
        opt_level="3",
        group_name=GROUP,
        target_dir=str(BUILD / "c"),
        multi_file=True,  # several C files: compiled in parallel below (CI has two cores)
    )
    for ext in exts:
        # With a dotted group name and multi_file, mypyc writes the group's header under services/ but the
        # split C files at the top of target_dir, which include it by its bare name.
        ext.include_dirs.append(str(BUILD / "c" / "services"))
    t1 = time.perf_counter()
    dist = Distribution(
        {"name": "mpctl-native", "ext_modules": exts, "cmdclass": {"build_ext": _build_ext_class()}}
    )
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(BUILD / "temp")
    dist.run_command("build_ext")
    t2 = time.perf_counter()
    stamp = {
        "built": True,
        "python": sys.version.split()[0],
        "sources": {p: digest(ROOT / p) for p in paths},
        "modules": {module_name(p): p for p in paths},
    }
    STAMP.write_text(json.dumps(stamp, indent=2) + "\n")
    print(
        f"build_native: {len(paths)} modules in {t2 - t0:.1f} s (mypyc {t1 - t0:.1f} s, C compiler {t2 - t1:.1f} s)",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules and build/native")
    args = ap.parse_args(argv)
    if args.clean:
        clean()
    else:
        build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
