"""Going live is explicit in every way the stack starts: the execution worker's check (MPCTL_LIVE), and what
compose and Kubernetes render for a live config (the committed files render the paper template: unchanged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mpctl import compose, k8s
from services.execution.bootstrap import LIVE_ENV, live_consent_problem
from shared.config import AppConfig, load_config

TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "coinbase_profiles.yaml"


def config(mode: str) -> AppConfig:
    cfg = load_config(TEMPLATE)
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"mode": mode})})


def test_the_worker_starts_live_only_with_mpctl_live_1() -> None:
    assert live_consent_problem(config("paper"), {}) is None
    assert live_consent_problem(config("live"), {LIVE_ENV: "1"}) is None
    for env, said in (({}, "it is not set"), ({LIVE_ENV: "0"}, "it is '0'"), ({LIVE_ENV: "true"}, "'true'")):
        problem = live_consent_problem(config("live"), env)
        assert problem is not None and said in problem
        assert "mpctl live check" in problem and "mpctl run --live" in problem


def _compose_env(cfg: AppConfig) -> dict[str, Any]:
    services = yaml.safe_load(compose.render_compose(cfg))["services"]
    return {name: s.get("environment") or {} for name, s in services.items()}


def test_compose_takes_mpctl_live_from_the_shell_for_a_live_config_only() -> None:
    paper = _compose_env(config("paper"))
    assert not any(LIVE_ENV in env for env in paper.values())
    live = _compose_env(config("live"))
    for name, env in live.items():
        if name.startswith("execution-"):
            assert env[LIVE_ENV] == "${MPCTL_LIVE:-0}"  # `MPCTL_LIVE=1 docker compose up`; else refused
        else:
            assert LIVE_ENV not in env
    assert f"{LIVE_ENV}=1 docker compose up -d" in compose.render_compose(config("live"))


def _k8s_env(cfg: AppConfig, live: bool) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for o in k8s.workload_objects(cfg, live=live):
        if o["kind"] == "Deployment":
            out[o["metadata"]["name"]] = o["spec"]["template"]["spec"]["containers"][0].get("env") or []
    return out


def test_k8s_renders_mpctl_live_1_only_with_live() -> None:
    assert not any(LIVE_ENV in str(env) for env in _k8s_env(config("paper"), False).values())
    for live, value in ((False, "0"), (True, "1")):
        for name, env in _k8s_env(config("live"), live).items():
            found = [e["value"] for e in env if e["name"] == LIVE_ENV]
            assert found == ([value] if name.startswith("execution-") else []), name
