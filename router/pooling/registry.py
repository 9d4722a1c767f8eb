"""The shared drafter registry: RegisterDrafter / RemoveDrafter on one replica reach all.

The replica that took the call has validated, loaded and stored the drafter already; it
then appends a signed registration entry to the registry stream. Every other replica
reads it and registers the drafter itself, through the same validation (model roots,
safetensors, a tokenizer that fits, a probe generation) and its own SQLite store, the
local durable copy. A replica that cannot (the path missing on that node, say) keeps
serving and lists the drafter as unavailable, with the reason, in ListDrafters.

Entries are folded by drafter name first (the last entry of each name wins), the
retained history at start and each batch read later, so a drafter registered and
removed before this replica started is never loaded; each (writer, seq) is applied once
per process, also when a reader reads the stream again from its start. A registration
names the drafter's identity (kind, weights, options: ``DrafterRecord.identity``): a
replica that holds another drafter of that name (it was away while the fleet removed
the drafter and registered it again) removes its own and registers the announced one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.domain import MAX_SAMPLE_TEXTS, DrafterSpec
from router.errors import AlreadyExistsError, NotFoundError, SidecarError
from router.metrics import SidecarMetrics
from router.pooling.entries import (
    EntryRejected,
    EntrySigner,
    Origin,
    SharedRegistration,
    registration_from_payload,
    registration_payload,
)
from router.pooling.streams import StreamReader, StreamWriter
from router.store import DrafterRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnavailableDrafter:
    """A drafter registered elsewhere in the fleet that this replica could not load."""

    name: str
    kind: str
    path: str
    error: str


class SharedRegistry:
    """Publishes this replica's registrations and applies the others'."""

    def __init__(
        self,
        identity: str,
        service: Any,  # router.service.RouterService
        writer: StreamWriter,
        reader: StreamReader,
        signer: EntrySigner,
        metrics: SidecarMetrics,
        loading: set[str] | None = None,
    ) -> None:
        self.identity = identity
        self._service = service
        # Names whose registration is loading here; shared with the OutcomePool.
        self.loading: set[str] = loading if loading is not None else set()
        self._writer = writer
        self._reader = reader
        self._signer = signer
        self._metrics = metrics
        self._seq = 0
        self._applied: dict[str, int] = {}  # highest seq applied per writer, this process
        self._unavailable: dict[str, UnavailableDrafter] = {}
        self.rejected = 0

    # -- this replica's calls ---------------------------------------------------------------
    def registered(self, spec: DrafterSpec, identity: str) -> None:
        """Publish this replica's registration of ``spec`` (``identity``: its record's,
        ``DrafterRecord.identity``). Any thread (the registration's worker)."""
        self._seq += 1
        event = SharedRegistration(
            Origin(self.identity, self._seq),
            "register",
            spec.name,
            spec.kind,
            spec.path,
            tuple(spec.tasks),
            tuple(spec.finetune_sample),
            dict(spec.options),
            identity,
        )
        self._writer.append(registration_payload(event))

    def removed(self, name: str) -> None:
        self._seq += 1
        self._unavailable.pop(name, None)
        self._writer.append(
            registration_payload(
                SharedRegistration(Origin(self.identity, self._seq), "remove", name)
            )
        )

    def unavailable(self) -> list[UnavailableDrafter]:
        return list(self._unavailable.values())

    # -- the others' ----------------------------------------------------------------------
    def _checked(
        self, entries: Sequence[tuple[str, Mapping[Any, Any]]]
    ) -> list[SharedRegistration]:
        events = []
        for entry_id, fields in entries:
            try:
                event = registration_from_payload(self._signer.verified(fields))
            except EntryRejected as rejected:
                self.rejected += 1
                self._metrics.pooled_rejected.labels(reason=rejected.reason).inc()
                logger.warning("pooling: dropped registry entry %s (%s)", entry_id, rejected)
                continue
            if event.origin.seq > self._applied.get(event.origin.replica, 0):
                events.append(event)  # not applied yet in this process (its own included)
        return events

    async def handle(self, entries: Sequence[tuple[str, Mapping[Any, Any]]]) -> None:
        """Apply a batch of entries, folded by name: only the last one of each drafter
        name counts (the retained history at start is read in such batches too). This
        replica's own entries take part in the fold (a newer registration of its own
        wins over an older one of another replica's) and are not applied again."""
        folded: dict[str, list[SharedRegistration]] = {}
        for event in self._checked(entries):
            folded[event.name] = [*folded.pop(event.name, []), event]  # by last entry
        survivors = [group[-1] for group in folded.values()]
        self._expect([e for e in survivors if e.origin.replica != self.identity])
        for group in folded.values():
            survivor = group[-1]
            if survivor.origin.replica != self.identity:
                await self._apply(survivor)
            # Applied, and what folded into it with it: not applied again when read
            # again (a catch-up out of time, a reader started again). Writers publish in
            # seq order and names apply in the order of their last entries, so a
            # writer's entries up to the highest marked are all applied or superseded.
            for event in group:
                replica, seq = event.origin.replica, event.origin.seq
                self._applied[replica] = max(self._applied.get(replica, 0), seq)

    def _expect(self, events: Sequence[SharedRegistration]) -> None:
        """Every registration read and not served here is loading from now on: it is
        applied after the ones before it (a model load can take many seconds), and the
        outcomes other replicas learn of it meanwhile wait for it (``OutcomePool``)."""
        live = set(self._service.drafters.names())
        self.loading.update(e.name for e in events if e.kind != "remove" and e.name not in live)

    async def _apply(self, event: SharedRegistration) -> None:
        if event.kind == "remove":
            await self._remove(event.name)
        else:
            await self._register(event)
        self._metrics.shared_drafters_unavailable.set(len(self._unavailable))

    def _holds_another(self, event: SharedRegistration) -> bool:
        """Whether this replica holds another drafter of ``event``'s name than the one it
        announces, served or stored and not served (entries without an identity hold
        none)."""
        if not event.registration:
            return False
        drafters = self._service.drafters
        here = drafters.identity(event.name)
        if not here:
            stored = drafters.unserved_record(event.name)
            here = stored.identity if stored is not None else ""
        return bool(here) and here != event.registration

    async def _register(self, event: SharedRegistration) -> None:
        if self._holds_another(event):
            logger.info(
                "pooling: drafter %s was registered again by %s with other weights or "
                "options; this replica's is replaced",
                event.name,
                event.origin.replica,
            )
            self.loading.add(event.name)  # the announced one's outcomes wait for it
            if not await self._remove(event.name, replacing=True):
                self.loading.discard(event.name)
                self._service.policy.drafter_not_served(event.name)
                return
        live = self._service.drafters.names()
        if event.name in live:
            self.loading.discard(event.name)
            logger.debug("pooling: drafter %s is already served here", event.name)
            return
        spec = DrafterSpec(
            name=event.name,
            kind=event.drafter_kind,
            path=event.path,
            tasks=event.tasks,
            # A replica of an earlier version sent its whole sample; this one registers
            # at most MAX_SAMPLE_TEXTS of it.
            finetune_sample=event.finetune_sample[:MAX_SAMPLE_TEXTS],
            options=dict(event.options or {}),
        )
        self.loading.add(event.name)  # its outcomes wait for it meanwhile (OutcomePool)
        try:
            await self._service.register_drafter(spec)
        except asyncio.CancelledError:
            # A catch-up out of time: the registration goes on in its worker thread (and
            # applies what waits for it); the live reader reads this entry again.
            raise
        except AlreadyExistsError:  # stored here but not served: it will not join
            self.loading.discard(event.name)
            self._service.policy.drafter_not_served(event.name)
            return
        except Exception as error:  # SidecarError, or a model that fails to load here
            self.loading.discard(event.name)  # before its waiting outcomes are dropped
            self._unavailable[event.name] = UnavailableDrafter(
                event.name, event.drafter_kind, event.path, str(error)
            )
            self._service.policy.drafter_not_served(event.name)
            logger.warning(
                "pooling: drafter %s registered by %s is unavailable here: %s",
                event.name,
                event.origin.replica,
                error,
            )
            return
        self.loading.discard(event.name)  # joined the policy (what waited is applied)
        self._unavailable.pop(event.name, None)
        logger.info("pooling: drafter %s registered by %s", event.name, event.origin.replica)

    async def _remove(self, name: str, replacing: bool = False) -> bool:
        """Remove this replica's drafter ``name``, served or stored and not served (its
        record stayed, and a restart with its files back served a drafter the fleet had
        removed); False when it stays (built in here, or the removal failed).
        ``replacing``: another registration of the name follows; the name stays loading,
        so the outcomes that arrive for it from now on wait for the new drafter."""
        self._unavailable.pop(name, None)
        if not replacing:
            self.loading.discard(name)
        drafters = self._service.drafters
        try:
            record: DrafterRecord | None = drafters.get(name).record
        except NotFoundError:
            record = None
        if record is not None and record.builtin:
            logger.warning("pooling: another replica removed %s, built in here; kept", name)
            return False
        if record is None and drafters.unserved_record(name) is None:
            if not replacing:
                self._service.policy.drafter_not_served(name)
            return True
        try:
            await self._service.remove_drafter(name)
        except (NotFoundError, SidecarError) as error:
            logger.warning("pooling: cannot remove drafter %s: %s", name, error)
            return False
        if not replacing:
            self._service.policy.drafter_not_served(name)
        logger.info("pooling: drafter %s removed by another replica", name)
        return True

    # -- loops ----------------------------------------------------------------------------
    async def catch_up(self) -> int:
        history: list[tuple[str, Mapping[Any, Any]]] = []
        start = self._reader.last_id
        try:
            count = await self._reader.catch_up(history.extend)
            await self.handle(history)
        except BaseException:
            self._reader.last_id = start  # the live loop reads them again
            raise
        return count

    async def run_reader(self) -> None:
        await self._reader.run(self.handle, rewound=self.announce_served)

    def announce_served(self) -> int:
        """Publish again every drafter registered at run time that this replica serves: the
        registry stream was lost (a Redis restarted without its data), and a replica
        that starts since, or missed the entry, would never hear of them (the outcomes'
        loss is only a loss; a registration's is a drafter never served there). Every
        replica announces what it serves; one that serves it already does nothing."""
        drafters = self._service.drafters
        names = sorted(drafters.registration_times())
        for name in names:
            record = drafters.get(name).record
            self.registered(DrafterSpec.of(record), record.identity)
        if names:
            logger.info("pooling: registry stream lost; announced %s again", names)
        return len(names)

    async def run_writer(self) -> None:
        await self._writer.run()
