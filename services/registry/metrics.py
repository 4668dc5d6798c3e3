"""Prometheus metrics of one registry process, served on 127.0.0.1 when a port is given.

Each process has its own CollectorRegistry (not the library's global one), so tests can build several
services in one interpreter and a scrape shows only the registry's series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.metrics import MetricsEndpoint

__all__ = ["RegistryMetrics"]


class RegistryMetrics(MetricsEndpoint):
    log_name = "registry.metrics"

    def __init__(self, instance: str = "0") -> None:
        super().__init__()
        r = self.registry
        self.collisions = Counter(
            "mp_registry_collisions_resolved",
            "Nonce bumps (hash or fingerprint held by another profile) in plans this process decided",
            ["profile"],
            registry=r,
        )
        self.refused = Counter(
            "mp_registry_claims_refused",
            "Claims refused during resolution, by outcome (HASH_TAKEN, FP_TAKEN, ASSET_TAKEN)",
            ["profile", "outcome"],
            registry=r,
        )
        self.published = Counter(
            "mp_registry_plans_published",
            "Plans this process published to the plans topic",
            ["profile"],
            registry=r,
        )
        self.decided = Counter(
            "mp_registry_plans_decided",
            "Plans this process derived and recorded first",
            ["profile"],
            registry=r,
        )
        self.adopted = Counter(
            "mp_registry_plans_adopted",
            "Plans recorded by another replica (or already on the topic at start), taken as they are",
            ["profile", "source"],
            registry=r,
        )
        self.divergent = Counter(
            "mp_registry_divergent_resolutions",
            "Resolutions that lost the decision with a different plan than the winner's (their keys released)",
            ["profile"],
            registry=r,
        )
        self.recoveries = Counter(
            "mp_registry_recoveries",
            "Recoveries of the claim set: rebuilt (from the plans topic) or rejoined (after another's rebuild)",
            ["kind"],
            registry=r,
        )
        self.reclaimed = Counter(
            "mp_registry_reclaimed", "Plans re-claimed during recoveries, by outcome", ["outcome"], registry=r
        )
        self.takeovers = Counter(
            "mp_registry_takeovers",
            "Decided plans published by this process after their owner's lease ran out",
            registry=r,
        )
        self.rotations = Counter(
            "mp_registry_rotations",
            "Early rotations (operator rotate commands) applied by this process, published or adopted",
            ["profile"],
            registry=r,
        )
        self.epoch = Gauge(
            "mp_registry_current_epoch", "Epoch of the profile's current plan", ["profile"], registry=r
        )
        self.info = Gauge(
            "mp_registry_instance_info", "Constant 1, labelled with the instance", ["instance"], registry=r
        )
        self.info.labels(instance=instance).set(1)
