"""Live drafters: the built-in ones plus the store's registered ones, validated before they serve.

Registration checks everything before anything changes: the name is free, the kind is
known, the path is under a model root, the weights are safetensors, the tokenizer
matches the target's, and the drafter loads and drafts on a probe prompt. Only then is
the record committed to SQLite and the drafter made eligible for the next request.

In fleet mode the target's weights are not loaded (a ``TargetDescription``, no engine):
the probe asks the drafter itself for a draft and a counterfactual score, and a kind that
drafts with the target's own weights (``self``) is refused.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifiers.chat import render_chat
from router.bundle import read_finetune_sample
from router.domain import DrafterSpec, check_registration_lists
from router.errors import (
    AlreadyExistsError,
    CapacityError,
    InvalidFieldError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    SidecarError,
)
from router.policy.base import NONE_DRAFTER
from router.settings import Limits
from router.store import DrafterRecord, SidecarStore

if TYPE_CHECKING:
    from drafters.engine import SpeculativeEngine
    from drafters.loader import TargetInfo

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")  # whole names: fullmatch
PROBE_PROMPT = render_chat([{"role": "user", "content": "Hello, how are you?"}])
PROBE_TOKENS = 4
PROBE_DRAFT_LENGTH = 2


class TargetWeightsNotLoadedError(PreconditionError):
    """A drafter kind that drafts with the target's weights, in a sidecar that has not
    loaded them (fleet mode)."""


@dataclass(frozen=True)
class LiveDrafter:
    """A drafter ready to serve, with its record; ``serial`` tells this registration from
    an earlier or later one of its name (``DrafterPool.serial``)."""

    record: DrafterRecord
    drafter: Any  # drafters.Drafter
    serial: int = 0


class DrafterPool:
    """Name -> live drafter; reads are lock-free snapshots, writes take a lock.

    ``engine`` is None when the target's weights are not loaded (fleet mode)."""

    def __init__(
        self,
        target: TargetInfo,
        engine: SpeculativeEngine | None,
        store: SidecarStore,
        roots: Sequence[Path],
        limits: Limits | None = None,
    ) -> None:
        self._target = target
        self._engine = engine
        self._store = store
        self._roots = list(roots)
        self._limits = limits or Limits()
        self._write_lock = threading.Lock()
        self._live: dict[str, LiveDrafter] = {}
        self._serials = itertools.count(1)
        # Stored drafters this start did not serve, with why (ListDrafters' unavailable).
        self._unserved: dict[str, tuple[DrafterRecord, str]] = {}

    # -- reads ------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._live)

    def eligible(self) -> list[str]:
        """Drafters the policy may choose (``none`` is k = 0, always available to it)."""
        return [name for name in self._live if name != NONE_DRAFTER]

    def get(self, name: str) -> LiveDrafter:
        live = self._live.get(name)
        if live is None:
            unserved = self._unserved.get(name)
            if unserved is not None:  # ListDrafters says why: so does this
                raise NotFoundError(
                    f"drafter {name!r} is registered but not served at this start: "
                    f"{unserved[1]}; served: {sorted(self._live)}"
                )
            raise NotFoundError(f"no drafter named {name!r}; registered: {sorted(self._live)}")
        return live

    def find(self, name: str) -> LiveDrafter | None:
        """The served drafter ``name`` (None when none is), read once."""
        return self._live.get(name)

    def serial(self, name: str) -> int:
        """The serving registration of ``name`` (0: none served): a request routed to one
        registration is learnt from only while that one serves (``RoutedRequest``)."""
        live = self.find(name)
        return live.serial if live is not None else 0

    def identity(self, name: str) -> str:
        """The served drafter ``name``'s ``DrafterRecord.identity``; "" for none served."""
        live = self.find(name)
        return live.record.identity if live is not None else ""

    def unserved_record(self, name: str) -> DrafterRecord | None:
        """The stored record of ``name`` when this start does not serve it."""
        found = self._unserved.get(name)
        return found[0] if found is not None else None

    def records(self) -> list[DrafterRecord]:
        return [live.record for live in self._live.values()]

    def registration_times(self) -> dict[str, float]:
        """Drafters registered at run time (not built in) that are served -> when."""
        return {
            name: live.record.created_unix
            for name, live in self._live.items()
            if not live.record.builtin
        }

    def unserved(self) -> list[tuple[DrafterRecord, str]]:
        """Stored drafters this start did not serve, each with the reason (kept in the
        store for a start whose settings allow them, or for ``remove``)."""
        return list(self._unserved.values())

    # -- start-up ---------------------------------------------------------------------
    def add_builtin(self, record: DrafterRecord) -> None:
        """Load a built-in drafter (the world's, ngram, none); not stored in SQLite. One
        that needs the target's weights where they are not loaded is left out, warned."""
        try:
            drafter = self._create(record.kind, record.name, record.path or None, record.options)
        except TargetWeightsNotLoadedError as exc:
            logger.warning("built-in drafter %s left out: %s", record.name, exc)
            return
        described = _with_weights(replace(record, builtin=True), drafter, self._target)
        self._publish(LiveDrafter(described, drafter))

    def restore(self) -> list[str]:
        """Load every stored drafter; a broken one is logged and skipped, not deleted.

        A stored drafter passes the checks registration made, against this start's
        settings: its kind and options, and a model drafter's path under today's model
        roots (an operator who narrows the roots and restarts does not keep loading
        files from outside them)."""
        restored = []
        for record in self._store.drafters():
            if record.name in self._live:
                # Kept, listed as unavailable and removable (RemoveDrafter takes the stored
                # record, not the built-in): it was skipped unseen and could never go.
                why = "a built-in drafter (the bundle's or drafter_dirs) has this name"
                logger.warning("stored drafter %s not served (kept): %s", record.name, why)
                self._unserved[record.name] = (record, why)
                continue
            try:
                self._check_stored(record)
                drafter = self._create(
                    record.kind, record.name, record.path or None, record.options
                )
            except (SidecarError, TargetWeightsNotLoadedError) as exc:
                logger.warning("stored drafter %s not served (kept): %s", record.name, exc)
                self._unserved[record.name] = (record, str(exc))
                continue
            except Exception as exc:
                logger.exception("cannot restore drafter %s from %s", record.name, record.path)
                self._unserved[record.name] = (record, f"{type(exc).__name__}: {exc}")
                continue
            self._publish(LiveDrafter(record, drafter))
            restored.append(record.name)
        return restored

    # -- writes -----------------------------------------------------------------------
    def register(self, spec: DrafterSpec) -> DrafterRecord:
        """Validate, load, probe, persist, then publish ``spec`` (blocking: call in a thread)."""
        with self._write_lock:
            self._check_name(spec.name)
            check_registration_lists(spec)
            full = self.full()
            if full is not None:
                raise CapacityError(full)
            kind = self._check_kind(spec.kind)
            self._check_options(kind, spec.options)
            if spec.path and not _loads_weights(kind):  # it was dropped without a word
                raise InvalidFieldError(
                    "path", f"a {kind} drafter loads no model directory: leave the path out"
                )
            path = self._check_path(spec.path, kind) if _loads_weights(kind) else None
            if path is not None:
                self._check_memory(spec.name, path)
            drafter = self._create(kind, spec.name, path, spec.options)
            self._probe(spec.name, drafter)
            record = DrafterRecord(
                name=spec.name,
                kind=kind,
                path=str(path) if path else "",
                tasks=tuple(spec.tasks),
                finetune_sample=_sample_of(spec, path),
                options=dict(spec.options),
            )
            record = _with_weights(record, drafter, self._target)
            stored = self._store.add_drafter(record)
            self._publish(LiveDrafter(stored, drafter))
            logger.info("registered drafter %s (%s, %s)", stored.name, kind, stored.path)
            return stored

    def remove(self, name: str) -> DrafterRecord:
        """Unpublish and delete a registered drafter; built-ins cannot be removed. One
        stored but not served by this start (``unserved``, a built-in's namesake included)
        is deleted from the store, and a built-in of its name stays."""
        with self._write_lock:
            live = self._live.get(name)
            if name in self._unserved and (live is None or live.record.builtin):
                record = self._store.remove_drafter(name)
                del self._unserved[name]
                return record
            live = self.get(name)
            if live.record.builtin:
                raise PreconditionError(f"{name!r} is a built-in drafter and cannot be removed")
            record = self._store.remove_drafter(name)
            live_now = dict(self._live)
            live_now.pop(name, None)
            self._live = live_now
            return record

    # -- helpers ----------------------------------------------------------------------
    def _publish(self, live: LiveDrafter) -> None:
        # Copy-on-write: readers on the event loop never see a dict mid-update.
        live = replace(live, serial=next(self._serials))
        self._live = {**self._live, live.record.name: live}

    def _check_name(self, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name):  # match's "$" took "generic\n"
            raise InvalidRequestError(
                f"drafter name {name!r} must match {NAME_PATTERN.pattern} (letters, digits, _.-)"
            )
        if name in self._live or name in {r.name for r in self._store.drafters()}:
            raise AlreadyExistsError(f"a drafter named {name!r} already exists")

    def _check_stored(self, record: DrafterRecord) -> None:
        kind = self._check_kind(record.kind)
        self._check_options(kind, record.options)
        if _loads_weights(kind):
            path = self._check_path(record.path, kind)
            self._check_same_weights(record)
            self._check_memory(record.name, path)

    def full(self) -> str | None:
        """Why one more drafter cannot be registered (``limits.max_registered_drafters``
        of them are: built-in ones are not counted, stored ones not served are), or None."""
        registered = len(self._store.drafters())
        bound = self._limits.max_registered_drafters
        if registered < bound:
            return None
        return (
            f"{registered} drafters are registered, limits.max_registered_drafters is "
            f"{bound}: remove one first (every Route prices each drafter's arms)"
        )

    def _check_memory(self, name: str, path: Path) -> None:
        """CapacityError when the drafter's weights at the target's precision, and
        ``limits.drafter_memory_headroom_mib`` beside them, do not fit in the memory left
        (``router.resources``): loading them would get the sidecar killed for memory (the
        kernel's OOM killer, a container's limit) or fail on the device."""
        from drafters.loader import ModelLoadError, safetensors_files, weights_bytes
        from router.resources import GIB, memory_room

        try:
            needed = weights_bytes(safetensors_files(path), self._target.dtype)
        except ModelLoadError as exc:
            raise InvalidRequestError(str(exc)) from exc
        room = memory_room(self._target.device)
        headroom = self._limits.drafter_memory_headroom_mib
        if room is None or needed + (headroom << 20) <= room.free_bytes:
            return
        dtype = str(self._target.dtype).removeprefix("torch.")
        raise CapacityError(
            f"drafter {name!r} needs {needed / GIB:.2f} GiB for its weights ({dtype}) and "
            f"{headroom} MiB beside them (limits.drafter_memory_headroom_mib), but "
            f"{room.free_bytes / GIB:.2f} GiB is free under {room.bound}: remove a drafter "
            "or give the sidecar more memory"
        )

    def _check_same_weights(self, record: DrafterRecord) -> None:
        """FAILED_PRECONDITION when a stored model drafter's weight files are no longer
        the ones registered (replaced in place, or damaged): what the policy learnt of it
        belongs to the registered weights, and a changed file under a model root is not
        served unannounced. Through the digest cache: unchanged files are not re-read."""
        from drafters.loader import digest_weights, safetensors_files

        if not record.weights_digest:
            return
        now = digest_weights(safetensors_files(record.path), self._target.digest_cache)
        if now != record.weights_digest:
            raise PreconditionError(
                f"its weights in {record.path} changed since it was registered (digest "
                f"{record.weights_digest[:12]}, now {now[:12]}): remove it (what was learnt "
                "of it goes) and register it again"
            )

    def _check_kind(self, kind: str) -> str:
        from drafters import DRAFTER_KINDS

        registrable = sorted(k for k in DRAFTER_KINDS if k != NONE_DRAFTER)
        if kind not in registrable:
            raise InvalidRequestError(f"drafter kind must be one of {registrable}, got {kind!r}")
        return kind

    def _check_options(self, kind: str, options: Mapping[str, str]) -> None:
        from drafters import check_options

        try:
            check_options(kind, options)
        except ValueError as exc:
            raise InvalidRequestError(f"options: {exc}") from exc

    def _check_path(self, path: str, kind: str) -> Path:
        from drafters.loader import ModelLoadError, safetensors_files

        if not path:
            raise InvalidFieldError("path", f"is needed for a {kind} drafter (its model directory)")
        resolved = under_model_roots(path, self._roots)
        try:
            safetensors_files(resolved)
        except ModelLoadError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return resolved

    def _create(
        self, kind: str, name: str, path: str | Path | None, options: Mapping[str, str]
    ) -> Any:
        from drafters import TargetWeightsRequiredError, TokenizerMismatchError, create_drafter
        from drafters.loader import ModelLoadError

        try:
            return create_drafter(
                kind, name=name, target=self._target, path=path, options=dict(options) or None
            )
        except TargetWeightsRequiredError as exc:
            raise TargetWeightsNotLoadedError(
                f"drafter kind {kind!r} drafts with the target's own weights, which a sidecar "
                "in fleet mode does not load (the vLLM replicas run the target); register a "
                "model or ngram drafter instead"
            ) from exc
        except TokenizerMismatchError as exc:
            raise PreconditionError(f"tokenizer does not match the target's: {exc}") from exc
        except ModelLoadError as exc:
            raise InvalidRequestError(str(exc)) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"cannot create {kind} drafter {name!r}: {exc}") from exc

    def _probe(self, name: str, drafter: Any) -> None:
        """Draft a few tokens on a probe prompt (a generation with the engine; without
        one, what fleet mode asks of a drafter: a draft and a counterfactual score); any
        failure refuses the drafter."""
        ids = list(self._target.tokenizer(PROBE_PROMPT, add_special_tokens=False)["input_ids"])
        try:
            if self._engine is None:
                probe_without_target(drafter, ids)
                return
            run = self._engine.generate(
                ids, drafter, PROBE_DRAFT_LENGTH, max_new_tokens=PROBE_TOKENS
            )
            for _ in run:
                pass
        except Exception as exc:
            raise PreconditionError(f"drafter {name!r} failed its probe generation: {exc}") from exc


def probe_without_target(drafter: Any, ids: Sequence[int]) -> None:
    """Ask ``drafter`` for a greedy draft continuing ``ids``, then score it counterfactually
    on their last tokens (as fleet mode does after each greedy request)."""
    from drafters.sampling import SamplingConfig

    session = drafter.start(ids)
    session.prefill(ids)
    session.propose(ids, PROBE_DRAFT_LENGTH, SamplingConfig(), None)
    split = max(1, len(ids) - PROBE_TOKENS)
    drafter.score_counterfactual(ids[:split], ids[split:], PROBE_DRAFT_LENGTH)


def _loads_weights(kind: str) -> bool:
    """Whether drafters of ``kind`` load a model directory (``path``, under the roots)."""
    from drafters import PATH_KINDS

    return kind in PATH_KINDS


def _with_weights(record: DrafterRecord, drafter: Any, target: TargetInfo) -> DrafterRecord:
    """``record`` with the drafter's parameter count and weights digest filled in (through
    the target's digest cache: loading the drafter has just hashed the same files)."""
    if not _loads_weights(record.kind) or not record.path:
        return record
    from drafters.loader import digest_weights, safetensors_files

    model = getattr(drafter, "model", None)
    count = sum(p.numel() for p in model.parameters()) if model is not None else 0
    cache = target.digest_cache
    digest = record.weights_digest or digest_weights(safetensors_files(record.path), cache)
    return replace(record, parameter_count=int(count), weights_digest=digest)


def under_model_roots(path: str, roots: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks included), if it lies under one of ``roots``: else
    PERMISSION_DENIED; a string that is no path (a NUL in it) is INVALID_ARGUMENT."""
    from drafters.loader import ModelLoadError, PathOutsideRootsError, resolve_under_roots

    try:
        return resolve_under_roots(path, roots)
    except PathOutsideRootsError as exc:
        raise PermissionDeniedError(str(exc)) from exc
    except ModelLoadError as exc:
        raise InvalidRequestError(str(exc)) from exc


def _sample_of(spec: DrafterSpec, path: Path | None) -> tuple[str, ...]:
    """The fine-tuning sample a registration gives its drafter's prior: the one sent, else
    its directory's ``finetune_sample.jsonl`` (as the world's drafters and ``drafter_dirs``
    are read; a distilled drafter writes one), else none."""
    if spec.finetune_sample or path is None:
        return tuple(spec.finetune_sample)
    return read_finetune_sample(path)
