"""What a profile's workers load, and the forked host that lets several profiles share it (#16 item 3).

The imports are run in a fresh interpreter (a subprocess) whose sys.modules is then inspected: a paper execution
worker, its entry point imported and its service built, has not loaded ccxt (only live mode loads the ccxt
adapter); a strategy worker, built, has loaded neither faust (it consumes with the project's own loop since
issue 16), nor a web server (aiohttp's server side), nor ccxt. Nothing here is timed, nothing needs a broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpctl.stack import PROFILES_PER_PROCESS_ENV, profile_groups, profiles_per_process
from shared.forkhost import argv_for, profile_arg, profiles_of

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"


def modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after `code` ran."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def settings_code(service: str) -> str:
    return f"""
        from shared.runtime import ServiceSettings
        settings = ServiceSettings(
            kafka={{"servers": "127.0.0.1:1"}}, config_path={str(TEMPLATE)!r}, profile="profile_a", namespace="imports"
        )
        import services.{service}.__main__ as entry
        for name in entry.PRELOAD:
            __import__(name)
    """


def test_paper_execution_worker_does_not_load_ccxt() -> None:
    mods = modules_after(
        settings_code("execution")
        + """
        from services.execution.bootstrap import bootstrap
        svc = bootstrap(settings)
        assert svc.cfg.system.mode == "paper"
        """
    )
    assert "services.execution.bootstrap" in mods
    loaded = sorted(
        m for m in mods if m == "ccxt" or m.startswith(("ccxt.", "services.execution.ccxt_adapter"))
    )
    assert loaded == []
    assert "services.execution.live_wiring" not in mods


def test_strategy_worker_loads_neither_faust_nor_a_web_server_nor_ccxt() -> None:
    mods = modules_after(
        settings_code("strategy")
        + """
        from services.strategy.bootstrap import bootstrap
        worker = bootstrap(settings)
        assert worker.profile_id
        """
    )
    assert "services.strategy.bootstrap" in mods  # the worker was built
    loaded = sorted(
        m
        for m in mods
        if m in ("faust", "mode", "ccxt") or m.startswith(("faust.", "mode.", "aiohttp.web", "ccxt."))
    )
    assert loaded == []


def test_host_command_line_per_profile() -> None:
    argv = ["--bootstrap", "b:1", "--profile", "a,b,c", "--log-level", "WARNING"]
    assert profile_arg(argv) == "a,b,c"
    assert profiles_of("a,b,c") == ["a", "b", "c"]
    assert profiles_of("a") == ["a"]
    assert argv_for(argv, "b", ["a", "b", "c"]) == [
        "--bootstrap",
        "b:1",
        "--profile",
        "b",
        "--log-level",
        "WARNING",
    ]
    assert argv_for(["--profile=a,b"], "a", ["a", "b"]) == ["--profile=a"]
    # Metrics on: each profile's worker serves them on its own port.
    assert argv_for(["--profile", "a,b"], "b", ["a", "b"], 9100)[-2:] == ["--metrics-port", "9101"]


def test_profiles_per_process_setting() -> None:
    assert profiles_per_process({}) == 1
    assert profiles_per_process({PROFILES_PER_PROCESS_ENV: "8"}) == 8
    with pytest.raises(ValueError, match="at least 1"):
        profiles_per_process({PROFILES_PER_PROCESS_ENV: "0"})
    with pytest.raises(ValueError, match="whole number"):
        profiles_per_process({PROFILES_PER_PROCESS_ENV: "many"})
    assert profile_groups(["a", "b", "c"], 1) == [["a"], ["b"], ["c"]]
    assert profile_groups(["a", "b", "c"], 2) == [["a", "b"], ["c"]]


def test_forked_host_runs_each_profile_in_its_own_process_and_restarts_a_crash(tmp_path: Path) -> None:
    # In a subprocess: the host installs its own signal handlers.
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from shared.forkhost import serve_forked
        out = Path({str(tmp_path)!r})

        def run_one(profile):
            runs = out / f"{{profile}}.runs"
            with runs.open("a") as fh:
                fh.write(f"{{os.getpid()}} {{os.getppid()}}\\n")
            if profile == "b" and len(runs.read_text().splitlines()) == 1:
                raise RuntimeError("first run of b crashes")
            return 0

        sys.exit(serve_forked(["a", "b", "c"], run_one, name="test", preload=("statistics",)))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    runs = {p: (tmp_path / f"{p}.runs").read_text().splitlines() for p in "abc"}
    assert [len(runs[p]) for p in "abc"] == [1, 2, 1]  # b crashed once and was started again
    pids = {line.split()[0] for lines in runs.values() for line in lines}
    parents = {line.split()[1] for lines in runs.values() for line in lines}
    assert len(pids) == 4  # a process per run
    assert len(parents) == 1  # all forked by the one host
    assert "first run of b crashes" in done.stderr


def test_forked_host_refuses_a_profile_named_twice() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = "from shared.forkhost import serve_forked\nserve_forked(['a', 'a'], lambda p: 0, name='test')"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "named twice" in done.stderr


def test_a_profiles_file_is_parsed_again_only_when_it_changed(tmp_path: Path) -> None:
    from shared.config import load_config

    f = tmp_path / "profiles.yaml"
    f.write_bytes(TEMPLATE.read_bytes())
    first = load_config(f)
    assert load_config(f) is first  # the same content: the parse is reused
    f.write_text(TEMPLATE.read_text().replace("profile_a:", "profile_z:", 1))
    changed = load_config(f)
    assert changed is not first
    assert "profile_z" in changed.profiles and "profile_a" not in changed.profiles
