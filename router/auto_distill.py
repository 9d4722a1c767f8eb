"""Automatic distillation: the sidecar distils a drafter for the cluster with the most headroom
once it has enough captured samples (``[auto_distill]``, off by default; docs/capture.md).

Every ``interval_s`` the sidecar reads its cluster view (router.clusters) and the capture
store. A cluster qualifies with at least ``min_samples`` captured samples, a defined and
positive headroom, and ``min_samples`` new samples since its last automatic run; the one
with the most headroom is distilled. The distillation is ``specroute drafters distill
--register --nice N --cpus ...`` in a child process that lowers its own priority and pins
itself to ``cores`` CPU cores after exec, with as many torch threads, so serving keeps the
other cores (a ``preexec_fn`` doing the same in the forked child of the multi-threaded
sidecar crashed it now and then). The child validates the drafter on held-out captured
samples and registers it through this sidecar's admin API only if it beats both the
cluster's current arm and its starting drafter; otherwise it is discarded, and the reason
is logged here. A registered drafter is adopted by the policy through its similarity prior
and the counterfactual scores of the greedy Generates that follow. One run at a time. Once
a run registers its drafter, the cluster's older automatic drafters past
``keep_per_cluster`` are removed and their directories deleted (``retire``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.capture import AutoDistillSettings
from router.clusters import cluster_views
from router.settings import host_port

logger = logging.getLogger(__name__)

DISTILLED_DIR = "distilled"  # under the state directory, unless out_dir is set


def distilled_root(settings: Any) -> Path:
    """Where automatic runs write their drafters (a model root while enabled, and once
    made)."""
    auto: AutoDistillSettings = settings.auto_distill
    if auto.out_dir is not None:
        return Path(auto.out_dir).expanduser()
    return Path(settings.state_dir).expanduser() / DISTILLED_DIR


def extra_model_roots(settings: Any) -> tuple[Path, ...]:
    """Model roots automatic distillation adds (created), so its drafters register; still
    one once made with automatic distillation turned off: the drafters it registered there
    were left unserved ("outside the configured model roots") at the next start."""
    root = distilled_root(settings)
    if not settings.auto_distill.enabled:
        return (root,) if root.is_dir() else ()
    root.mkdir(parents=True, exist_ok=True)
    return (root,)


def auto_drafter_name(cluster: str, stamp: str) -> str:
    """``<cluster>-auto-<stamp>`` as a drafter name (letters, digits, ``_.-``, at most 64)
    and a directory name: a classifier label such as "open qa", or one too long, made a
    name RegisterDrafter refuses, after minutes of training, at every run; one with "/"
    or ".." wrote outside the distilled root."""
    suffix = f"-auto-{stamp}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cluster).strip("._-") or "cluster"
    return safe[: 64 - len(suffix)] + suffix


def stopped_marker(out: Path) -> Path:
    """Beside a run's output directory while the run is under way, and left there when
    it was stopped with the sidecar, SIGKILL included; it holds the cluster's mark before
    the run (``CaptureStore.mark_auto_run``), which the next start puts back."""
    return out.with_name(f".{out.name}.stopped")


def _clean_marked_runs(root: Path, suffix: str, registered: Callable[[str], bool]) -> list[str]:
    """The output of each run marked ``.<name><suffix>`` in ``root`` removed unless its
    drafter was registered after all, and the markers; the names removed."""
    removed = []
    for marker in sorted(root.glob(f".*{suffix}")):
        name = marker.name[1 : -len(suffix)]
        if not registered(name):
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(name)
        marker.unlink(missing_ok=True)
    return removed


def clean_stopped_runs(root: Path, registered: Callable[[str], bool], capture: Any) -> list[str]:
    """At start: the output of each run stopped with the sidecar is removed unless its
    drafter was registered after all (the stopping sidecar completes a registration in
    progress), the run counts as failed and its samples are due again (the cluster's
    mark from before it, which its marker holds); the names removed."""
    marks = {m.name[1 : -len(".stopped")]: _mark_in(m) for m in root.glob(".*.stopped")}
    removed = _clean_marked_runs(root, ".stopped", registered)
    for name in removed:
        cluster = name.rsplit("-auto-", 1)[0]
        capture.record_distillation(cluster, "failed", 0.0, "stopped with the sidecar")
        if marks.get(name) is not None:
            capture.mark_auto_run(cluster, marks[name])
    return removed


def _mark_in(marker: Path) -> int | None:
    """The mark a run's marker holds (None: an empty or unreadable one)."""
    try:
        return int(marker.read_text().strip())
    except (OSError, ValueError):
        return None


def unsettled_marker(out: Path) -> Path:
    """Beside a run's output directory: its RegisterDrafter failed on the child's side
    (refused, or its deadline passed while the sidecar may still complete it)."""
    return out.with_name(f".{out.name}.unsettled")


def clean_unsettled_runs(root: Path, registered: Callable[[str], bool]) -> list[str]:
    """The output of each run whose registration failed is removed unless its drafter
    was registered after all: it holds prompts of the captured traffic (the fine-tuning
    sample), kept past ``retention_days`` for good otherwise; the names removed. Called
    before each run and at start, when a registration still in progress has ended."""
    return _clean_marked_runs(root, ".unsettled", registered)


def child_cores(cores: int, available: Sequence[int]) -> set[int]:
    """The last ``cores`` of the CPUs this process may use (serving tends to start on the
    first ones); all of them when there are not more."""
    ordered = sorted(available)
    return set(ordered[-cores:]) if cores < len(ordered) else set(ordered)


@dataclass
class AutoDistiller:
    """The background loop; :meth:`run` until cancelled (the child is killed with it)."""

    settings: Any  # router.settings.Settings
    contexts: Callable[[], Sequence[Any]]  # the policy's context summaries
    capture: Any  # router.capture.CaptureStore
    address: str  # this sidecar's gRPC host:port
    # The drafters the sidecar serves (router.store.DrafterRecord): ``retire``, clean-up.
    drafters: Callable[[], Sequence[Any]] = field(default=lambda: [])
    # Why RegisterDrafter would refuse one more drafter now (``DrafterPool.full``), or None.
    full: Callable[[], str | None] = field(default=lambda: None)
    # Per cluster, the newest sample (CaptureStore.newest_id) when its last run began;
    # kept in the capture store too, so that a restart does not run again on the same
    # samples (and register one more drafter of them at every start).
    last_run_id: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    # Whether the wait for room under limits.max_registered_drafters was logged.
    full_logged: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.last_run_id = {**self.capture.auto_run_marks(), **self.last_run_id}

    def pick(self) -> str | None:
        """The qualifying cluster with the most headroom (module doc), or None."""
        auto: AutoDistillSettings = self.settings.auto_distill
        captured = {s.cluster: s.samples for s in self.capture.stats()}
        candidates = [
            view
            for view in cluster_views(self.contexts(), captured)
            if view.captured_samples >= auto.min_samples
            and view.headroom > 0  # False for NaN too
            and self._new_samples(view.cluster) >= auto.min_samples
        ]
        best = max(candidates, key=lambda view: view.headroom, default=None)
        return best.cluster if best is not None else None

    def _new_samples(self, cluster: str) -> int:
        """Samples of ``cluster`` captured since its last run (all, before one): counted
        by number, not as a difference of counts, which stopped growing once the cluster
        kept ``samples_per_cluster`` and never let it run again."""
        return self.capture.samples_since(cluster, self.last_run_id.get(cluster, 0))

    def command(self, cluster: str, out: Path, name: str) -> list[str]:
        auto: AutoDistillSettings = self.settings.auto_distill
        command = [
            sys.executable, "-m", "router.cli", "drafters", "distill",
            "--cluster", cluster, "--out", str(out), "--register", name,
            "--steps", str(auto.steps), "--state-dir", str(self.settings.state_dir),
            "--address", self.address,
            # The child lowers its own priority after exec (``lower_priority``), and ends
            # with this process, SIGKILL included (``exit_with_parent``).
            "--nice", str(auto.nice), "--cpus", ",".join(map(str, sorted(self.child_cpus()))),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self.settings.world_dir is not None:
            command += ["--world", str(self.settings.world_dir)]
        if auto.from_drafter:
            command += ["--from", auto.from_drafter]
        return command

    def environment(self) -> dict[str, str]:
        """The child's environment: the admin token, the target, the thread limits."""
        auto: AutoDistillSettings = self.settings.auto_distill
        threads = str(auto.cores)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "SPECROUTE_WORLD_SCALE": self.settings.world_scale,
        }
        token = self.settings.admin_token
        if token is not None:
            env["SPECROUTE_ADMIN_TOKEN"] = token.get_secret_value()
        if self.settings.target_dir is not None:
            env["SPECROUTE_TARGET_DIR"] = str(self.settings.target_dir)
        return env

    def child_cpus(self) -> set[int]:
        """The CPUs the child is pinned to (``child_cores`` of this process's)."""
        try:
            available = sorted(os.sched_getaffinity(0))
        except AttributeError:  # no affinity outside Linux
            available = list(range(os.cpu_count() or 1))
        return child_cores(self.settings.auto_distill.cores, available)

    async def run_once(self) -> int | None:
        """Distil the picked cluster, if any; the child's exit status (0: registered)."""
        names = {record.name for record in self.drafters()}
        removed = clean_unsettled_runs(distilled_root(self.settings), names.__contains__)
        if removed:
            logger.info("auto-distillation: removed runs not registered: %s", removed)
        cluster = self.pick()
        if cluster is None or self._no_room_to_register():
            return None
        samples = self.capture.samples(cluster)
        previous = self.last_run_id.get(cluster, 0)
        self.last_run_id[cluster] = newest = self.capture.newest_id()
        self.runs += 1
        name = auto_drafter_name(cluster, time.strftime("%Y%m%d%H%M%S", time.gmtime()))
        out = distilled_root(self.settings) / name
        # Written before the run starts: a sidecar killed meanwhile (SIGKILL, the OOM
        # killer) left a directory of captured prompts and its samples marked as used,
        # which nothing cleared (``clean_stopped_runs`` at the next start now does).
        out.parent.mkdir(parents=True, exist_ok=True)
        stopped_marker(out).write_text(f"{previous}\n")
        self.capture.mark_auto_run(cluster, newest)
        logger.info("auto-distillation of %s on %d captured samples: %s", cluster, samples, out)
        before = self.capture.distillation_counts()
        recorded = sum(before.values())
        started = time.perf_counter()
        # A plain Popen waited on in a thread: no asyncio transport outlives the loop.
        child = subprocess.Popen(
            self.command(cluster, out, name),
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.to_thread(child.communicate)
        except asyncio.CancelledError:
            # The sidecar stops: the run is killed and its samples are due again. What it
            # wrote holds prompts of the captured traffic, but it may be a drafter whose
            # registration the stopping sidecar still completes: the next start removes
            # it unless it was registered (``clean_stopped_runs``).
            child.kill()
            await asyncio.to_thread(child.wait)
            self.last_run_id[cluster] = previous
            self.capture.mark_auto_run(cluster, previous)
            raise
        stopped_marker(out).unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        lines = output.decode(errors="replace").splitlines()
        verdict = next((line for line in reversed(lines) if line.strip()), "")
        if child.returncode == 0:
            logger.info("auto-distillation of %s registered %s (%.0f s)", cluster, name, seconds)
            await self.retire(cluster)
        else:
            logger.warning(
                "auto-distillation of %s discarded after %.0f s: %s", cluster, seconds, verdict
            )
            after = self.capture.distillation_counts()
            if after.get("failed", 0) == before.get("failed", 0):
                # Refused, or stopped before writing: what it wrote holds prompts of the
                # captured traffic (the fine-tuning sample), and discarded means gone, not
                # left for `capture purge` to miss. A RegisterDrafter that failed on the
                # client's side (its deadline) may still complete on the server: kept
                # until the next run, or start, finds it not registered.
                shutil.rmtree(out, ignore_errors=True)
            elif out.exists():
                unsettled_marker(out).touch()
            if sum(after.values()) == recorded:
                # It stopped before writing a drafter (its own record): counted here.
                self.capture.record_distillation(cluster, "failed", seconds, verdict[-500:])
        return child.returncode

    def _no_room_to_register(self) -> bool:
        """Whether RegisterDrafter would refuse a run's drafter for
        ``limits.max_registered_drafters`` (a run registers its drafter before it retires
        the cluster's older one): minutes of training thrown away at every run. The wait
        is logged once."""
        full = self.full()
        if full is None:
            self.full_logged = False
            return False
        if not self.full_logged:
            logger.warning(
                "auto-distillation waits (a run registers its drafter before it retires "
                "the cluster's older one): %s, or raise the limit",
                full,
            )
            self.full_logged = True
        return True

    async def retire(self, cluster: str) -> list[str]:
        """Remove ``cluster``'s automatic drafters (its task, a directory of the distilled
        root) past the newest ``keep_per_cluster``, through the admin API so that pooled
        replicas drop them too, and delete their directories; the names removed."""
        root = distilled_root(self.settings).resolve()
        automatic = [
            record
            for record in self.drafters()
            if tuple(record.tasks) == (cluster,)
            and record.path
            and Path(record.path).resolve().parent == root
        ]
        automatic.sort(key=lambda record: record.created_unix, reverse=True)
        retired = []
        for record in automatic[self.settings.auto_distill.keep_per_cluster :]:
            await self._remove(record.name)
            shutil.rmtree(Path(record.path).resolve(), ignore_errors=True)
            retired.append(record.name)
        if retired:
            logger.info("auto-distillation of %s retired %s", cluster, ", ".join(retired))
        return retired

    async def _remove(self, name: str) -> None:
        """RemoveDrafter on this sidecar (one removed meanwhile is no error)."""
        import grpc

        from router.pb import router_pb2 as pb
        from router.pb import router_pb2_grpc

        token = self.settings.admin_token
        metadata = (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                await router_pb2_grpc.RouterStub(channel).RemoveDrafter(
                    pb.RemoveDrafterRequest(name=name), metadata=metadata, timeout=60
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.auto_distill.interval_s)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("auto-distillation failed")


def start_auto_distiller(settings: Any, service: Any, grpc_port: int) -> asyncio.Task[None] | None:
    """The background task when ``[auto_distill]`` is on and can work, else None (logged)."""
    if not settings.auto_distill.enabled:
        return None
    if service.capture is None or settings.admin_token is None or settings.tls.enabled:
        logger.warning(
            "auto_distill needs [capture] enabled, an admin_token and no TLS (its child "
            "registers over plain gRPC on this host): it stays off"
        )
        return None
    drafters = service.drafters

    def registered(name: str) -> bool:
        return bool(drafters.identity(name)) or drafters.unserved_record(name) is not None

    removed = clean_stopped_runs(distilled_root(settings), registered, service.capture)
    if removed:
        logger.info("auto-distillation: removed runs stopped with the sidecar: %s", removed)
    removed = clean_unsettled_runs(distilled_root(settings), registered)
    if removed:
        logger.info("auto-distillation: removed runs not registered: %s", removed)
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    distiller = AutoDistiller(
        settings,
        lambda: service.policy.describe()[2],
        service.capture,
        host_port(host, grpc_port),
        service.list_drafters,
        full=drafters.full,
    )
    return asyncio.create_task(distiller.run())
