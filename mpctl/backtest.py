"""`mpctl backtest`: the demo's run in one process, without Kafka or Redis, with the same domain code.

The services' pure cores are driven directly: ingest's `build_schedule`, the registry's handler (claims in an
in-memory store with the Redis script's semantics), each profile's strategy state machine, the arbiter's
`decide`, each profile's paper exchange. Messages travel between them where the services would publish them:
the services' own pure routing functions (services/*/routing.py; their Kafka topics mapped to the cores that
consume them), intents to the arbiter partition that aiokafka's default partitioner (murmur2 of the
product key) gives them. The output files are written by the monitor's `write_outputs`, as in the demo.

Order semantics (docs/backtest.md): per market step, the registry, the arbiter and the paper exchanges get the
step's market data (plans, fills), then every strategy evaluates the step, and intents, step markers,
decisions, orders and fills travel until nothing moves. Strategies stay in lockstep (no profile evaluates step
T+1 before every profile evaluated T), which lets all profiles share one set of indicators. The services'
results do not depend on timing (every consumer waits for complete event-time steps and for the outcomes it
needs), so this order gives the demo's results; tests/e2e/test_backtest_parity.py compares the files.

Shortcuts make it fast, each checked against the exact delivery (`--exact`, tests/unit/test_backtest.py):
- while no intent waits for a decision, step markers only raise the arbiter's marks: the latest one per profile
  and partition is kept and delivered before the arbiter's next input from the intents topic (and a held
  marker is never built: strategy.on_step(..., lazy_marker=True) gives its values, which the arbiter reads
  through arbiter.on_step_marker as decide reads the message);
- a paper exchange without an open order gets no candles, except those an order can still fill at: an order
  fills at the first candle opening at or after its decision, never before the close of its intent's step;
- the registry and the arbiter get whole steps (registry.on_step, arbiter.on_market_step), as their aligners
  would release them, instead of each candle and watermark.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from mpctl.audit import audit_summary_line
from mpctl.commands_config import load_for_command
from mpctl.progress import Progress
from services.arbiter import domain as arbiter
from services.arbiter.routing import route as arbiter_route
from services.execution import domain as execution
from services.execution.routing import route as execution_route
from services.ingest.domain import build_schedule, finished_message
from services.monitor.collect import write_outputs
from services.monitor.domain import RunData
from services.registry import handlers as registry
from services.registry.memory import MemoryRegistry
from services.registry.ports import Backend
from services.registry.routing import route as registry_route
from services.strategy import domain as strategy
from services.strategy.routing import Outputs
from services.strategy.routing import routes as strategy_routes
from shared.aligner import Step
from shared.candles import CandleFile, load_products
from shared.config import AppConfig
from shared.messages import (
    TERMINAL_STATUSES,
    ExecuteOrder,
    Message,
    OrderDecided,
    OrderUpdated,
    PlaceOrder,
    ReplayFinished,
    StepCompleted,
)
from shared.topics import Route, Topics

__all__ = [
    "Backtest",
    "MemoryRegistry",
    "Stats",
    "load_schedule",
    "main",
    "register",
    "run_backtest",
    "run_command",
    "subscriptions",
    "write_report",
]

_FINAL_VERDICTS = frozenset({"approved", "rejected"})


# ------------------------------------------------------------------------------------------ data
def _trim(
    files: dict[str, CandleFile], start: datetime | None, end: datetime | None, hours: float | None
) -> dict[str, CandleFile]:
    """Rows outside the replayed span dropped before `build_schedule` builds a message for each: the same
    bounds as build_schedule ([start, end), then the first `hours` from the first candle kept), so its
    result is unchanged and only the work on rows it would discard is saved."""
    if not files:
        return files

    def ms(d: datetime) -> int:
        return int((d if d.tzinfo is not None else d.replace(tzinfo=UTC)).timestamp()) * 1000

    lo = ms(start) if start else None
    hi = ms(end) if end else None
    if hours is not None and hours > 0 and hours != float("inf"):
        first = (
            lo
            if lo is not None
            else min((cf.rows[0].open_time_ms for cf in files.values() if cf.rows), default=0)
        )
        cap = first + int(hours * 3600) * 1000
        hi = cap if hi is None else min(hi, cap)
    if lo is None and hi is None:
        return files
    out = {}
    for product, cf in files.items():
        rows = tuple(
            r for r in cf.rows if (lo is None or r.open_time_ms >= lo) and (hi is None or r.open_time_ms < hi)
        )
        out[product] = dataclasses.replace(cf, rows=rows)
    return {p: cf for p, cf in out.items() if cf.rows} or files  # nothing left: let build_schedule say why


@contextmanager
def _gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """Loading allocates about ten objects per candle and frees almost none, in no reference cycle: the cyclic
    collector would walk the growing heap again and again for nothing (a third of the loading time). What
    was loaded is then frozen (gc.freeze): the schedule lives as long as the run, and every later full
    collection would walk its million objects again (about a second over a two-year run and its report).
    Frozen objects are still freed by reference counting once the schedule is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


@contextmanager
def _gc_relaxed(young: int = 50_000) -> Iterator[None]:
    """The run allocates messages and records it keeps (RunData) and makes almost no reference cycle: the cyclic
    collector's default of a young collection every 700 allocations (about 400 over a two-year run, and their
    older-generation ones walking the growing records) finds next to nothing. Collections are made rarer, not
    stopped (a cycle is still freed), and the thresholds are restored after."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], young), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def load_schedule(
    cfg: AppConfig,
    data: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    hours: float | None = None,
) -> list[Step]:
    with _gc_paused(freeze=True):
        files = load_products(data, cfg.all_products())
        return build_schedule(_trim(files, start, end, hours), start=start, end=end, hours=hours)


# ------------------------------------------------------------------------------------------ engine
@dataclass
class Stats:
    steps: int = 0
    evaluations: int = 0  # profile-candle evaluations: each profile's evaluated steps times their candles
    messages: int = 0
    seconds: float = 0.0


@dataclass
class _Exchange:
    state: execution.PaperState
    open_orders: set[str] = field(default_factory=set)
    unfed: deque[Step] = field(default_factory=deque)  # market steps not delivered yet (see _market_step)


def subscriptions(topics: Topics, profiles: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Which core reads which topic, as the services subscribe (services/*/bootstrap.py). A core that is given
    a message type it does not use ignores it, so listing a topic too many is harmless and one too few is not;
    tests/unit/test_backtest.py compares this table with the services' own subscriptions."""
    t = topics
    subs: dict[str, list[tuple[str, str]]] = {
        t.candles: [("registry", ""), ("arbiter", ""), *(("execution", p) for p in profiles)],
        t.plans: [("arbiter", ""), *(("strategy", p) for p in profiles)],
        t.intents: [("arbiter", "")],
        t.events: [("strategy", p) for p in profiles],
        t.decisions: [("strategy", p) for p in profiles],
        # Operators' signed commands: none is published in a backtest; listed for completeness.
        t.commands: [("execution", p) for p in profiles],
    }
    for p in profiles:
        subs[t.approved(p)] = [("execution", p)]
    return subs


class Backtest:
    """One run. `exact=True` delivers every step marker and every candle, as the services receive them."""

    def __init__(self, cfg: AppConfig, steps: list[Step], *, exact: bool = False) -> None:
        if not steps:
            raise ValueError("nothing to replay: the schedule has no step")
        self.cfg = cfg
        self.steps = steps
        self.exact = exact
        self.topics = t = Topics(cfg.system.kafka.namespace)
        k = cfg.system.kafka
        self.n_intents = k.intent_partitions
        self.n_candles = k.candle_partitions
        self.profiles = list(cfg.enabled_profiles())
        self.data = RunData()
        self.stats = Stats()
        self.market = strategy.MarketSignals()
        parts = frozenset(range(self.n_candles))
        self.strategies = {
            pid: strategy.new_state(
                pid,
                p,
                cfg.system.quote_asset,
                parts,
                on_rotation=cfg.system.registry.on_rotation,
                market=self.market,
                decision_wait_steps=cfg.system.strategy.decision_wait_steps,
            )
            for pid, p in cfg.enabled_profiles().items()
        }
        self.exchanges = {
            pid: _Exchange(
                execution.new_state(
                    pid,
                    p,
                    cfg.system.execution,
                    parts,
                    profiles_sharing=len(cfg.enabled_profiles()),
                    quote=cfg.system.quote_asset,
                    account_snapshots=True,
                )
            )
            for pid, p in cfg.enabled_profiles().items()
        }
        self.arbiter = arbiter.new_state(cfg)
        self.registry = registry.new_state(cfg)
        # The registry's store port, in memory (the services use the Redis one).
        self.claims: Backend = MemoryRegistry(cfg.system.registry.claim_grace_s)
        # The services' own routing functions (services/*/routing.py), so the backtest follows them.
        self._outputs = {pid: Outputs.of(t, self.n_intents, pid) for pid in self.profiles}
        self._intents_topic = t.intents
        self._subs = subscriptions(t, self.profiles)
        self._market_subs = {kind for kind, _ in self._subs[t.candles]}
        # What the demo's collector reads (services/monitor/collect.py).
        self._collected = {t.candles, t.audit, t.intents, t.events, t.decisions}
        self._partition: dict[tuple[bytes, int], int] = {}
        self._queue: deque[tuple[str, str, int, Message]] = deque()
        # Held step markers, per intents partition and profile: a message, or what strategy.step_marker would build
        # one from (profile, step time, close, intents), delivered without a message (see _flush_markers).
        self._markers: dict[int, dict[str, StepCompleted | tuple[str, int, int, int]]] = {
            p: {} for p in range(self.n_intents)
        }
        self._held_markers = 0
        self._undecided: set[str] = set()  # intents routed to the arbiter and not decided yet
        self._backlog: deque[Step] = deque()
        self._step_messages: dict[int, list[tuple[int, Message]]] = {}  # step time -> its market messages

    # -------------------------------------------------------------------------------- routing
    def _key_partition(self, key: bytes | None, n: int) -> int:
        # aiokafka's DefaultPartitioner (murmur2, as the Java client), which the services' producers use.
        if key is None or n == 1:
            return 0  # unkeyed outputs go to single-partition topics only
        p = self._partition.get((key, n))
        if p is None:
            p = self._partition[(key, n)] = (murmur2(key) & 0x7FFFFFFF) % n
        return p

    def _publish(self, msg: Message, topic: str, key: bytes | None, partition: int | None) -> None:
        """One message on one topic: queued for every core that reads the topic."""
        subs = self._subs.get(topic)
        if not subs:
            return  # audit, status, dead letters: read by no core (the report reads audit, see _collect)
        if topic == self._intents_topic:
            p = partition if partition is not None else self._key_partition(key, self.n_intents)
            if isinstance(msg, PlaceOrder):
                self._undecided.add(msg.intent_id)
            elif not self.exact and not self._undecided and isinstance(msg, StepCompleted) and not msg.final:
                # No intent undecided anywhere: the marker could only raise a mark. The latest one per
                # profile and partition is delivered before the arbiter's next input (or at the end).
                self._markers[p][msg.profile] = msg
                self._held_markers += 1
                return
        else:
            p = partition if partition is not None else 0
        for kind, dest in subs:
            self._queue.append((kind, dest, p, msg))

    def _publish_routes(self, msg: Message, routes: list[Route]) -> None:
        collect = False
        for topic, key, broadcast in routes:
            collect = collect or topic in self._collected
            if broadcast and topic == self._intents_topic:
                for p in range(self.n_intents):
                    self._publish(msg, topic, None, p)
            else:
                self._publish(msg, topic, key.encode() if key is not None else None, None)
        if collect:
            self.data.add(msg)

    def _from_strategy(self, pid: str, msgs: list[Message]) -> None:
        out = self._outputs[pid]
        for msg in msgs:
            dests = strategy_routes(msg, out)
            if dests is out.markers and not self.exact and not self._undecided:
                # The common case, one step marker per profile and step: what _publish would do, inline.
                assert isinstance(msg, StepCompleted)
                if not msg.final:
                    for held in self._markers.values():
                        held[pid] = msg
                    self._held_markers += len(self._markers)
                    self.data.add(msg)
                    continue
            collect = False
            for topic, key, partition in dests:
                collect = collect or topic in self._collected
                self._publish(msg, topic, key, partition)
            if collect:
                self.data.add(msg)

    def _from_lazy_marker(self, pid: str, marker: tuple[int, int, int]) -> None:
        """The step marker that strategy.on_step(..., lazy_marker=True) described instead of building it (its
        last output). Held like the others while markers are held, and delivered to the arbiter without a
        message (arbiter.on_step_marker); otherwise built now and routed as usual."""
        if not self.exact and not self._undecided:
            spec = (pid, *marker)
            for held in self._markers.values():
                held[pid] = spec
            self._held_markers += len(self._markers)
        else:
            self._from_strategy(pid, [strategy.step_marker(pid, *marker)])

    def _from_registry(self, msgs: list[Message]) -> None:
        t = self.topics
        for msg in msgs:
            self._publish_routes(msg, registry_route(msg, t))

    def _from_execution(self, pid: str, msgs: list[Message]) -> None:
        ex = self.exchanges[pid]
        for msg in msgs:
            if isinstance(msg, OrderUpdated):
                if msg.status in TERMINAL_STATUSES:
                    ex.open_orders.discard(msg.client_order_id)
                else:
                    ex.open_orders.add(msg.client_order_id)
            self._publish_routes(msg, execution_route(msg, self.topics, pid))

    def _from_arbiter(self, msgs: list[Message]) -> None:
        for m in msgs:
            if isinstance(m, OrderDecided):
                self._undecided.discard(m.intent_id)
            self._publish_routes(m, arbiter_route(m, self.topics))

    def _flush_markers(self) -> None:
        if self._held_markers:
            self._held_markers = 0
            for p, held in self._markers.items():
                if held:
                    self._markers[p] = {}
                    for m in held.values():
                        if isinstance(m, tuple):
                            # A lazy marker (profile, step time, close, intents), never final: given to the
                            # arbiter as decide would read its message, which is not built.
                            self._from_arbiter(arbiter.on_step_marker(self.arbiter, m[0], m[1], p))
                        else:
                            self._from_arbiter(arbiter.decide(self.arbiter, m, p))

    def _pump(self) -> None:
        q = self._queue
        while q:
            kind, dest, partition, msg = q.popleft()
            self.stats.messages += 1
            if kind == "strategy":
                self._from_strategy(dest, strategy.decide(self.strategies[dest], msg, partition))
            elif kind == "arbiter":
                if isinstance(msg, PlaceOrder | StepCompleted):
                    self._flush_markers()  # held markers precede it on the intents topic
                self._from_arbiter(arbiter.decide(self.arbiter, msg, partition))
            elif kind == "execution":
                if isinstance(msg, ExecuteOrder):
                    self._feed_backlog(dest)
                self._from_execution(dest, execution.decide(self.exchanges[dest].state, msg, partition))

    # -------------------------------------------------------------------------------- market data
    def _market_messages(self, step: Step) -> list[tuple[int, Message]]:
        """What the ingest publishes for a step: each candle on its product's partition, then the watermark
        on every partition. Built when a core needs them (a paper exchange with an order, or --exact), kept
        for the other exchanges that may need the same step."""
        msgs = self._step_messages.get(step.time_s)
        if msgs is None:
            msgs = [(self._key_partition(c.product.encode(), self.n_candles), c) for c in step.candles]
            wm = step.watermark()
            msgs += [(p, wm) for p in range(self.n_candles)]
            if len(self._step_messages) >= 256:
                del self._step_messages[next(iter(self._step_messages))]  # the oldest: a bounded memo
            self._step_messages[step.time_s] = msgs
        return msgs

    def _feed_exchange(self, pid: str, msgs: list[tuple[int, Message]]) -> None:
        state = self.exchanges[pid].state
        for partition, m in msgs:
            self._from_execution(pid, execution.decide(state, m, partition))

    def _feed_backlog(self, pid: str) -> None:
        ex = self.exchanges[pid]
        while ex.unfed:
            self._feed_exchange(pid, self._market_messages(ex.unfed.popleft()))

    def _fill_floor(self, step: Step) -> int:
        """No order still to come can fill at a candle opening before this time (epoch s): its decision is
        not before the close of its intent's step, and that step is waiting for its outcome, waiting to be
        evaluated, or `step` (being delivered) or later."""
        # A protective exit of a step still to evaluate fills on that step's own candle.
        floor = step.time_s
        if self._backlog:
            floor = min(floor, self._backlog[0].time_s)
        for st in self.strategies.values():
            for i in st.pending.values():
                at = i.trigger_candle or i.event_time
                floor = min(floor, int(at.timestamp()))
        return floor

    async def _market_step(self, step: Step) -> None:
        self.data.add_candles(step.candles)
        # 1. Registry: the plans of the epochs this step enters (from candles before the step).
        # 2. Arbiter: the step's market data (its market barrier, marks and returns).
        # Both get the whole step, as their aligners would release it (`--exact`: message by message).
        if self.exact:
            for partition, m in self._market_messages(step):
                self._from_registry(await registry.handle(self.registry, m, partition, self.claims))
        else:
            self._from_registry(await registry.on_step(self.registry, step, self.claims))
        self._pump()
        if "arbiter" in self._market_subs:
            # Another topic than the held markers': Kafka interleaves topics arbitrarily, and so may we.
            if self.exact:
                for partition, m in self._market_messages(step):
                    self._from_arbiter(arbiter.decide(self.arbiter, m, partition))
            else:
                self._from_arbiter(arbiter.on_market_step(self.arbiter, step))
        # 3. Paper exchanges: fills at this step's opens.
        floor: int | None = None
        for pid in self.profiles:
            ex = self.exchanges[pid]
            if self.exact or ex.open_orders:
                self._feed_backlog(pid)
                self._feed_exchange(pid, self._market_messages(step))
            else:
                if floor is None:
                    floor = self._fill_floor(step)
                while ex.unfed and ex.unfed[0].time_s < floor:
                    ex.unfed.popleft()  # no order can fill there any more
                ex.unfed.append(step)
        self._pump()

    async def run(self) -> None:
        """The run; its messages are in `self.data` (not returned: asyncio.run's SIGINT handling makes
        Python 3.11 format the main task's repr, result included, which for a whole run takes seconds)."""
        t0 = time.perf_counter()
        with _gc_relaxed():
            for replay_step in self.steps:
                self.stats.steps += 1
                step = Step(replay_step.time_s, replay_step.interval_s, replay_step.candles)
                await self._market_step(step)
                # 4. Strategies, in lockstep: a step is evaluated once every profile can evaluate it.
                self._backlog.append(step)
                self._evaluate_ready()
            await self._finish()
        self.stats.seconds = time.perf_counter() - t0

    def _evaluate_ready(self) -> None:
        states = self.strategies
        lazy = not self.exact
        stats = self.stats
        queue = self._queue
        markers = self._markers  # its dicts are replaced by each flush: read at each use
        while self._backlog and all(strategy.ready(s, self._backlog[0]) for s in states.values()):
            step = self._backlog.popleft()
            n = len(step.candles)
            for pid, st in states.items():
                stats.evaluations += n
                msgs = strategy.on_step(st, step, lazy_marker=lazy)
                if msgs:
                    self._from_strategy(pid, msgs)
                marker = st.marker
                if marker is not None:
                    st.marker = None
                    if lazy and not self._undecided:  # what _from_lazy_marker does then, inline
                        spec = (pid, *marker)
                        for h in markers.values():
                            h[pid] = spec
                        self._held_markers += len(markers)
                    else:
                        self._from_lazy_marker(pid, marker)
                if queue:
                    self._pump()

    async def _finish(self) -> None:
        done: ReplayFinished = finished_message(self.steps)
        ends = [(p, done) for p in range(self.n_candles)]
        for partition, m in ends:
            self._from_registry(await registry.handle(self.registry, m, partition, self.claims))
        if "arbiter" in self._market_subs:
            for partition, m in ends:
                self._from_arbiter(arbiter.decide(self.arbiter, m, partition))
        for pid in self.profiles:
            self._feed_backlog(pid)
            self._feed_exchange(pid, list(ends))
        self._pump()
        self._evaluate_ready()
        if self._backlog:
            stuck = {pid: sorted(s.pending) for pid, s in self.strategies.items() if s.pending}
            raise RuntimeError(
                f"backtest stuck with {len(self._backlog)} steps left; intents without outcome: {stuck} "
                f"(undecided by the arbiter: {sorted(self._undecided)})"
            )
        for pid, st in self.strategies.items():
            self._from_strategy(pid, strategy.on_market_end(st))
            self._pump()
        self._flush_markers()
        self._pump()


def run_backtest(cfg: AppConfig, steps: list[Step], *, exact: bool = False) -> tuple[RunData, Stats]:
    bt = Backtest(cfg, steps, exact=exact)
    asyncio.run(bt.run())
    return bt.data, bt.stats


def write_report(cfg: AppConfig, data: RunData, out: Path) -> dict[str, Any]:
    """The demo's files, through the monitor's `write_outputs` (stale ones removed first). The records are
    plain dicts in no reference cycle: the cyclic collector is paused (a third of the time on two years)."""
    for stale in ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    with _gc_paused():
        return write_outputs(
            cfg, data, out, extra={"undecodable_messages": 0}
        )  # as the demo's collector counts


# ------------------------------------------------------------------------------------------ command
def register(sub: Any) -> None:
    p = sub.add_parser(
        "backtest", help="the demo's run in one process, without Kafka or Redis (same domain code)"
    )
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("data/market"))
    p.add_argument("--out", type=Path, default=Path("reports/backtest"))
    p.add_argument("--hours", type=float, default=None, help="replay only the first N hours of the data")
    p.add_argument("--start", default=None, help="ISO time, first candle open (UTC)")
    p.add_argument("--end", default=None, help="ISO time, replay candles opening before this")
    p.add_argument(
        "--exact", action="store_true", help="deliver every step marker and candle (slower; a check)"
    )
    p.set_defaults(handler=run_command)


def _parse_time(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--{flag} {text!r} is not an ISO time (e.g. 2021-01-01 or 2021-01-01T00:00:00Z)"
        ) from None


def run_command(args: argparse.Namespace) -> int:
    from mpctl.commands_demo import print_table

    cfg = load_for_command(args.config)
    if cfg is None:
        return 1
    if cfg.system.mode != "paper":
        print("mpctl backtest runs in paper mode only; set system.mode: paper", file=sys.stderr)
        return 1
    if not args.data.is_dir():
        print(f"--data {args.data} is not a folder", file=sys.stderr)
        return 1
    say = Progress("backtest")  # terminal only, quiet in CI and pipes
    say(f"loading candles from {args.data} ...")
    t0 = time.perf_counter()
    try:
        steps = load_schedule(
            cfg,
            args.data,
            start=_parse_time(args.start, "start"),
            end=_parse_time(args.end, "end"),
            hours=args.hours,
        )
    except ValueError as err:
        print(f"backtest: {err}", file=sys.stderr)
        return 1
    t1 = time.perf_counter()
    say(f"{len(steps)} steps loaded in {t1 - t0:.1f} s; running {len(cfg.enabled_profiles())} profiles ...")
    data, stats = run_backtest(cfg, steps, exact=args.exact)
    t2 = time.perf_counter()
    say(f"ran in {t2 - t1:.1f} s; writing the outputs to {args.out} ...")
    out: Path = args.out
    summary = write_report(cfg, data, out)
    t3 = time.perf_counter()
    print_table(summary)
    rate = stats.evaluations / stats.seconds if stats.seconds else 0.0
    print(
        f"{stats.steps} steps, {len(cfg.enabled_profiles())} profiles, {stats.evaluations} profile-candle evaluations "
        f"in {stats.seconds:.2f} s ({rate:,.0f}/s); load {t1 - t0:.2f} s, report {t3 - t2:.2f} s; outputs in {out}"
    )
    ok, line = audit_summary_line(out, args.data, cfg)
    print(line)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mpctl.backtest ...`: the same command without the mpctl entry point."""
    parser = argparse.ArgumentParser(prog="python -m mpctl.backtest")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["backtest", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
