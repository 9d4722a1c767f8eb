"""The serving policy behind a lock, swappable at run time, snapshotted to the store.

Route runs on the event loop while generations update the policy from worker threads;
every policy call goes through one lock (each call is tens of microseconds).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from router.errors import InvalidFieldError, InvalidRequestError
from router.policy.base import (
    NONE_DRAFTER,
    DrafterHints,
    IncompatibleStateError,
    PricesPlainSteps,
)
from router.store import PolicySnapshot, SidecarStore

logger = logging.getLogger(__name__)

#: Key of a snapshot's learning-log cursor (which shared outcomes its state holds); kept
#: beside the policy's own state and never handed to the policy.
LOG_CURSOR_KEY = "learning_log_cursor"
#: A snapshot this build cannot restore (another format version, another policy) is kept
#: in the store under ``<policy>`` + this suffix, where pruning the policy's own
#: snapshots does not reach it: the learned state stays for a migration or a downgrade.
UNRESTORED_SUFFIX = ".unrestored"


class LearningLog(Protocol):
    """Where every outcome the policy learns from is recorded (``router.pooling``).

    Called under the holder's lock, so the order of records is the order of updates and a
    snapshot's cursor matches the state it is saved with; implementations only enqueue.
    """

    def outcome(self, context: Any, decision: Any, outcome: Any) -> None: ...

    def counterfactual(
        self,
        context: Any,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None: ...

    def cursor(self) -> dict[str, Any]: ...

    def restore(self, cursor: Mapping[str, Any] | None, policy: Any) -> None: ...

    def drafter_added(self, policy: Any, name: str) -> None: ...

    def drafter_not_served(self, name: str) -> None: ...


class PolicyHolder:
    """The current policy, its name, and persistence of its state."""

    def __init__(
        self,
        store: SidecarStore,
        drafters: Callable[[], Sequence[str]],
        similarity: Callable[[str], Mapping[str, float] | None],
        hints: Callable[[], DrafterHints] = DrafterHints,
        kept: Callable[[], Iterable[str]] = tuple,
        registered: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        self._store = store
        self._drafters = drafters
        # Stored drafters this start does not serve (files moved, roots narrowed): never
        # chosen, but their learned arms stay for the start that serves them again.
        self._kept = kept
        # Live drafters registered at run time -> when (``DrafterRecord.created_unix``): a
        # snapshot older than a drafter's registration holds no arms of it, only, maybe,
        # of an earlier drafter of the same name (removed, then registered again).
        self._registered = registered
        self._similarity = similarity
        self._hints = hints
        self._lock = threading.Lock()
        # Orders saves (the periodic snapshot, a policy switch, the final one): a state
        # read earlier is never saved after a newer one. Taken before ``_lock``, so that a
        # save's disk write does not hold up decisions.
        self._saving = threading.Lock()
        self._policy: Any = None
        self.name = ""
        # The current policy's own configuration, before the drafters' hints fill it in.
        self._config: Mapping[str, Any] | None = None
        self._log: LearningLog | None = None
        self._restored_cursor: Mapping[str, Any] | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(
        self, name: str, config: Mapping[str, Any] | None = None, *, restore: bool = True
    ) -> PolicySnapshot | None:
        """Make policy ``name`` (restoring its last snapshot unless told not to) and serve it;
        what the drafters' kinds hint (``DrafterHints``) fills what ``config`` leaves out.

        Under one hold of the lock the policy served until now is read, the new one
        replaces it (restored from the state just read when the same policy is set again
        with another configuration) and no update falls in between; the database is read
        and written outside it. Route and Report take that lock on the event loop: a
        database another process held (a backup, an operator's shell) stalled every call
        for SQLite's 5 s wait. Then the outgoing state is saved, and the new policy's when
        it starts from its priors (a reset, or a first use: a crash before the next
        periodic snapshot brought back the state it replaced); a save that fails puts the
        previous policy back, as it was, and raises."""
        hinted, policy = self._made(name, config)
        with self._saving:
            same = restore and self.started and self.name == name
            stored = self._store.latest_policy(name) if restore and not same else None
            snapshot, cursor = None, None
            if stored is not None:
                policy, snapshot, cursor = self._restored(name, hinted, policy, stored)
            with self._lock:
                previous = (self._policy, self.name, self._config, self._restored_cursor)
                outgoing = None
                if self._policy is not None:
                    outgoing = PolicySnapshot(
                        self.name,
                        int(self._policy.version),
                        self._state_of(self._policy),
                        time.time(),
                    )
                if same and outgoing is not None:
                    policy, snapshot, cursor = self._restored(name, hinted, policy, outgoing)
                self._sync_drafters(policy)  # a drafter (un)registered since it was made
                fresh = None
                if snapshot is None and outgoing is not None:
                    fresh = PolicySnapshot(
                        name, int(policy.version), self._state_of(policy), time.time()
                    )
                self._policy, self.name, self._config = policy, name, config
                self._restored_cursor = cursor
                self._rehint()
            try:
                for saved in (outgoing, fresh):
                    if saved is not None:
                        self._store.save_policy(
                            saved.policy, saved.version, saved.state, saved.created_unix
                        )
            except Exception:
                with self._lock:
                    self._policy, self.name, self._config, self._restored_cursor = previous
                    self._rehint()
                raise
        return snapshot

    def check(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """InvalidRequestError where ``start(name, config)`` would refuse the name or the
        configuration, or where the configuration plays a drafter not served now (a typo
        would turn speculation off for every request it names); nothing changes."""
        _, policy = self._made(name, config)
        named: set[str] = getattr(policy, "named_drafters", set)()
        unknown = sorted(named - {*self._drafters(), NONE_DRAFTER})
        if unknown:
            raise InvalidFieldError(
                "config",
                f"names drafters this sidecar does not serve: {unknown}; served: "
                f"{sorted(self._drafters())}",
            )

    def _made(
        self, name: str, config: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any] | None, Any]:
        """(the hinted configuration, a new policy ``name`` from it), or InvalidRequestError."""
        from router.policy.registry import POLICIES, with_drafter_hints

        if name not in POLICIES:
            raise InvalidRequestError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
        hinted = with_drafter_hints(name, config, self._hints())
        return hinted, self._make(name, hinted)

    def _restored(
        self, name: str, hinted: Mapping[str, Any] | None, policy: Any, snapshot: PolicySnapshot
    ) -> tuple[Any, PolicySnapshot | None, Mapping[str, Any] | None]:
        """``policy`` with ``snapshot`` loaded, the snapshot and the learning log's cursor
        it holds; a state that does not load is kept as ``<name>.unrestored`` and a new
        policy from its priors serves instead (not one a load that failed midway left
        half-filled), with no snapshot and no cursor."""
        state = dict(snapshot.state)
        cursor = state.pop(LOG_CURSOR_KEY, None)
        try:
            policy.load_state_dict(state)
            logger.info("restored policy %s at version %d", name, snapshot.version)
        except Exception as exc:  # any state that does not load: start from priors
            self._keep_unrestored(name, snapshot, exc)
            return self._make(name, hinted), None, None
        self._forget_earlier_registrations(policy, snapshot.created_unix)
        self._sync_drafters(policy)
        return policy, snapshot, cursor

    def _forget_earlier_registrations(self, policy: Any, saved_unix: float) -> None:
        """Drop from a restored ``policy`` the arms of every live drafter registered after
        its snapshot was saved: they were learned by an earlier drafter of that name (removed,
        then a new one registered before the next snapshot, then a crash, or a switch back
        to a policy whose snapshot predates both), and the new drafter starts from its
        prior (``_sync_drafters`` adds it back)."""
        for name, registered_unix in self._registered().items():
            if registered_unix > saved_unix and name in (getattr(policy, "drafters_", ()) or ()):
                logger.info(
                    "policy snapshot predates drafter %s's registration: its arms there were "
                    "an earlier %s's, not restored",
                    name,
                    name,
                )
                policy.remove_drafter(name)

    def _make(self, name: str, hinted: Mapping[str, Any] | None) -> Any:
        """A new policy ``name`` over the live drafters, from its priors."""
        from router.policy.registry import config_problem, make_policy

        try:
            policy = make_policy(name, list(self._drafters()), hinted or None)
        except (TypeError, ValueError, KeyError) as exc:
            problem = config_problem(exc)
            raise InvalidRequestError(f"bad configuration for policy {name!r}: {problem}") from exc
        self._sync_drafters(policy)  # similarity priors for the built-in drafters
        return policy

    def _keep_unrestored(self, name: str, snapshot: PolicySnapshot, exc: Exception) -> None:
        """Keep a snapshot this build cannot restore as ``<name>.unrestored``, so that no
        later pruning removes that learned state, and say so."""
        kept = self._store.save_policy(name + UNRESTORED_SUFFIX, snapshot.version, snapshot.state)
        logger.log(
            logging.WARNING if isinstance(exc, IncompatibleStateError) else logging.ERROR,
            "not restoring policy %s: %s; starting from priors, the snapshot is kept in the "
            "store as %r",
            name,
            exc if isinstance(exc, IncompatibleStateError) else f"{type(exc).__name__}: {exc}",
            kept.policy,
        )

    def _sync_drafters(self, policy: Any) -> None:
        """Make the policy's drafters the live ones (a snapshot may predate (un)registrations),
        keeping the arms of the stored drafters not served now (``kept``)."""
        live = list(self._drafters())
        for drafter in live:
            with contextlib.suppress(ValueError, KeyError):  # already known to it
                policy.add_drafter(drafter, self._similarity(drafter))
        keep = {*live, *self._kept()}
        for drafter in list(getattr(policy, "drafters_", ()) or ()):
            if drafter not in keep:
                policy.remove_drafter(drafter)

    # -- per request ------------------------------------------------------------------
    def select(self, context: Any, eligible: Sequence[str]) -> tuple[Any, int]:
        with self._lock:
            return self._policy.select(context, eligible), int(self._policy.version)

    def select_many(
        self, contexts: Sequence[Any], eligible: Sequence[str]
    ) -> tuple[list[Any], int]:
        """Decisions for a batch of contexts under one lock, and the policy version."""
        with self._lock:
            return self._policy.select_many(contexts, eligible), int(self._policy.version)

    def plain_step_terms(self) -> tuple[float, float] | None:
        """(q, s) of the serving policy where it measures them (``PricesPlainSteps``)."""
        with self._lock:
            policy = self._policy
            return policy.plain_step_terms() if isinstance(policy, PricesPlainSteps) else None

    def update(self, context: Any, decision: Any, outcome: Any) -> int:
        """Every outcome this process learns from (Report, Generate) comes here."""
        with self._lock:
            self._policy.update(context, decision, outcome)
            if self._log is not None:
                self._log.outcome(context, decision, outcome)
            return int(self._policy.version)

    def update_counterfactual(
        self,
        context: Any,
        drafter: str,
        accepted_per_step: Sequence[int],
        draft_length: int,
        drafted_per_step: Sequence[int] | None = None,
    ) -> None:
        """A counterfactual score (``drafted_per_step``: where the scorer counts drafts)."""
        drafted = None if drafted_per_step is None else list(drafted_per_step)
        with self._lock:
            self._policy.update_counterfactual(
                context, drafter, list(accepted_per_step), draft_length, drafted
            )
            if self._log is not None:
                self._log.counterfactual(context, drafter, accepted_per_step, draft_length, drafted)

    # -- learning shared with other processes (router.pooling) ---------------------------
    def attach_log(self, log: LearningLog) -> None:
        """Record every later update in ``log``; it resumes from the restored snapshot's
        cursor (what the restored state already holds)."""
        with self._lock:
            log.restore(self._restored_cursor, self._policy)
            self._log = log

    def apply_shared(self, admit: Callable[[], bool], learn: Callable[[Any], bool]) -> bool:
        """Apply an outcome learned elsewhere: under the lock, ``admit()`` (deduplication,
        advancing the log's cursor) and then ``learn(policy)``, whose answer (applied now,
        or kept for later) it returns; not recorded again."""
        with self._lock:
            if not admit():
                return False
            return learn(self._policy)

    def change_log(self, change: Callable[[], None]) -> None:
        """``change()`` under the lock: the attached log's cursor, which every snapshot
        saves, changes only under it."""
        with self._lock:
            change()

    def add_drafter(self, name: str, similarity: Mapping[str, float] | None) -> None:
        """A drafter registered at run time joins the policy with its kind's hints, as
        it would at a restart (which loads it with the others)."""
        with self._lock:
            self._policy.add_drafter(name, similarity)
            self._rehint()
            if self._log is not None:  # outcomes other replicas learnt of it meanwhile
                self._log.drafter_added(self._policy, name)

    def remove_drafter(self, name: str) -> None:
        """Forget ``name``'s arms. A snapshot read before this holds them, and is stamped
        with that time: a later registration of the same name is newer, and restoring it
        leaves them out (``_forget_earlier_registrations``)."""
        with self._lock:
            self._policy.remove_drafter(name)
            self._rehint()
            if self._log is not None:
                self._log.drafter_not_served(name)

    def drafter_not_served(self, name: str) -> None:
        """``name``, registered on another replica, will not be served here (it failed to
        load, or was removed before it did): outcomes waiting for it are dropped."""
        with self._lock:
            if self._log is not None:
                self._log.drafter_not_served(name)

    def hints_changed(self) -> None:
        """The drafters' hints changed (a fleet's drafter now runs at another k): the
        policy is given them."""
        with self._lock:
            self._rehint()

    def _rehint(self) -> None:
        """Give the policy the hints of the live drafters, merged with its configuration
        as at start (call locked)."""
        from router.policy.registry import READS_DRAFTER_HINTS, with_drafter_hints

        if self.name not in READS_DRAFTER_HINTS:
            return
        hinted = with_drafter_hints(self.name, self._config, self._hints())
        self._policy.set_drafter_hints(
            DrafterHints(
                draft_cost_ratio=hinted.get("draft_cost_ratio") or {},
                copy_drafters=tuple(hinted.get("copy_drafters") or ()),
                draft_length=hinted.get("draft_length") or {},
                cost_shape=hinted.get("cost_shape") or {},
            )
        )

    # -- inspection and persistence ---------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether a policy serves (``start`` has run): before, there is nothing to save."""
        return self._policy is not None

    @property
    def version(self) -> int:
        return int(self._policy.version)

    def describe(self) -> tuple[str, int, list[Any]]:
        with self._lock:
            return self.name, int(self._policy.version), list(self._policy.describe())

    def state(self) -> tuple[str, int, dict[str, Any]]:
        with self._lock:
            return self.name, int(self._policy.version), self._state_of(self._policy)

    def _state_of(self, policy: Any) -> dict[str, Any]:
        """The policy's state, with the log's cursor: the attached log's, else the one it
        was restored with, kept for a start with pooling on again (call locked)."""
        state = dict(policy.state_dict())
        if self._log is not None:
            state[LOG_CURSOR_KEY] = self._log.cursor()
        elif self._restored_cursor is not None:
            # Dropping it would replay the whole retained stream, this state's own
            # outcomes included, into it once pooling is back on: counted twice.
            state[LOG_CURSOR_KEY] = self._restored_cursor
        return state

    def snapshot(self) -> PolicySnapshot:
        """Save the current policy's state to the store (after any save begun before: a
        periodic snapshot read before a policy switch or the final snapshot was saved after
        it, and restored in its place)."""
        with self._saving:
            with self._lock:  # the time the state was read, not saved: a registration
                # in between is after it (``_forget_earlier_registrations``)
                name, version = self.name, int(self._policy.version)
                state, read_unix = self._state_of(self._policy), time.time()
            return self._store.save_policy(name, version, state, read_unix)
