"""``specroute capture stats|purge``, ``specroute clusters`` and ``specroute drafters distill``.

Capture and distillation read the state directory directly (``--state-dir``, else the
settings' ``state_dir``): run them on the sidecar's host. ``clusters`` and a distillation's
``--register`` also ask the running sidecar (``--address``) over gRPC (docs/capture.md).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from router.serve_cli import (
    ADDRESS_OPTION,
    DATA_TOKEN_OPTION,
    DEFAULT_ADDRESS,
    TIMEOUT_OPTION,
    TOKEN_OPTION,
)

CONFIG_OPTION = typer.Option("--config", help="TOML settings file (for state_dir, world).")
STATE_OPTION = typer.Option("--state-dir", help="State directory (default: the settings').")
GENERIC_DRAFTER = "generic"
RPC_TIMEOUT_S = 10.0
REGISTER_TIMEOUT_S = 300.0  # the registration loads and probes the drafter
# The kernel's OOM killer takes the process of the highest score first; 1000 is its most.
OOM_SCORE_ADJ_FIRST = 1000
PR_SET_PDEATHSIG = 1  # linux/prctl.h

logger = logging.getLogger(__name__)


def _settings(config: Path | None, **overrides: Any) -> Any:
    from router.settings import SettingsLoadError, load_settings

    try:
        return load_settings(config, **overrides)
    except SettingsLoadError as error:
        typer.echo(f"invalid settings: {error}", err=True)
        raise typer.Exit(2) from None


def _state_dir(state_dir: Path | None, config: Path | None) -> Path:
    if state_dir is not None:
        return state_dir.expanduser()
    return Path(_settings(config).state_dir).expanduser()


def _existing_capture(state_dir: Path) -> Any:
    """The state directory's capture store, or None when nothing was ever captured there
    (not created by reading it)."""
    from router.capture import DATABASE_NAME, CaptureStore

    return CaptureStore(state_dir) if (state_dir / DATABASE_NAME).is_file() else None


def _checked_state_dir(directory: Path) -> Path:
    """``directory``, or exit 2 (a usage error, as for every setting that cannot be used)
    naming it when it is not one: a mistyped path was read as "nothing captured", status 0."""
    if not directory.is_dir():
        typer.echo(f"error: {directory} is not a state directory", err=True)
        raise typer.Exit(2)
    return directory


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# -- capture ----------------------------------------------------------------------------
def capture_stats_command(
    state_dir: Annotated[Path | None, STATE_OPTION] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
) -> None:
    """Captured samples per cluster: count, bytes of token ids, oldest and newest."""
    directory = _checked_state_dir(_state_dir(state_dir, config))
    store = _existing_capture(directory)
    stats = store.stats() if store is not None else []
    if not stats:
        typer.echo(f"nothing captured in {directory}")
        return
    typer.echo(f"{'cluster':<16} {'samples':>8} {'bytes':>10}  oldest                newest")
    for s in stats:
        typer.echo(
            f"{s.cluster:<16} {s.samples:>8} {s.bytes:>10}  {_when(s.oldest_unix)}  "
            f"{_when(s.newest_unix)}"
        )
    typer.echo(
        f"{'total':<16} {sum(s.samples for s in stats):>8} {sum(s.bytes for s in stats):>10}"
    )


def capture_purge_command(
    cluster: Annotated[str | None, typer.Option("--cluster", help="Only this cluster.")] = None,
    state_dir: Annotated[Path | None, STATE_OPTION] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Purge every cluster without asking.")
    ] = False,
) -> None:
    """Delete captured samples: one cluster's, or all (asked to confirm, or --yes). A
    state directory with no capture database is an error: a mistyped path must not read
    as a purge done."""
    directory = _state_dir(state_dir, config)
    store = _existing_capture(directory)
    if store is None:
        typer.echo(f"error: no capture database in {directory} (nothing purged)", err=True)
        raise typer.Exit(1)
    if cluster is not None and cluster not in {s.cluster for s in store.stats()}:
        typer.echo(f"warning: nothing captured for cluster {cluster!r} in {directory}", err=True)
    if cluster is None and not yes:
        typer.confirm(f"Purge every captured sample in {directory}?", abort=True, err=True)
    removed = store.purge(cluster)
    typer.echo(f"purged {removed} captured samples ({cluster or 'every cluster'}) from {directory}")
    kept = _drafters_with_samples(directory)
    if kept:
        typer.echo(
            "note: purge leaves the fine-tuning samples (prompts) that registered drafters "
            f"keep, a distilled drafter's from captured traffic: {', '.join(kept)}. "
            "`specroute drafters remove NAME` deletes a drafter's stored sample; delete the "
            "finetune_sample.jsonl in its directory as well",
            err=True,
        )


def _drafters_with_samples(state_dir: Path) -> list[str]:
    """``name (directory)`` of each drafter registered in ``state_dir`` (its drafter
    store, when there is one: not created by reading) that keeps a fine-tuning sample."""
    from router.store import DATABASE_NAME, SidecarStore

    if not (state_dir / DATABASE_NAME).is_file():
        return []
    store = SidecarStore(state_dir)
    try:
        return [f"{r.name} ({r.path})" for r in store.drafters() if r.finetune_sample]
    finally:
        store.close()


# -- clusters ---------------------------------------------------------------------------
def _figure(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def clusters_command(
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    state_dir: Annotated[Path | None, STATE_OPTION] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per cluster.")] = False,
    token: Annotated[str | None, DATA_TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = RPC_TIMEOUT_S,
) -> None:
    """Per task cluster: traffic share, speed-up, acceptance, best arm, captured samples and
    headroom (share x (speed-up with every draft accepted - speed-up now))."""
    from router.clusters import cluster_views, summaries_from_pb
    from router.pb import router_pb2 as pb
    from router.serve_cli import _call, _metadata, _stub

    # The configured directory may be another host's (none here: nothing captured); one
    # given by --state-dir must exist.
    directory = _state_dir(state_dir, config)
    if state_dir is not None:
        _checked_state_dir(directory)
    state = _call(
        _stub(address).GetPolicyState,
        pb.GetPolicyStateRequest(),
        timeout=timeout,
        metadata=_metadata(token),
    )
    store = _existing_capture(directory)
    captured = {s.cluster: s.samples for s in store.stats()} if store is not None else {}
    views = cluster_views(summaries_from_pb(state), captured)
    if as_json:
        for view in views:
            typer.echo(json.dumps(asdict(view)))
        return
    typer.echo(
        f"{'cluster':<16} {'share':>6} {'speed-up':>8} {'accept':>6}  {'best arm':<20}"
        f" {'captured':>8} {'headroom':>8}"
    )
    for view in sorted(views, key=lambda v: -v.headroom if not math.isnan(v.headroom) else 0):
        arm = f"{view.best_drafter} k={view.best_k}" if view.best_drafter else "-"
        typer.echo(
            f"{view.cluster:<16} {view.traffic_share:>6.1%} {_figure(view.speedup):>8}"
            f" {_figure(view.acceptance):>6}  {arm:<20} {view.captured_samples:>8}"
            f" {_figure(view.headroom, 3):>8}"
        )


# -- distillation -----------------------------------------------------------------------
@dataclass(frozen=True)
class SidecarView:
    """What a running sidecar says about the cluster: its drafters and the current arm."""

    drafters: dict[str, Any]  # name -> DrafterInfo
    current_arm: str  # the cluster's chosen drafter (its busiest context), "" if unknown
    taken: frozenset[str] = frozenset()  # names served, or stored and not served now


def _sidecar_view(address: str, cluster: str, token: str | None) -> SidecarView | None:
    """ListDrafters and the cluster's current arm, or None when the sidecar is not there
    (a sidecar that refuses the token is an error, not an absent sidecar)."""
    import grpc

    from router.pb import router_pb2 as pb
    from router.serve_cli import _metadata, _stub

    stub = _stub(address)
    asked = {"timeout": RPC_TIMEOUT_S, "metadata": _metadata(token)}
    try:
        listed = stub.ListDrafters(pb.ListDraftersRequest(), **asked)
        state = stub.GetPolicyState(pb.GetPolicyStateRequest(), **asked)
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            typer.echo(f"error: the sidecar at {address}: {error.details()}", err=True)
            raise typer.Exit(1) from None
        return None
    contexts = [c for c in state.contexts if c.task_cluster == cluster]
    busiest = max(contexts, key=lambda c: c.requests, default=None)
    return SidecarView(
        {info.name: info for info in listed.drafters},
        busiest.chosen_drafter if busiest is not None else "",
        frozenset(info.name for info in [*listed.drafters, *listed.unavailable]),
    )


def _check_registrable(name: str, view: SidecarView, address: str) -> None:
    """``--register``: a name the sidecar would refuse is told before the fine-tune, which
    takes hours with a real model (it was told after it)."""
    from router.drafter_pool import NAME_PATTERN
    from router.policy.base import NONE_DRAFTER

    if not NAME_PATTERN.fullmatch(name) or name == NONE_DRAFTER:
        raise typer.BadParameter(
            f"{name!r} is not a drafter name: 1 to 64 letters, digits and _.- starting with "
            f"a letter or digit, not {NONE_DRAFTER!r}",
            param_hint="--register",
        )
    if name in view.taken:
        typer.echo(f"error: the sidecar at {address} has a drafter named {name!r}", err=True)
        raise typer.Exit(1)


def _world_generic(settings: Any) -> Path | None:
    from router.bundle import ModelBundle

    try:
        return ModelBundle.load(settings.world_path()).drafter_dirs.get(GENERIC_DRAFTER)
    except (FileNotFoundError, ValueError, KeyError):
        return None


#: Soft labels need the target in fp32 on the CPU beside the drafter: past this much
#: weights on disk (about 1B parameters in bf16) that is gigabytes and hours a step, so
#: distillation uses hard labels (Qwen2.5-7B as the target took ~28 GB and never ended).
SOFT_LABEL_TARGET_MAX_BYTES = 2 << 30


def _local_target(settings: Any) -> Path | None:
    """The target's directory when it is on this host and small enough to run here in
    fp32 (soft labels), else None."""
    from drafters.loader import ModelLoadError, safetensors_files
    from router.components import target_dir_of

    try:
        path: Path | None = target_dir_of(settings)
    except (FileNotFoundError, ValueError, KeyError):
        path = None
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        size = sum(f.stat().st_size for f in safetensors_files(path))
    except (ModelLoadError, OSError):
        return None
    if size > SOFT_LABEL_TARGET_MAX_BYTES:
        typer.echo(
            f"note: the target at {path} has {size / 2**30:.1f} GiB of weights, too large "
            "to run here in fp32: distilling on hard labels",
            err=True,
        )
        return None
    return path


def _start_drafter(source: str | None, view: SidecarView | None, settings: Any) -> tuple[str, Path]:
    """(name, directory) of the model drafter to start from: ``--from`` (a drafter the
    sidecar serves, or a directory), else the cluster's current arm when it is a model
    drafter, else the generic drafter."""
    served = view.drafters if view is not None else {}
    if source:
        info = served.get(source)
        if info is not None and info.kind == "model":
            return source, Path(info.path)
        if Path(source).expanduser().is_dir():
            return Path(source).name, Path(source).expanduser()
        raise typer.BadParameter(
            f"{source!r} is neither a model drafter the sidecar serves nor a directory",
            param_hint="--from",
        )
    current = served.get(view.current_arm) if view is not None else None
    if current is not None and current.kind == "model":
        return current.name, Path(current.path)
    generic = served.get(GENERIC_DRAFTER)
    if generic is not None and generic.kind == "model":
        return GENERIC_DRAFTER, Path(generic.path)
    world_generic = _world_generic(settings)
    if world_generic is None:
        raise typer.BadParameter("no generic drafter found: name one", param_hint="--from")
    return GENERIC_DRAFTER, world_generic


def _scorer(name: str, info: Any, placement: Any, target: Callable[[], Any]) -> Any | None:
    """The counterfactual scorer of a served drafter: a model, n-gram or no drafter here;
    any other kind (copy-or-model, self) built as the sidecar builds it, on the target
    (``target()``: the local target, loaded once, or None). None when it cannot be built
    here: every other kind was scored as no drafter, whose acceptance of 0 any distilled
    drafter beat."""
    from drafters.distill import model_scorer
    from drafters.loader import load_model
    from drafters.ngram import NgramDrafter
    from drafters.registry import NoDrafter, create_drafter

    kind = info.kind if info is not None else "none"
    options = dict(getattr(info, "options", {}) or {})
    if kind == "model":
        loaded = load_model(info.path, placement=placement)
        return model_scorer(loaded.model, len(loaded.tokenizer))
    if kind == "ngram":
        drafter: Any = NgramDrafter(
            name,
            placement.device,
            min_n=int(options.get("min_n", 2)),
            max_n=int(options.get("max_n", 3)),
        )
        return drafter.score_counterfactual
    if kind == "none":
        return NoDrafter(name, placement.device).score_counterfactual
    loaded_target = target()
    if loaded_target is None:
        return None
    path = info.path or None
    built = create_drafter(kind, name=name, target=loaded_target, path=path, options=options)
    return built.score_counterfactual


def _refusal(after: Any, baselines: Sequence[tuple[str, Any]]) -> str | None:
    """Why the distilled drafter must not be registered (None: it beats every baseline)."""
    for name, acceptance in baselines:
        if after.rate <= acceptance.rate:
            return (
                f"not registered: held-out acceptance {after.rate:.3f} does not beat "
                f"{name}'s {acceptance.rate:.3f} on {after.samples} held-out samples"
            )
    return None


def _register(
    address: str,
    token: str | None,
    name: str,
    out: Path,
    cluster: str,
    sample: list[str],
    timeout: float,
) -> Any:
    from router.pb import router_pb2 as pb
    from router.serve_cli import _call, _metadata, _stub

    request = pb.RegisterDrafterRequest(
        name=name, kind="model", path=str(out.resolve()), tasks=[cluster], finetune_sample=sample
    )
    return _call(
        _stub(address).RegisterDrafter, request, metadata=_metadata(token), timeout=timeout
    )


def lower_priority(nice: int, cpus: str) -> None:
    """``--nice`` and ``--cpus``: this process gives way to serving (before torch starts its
    threads). The sidecar's automatic distillation runs ``drafters distill`` with both, so
    the child lowers itself after exec; a ``preexec_fn`` in the forked child of the
    multi-threaded sidecar could crash or hang before exec. A process that gives way is
    also the one the kernel's OOM killer takes first (``oom_first``)."""
    if nice or cpus:
        oom_first()
    if nice:
        os.nice(nice)
    if cpus:
        try:
            chosen = {int(cpu) for cpu in cpus.split(",") if cpu.strip()}
        except ValueError:
            raise typer.BadParameter(
                f"{cpus!r} is not a list of CPU ids", param_hint="--cpus"
            ) from None
        try:
            os.sched_setaffinity(0, chosen)
        except AttributeError:  # no affinity outside Linux
            pass
        except (OSError, ValueError) as error:  # CPUs this machine lacks, or a negative id
            raise typer.BadParameter(f"{cpus}: {error}", param_hint="--cpus") from None


def exit_with_parent(parent_pid: int) -> None:
    """``--parent-pid``: this process is killed when its parent ends, SIGKILL included (the
    sidecar's automatic distillation: a run orphaned by a killed sidecar trained on and
    registered into the next one, racing its clean-up of that run); a parent already gone
    ends it now. Linux's ``PR_SET_PDEATHSIG``, set after exec, as ``lower_priority`` is;
    elsewhere only the check."""
    if not parent_pid:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as error:  # not Linux
        logger.debug("no parent-death signal: %s", error)
    if os.getppid() != parent_pid:
        raise typer.Exit(1)


def oom_first() -> None:
    """Raise this process's ``oom_score_adj`` to ``OOM_SCORE_ADJ_FIRST`` (no privilege is
    needed to raise it): a training run out of memory in the sidecar's container or
    cgroup then ends itself, where the kernel took the larger process, the sidecar, with
    every generation in flight. Nothing where ``/proc`` has no such file."""
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ_FIRST}\n")
    except OSError as error:  # not Linux, or /proc read-only
        logger.debug("oom_score_adj left as it is: %s", error)


def distill_command(
    cluster: Annotated[str, typer.Option("--cluster", help="Task cluster to distill for.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the drafter to.")],
    source: Annotated[
        str | None,
        typer.Option("--from", help="Drafter name or directory (default: current arm/generic)."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Optimiser steps.")] = 100,
    register_as: Annotated[
        str | None, typer.Option("--register", help="Register it under this name if it pays.")
    ] = None,
    held_out: Annotated[float, typer.Option("--held-out", help="Fraction held out.")] = 0.2,
    draft_length: Annotated[int, typer.Option("--k", min=1, help="k of the replay.")] = 4,
    learning_rate: Annotated[float, typer.Option("--lr")] = 1e-3,
    no_target: Annotated[
        bool, typer.Option("--no-target", help="Hard labels even if the target is local.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    state_dir: Annotated[Path | None, STATE_OPTION] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    world: Annotated[Path | None, typer.Option("--world", help="World directory.")] = None,
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = REGISTER_TIMEOUT_S,
    nice: Annotated[
        int, typer.Option("--nice", min=0, max=19, help="Lower this process's priority by N.")
    ] = 0,
    cpus: Annotated[
        str, typer.Option("--cpus", help="Run only on these CPUs (comma-separated ids).")
    ] = "",
    parent_pid: Annotated[
        int, typer.Option("--parent-pid", help="End when this process (the parent) ends.")
    ] = 0,
) -> None:
    """Fine-tune a drafter on a cluster's captured traffic, report held-out acceptance before
    and after, write it as a Hugging Face directory; --register adds it to the sidecar only
    if it beats both the cluster's current arm and the drafter it started from."""
    exit_with_parent(parent_pid)
    lower_priority(nice, cpus)
    import torch

    from drafters.distill import (
        DistillConfig,
        TrainingPair,
        acceptance_of,
        distill,
        model_scorer,
        save_drafter,
        split_held_out,
    )
    from drafters.loader import DevicePlacement, ModelLoadError, load_model

    started = time.perf_counter()
    settings = _settings(config, world_dir=world)
    directory = Path(state_dir).expanduser() if state_dir else Path(settings.state_dir)
    store = _existing_capture(directory.expanduser())
    captured = store.pairs(cluster) if store is not None else []
    # A prompt served more than once with one output is one pair, and every pair of a
    # prompt is on one side of the split: a held-out copy of training text would flatter
    # the drafter.
    pairs = list(dict.fromkeys(TrainingPair(p.prompt_ids, p.output_ids) for p in captured))
    prompts = len({pair.prompt_ids for pair in pairs})
    if prompts < 2:
        typer.echo(
            f"error: {prompts} distinct captured prompts of {cluster!r} in {directory}; "
            "distillation needs at least 2 (enable [capture] and serve some traffic)",
            err=True,
        )
        raise typer.Exit(1)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file, not a directory", param_hint="--out")
    if out.exists() and any(out.iterdir()) and not force:
        typer.echo(f"error: {out} exists and is not empty (--force to write into it)", err=True)
        raise typer.Exit(1)
    try:
        train, held = split_held_out(pairs, held_out, seed)
    except ValueError as error:  # a fraction outside (0, 1)
        raise typer.BadParameter(str(error), param_hint="--held-out") from None
    view = _sidecar_view(address, cluster, token)
    if register_as:
        if view is None:
            typer.echo(f"error: no sidecar at {address} to register with", err=True)
            raise typer.Exit(1)
        _check_registrable(register_as, view, address)
    start_name, start_dir = _start_drafter(source, view, settings)
    placement = DevicePlacement(torch.device("cpu"), torch.float32)
    try:
        drafter = load_model(start_dir, placement=placement)
    except ModelLoadError as error:  # --from a directory that is not a model
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    local_target = _local_target(settings)

    @functools.cache
    def loaded_target() -> Any:
        return load_model(local_target, placement=placement) if local_target else None

    target = None if no_target or local_target is None else loaded_target().model
    vocabulary = len(drafter.tokenizer)
    before = acceptance_of(model_scorer(drafter.model, vocabulary), held, draft_length)
    baselines = [(f"the starting drafter {start_name}", before)]
    current = view.current_arm if view is not None else ""
    unscored = ""
    if current and current != start_name:
        info = view.drafters.get(current) if view else None
        scorer = _scorer(current, info, placement, loaded_target)
        if scorer is None:
            unscored = (
                f"not registered: the current arm {current} ({info.kind if info else '?'}) "
                "drafts with the target's weights, which are not run here (not on this host, "
                f"or over the {SOFT_LABEL_TARGET_MAX_BYTES >> 30} GiB run here in fp32): the "
                "distilled drafter cannot be compared with it"
            )
            typer.echo(f"warning: {unscored}", err=True)
        else:
            acceptance = acceptance_of(scorer, held, draft_length)
            baselines.append((f"the current arm {current}", acceptance))
    labels = "soft labels (the target's top-16)" if target is not None else "hard labels"
    typer.echo(
        f"distilling {start_name} on {len(train)} captured {cluster} samples, {steps} steps,"
        f" {labels}; {len(held)} held out",
        err=True,
    )
    config_ = DistillConfig(steps=steps, learning_rate=learning_rate, seed=seed)
    pad_id = drafter.tokenizer.pad_token_id
    pad = int(pad_id if pad_id is not None else drafter.tokenizer.eos_token_id)
    if steps > 0:
        distill(
            drafter.model,
            train,
            config_,
            pad_id=pad,
            target=target,
            progress=True,
            description=f"distill {cluster}",
        )
    after = acceptance_of(model_scorer(drafter.model, vocabulary), held, draft_length)
    for name, acceptance in baselines:
        typer.echo(f"held-out acceptance (k={draft_length}) of {name}: {acceptance.rate:.3f}")
    typer.echo(f"held-out acceptance (k={draft_length}) after distillation: {after.rate:.3f}")
    sample = [
        drafter.tokenizer.decode(list(p.prompt_ids), skip_special_tokens=False) for p in train
    ]
    report = {
        "cluster": cluster,
        "from": start_name,
        "steps": steps,
        "labels": "soft" if target is not None else "hard",
        "train_samples": len(train),
        "held_out_samples": len(held),
        "draft_length": draft_length,
        "acceptance_before": before.rate,
        "acceptance_after": after.rate,
        "baselines": {name: acceptance.rate for name, acceptance in baselines},
    }
    save_drafter(drafter.model, drafter.tokenizer, out, sample, cluster, report)
    typer.echo(f"wrote {out}")
    seconds = time.perf_counter() - started
    record = _recorder(directory, cluster, seconds)
    if not register_as:
        record("written", str(out))
        return
    refusal = unscored or _refusal(after, baselines)
    if refusal:
        record("refused", refusal)
        typer.echo(refusal, err=True)
        raise typer.Exit(1)
    try:
        info = _register(address, token, register_as, out, cluster, sample[:64], timeout)
    except typer.Exit:
        record("failed", f"RegisterDrafter {register_as} refused")
        raise
    record("registered", register_as)
    typer.echo(f"registered {info.name} for {cluster}")


def _recorder(directory: Path, cluster: str, seconds: float) -> Any:
    from router.capture import CaptureStore

    def record(outcome: str, detail: str) -> None:
        store = CaptureStore(directory)
        try:
            store.record_distillation(cluster, outcome, seconds, detail)
        finally:
            store.close()

    return record


def _group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    from router.serve_cli import _group as group

    return group(app, name, help_text)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``capture``, ``clusters`` and ``drafters distill`` to the root app."""
    capture = _group(app, "capture", "Captured traffic (opt-in): stats and purge.")
    capture.command("stats")(capture_stats_command)
    capture.command("purge")(capture_purge_command)
    app.command("clusters")(clusters_command)
    drafters = _group(app, "drafters", "Drafters: list, register and remove on a sidecar.")
    drafters.command("distill")(distill_command)
