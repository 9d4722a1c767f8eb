"""The outcome stream: what every replica learns from, applied by every other replica.

:class:`OutcomePool` is the policy holder's learning log (``PolicyHolder.attach_log``):
each update the holder makes (Report, the sidecar's own Generate, counterfactual scores)
is recorded under the holder's lock with the next sequence number of this replica and
queued for the stream. Entries of other replicas are read back, checked (signature, then
shape) and applied through ``PolicyHolder.apply_shared``: once per (replica, seq), with
the times left out, so each replica's cost model stays its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

from router.metrics import SidecarMetrics
from router.policy.base import MAX_DRAFT_LENGTH, NONE_DRAFTER, Context, Decision, Outcome
from router.policy_holder import PolicyHolder
from router.pooling.entries import (
    EntryRejected,
    EntrySigner,
    Origin,
    SharedOutcome,
    outcome_from_payload,
    outcome_payload,
)
from router.pooling.streams import StreamReader, StreamWriter

logger = logging.getLogger(__name__)

# Policies whose reward is a measured time (UCB's speed-up): a pooled outcome carries no
# times, so they cannot learn from it, and it is consumed without reaching them.
TIME_REWARD_POLICIES = frozenset({"ucb"})
#: Outcomes of a drafter whose registration is loading here wait for it (a registration
#: on another replica reaches this one through the registry stream and loads here while
#: the other replica already learns from it), at most this many, oldest dropped first.
WAITING_MAX = 4096
#: Drafters not served here whose dropped outcomes were warned about (once each).
WARNED_MAX = 1024
#: Dropped entries are logged at most once this often per reason, with how many more
#: were dropped since: a replica with another secret logged a line per entry, each of
#: its requests on every other replica and the whole retained stream at each start.
REJECT_LOG_INTERVAL_S = 60.0


def serves(policy: Any, drafter: str) -> bool:
    """Whether ``policy`` has arms for ``drafter`` (policies without a drafter list take
    every outcome)."""
    drafters = getattr(policy, "drafters_", None)
    return drafter == NONE_DRAFTER or drafters is None or drafter in drafters


def apply_to_policy(policy: Any, shared: SharedOutcome) -> None:
    """Feed ``shared`` to ``policy`` through its normal update, acceptance only.

    The outcome's times are 0: thompson's cost ratios (``StepRatios.observe``) and fixed
    times (``RequestOverheads.observe``) skip outcomes without times, so costs stay local,
    while the acceptance posterior and the decision counts take the drafted and accepted
    tokens.
    """
    if getattr(policy, "name", "") in TIME_REWARD_POLICIES:
        return
    context = Context(shared.cluster, shared.length_bucket, shared.structured)
    if shared.kind == "counterfactual":
        scored = None if shared.scored_drafted is None else list(shared.scored_drafted)
        policy.update_counterfactual(
            context, shared.drafter, list(shared.accepted), shared.k, scored
        )
        return
    outcome = Outcome(
        shared.drafted,
        shared.accepted,
        0.0,
        0.0,
        0.0,
        shared.generated_tokens,
        requested_per_step=shared.requested,
    )
    policy.update(context, Decision(shared.drafter, shared.k), outcome)


def _waiting_from(payloads: Any) -> list[SharedOutcome]:
    """A cursor's waiting outcomes, checked as when they were read (a damaged one is
    logged and left out)."""
    outcomes = []
    for payload in payloads if isinstance(payloads, list) else []:
        try:
            outcomes.append(outcome_from_payload(payload, MAX_DRAFT_LENGTH))
        except (EntryRejected, TypeError, AttributeError) as error:
            logger.warning("pooling: a waiting outcome in the snapshot is left out: %s", error)
    return outcomes[-WAITING_MAX:]


class OutcomePool:
    """The learning log of one replica's policy holder, shared through a Redis stream."""

    def __init__(
        self,
        identity: str,
        holder: PolicyHolder,
        writer: StreamWriter,
        reader: StreamReader,
        signer: EntrySigner,
        metrics: SidecarMetrics,
        loading: Set[str] = frozenset(),
        registration_of: Callable[[str], str] = lambda drafter: "",
    ) -> None:
        self.identity = identity
        # A served drafter's ``DrafterRecord.identity`` ("" for none): sent with each
        # outcome, and an outcome of another registration of the name is not applied.
        self._registration_of = registration_of
        # Drafters whose shared registration is loading here (``SharedRegistry``): only
        # their outcomes wait; any other drafter's are dropped at once.
        self._loading = loading
        self._warned: set[str] = set()
        self._reject_lines: dict[str, tuple[float, int]] = {}  # reason -> (last line, since)
        self._warned_other: set[str] = set()
        self._holder = holder
        self._writer = writer
        self._reader = reader
        self._signer = signer
        self._metrics = metrics
        self._seq = 0
        # Highest seq applied per writer (this replica's own included): the cursor saved
        # with every policy snapshot. Changed only under the holder's lock.
        self._applied: dict[str, int] = {}
        # The writers of the entries read until the start's catch-up ends (then None): a
        # writer of none of them has no entry left in the stream, and ``catch_up`` drops
        # it from ``_applied`` (each process start is a writer of its own: kept, the
        # cursor grew by one writer per restart of any replica, for good).
        self._writers_read: set[str] | None = set()
        # Admitted entries whose drafter the policy does not know yet (``_apply_or_wait``).
        self._waiting: collections.deque[SharedOutcome] = collections.deque()
        self.applied = 0
        self.rejected = 0

    # -- LearningLog (called under the holder's lock) -------------------------------------
    def outcome(self, context: Any, decision: Any, outcome: Any) -> None:
        self._record(
            "outcome",
            context,
            decision.drafter,
            int(decision.k),
            tuple(outcome.drafted_per_step),
            tuple(outcome.accepted_per_step),
            int(outcome.generated_tokens),
            tuple(outcome.requested_per_step),
        )

    def counterfactual(
        self,
        context: Any,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        accepted = tuple(int(a) for a in accepted_per_step)
        scored = None if drafted_per_step is None else tuple(int(d) for d in drafted_per_step)
        self._record(
            "counterfactual", context, drafter, int(draft_length), (), accepted, 0, scored=scored
        )

    def cursor(self) -> dict[str, Any]:
        """What a snapshot's state holds of the stream: the highest seq applied per writer,
        and the admitted outcomes still waiting for their drafter (so that a crash does
        not lose them: the cursor says they were admitted)."""
        waiting = [outcome_payload(shared) for shared in self._waiting]
        return {"applied": dict(self._applied), "waiting": waiting}

    def drafter_added(self, policy: Any, name: str) -> None:
        """Apply the waiting entries of ``name``, now that ``policy`` has its arms."""
        ready = self._take_waiting(name)
        if not ready:
            return
        applied = 0
        for shared in ready:
            if not self._same_registration(shared):
                continue
            try:
                apply_to_policy(policy, shared)
            except (ValueError, KeyError, TypeError) as error:  # never the registration's
                self._count_rejected("malformed", 1)
                logger.warning("pooling: dropped a waiting outcome of %s: %s", name, error)
            else:
                applied += 1
        self._counted_applied(applied)
        logger.info("pooling: applied %d waiting outcomes of drafter %s", applied, name)

    def drafter_not_served(self, name: str) -> None:
        """Drop the waiting entries of ``name``: removed, or registered elsewhere and not
        servable here, it will not join the policy."""
        dropped = len(self._take_waiting(name))
        if dropped:
            self._count_rejected("drafter_not_served", dropped)

    def _take_waiting(self, name: str) -> list[SharedOutcome]:
        """Remove the waiting entries of ``name`` and return them, oldest first."""
        taken = [shared for shared in self._waiting if shared.drafter == name]
        if taken:
            self._waiting = collections.deque(s for s in self._waiting if s.drafter != name)
            self._metrics.pooled_waiting.set(len(self._waiting))
        return taken

    def restore(self, cursor: Mapping[str, Any] | None, policy: Any) -> None:
        """Resume from a snapshot's ``cursor``: its waiting outcomes wait again, and those
        whose drafter ``policy`` serves already (registered before the crash, after the
        snapshot) are applied now."""
        applied = (cursor or {}).get("applied") or {}
        self._applied = {
            str(replica): int(seq) for replica, seq in applied.items() if isinstance(seq, int)
        }
        self._waiting = collections.deque(_waiting_from((cursor or {}).get("waiting")))
        for name in {shared.drafter for shared in self._waiting if serves(policy, shared.drafter)}:
            self.drafter_added(policy, name)
        self._metrics.pooled_waiting.set(len(self._waiting))

    def _record(
        self,
        kind: str,
        context: Any,
        drafter: str,
        k: int,
        drafted: tuple[int, ...],
        accepted: tuple[int, ...],
        tokens: int,
        requested: tuple[int, ...] = (),
        *,
        scored: tuple[int, ...] | None = None,
    ) -> None:
        self._seq += 1
        self._applied[self.identity] = self._seq
        shared = SharedOutcome(
            Origin(self.identity, self._seq),
            kind,
            str(context.cluster),
            int(context.length_bucket),
            drafter,
            k,
            drafted,
            accepted,
            tokens,
            requested,
            self._registration_of(drafter),
            scored,
            bool(context.structured),
        )
        self._writer.append(outcome_payload(shared))

    # -- entries of other replicas --------------------------------------------------------
    def handle(self, entries: Sequence[tuple[str, Mapping[Any, Any]]]) -> None:
        """Check and apply a batch of stream entries (in stream order)."""
        for entry_id, fields in entries:
            try:
                payload = self._signer.verified(fields)
                shared = outcome_from_payload(payload, MAX_DRAFT_LENGTH)
            except EntryRejected as rejected:
                self.reject(entry_id, rejected.reason, str(rejected))
                continue
            if self._writers_read is not None:
                self._writers_read.add(shared.origin.replica)
            if shared.origin.replica == self.identity:
                continue  # learned here first
            try:
                done = self._holder.apply_shared(
                    lambda origin=shared.origin: self._admit(origin),  # type: ignore[misc]
                    lambda policy, shared=shared: self._apply_or_wait(policy, shared),  # type: ignore[misc]
                )
            except (ValueError, KeyError, TypeError) as error:
                self.reject(entry_id, "malformed", f"the policy refused it: {error}")
                continue
            if done:
                self._counted_applied(1)
        self._metrics.policy_version.set(self._holder.version)

    def _apply_or_wait(self, policy: Any, shared: SharedOutcome) -> bool:
        """Apply ``shared`` (True), or keep it until its drafter joins the policy
        (``drafter_added``): applied now, an outcome of a drafter the policy has no arms
        for counted as a request and lost its acceptance. At most ``WAITING_MAX`` wait."""
        if serves(policy, shared.drafter):
            if not self._same_registration(shared):
                return False
            apply_to_policy(policy, shared)
            return True
        if shared.drafter not in self._loading:
            self._not_served(shared)
            return False
        if len(self._waiting) >= WAITING_MAX:
            oldest = self._waiting.popleft()
            self._count_rejected("drafter_not_served", 1)
            logger.warning(
                "pooling: dropped an outcome of drafter %s from %s: %d outcomes already wait "
                "for drafters this replica does not serve",
                oldest.drafter,
                oldest.origin.replica,
                WAITING_MAX,
            )
        self._waiting.append(shared)
        self._metrics.pooled_waiting.set(len(self._waiting))
        return False

    def _same_registration(self, shared: SharedOutcome) -> bool:
        """Whether ``shared`` was learnt of the drafter served here under its name, not of
        another registration of it (removed and registered again with other weights or
        options, here or on the writer's replica: the two streams are not ordered with
        each other). An outcome that names none, or a drafter this replica cannot
        name, is taken. Otherwise it is dropped and counted (``other_registration``)."""
        here = self._registration_of(shared.drafter) if shared.registration else ""
        if not here or here == shared.registration:
            return True
        self._count_rejected("other_registration", 1)
        if shared.drafter not in self._warned_other and len(self._warned_other) < WARNED_MAX:
            self._warned_other.add(shared.drafter)
            logger.warning(
                "pooling: outcomes of drafter %s from %s are dropped: they were learnt of "
                "another registration of that name (%s; served here: %s)",
                shared.drafter,
                shared.origin.replica,
                shared.registration,
                here,
            )
        return False

    def _not_served(self, shared: SharedOutcome) -> None:
        """An outcome of a drafter neither served nor loading here (removed, one this
        replica could not load, or one whose registration entry has not been read yet):
        dropped, counted, warned about once per drafter."""
        self._count_rejected("drafter_not_served", 1)
        if shared.drafter in self._warned or len(self._warned) >= WARNED_MAX:
            return
        self._warned.add(shared.drafter)
        logger.warning(
            "pooling: outcomes of drafter %s (from %s and others) are dropped: it is not "
            "served here (counted in specroute_pooled_entries_rejected_total, reason "
            "drafter_not_served)",
            shared.drafter,
            shared.origin.replica,
        )

    def _counted_applied(self, count: int) -> None:
        self.applied += count
        self._metrics.pooled_applied.inc(count)

    def _count_rejected(self, reason: str, count: int) -> None:
        self.rejected += count
        self._metrics.pooled_rejected.labels(reason=reason).inc(count)

    def reject(self, entry_id: str, reason: str, detail: str) -> None:
        """Drop an entry: counted, and logged at most once per ``REJECT_LOG_INTERVAL_S``
        per reason (with how many were dropped for it since the last line)."""
        self._count_rejected(reason, 1)
        now = time.monotonic()
        last, since = self._reject_lines.get(reason, (-REJECT_LOG_INTERVAL_S, 0))
        if now - last < REJECT_LOG_INTERVAL_S:
            self._reject_lines[reason] = (last, since + 1)
            return
        self._reject_lines[reason] = (now, 0)
        logger.warning(
            "pooling: dropped outcome entry %s (%s)%s; counted in "
            "specroute_pooled_entries_rejected_total{reason=%s}, logged once a minute at most",
            entry_id,
            detail,
            f"; {since} more for this reason since the last line" if since else "",
            reason,
        )

    def _admit(self, origin: Origin) -> bool:
        """True the first time (replica, seq) comes: writers publish in seq order, so
        anything at or below the highest applied seq was applied already."""
        if origin.seq <= self._applied.get(origin.replica, 0):
            return False
        self._applied[origin.replica] = origin.seq
        return True

    # -- loops ----------------------------------------------------------------------------
    async def _handle_off_loop(self, entries: Sequence[tuple[str, Mapping[Any, Any]]]) -> None:
        """``handle`` in a worker thread (the holder is locked, entries stay in order): on
        the event loop, a batch of 1,000 entries stalled Route and Generate for up to
        ~100 ms (11-14 ms in a thread, side by side: ``benchmarks/pooling/HISTORY.md``)."""
        await asyncio.to_thread(self.handle, entries)

    async def catch_up(self) -> int:
        """Read and apply every retained entry, then forget the writers none of them
        came from (their entries are gone from the stream: none can be read again)."""
        read = await self._reader.catch_up(self._handle_off_loop)
        self._holder.change_log(self._forget_writers_gone)
        return read

    def _forget_writers_gone(self) -> None:
        """Keep in ``_applied`` only this replica and the writers read since the start
        (under the holder's lock)."""
        if self._writers_read is None:
            return
        kept = self._writers_read | {self.identity}
        gone = [writer for writer in self._applied if writer not in kept]
        for writer in gone:
            del self._applied[writer]
        self._writers_read = None
        if gone:
            logger.info("pooling: forgot %d writers with no entry left in the stream", len(gone))

    async def run_reader(self) -> None:
        await self._reader.run(self._handle_off_loop)

    async def run_writer(self) -> None:
        await self._writer.run()

    @property
    def published(self) -> int:
        return self._writer.published

    @property
    def dropped(self) -> int:
        return self._writer.dropped

    @property
    def pending(self) -> int:
        return self._writer.pending

    @property
    def waiting(self) -> int:
        return len(self._waiting)
