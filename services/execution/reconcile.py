"""Reconciliation, pure: what the worker knows (from the events it published) against what the exchange says,
and the events that are missing.

Known state is rebuilt from the worker's own events on `orders.events` (`known_from_events`), so it survives a
crash exactly as far as its events were published. The exchange side is a set of lookups by client order id
(an order the exchange definitely does not have is `None`) and the fills of those orders.

Rules:
- A fill of a known order whose id was never published -> OrderFilled (id derived from the exchange's fill id, so
  publishing it twice gives the same id, which every consumer counts once).
- A known order whose state differs at the exchange (filled while we were down, cancelled on the exchange's site,
  partly filled) -> OrderUpdated with the new status and filled size.
- A terminal status is published only when the fills published for the order add up to its filled size; until
  then the order stays `partially_filled` (a fills list that lags the order is waited for, not lost).
- A known, unfinished order the exchange does not have -> `rejected` (it never got there, or Coinbase Exchange
  forgot it: that API answers 404 for an order cancelled before any fill). No fill is lost either way.
- An order at the exchange with a client id we do not know (placed by hand, or by another system on this key)
  is reported, never adopted: there is no intent to attach it to.
- A second order under a known client order id (an exchange that does not de-duplicate client ids, two workers
  of the profile: docs/live.md, "Never twice with two workers"): the first one the exchange took is the intent's
  order (`split_duplicates`); the others' fills are booked as OrderFilled with `duplicate_of` (outside the
  intent's size), and each is reported once per state in a DuplicateOrderDetected (`duplicate_events`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

from services.execution.ports import ExchangeFill, ExchangeOrder
from shared.clock import derived_id
from shared.messages import (
    TERMINAL_STATUSES,
    DuplicateOrderDetected,
    ExecuteOrder,
    Message,
    OrderFilled,
    OrderStatus,
    OrderUpdated,
)


@dataclass(frozen=True)
class KnownOrder:
    client_order_id: str
    intent_id: str
    profile: str
    product: str
    side: str
    size: Decimal
    correlation_id: str
    causation_id: str | None = None
    status: OrderStatus = "submitted"
    filled_size: Decimal = Decimal(0)
    fill_ids: frozenset[str] = frozenset()
    filled_from_fills: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)
    notional: Decimal = Decimal(0)
    # Fills of a second order under this client id (OrderFilled.duplicate_of): booked apart from the intent's.
    duplicate_fill_ids: frozenset[str] = frozenset()
    # Ids of the DuplicateOrderDetected events published for this client id.
    duplicates_reported: frozenset[str] = frozenset()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_execute(cls, o: ExecuteOrder) -> KnownOrder:
        return cls(
            client_order_id=o.client_order_id,
            intent_id=o.intent_id,
            profile=o.profile,
            product=o.product,
            side=o.side,
            size=o.size,
            correlation_id=o.correlation_id,
            causation_id=o.id,
        )


def fill_event_id(profile: str, fill: ExchangeFill) -> str:
    return derived_id("live-fill", profile, fill.fill_id)


def exchange_fill(
    profile: str, k: KnownOrder, f: ExchangeFill, *, duplicate_of: str | None = None
) -> OrderFilled:
    """The OrderFilled of one exchange fill of a known order (of a second order under its client id, when
    `duplicate_of` names the first)."""
    fid = fill_event_id(profile, f)
    return OrderFilled(
        id=fid,
        event_time=f.time,
        correlation_id=k.correlation_id,
        causation_id=k.causation_id,
        fill_id=fid,
        intent_id=k.intent_id,
        client_order_id=k.client_order_id,
        profile=profile,
        product=k.product,
        side="sell" if k.side == "sell" else "buy",
        size=f.size,
        price=f.price,
        fee=f.fee,
        liquidity=f.liquidity,
        duplicate_of=duplicate_of,
    )


def update_event_id(client_order_id: str, status: str, filled: Decimal) -> str:
    return derived_id("order-update", client_order_id, status, filled.normalize())


def _first_known(msg: OrderUpdated | OrderFilled) -> KnownOrder:
    """An order first seen through one of its events (an update or a fill may come first)."""
    return KnownOrder(
        client_order_id=msg.client_order_id,
        intent_id=msg.intent_id,
        profile=msg.profile,
        product=msg.product,
        side=msg.side,
        size=msg.size,
        correlation_id=msg.correlation_id,
        causation_id=msg.causation_id,
    )


def apply_event(known: dict[str, KnownOrder], msg: Message, profile: str) -> None:
    """Fold one of our own events into the known state (used both live and when rebuilding from the topic)."""
    if isinstance(msg, OrderUpdated) and msg.profile == profile:
        k = known.get(msg.client_order_id) or _first_known(msg)
        if k.terminal and msg.status not in TERMINAL_STATUSES:
            return  # a late, older update never reopens a finished order
        known[msg.client_order_id] = replace(
            k, status=msg.status, filled_size=max(k.filled_size, msg.filled_size)
        )
    elif isinstance(msg, DuplicateOrderDetected) and msg.profile == profile:
        seen = known.get(msg.client_order_id)
        if seen is not None:
            known[msg.client_order_id] = replace(
                seen, duplicates_reported=seen.duplicates_reported | {msg.id}
            )
    elif isinstance(msg, OrderFilled) and msg.profile == profile:
        k = known.get(msg.client_order_id) or _first_known(msg)
        if msg.duplicate_of is not None:
            # Not the intent's order: its fills never add to what the intent's order filled.
            known[msg.client_order_id] = replace(k, duplicate_fill_ids=k.duplicate_fill_ids | {msg.fill_id})
            return
        if msg.fill_id in k.fill_ids:
            return
        known[msg.client_order_id] = replace(
            k,
            fill_ids=k.fill_ids | {msg.fill_id},
            filled_from_fills=k.filled_from_fills + msg.size,
            fees=k.fees + msg.fee,
            notional=k.notional + msg.size * msg.price,
        )


def known_from_events(profile: str, events: Iterable[Message]) -> dict[str, KnownOrder]:
    known: dict[str, KnownOrder] = {}
    for msg in events:
        apply_event(known, msg, profile)
    return known


@dataclass
class Reconciliation:
    events: list[Message] = field(default_factory=list)
    unknown_orders: list[ExchangeOrder] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _status_of(o: ExchangeOrder, filled: Decimal) -> OrderStatus:
    if o.status == "open":
        return "partially_filled" if filled > 0 else "open"
    return o.status


def reconcile(
    profile: str,
    known: Mapping[str, KnownOrder],
    observed: Mapping[str, ExchangeOrder | None],
    fills: Iterable[ExchangeFill],
    now: datetime,
    *,
    open_orders: Iterable[ExchangeOrder] = (),
    reason: str = "reconciled with the exchange",
) -> Reconciliation:
    """The missing events. `observed`: client order id -> the exchange's order (None: it has none); known orders
    not in `observed` were not looked up and are left alone. `fills`: fills of the observed orders."""
    out = Reconciliation()
    by_exchange_id = {o.exchange_order_id: coid for coid, o in observed.items() if o is not None}
    fills_of: dict[str, list[ExchangeFill]] = {}
    for f in fills:
        coid = f.client_order_id or by_exchange_id.get(f.exchange_order_id)
        if coid is None or coid not in known:
            out.notes.append(
                f"fill {f.fill_id} of exchange order {f.exchange_order_id} matches no known order"
            )
            continue
        fills_of.setdefault(coid, []).append(f)

    for coid in sorted(observed):
        k = known.get(coid)
        o = observed[coid]
        if k is None:
            if o is not None:
                out.unknown_orders.append(o)
            continue
        if o is None:
            if not k.terminal:
                why = "the exchange has no such order: it never got there, or was cancelled before any fill"
                out.events.append(_update(k, "rejected", now, reason=f"{reason}: {why}"))
            continue
        # New fills first, in exchange time order, so a consumer sees them before the status that sums them up.
        new_fills: list[OrderFilled] = []
        seen = set(k.fill_ids)
        for f in sorted(fills_of.get(coid, []), key=lambda x: (x.time, x.fill_id)):
            fid = fill_event_id(profile, f)
            if fid in seen or f.size <= 0:
                continue
            seen.add(fid)
            new_fills.append(exchange_fill(profile, k, f))
        out.events.extend(new_fills)
        counted = k.filled_from_fills + sum((x.size for x in new_fills), Decimal(0))
        fees = k.fees + sum((x.fee for x in new_fills), Decimal(0))
        notional = k.notional + sum((x.size * x.price for x in new_fills), Decimal(0))
        status = _status_of(o, o.filled_size)
        if status in TERMINAL_STATUSES and counted < o.filled_size:
            out.notes.append(
                f"order {coid} is {status} with {o.filled_size} filled, but fills for only {counted} are listed: "
                "waiting for the rest"
            )
            status = "partially_filled"
        if k.terminal:
            continue  # fills may still be added above; a finished order's status never changes
        if status == k.status and counted == k.filled_size:
            continue
        price = (notional / counted).quantize(Decimal("0.00000001")) if counted > 0 else None
        why = o.reason or reason
        out.events.append(_update(k, status, now, reason=why, filled=counted, price=price, fee=fees))

    known_ids = set(known)
    for o in open_orders:
        if o.client_order_id not in known_ids and all(
            o.exchange_order_id != u.exchange_order_id for u in out.unknown_orders
        ):
            out.unknown_orders.append(o)
    for u in out.unknown_orders:
        out.notes.append(
            f"exchange order {u.exchange_order_id} ({u.product} {u.side} {u.size}, client id {u.client_order_id}) "
            "is not one of this worker's orders: left alone"
        )
    return out


def split_duplicates(orders: Sequence[ExchangeOrder]) -> tuple[ExchangeOrder | None, list[ExchangeOrder]]:
    """The orders the exchange holds under one client order id as (the intent's order, the duplicates): the first
    one it took (created first; the smaller exchange id on a tie) is the intent's, whoever sent it, so every
    worker that looks picks the same one. An order without a creation time counts as the newest."""
    latest = datetime.max.replace(tzinfo=UTC)
    by_id = {o.exchange_order_id: o for o in orders}
    ordered = sorted(by_id.values(), key=lambda o: (o.created_at or latest, o.exchange_order_id))
    if not ordered:
        return None, []
    return ordered[0], ordered[1:]


def duplicate_report_id(client_order_id: str, duplicate: ExchangeOrder) -> str:
    return derived_id(
        "duplicate-order",
        client_order_id,
        duplicate.exchange_order_id,
        duplicate.status,
        duplicate.filled_size.normalize(),
    )


def duplicate_events(
    profile: str,
    k: KnownOrder,
    original: ExchangeOrder,
    duplicate: ExchangeOrder,
    fills: Iterable[ExchangeFill],
    now: datetime,
    *,
    cancelled: bool = False,
) -> list[Message]:
    """What is missing about one duplicate of a known order: its fills not yet booked (OrderFilled with
    `duplicate_of`, ids derived from the exchange's fill ids as for any fill), then a DuplicateOrderDetected for
    its present state if none was published for that state."""
    out: list[Message] = []
    seen = set(k.duplicate_fill_ids)
    mine = [f for f in fills if f.exchange_order_id == duplicate.exchange_order_id and f.size > 0]
    for f in sorted(mine, key=lambda x: (x.time, x.fill_id)):
        fid = fill_event_id(profile, f)
        if fid in seen:
            continue
        seen.add(fid)
        out.append(exchange_fill(profile, k, f, duplicate_of=original.exchange_order_id))
    rid = duplicate_report_id(k.client_order_id, duplicate)
    if rid in k.duplicates_reported:
        return out
    filled = duplicate.filled_size
    done = "cancelled it" if cancelled else ("it was " + duplicate.status)
    booked = f"; its fills of {filled} are booked outside the intent" if filled > 0 else ""
    reason = (
        f"{profile}: the exchange holds two orders under client order id {k.client_order_id} ({k.side} "
        f"{k.product}): {original.exchange_order_id} (the intent's) and {duplicate.exchange_order_id} (a second "
        f"send, by another worker of the profile); {done}{booked}"
    )
    out.append(
        DuplicateOrderDetected(
            id=rid,
            event_time=now,
            correlation_id=k.correlation_id,
            causation_id=k.causation_id,
            profile=profile,
            intent_id=k.intent_id,
            client_order_id=k.client_order_id,
            product=k.product,
            side="sell" if k.side == "sell" else "buy",
            original=original.exchange_order_id,
            duplicate=duplicate.exchange_order_id,
            status=duplicate.status,
            filled_size=filled,
            cancelled=cancelled,
            reason=reason[:2000],
        )
    )
    return out


def _update(
    k: KnownOrder,
    status: OrderStatus,
    now: datetime,
    *,
    reason: str = "",
    filled: Decimal | None = None,
    price: Decimal | None = None,
    fee: Decimal = Decimal(0),
) -> OrderUpdated:
    f = k.filled_size if filled is None else filled
    return OrderUpdated(
        id=update_event_id(k.client_order_id, status, f),
        event_time=now,
        correlation_id=k.correlation_id,
        causation_id=k.causation_id,
        intent_id=k.intent_id,
        client_order_id=k.client_order_id,
        profile=k.profile,
        product=k.product,
        side="sell" if k.side == "sell" else "buy",
        size=k.size,
        filled_size=f,
        price=price,
        fee=fee,
        status=status,
        reason=reason,
    )


def order_update(k: KnownOrder, status: OrderStatus, now: datetime, *, reason: str = "") -> OrderUpdated:
    """An update for a known order without exchange data (submitted, rejected before sending)."""
    return _update(k, status, now, reason=reason)
