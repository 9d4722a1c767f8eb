"""``specroute bench load`` and ``bench load-compare``: Route throughput and latency.

N Route calls at concurrency C from this (client) process, then N at concurrency 1,
in rounds alternating with the echo servicer (below),
with the sidecar's resident memory before and after. In the same run a trivial echo
servicer (the same Router service returning a canned reply of the same size, in its own
process) is loaded the same way: its throughput is the ceiling for a Python gRPC server
on this machine, and the sidecar's throughput is reported as a fraction of it.
``load-compare`` loads several servers in interleaved rounds, optionally with the floor
servicer (:class:`FloorServicer`: echo plus the tokenizer and classifier work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from benchmarks import module_parser
from router.coalescer import Coalescer
from router.launch import sigterm_as_exit
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.prompt_reader import PromptReader, PromptsRead
from router.route_process import ChildProcessReader

# One short prompt per task of the built-in world: the request sizes of the load.
PROMPTS = (
    "<|im_start|>user\nHow was your weekend? Did you do anything fun?<|im_end|>\n",
    "<|im_start|>user\nTranslate to French: The library opens at nine.<|im_end|>\n",
    "<|im_start|>user\nSummarize: The committee met on Monday and agreed to delay the "
    "vote on the new budget until the auditors finish their review.<|im_end|>\n",
    "<|im_start|>user\nWhat is the capital of Australia?<|im_end|>\n",
    "<|im_start|>user\nWhat is 17 * 23 + 4? Think step by step.<|im_end|>\n",
    "<|im_start|>system\nAnswer from the document.<|im_end|>\n<|im_start|>user\nDocument: "
    "Returns are accepted within 30 days.\nQuestion: How long do I have?<|im_end|>\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n",
)
WARMUP_CALLS = 300
ROUNDS = 4
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LoadRun:
    """Latencies (seconds) of the successful calls, the error count and the wall time."""

    latencies: list[float]
    errors: int
    elapsed_s: float

    @property
    def rps(self) -> float:
        """Calls answered per second: a failed call is no throughput (counted, fast
        failures made a server that refuses work look faster)."""
        return len(self.latencies) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index] * 1000.0


def merge(runs: Sequence[LoadRun]) -> LoadRun:
    """Several runs as one: latencies pooled, errors and wall times summed."""
    return LoadRun(
        [latency for run in runs for latency in run.latencies],
        sum(run.errors for run in runs),
        sum(run.elapsed_s for run in runs),
    )


def _rounds(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds) if base or i < extra]


def route_requests(count: int) -> list[pb.RouteRequest]:
    return [
        pb.RouteRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=64) for i in range(count)
    ]


async def _drive_async(
    address: str, requests: Sequence[pb.RouteRequest], concurrency: int, metadata: Any
) -> LoadRun:
    """``concurrency`` tasks on one channel, each sending its share of ``requests``."""
    latencies: list[float] = []
    errors = 0
    async with aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await channel.channel_ready()
        shares = [requests[i::concurrency] for i in range(concurrency)]

        async def worker(share: Sequence[pb.RouteRequest]) -> None:
            nonlocal errors
            for request in share:
                started = time.perf_counter()
                try:
                    await stub.Route(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(share) for share in shares))
        elapsed = time.perf_counter() - started
    return LoadRun(latencies, errors, elapsed)


def drive(address: str, count: int, concurrency: int, token: str | None = None) -> LoadRun:
    """Send ``count`` Route calls at ``concurrency``; sequential calls use the sync stub."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    requests = route_requests(count)
    if concurrency > 1:
        return asyncio.run(_drive_async(address, requests, concurrency, metadata))
    latencies: list[float] = []
    errors = 0
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        started = time.perf_counter()
        for request in requests:
            begin = time.perf_counter()
            try:
                stub.Route(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
            except grpc.RpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - started
    return LoadRun(latencies, errors, elapsed)


# -- the sidecar's memory --------------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` and its child processes (the route process) in MiB,
    from /proc/<pid>/status."""
    total = 0.0
    for each in (pid, *child_pids(pid)):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:  # a child that just exited
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:")) / 1024
    if not total:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (same user), if any."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return None
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and targets & _socket_links(proc):
            return int(proc.name)
    return None


def _socket_links(proc: Path) -> set[str]:
    """What the open files of a /proc/<pid> entry link to (an fd closed meanwhile, or a
    process of another user, is skipped, not the whole process)."""
    links: set[str] = set()
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return links
    for fd in fds:
        with contextlib.suppress(OSError):
            links.add(os.readlink(fd))
    return links


# -- the echo servicer (ceiling) and the floor servicer ---------------------------------
class EchoServicer(router_pb2_grpc.RouterServicer):
    """Route returns a canned decision of the sidecar's reply size; nothing else."""

    def __init__(self, reply: pb.RouteDecision) -> None:
        self._reply = reply

    async def Route(self, request: pb.RouteRequest, context: aio.ServicerContext) -> Any:
        return self._reply


class FloorServicer(EchoServicer):
    """The echo servicer plus the Route work no sidecar can skip: each prompt is
    token-counted and classified by a prompt reader (the sidecar's, :func:`floor_reader`),
    in batches formed by the Coalescer, as the sidecar does. No checks, policy, metrics or
    interceptor: what the sidecar's Route costs beyond this is its own overhead; what this
    costs beyond echo is the tokenizer, the classifier and the hand-off to the child."""

    def __init__(self, reply: pb.RouteDecision, reader: PromptReader):
        super().__init__(reply)
        self._reader = reader
        self._batches: Coalescer[str, PromptsRead, pb.RouteDecision] = Coalescer(
            self._work, self._commit
        )

    async def _work(self, texts: list[str]) -> PromptsRead:
        return await self._reader.read(texts, texts)

    def _commit(self, texts: Sequence[str], done: PromptsRead) -> list[pb.RouteDecision]:
        return [self._reply] * len(texts)

    async def Route(self, request: pb.RouteRequest, context: aio.ServicerContext) -> Any:
        return await self._batches.submit(request.text)


def floor_reader(world_dir: Path) -> ChildProcessReader:
    """The sidecar's default prompt reader (a child process), started, with the tokenizer
    and classifier a sidecar serves on the world at ``world_dir``."""
    from transformers import AutoTokenizer

    from classifiers import ensure_world_classifier
    from classifiers.holder import ClassifierHolder
    from classifiers.runtime import OnnxTaskClassifier
    from router.bundle import ModelBundle

    world = ModelBundle.load(world_dir)
    classifier_dir = ensure_world_classifier(world.root, world.corpus_dir)
    classifiers = ClassifierHolder(OnnxTaskClassifier.load(classifier_dir))
    tokenizer = AutoTokenizer.from_pretrained(world.target_dir, local_files_only=True)
    reader = ChildProcessReader(tokenizer, classifiers)
    reader.start(wait=True)
    return reader


async def serve_servicer(servicer: EchoServicer, host: str = "127.0.0.1") -> None:
    """Serve ``servicer`` on a free port; print the port; run until killed."""
    server = aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(port, flush=True)  # the parent reads the port from our stdout
    await server.wait_for_termination()


def start_servicer(
    reply: pb.RouteDecision, world_dir: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start the echo servicer, or with ``world_dir`` the floor servicer on that world,
    in its own process; returns it and its address."""
    mode = "echo" if world_dir is None else "floor"
    command = [
        sys.executable,
        "-m",
        "benchmarks.load.load_bench",
        mode,
        reply.SerializeToString().hex(),
    ]
    if world_dir is not None:
        command += ["--world", str(world_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        process.kill()
        process.wait()
        raise RuntimeError(
            f"the {mode} servicer did not start (exit {process.returncode}; its error is above)"
        )
    return process, f"127.0.0.1:{line}"


def sample_reply(address: str, token: str | None = None) -> pb.RouteDecision:
    """One Route answer of the sidecar at ``address``: the reply the servicers send."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        return router_pb2_grpc.RouterStub(channel).Route(  # type: ignore[no-any-return]
            route_requests(1)[0], timeout=CALL_TIMEOUT_S, metadata=metadata
        )


@contextlib.contextmanager
def running_reference_servicer(
    address: str, token: str | None = None, world_dir: Path | None = None
) -> Iterator[str]:
    """An echo servicer (or, with ``world_dir``, a floor servicer) answering with the
    reply of the sidecar at ``address`` (same message sizes), in its own process for the
    ``with`` block; yields its address."""
    process, servicer_address = start_servicer(sample_reply(address, token), world_dir)
    try:
        yield servicer_address
    finally:
        process.kill()
        process.wait()


# -- the benchmark ---------------------------------------------------------------------
def run_load_bench(
    address: str,
    *,
    requests: int = 10_000,
    concurrency: int = 64,
    pid: int | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Load the sidecar at ``address`` and the echo ceiling; the JSON-ready result."""
    port = int(address.rsplit(":", 1)[1])
    sidecar_pid = pid or pid_listening_on(port)
    with running_reference_servicer(address, token) as echo_address:
        drive(address, WARMUP_CALLS, concurrency, token)  # lazy allocations before "before"
        drive(echo_address, WARMUP_CALLS, concurrency)
        before = rss_mb(sidecar_pid) if sidecar_pid else float("nan")
        # Alternate sidecar and echo rounds so that the machine's other load (it is
        # shared) weighs on both alike.
        runs: dict[str, list[LoadRun]] = {"c": [], "echo": [], "c1": [], "echo_c1": []}
        for share in _rounds(requests, ROUNDS):
            runs["c"].append(drive(address, share, concurrency, token))
            runs["echo"].append(drive(echo_address, share, concurrency))
        for share in _rounds(requests, ROUNDS):
            runs["c1"].append(drive(address, share, 1, token))
            runs["echo_c1"].append(drive(echo_address, share, 1))
        after = rss_mb(sidecar_pid) if sidecar_pid else float("nan")
    loaded, echo = merge(runs["c"]), merge(runs["echo"])
    sequential, echo_sequential = merge(runs["c1"]), merge(runs["echo_c1"])
    return {
        "requests": requests,
        "errors": loaded.errors + sequential.errors,
        "rps": round(loaded.rps, 1),
        "echo_rps": round(echo.rps, 1),
        "latency_ms": {"p50": loaded.percentile_ms(50), "p99": loaded.percentile_ms(99)},
        "latency_c1_ms": {"p50": sequential.percentile_ms(50), "p99": sequential.percentile_ms(99)},
        "rss_mb": {"before": round(before, 1), "after": round(after, 1)},
        "concurrency": concurrency,
        "ratio_to_echo": round(loaded.rps / echo.rps, 3) if echo.rps else None,
        "echo_latency_c1_ms": {
            "p50": echo_sequential.percentile_ms(50),
            "p99": echo_sequential.percentile_ms(99),
        },
        "sidecar_pid": sidecar_pid,
        "loadavg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }


def compare_sidecars(
    addresses: Sequence[str],
    *,
    rounds: int = 6,
    requests: int = 3_000,
    concurrency: int = 64,
    token: str | None = None,
    floor_world: Path | None = None,
) -> dict[str, Any]:
    """Several sidecars side by side: in each round every sidecar gets ``requests`` Route
    calls at ``concurrency``, each followed by the same on one echo servicer; the order
    alternates between rounds. Per sidecar: Route/s and p50 latency per round and the
    ratio to the echo round right after it (the machine's other load weighs on both
    alike). With ``floor_world``, a floor servicer on that world (:class:`FloorServicer`)
    takes part as one more server, labelled ``floor``."""
    if not addresses:
        raise ValueError("compare_sidecars needs at least one address")
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_exit())  # SIGTERM stops the reference servicers too
        echo_address = stack.enter_context(running_reference_servicer(addresses[0], token))
        servers: dict[str, tuple[str, str | None]] = {a: (a, token) for a in addresses}
        if floor_world is not None:
            floor = stack.enter_context(
                running_reference_servicer(addresses[0], token, floor_world)
            )
            servers["floor"] = (floor, None)
        per = _interleaved_rounds(servers, echo_address, rounds, requests, concurrency)
    return {
        "rounds": rounds,
        "requests": requests,
        "concurrency": concurrency,
        "sidecars": {
            label: {
                **runs,
                "median_ratio": statistics.median(runs["ratio"]),
                "median_p50_ms": statistics.median(runs["p50_ms"]),
                "median_echo_p50_ms": statistics.median(runs["echo_p50_ms"]),
            }
            for label, runs in per.items()
        },
    }


def _interleaved_rounds(
    servers: dict[str, tuple[str, str | None]],
    echo_address: str,
    rounds: int,
    requests: int,
    concurrency: int,
) -> dict[str, dict[str, list[float]]]:
    """:func:`compare_sidecars`' rounds: per server label, each round's figures."""
    keys = ("rps", "echo_rps", "ratio", "errors", "p50_ms", "echo_p50_ms")
    per: dict[str, dict[str, list[float]]] = {label: {k: [] for k in keys} for label in servers}
    for address, token in servers.values():
        drive(address, WARMUP_CALLS, concurrency, token)
    drive(echo_address, WARMUP_CALLS, concurrency)
    labels = list(servers)
    for index in range(rounds):
        for label in labels if index % 2 == 0 else labels[::-1]:
            address, token = servers[label]
            run = drive(address, requests, concurrency, token)
            echo = drive(echo_address, requests, concurrency)
            figures = per[label]
            figures["rps"].append(round(run.rps, 1))
            figures["echo_rps"].append(round(echo.rps, 1))
            figures["ratio"].append(round(run.rps / echo.rps, 3) if echo.rps else 0.0)
            figures["errors"].append(run.errors)
            figures["p50_ms"].append(round(run.percentile_ms(50), 3))
            figures["echo_p50_ms"].append(round(echo.percentile_ms(50), 3))
    return per


def format_comparison(result: dict[str, Any]) -> str:
    """One line per sidecar: Route/s per round, the median ratio to echo and the median
    p50 latency beside echo's."""
    lines = [
        f"{result['rounds']} interleaved rounds of {result['requests']} Route calls at "
        f"concurrency {result['concurrency']}, each beside an echo round:"
    ]
    for label, runs in result["sidecars"].items():
        rps = ", ".join(f"{r:.0f}" for r in runs["rps"])
        lines.append(
            f"  {label}: Route/s {rps}; median Route/echo {runs['median_ratio']:.3f}; "
            f"median p50 {runs['median_p50_ms']:.3f} ms (echo {runs['median_echo_p50_ms']:.3f}); "
            f"errors {sum(runs['errors'])}"
        )
    return "\n".join(lines)


def format_result(result: dict[str, Any]) -> str:
    """The result as a few lines, each figure beside its reference."""
    rss = result["rss_mb"]
    growth = (rss["after"] - rss["before"]) / rss["before"] * 100 if rss["before"] else 0.0
    c1, c = result["latency_c1_ms"], result["latency_ms"]
    echo_c1 = result["echo_latency_c1_ms"]
    return "\n".join(
        [
            f"Route x{result['requests']} at concurrency {result['concurrency']}: "
            f"{result['rps']:.0f} req/s vs echo ceiling {result['echo_rps']:.0f} req/s "
            f"= {100 * (result['ratio_to_echo'] or 0):.0f}% (target >= 70%), "
            f"errors {result['errors']} (target 0)",
            f"  latency at concurrency {result['concurrency']}: "
            f"p50 {c['p50']:.2f} ms, p99 {c['p99']:.2f} ms",
            f"  latency at concurrency 1: p50 {c1['p50']:.3f} ms (target <= 1), "
            f"p99 {c1['p99']:.3f} ms (target <= 2); echo p50 {echo_c1['p50']:.3f} ms, "
            f"p99 {echo_c1['p99']:.3f} ms",
            f"  sidecar rss (with its route process): {rss['before']:.1f} -> "
            f"{rss['after']:.1f} MiB ({growth:+.1f}%, target < 10%)",
            f"  machine: {result['cpus']} cpus, load average {result['loadavg'][0]:.2f}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.load.load_bench echo HEX`` (or ``floor HEX --world DIR``): run the
    echo (or floor) servicer, as the bench does."""
    parser = module_parser(__doc__)
    parser.add_argument("mode", choices=["echo", "floor"])
    parser.add_argument("reply_hex")
    parser.add_argument("--world", type=Path, help="the world of the floor servicer")
    args = parser.parse_args(argv)
    reply = pb.RouteDecision.FromString(bytes.fromhex(args.reply_hex))
    if args.mode == "echo":
        asyncio.run(serve_servicer(EchoServicer(reply)))
        return
    if args.world is None:
        parser.error("floor needs --world DIR")
    logging.basicConfig(level=logging.WARNING)
    reader = floor_reader(args.world)
    try:
        asyncio.run(serve_servicer(FloorServicer(reply, reader)))
    finally:
        reader.close()


if __name__ == "__main__":
    main()
