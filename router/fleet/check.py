"""``specroute fleet check``: a fleet file checked before it is served or read again.

The file is checked as ``specroute serve --fleet`` would check it at start (its format,
the drafters it names against those the settings serve, its API key variables, its CA
bundle). With ``probe`` each replica is also asked what a sidecar asks before it brings
one in (``GET /health``, ``GET /v1/models`` for the model and its ``max_model_len``,
``POST /tokenize`` for the tokenizer, with the sidecar's API key), so that a file meant
for a running sidecar's reload (``router.fleet.reload``) is known to serve first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from router.fleet.config import FleetSpec, ReplicaSpec, replica_api_keys, replica_tls
from router.fleet.replica import Replica, probe


@dataclass(frozen=True)
class ReplicaCheck:
    """One replica of the file, and what its probe found (``serving`` None: not probed)."""

    name: str
    url: str
    speculative: str
    k: int
    serving: bool | None = None
    problem: str = ""
    max_model_len: int | None = None

    def line(self) -> str:
        where = f"{self.name} ({self.url})" if self.name != self.url else self.url
        head = f"{where}: {self.speculative}, k={self.k}"
        if self.serving is None:
            return head
        if not self.serving:
            return f"{head}: NOT SERVING: {self.problem}"
        context = f", max_model_len {self.max_model_len}" if self.max_model_len else ""
        return f"{head}: serving{context}"


def unprobed(fleet: FleetSpec) -> list[ReplicaCheck]:
    return [_row(spec) for spec in fleet.replicas]


async def probed(
    fleet: FleetSpec, probe_ids: tuple[int, ...], source: str = ""
) -> list[ReplicaCheck]:
    """Each replica of ``fleet`` probed once, at once, as a sidecar's health check brings a
    replica in (``router.fleet.replica.probe``); ``probe_ids``: the target tokenizer's ids
    of ``TOKENIZER_PROBE``."""
    import aiohttp

    keys = replica_api_keys(fleet, source=source)
    tls = replica_tls(fleet, source)
    connector = aiohttp.TCPConnector(limit=0, ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        replicas = [
            Replica.from_spec(spec, fleet, keys[spec.name], probe_ids) for spec in fleet.replicas
        ]
        timeout_s = fleet.probe_timeout_s
        await asyncio.gather(*(probe(session, replica, timeout_s) for replica in replicas))
    return [_row(replica.spec, replica) for replica in replicas]


def _row(spec: ReplicaSpec, probed: Replica | None = None) -> ReplicaCheck:
    """A replica's line of the check: as the file gives it, and as ``probed`` found it."""
    row = ReplicaCheck(spec.name, spec.url, spec.speculative, spec.draft_length)
    if probed is None:
        return row
    return replace(
        row,
        serving=probed.healthy,
        problem=probed.last_error,
        max_model_len=probed.max_model_len,
    )
