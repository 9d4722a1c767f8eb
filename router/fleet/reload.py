"""The fleet file, read again while the sidecar serves: replicas added, removed or changed
without a restart (a scale-up, a replica moved, one taken out for maintenance).

Every ``reload_interval_s`` (5 s; 0: never) the sidecar reads the file, and when its
content changed checks the new one as at start (:func:`check_new_fleet`): a file it
cannot serve is refused in one logged line and the fleet stays as it was, serving; it is
not read as a change again until its content changes once more. A served file is applied
(:func:`plan_change`):

- a replica whose URL, model, drafter and k are the same (by name) is **kept**: the same
  object, its health, load and counts as they were, only its other settings (in-flight
  bound, timeout, API key) taken from the new file;
- a new one is **added** out of service, and serves once its first health check passes;
- one no longer listed, or listed with another URL, drafter or k, is **removed**: no new
  request goes to it, and those in flight on it finish there.

The model and ``tls_ca_file`` are the sidecar's for its whole run (its tokenizer, its HTTP
client): a file that changes them is refused, with the reason to restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.fleet.config import (
    FleetConfigError,
    FleetSpec,
    ReplicaSpec,
    check_fleet_drafters,
    fleet_from_bytes,
    replica_api_keys,
)
from router.fleet.replica import Replica

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetChange:
    """What applying a new fleet file does: the replicas to serve, in the file's order
    (``kept`` ones and ``added`` ones), and the ``removed`` ones."""

    replicas: list[Replica]
    added: list[Replica]
    removed: list[Replica]

    @property
    def kept(self) -> list[Replica]:
        added = {id(replica) for replica in self.added}
        return [replica for replica in self.replicas if id(replica) not in added]

    def summary(self) -> str:
        def names(replicas: Sequence[Replica]) -> str:
            return ", ".join(f"{r.name} ({r.drafter}, k={r.spec.draft_length})" for r in replicas)

        parts = [f"{len(self.kept)} kept"]
        parts += [f"added {names(self.added)}"] if self.added else []
        parts += [f"removed {names(self.removed)}"] if self.removed else []
        return "; ".join(parts)


def same_server(old: ReplicaSpec, new: ReplicaSpec) -> bool:
    """Whether ``new`` describes the replica ``old`` does: the same server serving the
    same configuration (its other settings may differ)."""
    return (old.url, old.model, old.speculative, old.draft_length) == (
        new.url,
        new.model,
        new.speculative,
        new.draft_length,
    )


def check_new_fleet(
    current: FleetSpec, new: FleetSpec, known_drafters: Collection[str], source: str
) -> dict[str, str | None]:
    """The new fleet's API keys by replica, once ``new`` is found servable in place of
    ``current``; ``FleetConfigError`` (one line) otherwise."""
    if new.model != current.model:
        raise FleetConfigError(
            f"{source}: the model changed from {current.model!r} to {new.model!r}; the "
            "sidecar serves one model (its tokenizer) for its whole run: restart it"
        )
    if new.tls_ca_file != current.tls_ca_file:
        raise FleetConfigError(
            f"{source}: tls_ca_file changed from {current.tls_ca_file} to {new.tls_ca_file}; "
            "the replicas' CA bundle is read at start: restart the sidecar"
        )
    check_fleet_drafters(new, known_drafters, source)
    return replica_api_keys(new, source=source)


def plan_change(
    current: Sequence[Replica],
    new: FleetSpec,
    keys: dict[str, str | None],
    probe_ids: tuple[int, ...],
) -> FleetChange:
    """The change from the ``current`` replicas to ``new``'s (module doc). Nothing is
    changed until the kept replicas' settings are refreshed by :func:`apply_settings`."""
    by_name = {replica.name: replica for replica in current}
    replicas: list[Replica] = []
    added: list[Replica] = []
    for spec in new.replicas:
        old = by_name.get(spec.name)
        if old is not None and same_server(old.spec, spec):
            replicas.append(old)
            continue
        replica = Replica.from_spec(spec, new, keys[spec.name], probe_ids)
        replicas.append(replica)
        added.append(replica)
    served = {id(replica) for replica in replicas}
    removed = [replica for replica in current if id(replica) not in served]
    return FleetChange(replicas, added, removed)


def apply_settings(change: FleetChange, new: FleetSpec, keys: dict[str, str | None]) -> None:
    """Give each kept replica its settings from ``new`` (in-flight bound, timeout, key)."""
    specs = {spec.name: spec for spec in new.replicas}
    for replica in change.kept:
        fresh = Replica.from_spec(specs[replica.name], new, keys[replica.name])
        replica.spec = fresh.spec
        replica.max_in_flight = fresh.max_in_flight
        replica.timeout_s = fresh.timeout_s
        replica.headers = fresh.headers


async def watch_fleet_file(
    path: Path,
    loaded: bytes,
    interval_s: Callable[[], float],
    apply: Callable[[FleetSpec], Awaitable[None]],
    refused: Callable[[str], None],
) -> None:
    """Forever (until ``interval_s()`` is 0): every ``interval_s()`` seconds, read the file
    at ``path``; when its content is not the last one read (``loaded`` at first), ``apply``
    the fleet it describes, or call ``refused`` with the one-line reason it cannot be
    served (``FleetConfigError`` from parsing it, or from ``apply``). A file that cannot
    be read leaves the fleet as it is (logged once)."""
    seen: bytes | None = loaded
    while interval_s() > 0:
        await asyncio.sleep(interval_s())
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except OSError as error:
            if seen is not None:
                logger.warning("fleet file %s unreadable (the fleet stays): %s", path, error)
            seen = None
            continue
        if content == seen:
            continue
        seen = content
        try:
            await apply(fleet_from_bytes(content, path))
        except FleetConfigError as error:
            refused(str(error))
    logger.info("fleet file %s: reload_interval_s is 0, it is no longer read", path)
