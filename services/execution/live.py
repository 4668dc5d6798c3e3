"""One profile's live execution over an ExchangePort: ExecuteOrder in, OrderUpdated / OrderFilled /
ProfileHalted out. The paper exchange (domain.py) stays the default; this runs when `system.mode: live`.

- Each order is a marketable limit: the reference price moved by `slippage_tolerance` against us, so the fill
  price is bounded exactly as in paper trading. An order still open after `order_timeout` seconds is cancelled
  (its filled part stays filled).
- Never twice: an ExecuteOrder whose client order id already has a final outcome produces nothing; one that is
  known but unfinished (a redelivery after a crash) goes through the port's create again, which finds the
  existing order (Exchange API: lookup; Advanced Trade: de-duplicated client_order_id) instead of placing another.
- Errors (errors.py): rejected -> `rejected` event with the reason; halt -> the order is rejected, ProfileHalted is
  emitted and every later order of the profile is rejected without contacting the exchange; retries exhausted ->
  the order stays `submitted` and reconciliation settles it.
- Sent at `not_before` (the arbiter's spacing of different profiles' orders on a product) plus the profile's
  de-sync delay (shared.orders.desync_delay_ms, the same seed and bounds as the paper exchange), waited for on
  the injected clock; an order whose send time has passed (a replay, a redelivery) goes at once.
- `reconcile()` (on start, then periodically) looks up every unfinished known order and emits what is missing.
- Never twice with two workers (issue #19; docs/live.md): every send is guarded. After the look-up of its client
  order id and immediately before each send (a retry's too), `fence(partition)` must confirm that this worker
  still holds the order's partition of its consumer group, with more of its session left than a request may
  take (ConsumeLoop.holds); otherwise nothing is sent, no event follows, and the order is left to the
  partition's owner. Where the exchange does not de-duplicate client ids (Exchange API) a pause between that
  check and the send can still make a second order, so after every send the worker lists the orders under the
  client id: the first the exchange took is the intent's; a later one is cancelled if open and its fills are
  booked (OrderFilled.duplicate_of), with a DuplicateOrderDetected the monitor alerts on. Reconciliation does
  the same for the known client ids of the last DUPLICATE_LOOKBACK.
- Protective orders rest at the exchange (issue #13): when an entry (a buy) ends with a fill, a stop loss at the
  profile's `stop_loss_pct` below its average price (with the take profit in the same bracket order where the
  API has one) is placed at the exchange under a client order id derived from the entry's, so a crash, a network
  cut or a deploy of this system still caps the loss. Any sale of the product (the strategy's exit of any
  reason) first cancels it; what it had already sold at the exchange is booked as that sale's fills (the same
  exchange fill ids: a redelivery counts them once), and the sale is then complete, or the rest is left to the
  strategy's next exit.
- `kill` (a verified operator command) cancels every open order of the profile at the exchange, protective
  ones included, and refuses later entries until `resume`; the strategy sells the positions on `flatten`.
- `account_snapshot()` reads the account's balances (the quote and every base asset the profile trades) and
  returns an `AccountSnapshotted`: amounts and the products' size increments only, stamped with the exchange
  time of the worker's clock. Published at start (after reconciliation), every
  `system.execution.account_snapshot_interval_s` and after each order reaches a final state (live_wiring.py).

The known state is rebuilt from this worker's own events (`apply` each of them, e.g. read back from
`orders.events` on start), so it survives a restart exactly as far as the events were published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from services.execution.domain import traded_base_assets
from services.execution.errors import HaltError, NotOwnerError, RejectedError, RetryableError
from services.execution.ports import ExchangeFill, ExchangeOrder, ExchangePort, SendGuard
from services.execution.reconcile import (
    KnownOrder,
    Reconciliation,
    apply_event,
    duplicate_events,
    order_update,
    reconcile,
    split_duplicates,
)
from shared import protective
from shared.clock import Clock, derived_id
from shared.config import Profile
from shared.messages import (
    PRICE_BAND_REASON,
    TERMINAL_STATUSES,
    AccountSnapshotted,
    AssetBalance,
    CandleClosed,
    CommandHandled,
    ControlCommand,
    ExecuteOrder,
    Message,
    OrderFilled,
    OrderUpdated,
    ProfileHalted,
)
from shared.orders import desync_delay_ms

log = logging.getLogger(__name__)

# How far back reconciliation lists the exchange's orders for a second order under a known client order id.
DUPLICATE_LOOKBACK = timedelta(days=1)
# The listing after a send starts this long before the order's send time: another worker's send of the same id
# cannot be earlier than that time, and the exchange's clock may differ a little from the one we follow.
DETECT_SLACK = timedelta(minutes=5)
# Where a test may pause a worker (`pause_before_send`): after the look-up, or after the ownership check.
PauseStage = Literal["after_lookup", "after_fence"]


def protective_client_id(entry_client_order_id: str) -> str:
    """The client order id of the protective order of the position an entry opened (a UUID, as Coinbase wants)."""
    h = derived_id("protective", entry_client_order_id)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class LiveExecution:
    def __init__(
        self,
        profile_id: str,
        profile: Profile,
        port: ExchangePort,
        *,
        clock: Clock,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock_sleep: Callable[[float], Awaitable[None]] | None = None,
        poll_interval_s: float = 1.0,
        desync_ms: tuple[int, int] = (0, 0),
        quote: str = "USDC",
        protect: bool = True,
        price_band_pct: Decimal | None = None,
        reference_lookup: Callable[[str], Awaitable[tuple[datetime, Decimal] | None]] | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        """`protect`: rest each position's stop at the exchange (what live trading does; tests of other rules
        may leave it out to count only the orders they send). `price_band_pct`: refuse a buy limit that far above
        the latest close of its product, a sell that far below (None: no band); the close comes from the
        candles this worker reads, else from `reference_lookup` (the tail of md.candles), else the order is
        refused: an approval for a product no candle was seen of is not sent."""
        self.profile_id = profile_id
        self.quote = quote
        self.assets = traded_base_assets(profile, quote)
        self.desync_ms = desync_ms
        self.seed = profile.profile_hash.base_hash
        self.port = port
        self.clock = clock
        self._sleep = sleep  # real seconds: polling the exchange
        # Seconds of `clock` time (the exchange's, live): the wait until an order's send time.
        self._clock_sleep = clock_sleep or sleep
        self.poll_interval_s = poll_interval_s
        self.order_timeout = timedelta(seconds=profile.trading_params.order_timeout)
        rm = profile.risk_management
        self.stop_loss_pct = Decimal(str(rm.stop_loss_pct))
        self.take_profit_pct = Decimal(str(rm.take_profit_pct))
        self.killed: str | None = None  # an operator's kill: open orders cancelled, new entries refused
        self.protect = protect
        self.price_band = price_band_pct / 100 if price_band_pct is not None else None
        self.reference_lookup = reference_lookup
        # product -> (open time, close) of the latest candle seen: the price band's reference
        self.references: dict[str, tuple[datetime, Decimal]] = {}
        self.slippage = Decimal(str(profile.trading_params.slippage_tolerance))
        self.known: dict[str, KnownOrder] = {}
        self.exchange_ids: dict[
            str, ExchangeOrder
        ] = {}  # client order id -> last seen exchange order (this run)
        self.halted: str | None = None
        self.last_reconciliation: Reconciliation | None = None
        # Publishes (and waits for the acknowledgement of) `submitted` before the order is sent. Without it, a crash
        # between send and answer leaves no trace but the redelivered command; with it, reconciliation on restart
        # knows the order even if the exchange lost it (Coinbase Exchange forgets orders cancelled unfilled).
        self.write_ahead: Callable[[list[Message]], Awaitable[None]] | None = None
        # Called with the client order id when the exchange accepts a create request (the latency metric).
        self.on_ack: Callable[[str], None] | None = None
        # fence(partition of orders.approved, seconds a request may take) -> None while this worker holds that
        # partition of its group with at least that much of its session left, else why not (the wiring gives
        # ConsumeLoop.holds). None: no group (tests of one worker), every send goes.
        self.fence: Callable[[int, float], Awaitable[str | None]] | None = None
        self.request_timeout_s = request_timeout_s
        # Tests only: awaited with (client order id, stage) around the ownership check, to pause a worker there.
        self.pause_before_send: Callable[[str, PauseStage], Awaitable[None]] | None = None
        # Entries whose protective order a failed ownership check kept back: placed when the order comes again.
        self.unprotected: set[str] = set()

    # -------------------------------------------------------------------------- state
    def apply(self, msg: Message) -> None:
        # A halt is not restored from past events: a restarted worker tries again, and halts again at the first
        # call if the cause (key, permission, clock) is still there.
        apply_event(self.known, msg, self.profile_id)

    def apply_all(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            self.apply(m)

    def _emit(self, msgs: list[Message]) -> list[Message]:
        self.apply_all(msgs)
        return msgs

    def send_time(self, o: ExecuteOrder) -> datetime:
        """`not_before` plus this profile's de-sync delay for the intent (internal transfers never reach here)."""
        lo, hi = self.desync_ms
        return o.not_before + timedelta(
            milliseconds=desync_delay_ms(o.profile_hash or self.seed, o.intent_id, lo, hi)
        )

    def limit_price(self, o: ExecuteOrder) -> Decimal:
        if o.limit_price is not None:
            return o.limit_price  # a limit order rests at its own price (maker where it does not cross)
        factor = (1 + self.slippage) if o.side == "buy" else (1 - self.slippage)
        return o.reference_price * factor

    def note_close(self, product: str, open_time: datetime, close: Decimal) -> None:
        """A candle's close, the price band's reference, unless a newer one of the product is known."""
        seen = self.references.get(product)
        if seen is None or open_time >= seen[0]:
            self.references[product] = (open_time, close)

    async def _outside_band(self, o: ExecuteOrder) -> str | None:
        """Why `o` is refused by the price band (defence in depth behind the bus's ACLs), or None."""
        if self.price_band is None:
            return None
        seen = self.references.get(o.product)
        # The order was decided on the candles up to its step (a protective exit: on its trigger candle), which
        # may not have reached this worker yet (another topic): then md.candles' tail has them. Judged against
        # an older close, a stop's sale after a crash would look like a dump and be refused.
        decided_on = o.trigger_candle or o.step_time
        if (seen is None or seen[0] < decided_on) and self.reference_lookup is not None:
            found = await self.reference_lookup(o.product)
            if found is not None:
                self.note_close(o.product, *found)
                seen = self.references[o.product]
        ref = seen[1] if seen is not None else None
        if ref is None or ref <= 0:
            return f"{PRICE_BAND_REASON}: no market price of {o.product} known yet (no candle of it read): not sent"
        limit = self.limit_price(o)
        deviation = limit / ref - 1
        buy = o.side == "buy"
        if (deviation if buy else -deviation) <= self.price_band:
            return None
        return (
            f"{PRICE_BAND_REASON}: {o.side} limit {limit.normalize():f} is {abs(deviation) * 100:.2f}% "
            f"{'above' if buy else 'below'} the latest {o.product} close {ref.normalize():f}, beyond "
            f"system.execution.max_price_deviation_pct {self.price_band * 100:g}: not sent"
        )

    # -------------------------------------------------------------------------- orders
    async def handle(self, msg: Message, partition: int = 0) -> list[Message]:
        if isinstance(msg, ControlCommand):
            return await self._command(msg)  # only verified commands reach here (shared/commands.py)
        if isinstance(msg, CandleClosed):
            self.note_close(msg.product, msg.open_time, msg.close)
            return []
        if not isinstance(msg, ExecuteOrder) or msg.profile != self.profile_id:
            return []  # markers drive the paper exchange only
        k = self.known.get(msg.client_order_id)
        if k is not None and k.terminal:
            if k.client_order_id in self.unprotected:
                await self._protect_again(k, partition)
            return []  # never twice: this intent already has its final outcome
        now = self.clock()
        out: list[Message] = []
        if k is None:
            k = KnownOrder.from_execute(msg)
            out += self._emit([order_update(k, "submitted", now, reason="sent to the exchange")])
            if self.write_ahead is not None:
                await self.write_ahead(list(out))  # published again with the outputs: same id, counted once
        if self.halted is not None:
            return out + self._emit(
                [order_update(k, "rejected", now, reason=f"profile halted: {self.halted}")]
            )
        if self.killed is not None and msg.side == "buy":
            # After a kill only sales go out (the strategy's flatten); entries wait for a resume.
            return out + self._emit([order_update(k, "rejected", now, reason=self.killed)])
        if getattr(msg, "internal_size", 0) > 0:
            # Netting two profiles as an internal transfer exists in paper mode only: between two real accounts
            # it would need a transfer, so a netted order reaching live execution is a configuration error.
            reason = "internal crosses are executed in paper mode only (system.arbiter.internal_cross: report in live)"
            return out + self._emit([order_update(k, "rejected", now, reason=reason)])
        refused = await self._outside_band(msg)
        if refused is not None:
            log.error("%s: order %s refused: %s", self.profile_id, k.client_order_id, refused)
            return out + self._emit([order_update(k, "rejected", now, reason=refused)])
        size = msg.size
        if msg.side == "sell":
            try:
                sold, done = await self._unprotect(k)
            except HaltError as err:
                return out + self._halt(k, err)
            except (RetryableError, RejectedError) as err:
                # The protective order's state is unknown: selling now could sell the position twice.
                reason = f"the resting protective order could not be cancelled first: {err.reason}"
                return out + self._emit([order_update(k, "cancelled", self.clock(), reason=reason)])
            out += sold
            if done:
                return out
            size = await self._held_at_most(msg, size)
            if size <= 0:
                reason = f"nothing of {msg.product.split('/')[0]} is free at the exchange: no sale is sent"
                return out + self._emit([order_update(k, "rejected", self.clock(), reason=reason)])
        send_at = self.send_time(msg)
        wait_s = (send_at - self.clock()).total_seconds()
        if wait_s > 0:
            await self._clock_sleep(wait_s)  # no lock-step with another profile's order on this product
        try:
            order = await self.port.create_order(
                msg.client_order_id,
                msg.product,
                msg.side,
                size,
                limit_price=self.limit_price(msg),
                guard=self._guard(msg.client_order_id, partition),
            )
        except NotOwnerError as err:
            log.warning(
                "%s: order %s not sent: %s; the partition's owner handles it",
                self.profile_id,
                k.client_order_id,
                err.reason,
            )
            return out
        except RejectedError as err:
            return out + self._emit([order_update(k, "rejected", self.clock(), reason=err.reason)])
        except HaltError as err:
            return out + self._halt(k, err)
        except RetryableError as err:
            log.warning(
                "%s: order %s state unknown (%s); reconciliation will settle it",
                self.profile_id,
                k.client_order_id,
                err.reason,
            )
            return out
        if self.on_ack is not None:
            self.on_ack(msg.client_order_id)
        if not self.port.dedups_client_ids:
            order, dups = await self._duplicates(k, order, since=send_at - DETECT_SLACK)
            out += dups
        self.exchange_ids[k.client_order_id] = order
        # A redelivered order found at the exchange keeps its original clock: order_timeout counts from creation.
        return out + await self._track(
            k.client_order_id, order, sent=order.created_at or now, partition=partition
        )

    def _guard(self, client_order_id: str, partition: int) -> SendGuard:
        """The check the port awaits immediately before each send of `client_order_id` (module docstring)."""

        async def guard() -> None:
            if self.pause_before_send is not None:
                await self.pause_before_send(client_order_id, "after_lookup")
            if self.fence is not None:
                why = await self.fence(partition, self.request_timeout_s)
                if why is not None:
                    raise NotOwnerError(why)
            if self.pause_before_send is not None:
                await self.pause_before_send(client_order_id, "after_fence")

        return guard

    async def _duplicates(
        self, k: KnownOrder, mine: ExchangeOrder, *, since: datetime
    ) -> tuple[ExchangeOrder, list[Message]]:
        """After a send on an exchange that does not de-duplicate client ids: every order under the client id;
        the first is the intent's (returned, to be followed), a later one is cancelled if open and booked."""
        try:
            found = await self.port.fetch_orders_by_client_id(k.client_order_id, k.product, since=since)
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning(
                "%s: orders under %s not listed (%s): reconciliation looks for a second one",
                self.profile_id,
                k.client_order_id,
                err.reason,
            )
            found = []
        others = [o for o in found if o.exchange_order_id != mine.exchange_order_id]
        original, dups = split_duplicates([mine, *others])  # the create's answer: the fresher state of ours
        assert original is not None  # `mine` is in the list
        return original, await self._settle_duplicates(k, original, dups)

    async def _settle_duplicates(
        self, k: KnownOrder, original: ExchangeOrder, dups: list[ExchangeOrder]
    ) -> list[Message]:
        out: list[Message] = []
        for d in dups:
            cancelled = False
            try:
                if not d.terminal:
                    d = await self.port.cancel(d)
                    cancelled = True
                fills = await self.port.fetch_fills(order=d) if d.filled_size > 0 else []
            except (RetryableError, RejectedError, HaltError) as err:
                log.error(
                    "%s: second order %s under %s (first %s) not settled (%s): reconciliation tries again",
                    self.profile_id,
                    d.exchange_order_id,
                    k.client_order_id,
                    original.exchange_order_id,
                    err.reason,
                )
                continue
            events = duplicate_events(
                self.profile_id, k, original, d, fills, self.clock(), cancelled=cancelled
            )
            for e in events:
                if not isinstance(e, OrderFilled):
                    log.error("%s", getattr(e, "reason", e))
            out += self._emit(events)
            k = self.known.get(k.client_order_id, k)
        return out

    def _halt(self, k: KnownOrder, err: HaltError) -> list[Message]:
        now = self.clock()
        self.halted = err.reason
        log.error("%s: halted: %s", self.profile_id, err.reason)
        halted = ProfileHalted(
            id=derived_id("profile-halted", self.profile_id, k.client_order_id),
            event_time=now,
            correlation_id=k.correlation_id,
            causation_id=k.causation_id,
            profile=self.profile_id,
            reason=f"execution halted: {err.reason}",
        )
        return self._emit([order_update(k, "rejected", now, reason=f"profile halted: {err.reason}"), halted])

    async def _track(
        self, coid: str, order: ExchangeOrder, *, sent: datetime, partition: int = 0
    ) -> list[Message]:
        """Follow the order until it is final or `order_timeout` passes (then cancel), and emit its events."""
        out: list[Message] = []
        try:
            deadline = sent + self.order_timeout
            while not order.terminal and self.clock() < deadline:
                if order.filled_size > 0:
                    out += await self._settle(coid, order)
                await self._sleep(self.poll_interval_s)
                order = await self.port.fetch_order(order)
            if not order.terminal:
                log.info(
                    "%s: order %s unfilled after %s: cancelling", self.profile_id, coid, self.order_timeout
                )
                order = await self.port.cancel(order)
                if not order.terminal:
                    order = await self.port.fetch_order(order)
                if order.status == "cancelled" and not order.reason:
                    order = _with_reason(
                        order, f"order_timeout {self.order_timeout.total_seconds():g}s reached"
                    )
            self.exchange_ids[coid] = order
            out += await self._settle(coid, order)
            k = self.known[coid]
            if self.protect and k.side == "buy" and order.filled_size > 0:
                await self._protect(k, order, partition)
        except HaltError as err:
            out += self._halt(self.known[coid], err)
        except (RetryableError, RejectedError) as err:
            log.warning(
                "%s: tracking order %s interrupted (%s); reconciliation continues",
                self.profile_id,
                coid,
                err.reason,
            )
        return out

    async def _held_at_most(self, msg: ExecuteOrder, size: Decimal) -> Decimal:
        """A sale never asks for more than the account holds free at the exchange (a fee taken in the coin, a
        manual sale on the website): the whole position, rounded down by the port to the increment."""
        base = msg.product.split("/")[0]
        try:
            held = (await self.port.balances()).get(base)
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning(
                "%s: balances not read before a sale (%s): selling %s", self.profile_id, err.reason, size
            )
            return size
        free = held.free if held is not None else Decimal(0)
        if free < size:
            log.warning(
                "%s: sale of %s %s reduced to the %s free at the exchange", self.profile_id, size, base, free
            )
            return max(free, Decimal(0))
        return size

    async def refresh_markets(self) -> None:
        """The exchange's product rules and trading status again (each reconciliation period)."""
        try:
            await self.port.load_markets(refresh=True)
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning(
                "%s: product rules not refreshed (%s): the last ones stay", self.profile_id, err.reason
            )

    # -------------------------------------------------------------------------- protective orders
    async def _protect_again(self, entry: KnownOrder, partition: int) -> None:
        """The protective order an ownership check kept back, once this worker holds the entry's order again."""
        try:
            order = await self.port.fetch_order_by_client_id(entry.client_order_id, entry.product)
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning("%s: entry %s not looked up (%s)", self.profile_id, entry.client_order_id, err.reason)
            return
        if order is None or order.filled_size <= 0:
            self.unprotected.discard(entry.client_order_id)
            return
        await self._protect(entry, order, partition)

    async def _protect(self, entry: KnownOrder, order: ExchangeOrder, partition: int = 0) -> None:
        """Rest the position's stop loss (and take profit, in one bracket where the API has one) at the exchange."""
        avg = order.average_price
        if (avg is None or avg <= 0) and entry.filled_size > 0:
            avg = entry.notional / entry.filled_size
        if avg is None or avg <= 0:
            log.error(
                "%s: entry %s has no fill price: no protective order", self.profile_id, entry.client_order_id
            )
            return
        stop, take = protective.levels(avg, self.stop_loss_pct, self.take_profit_pct)
        pcoid = protective_client_id(entry.client_order_id)
        guard = self._guard(pcoid, partition)
        try:
            try:
                placed = await self.port.create_protective(
                    pcoid, entry.product, order.filled_size, stop, take_profit_price=take, guard=guard
                )
            except RejectedError as err:
                if err.kind != "unsupported":
                    raise
                # The Exchange API has no bracket: the stop alone rests there, the take profit stays ours.
                placed = await self.port.create_protective(
                    pcoid, entry.product, order.filled_size, stop, guard=guard
                )
        except NotOwnerError as err:
            self.unprotected.add(entry.client_order_id)
            log.warning(
                "%s: the protective order of %s was not placed: %s; placed when the entry's order comes again",
                self.profile_id,
                entry.client_order_id,
                err.reason,
            )
            return
        except (RetryableError, RejectedError, HaltError) as err:
            log.error(
                "%s: the protective order of %s (stop %s) was not placed: %s; only the strategy's exits protect "
                "the position",
                self.profile_id,
                entry.client_order_id,
                stop,
                err.reason,
            )
            return
        self.unprotected.discard(entry.client_order_id)
        if not self.port.dedups_client_ids:
            await self._protective_duplicates(entry, pcoid)
        log.info(
            "%s: protective %s order %s rests at the exchange for %s %s: stop %s%s",
            self.profile_id,
            placed.kind,
            pcoid,
            placed.size,
            entry.product,
            placed.stop_price or stop,
            f", take profit {take}" if placed.kind == "bracket" else "",
        )

    async def _protective_duplicates(self, entry: KnownOrder, pcoid: str) -> None:
        """A second protective order under the entry's derived id (two workers) would sell the position twice:
        every later one is cancelled. One that already sold is logged as an error (the account snapshot then
        shows the difference: account_mismatch)."""
        since = self.clock() - self.order_timeout - DETECT_SLACK
        try:
            found = await self.port.fetch_orders_by_client_id(pcoid, entry.product, since=since)
            original, dups = split_duplicates(found)
            for d in dups:
                if not d.terminal:
                    d = await self.port.cancel(d)
                log.error(
                    "%s: a second protective order %s under %s (first %s), the entry %s's: %s, %s filled",
                    self.profile_id,
                    d.exchange_order_id,
                    pcoid,
                    original.exchange_order_id if original else None,
                    entry.client_order_id,
                    "cancelled" if d.filled_size <= 0 else d.status,
                    d.filled_size,
                )
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning("%s: protective orders under %s not listed: %s", self.profile_id, pcoid, err.reason)

    def _entry_of_position(self, product: str, sale: str) -> KnownOrder | None:
        """The entry that opened the product's current position: the last filled buy after the last sale."""
        entry: KnownOrder | None = None
        for k in self.known.values():
            if k.product != product or k.profile != self.profile_id or k.client_order_id == sale:
                continue
            if k.side == "sell" and k.terminal and k.filled_size > 0:
                # Only a sale that sold something ends the position (a refused one left it as it was).
                entry = None
            elif k.side == "buy" and k.terminal and k.filled_size > 0:
                entry = k
        return entry

    async def _unprotect(self, sale: KnownOrder) -> tuple[list[Message], bool]:
        """Cancel the position's resting protective order before a sale. What it already sold at the exchange is
        booked as the sale's fills; returns those events and whether the sale is done with them."""
        entry = self._entry_of_position(sale.product, sale.client_order_id)
        if entry is None:
            return [], False
        pcoid = protective_client_id(entry.client_order_id)
        prot = await self.port.fetch_order_by_client_id(pcoid, sale.product)
        if prot is None:
            return [], False
        if not prot.terminal:
            prot = await self.port.cancel(prot)
            if not prot.terminal:
                prot = await self.port.fetch_order(prot)
        if prot.filled_size <= 0:
            return [], False
        # Booked as the sale's: the same exchange fills (their ids keep a redelivery from counting them twice).
        fills = [
            replace(f, client_order_id=sale.client_order_id) for f in await self.port.fetch_fills(order=prot)
        ]
        complete = prot.filled_size >= sale.size
        reason = (
            f"sold {prot.filled_size} by the resting protective {prot.kind} order {pcoid} at the exchange"
            + ("" if complete else f"; the rest of {sale.size} is left to the strategy's next exit")
        )
        state = replace(prot, status="filled" if complete else "cancelled", reason=reason)
        rec = reconcile(
            self.profile_id,
            {sale.client_order_id: sale},
            {sale.client_order_id: state},
            fills,
            self.clock(),
            reason=reason,
        )
        return self._emit(rec.events), True

    async def _command(self, cmd: ControlCommand) -> list[Message]:
        """`kill`: every open order of the profile at the exchange cancelled (what was done is reported in a
        CommandHandled of this worker's exchange side, audited); `resume` accepts entries again."""
        if cmd.target not in (self.profile_id, "all"):
            return []
        if cmd.action == "resume":
            self.killed = None
            return []
        if cmd.action != "kill":
            return []
        self.killed = f"killed by operator command {cmd.id}"
        done: list[str] = []
        failed: list[str] = []
        try:
            open_orders = await self.port.fetch_open_orders()
        except (RetryableError, RejectedError, HaltError) as err:
            open_orders = []
            failed.append(f"open orders not listed ({err.reason}): cancel them on Coinbase's website")
        for o in open_orders:
            what = f"{o.kind} {o.side} {o.size} {o.product} ({o.client_order_id or o.exchange_order_id})"
            try:
                await self.port.cancel(o)
                done.append(what)
            except (RetryableError, RejectedError, HaltError) as err:
                failed.append(f"{what}: {err.reason}")
        report = f"kill: cancelled {len(done)} of {len(open_orders)} open order(s) at the exchange" + (
            f": {'; '.join(done)}" if done else ""
        )
        if failed:
            report += f"; NOT cancelled: {'; '.join(failed)}"
        (log.error if failed else log.warning)("%s: %s", self.profile_id, report)
        return [
            CommandHandled(
                id=derived_id("command-done", cmd.id, self.profile_id),
                event_time=self.clock(),
                correlation_id=cmd.correlation_id,
                causation_id=cmd.id,
                command_id=cmd.id,
                action=cmd.action,
                target=cmd.target,
                service=f"execution.{self.profile_id}.exchange",
                accepted=not failed,
                reason=report[:2000],
            )
        ]

    async def _settle(self, coid: str, order: ExchangeOrder) -> list[Message]:
        fills: list[ExchangeFill] = await self.port.fetch_fills(order=order) if order.filled_size > 0 else []
        rec = reconcile(
            self.profile_id,
            {coid: self.known[coid]},
            {coid: order},
            fills,
            self.clock(),
            reason=order.reason or "exchange",
        )
        return self._emit(rec.events)

    # -------------------------------------------------------------------------- account
    async def account_snapshot(self, trigger: Literal["start", "periodic", "order_final"]) -> list[Message]:
        """The account's balances as one AccountSnapshotted (none when the exchange does not answer: the next
        one will). Assets the account does not list are reported as zero."""
        try:
            raw = await self.port.balances()
        except (RetryableError, RejectedError, HaltError) as err:
            log.warning(
                "%s: balances not read (%s): no account snapshot this time", self.profile_id, err.reason
            )
            return []
        now = self.clock()
        balances: dict[str, AssetBalance] = {}
        for asset in (self.quote, *self.assets):
            b = raw.get(asset)
            increment: Decimal | None = None
            if asset != self.quote:
                try:
                    increment = self.port.market(f"{asset}/{self.quote}").size_increment
                except Exception:  # a product the exchange does not list: no increment known
                    increment = None
            if b is None:
                balances[asset] = AssetBalance(
                    free=Decimal(0), used=Decimal(0), total=Decimal(0), size_increment=increment
                )
            else:
                balances[asset] = AssetBalance(
                    free=max(b.free, Decimal(0)),
                    used=max(b.used, Decimal(0)),
                    total=max(b.total, Decimal(0)),
                    size_increment=increment if increment is not None and increment > 0 else None,
                )
        snap = AccountSnapshotted(
            id=derived_id("account", self.profile_id, trigger, now.isoformat()),
            event_time=now,
            correlation_id=f"account:{self.profile_id}",
            profile=self.profile_id,
            source="exchange",
            trigger=trigger,
            quote=self.quote,
            balances=balances,
        )
        return [snap]

    @staticmethod
    def has_final(msgs: Iterable[Message]) -> bool:
        """An order reached a final state among these events (an account snapshot follows)."""
        return any(isinstance(m, OrderUpdated) and m.status in TERMINAL_STATUSES for m in msgs)

    # -------------------------------------------------------------------------- reconciliation
    async def _known_duplicates(self, now: datetime) -> tuple[dict[str, ExchangeOrder], list[Message]]:
        """Every order of the products of the known orders of the last DUPLICATE_LOOKBACK, one listing per
        product: client order id -> the intent's order (the first one) where the exchange holds any, and the
        events of the second ones (cancelled if open, fills booked)."""
        since = now - DUPLICATE_LOOKBACK
        products = sorted({k.product for k in self.known.values() if k.profile == self.profile_id})
        originals: dict[str, ExchangeOrder] = {}
        out: list[Message] = []
        for product in products:
            try:
                listed = await self.port.fetch_orders_since(product, since)
            except (RetryableError, RejectedError, HaltError) as err:
                log.warning("%s: orders of %s not listed: %s", self.profile_id, product, err.reason)
                continue
            by_coid: dict[str, list[ExchangeOrder]] = {}
            for o in listed:
                if o.client_order_id in self.known:
                    by_coid.setdefault(o.client_order_id, []).append(o)
            for coid, orders in sorted(by_coid.items()):
                original, dups = split_duplicates(orders)
                if original is None:
                    continue
                originals[coid] = original
                if dups:
                    out += await self._settle_duplicates(self.known[coid], original, dups)
        return originals, out

    async def reconcile(self) -> list[Message]:
        """Look up every unfinished known order; emit missing fills and state changes; cancel overdue ones."""
        now = self.clock()
        observed: dict[str, ExchangeOrder | None] = {}
        fills: list[ExchangeFill] = []
        out: list[Message] = []
        originals: dict[str, ExchangeOrder] = {}
        if not self.port.dedups_client_ids:
            originals, dup_events = await self._known_duplicates(now)
            out += dup_events
        for coid, k in sorted(self.known.items()):
            if k.terminal:
                continue
            try:
                # With two orders under the id, a look-up by client id may answer either: the first is the intent's.
                first = originals.get(coid)
                o = (
                    await self.port.fetch_order(first)
                    if first is not None
                    else await self.port.fetch_order_by_client_id(coid, k.product)
                )
                if (
                    o is not None
                    and not o.terminal
                    and o.created_at is not None
                    and now - o.created_at > self.order_timeout
                ):
                    o = await self.port.cancel(o)  # overdue: order_timeout applies across restarts too
                if o is not None and o.filled_size > 0:
                    fills.extend(await self.port.fetch_fills(order=o))
            except HaltError as err:
                return out + self._halt(k, err)
            except (RetryableError, RejectedError) as err:
                log.warning("%s: reconciliation of %s postponed: %s", self.profile_id, coid, err.reason)
                continue
            observed[coid] = o
            if o is not None:
                self.exchange_ids[coid] = o
        try:
            open_orders = await self.port.fetch_open_orders()
        except (RetryableError, RejectedError) as err:
            log.warning("%s: open orders not listed: %s", self.profile_id, err.reason)
            open_orders = []
        except HaltError as err:
            log.error("%s: open orders not listed: %s", self.profile_id, err.reason)
            open_orders = []
        # The positions' resting protective orders are ours (ids derived from their entries'), not strangers.
        ours = {protective_client_id(c) for c, k in self.known.items() if k.side == "buy"}
        open_orders = [o for o in open_orders if o.client_order_id not in ours]
        rec = reconcile(self.profile_id, self.known, observed, fills, now, open_orders=open_orders)
        for note in rec.notes:
            log.warning("%s: %s", self.profile_id, note)
        self.last_reconciliation = rec
        return out + self._emit(rec.events)


def _with_reason(o: ExchangeOrder, reason: str) -> ExchangeOrder:
    return replace(o, reason=reason)
