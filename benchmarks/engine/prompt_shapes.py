"""Resident memory against the number of distinct prompt lengths a CPU process has served,
in bf16 and in fp32, on a Qwen2.5-0.5B-shaped target.

    python -m benchmarks.engine.prompt_shapes [--lengths 120] [--layers 4] [--vocab 151936]

On the CPU, a bf16 matmul runs through oneDNN, which builds a kernel for each new shape and
keeps it, with its buffers, in two caches of up to 1,024 entries each (oneDNN's primitive
cache, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, and PyTorch's ideep cache,
``LRU_CACHE_CAPACITY``). A prompt of a length not seen before is a new shape for every
projection of its prefill, so a sidecar's memory grows with the number of distinct prompt
lengths it has served until the caches are full. fp32 matmuls keep next to nothing per
shape.

Each dtype runs in a child process of its own (fresh caches, the environment passed on, so
the two variables above can be tried): a model of Qwen2.5-0.5B's configuration with
``--layers`` layers (random weights; the layers share their shapes; ``--vocab`` rows, the
real 151,936 by default) prefills
``--lengths`` prompts of distinct lengths (8, 10, 12, ... tokens) through the engine's
``prefill``, then the first 30 lengths again. Prints resident memory at the start, after the
distinct lengths and after the repeat, the growth per distinct length, and the time, with
fp32 as the reference beside bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import module_parser

REPEATED = 30  # lengths served again at the end (shapes already cached)


def resident_mb() -> float:
    """This process's resident memory (VmRSS), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(dtype_name: str, lengths: int, layers: int, vocab: int) -> dict[str, Any]:
    """Resident memory before, after ``lengths`` distinct prompt lengths and after
    ``REPEATED`` of them again, in one process (the child's work)."""
    import torch
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    from benchmarks.engine.logprobs_cost import QWEN25_05B
    from drafters.engine import prefill

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    shape = {**QWEN25_05B, "num_hidden_layers": layers, "vocab_size": vocab}
    config = Qwen2Config(**shape)  # type: ignore[arg-type]
    model = Qwen2ForCausalLM(config).to(dtype=dtype).eval()  # type: ignore[call-arg]
    device = torch.device("cpu")
    sizes = [8 + 2 * i for i in range(lengths)]
    start = resident_mb()
    began = time.perf_counter()
    for size in sizes:
        prefill(model, device, DynamicCache(), torch.randint(0, vocab, (size,)).tolist())
    seconds = time.perf_counter() - began
    after = resident_mb()
    for size in sizes[:REPEATED]:
        prefill(model, device, DynamicCache(), torch.randint(0, vocab, (size,)).tolist())
    return {
        "dtype": dtype_name,
        "start_mb": round(start, 1),
        "after_distinct_mb": round(after, 1),
        "after_repeat_mb": round(resident_mb(), 1),
        "mb_per_length": round((after - start) / lengths, 2),
        "seconds": round(seconds, 2),
    }


def in_child(dtype_name: str, lengths: int, layers: int, vocab: int) -> dict[str, Any]:
    """``measure`` in a fresh Python process (its own oneDNN caches)."""
    command = [sys.executable, "-m", "benchmarks.engine.prompt_shapes", "--child", dtype_name]
    command += ["--lengths", str(lengths), "--layers", str(layers), "--vocab", str(vocab)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def format_results(results: Sequence[dict[str, Any]], lengths: int, layers: int) -> str:
    lines = [
        f"Qwen2.5-0.5B-shaped target, {layers} layers, {lengths} distinct prompt lengths "
        f"(then {REPEATED} again), one thread; caches: ONEDNN_PRIMITIVE_CACHE_CAPACITY="
        f"{os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'default')}, LRU_CACHE_CAPACITY="
        f"{os.environ.get('LRU_CACHE_CAPACITY', 'default')}",
        f"{'dtype':<6} {'start MB':>9} {'after MB':>9} {'repeat MB':>10} {'MB/length':>10} "
        f"{'seconds':>8}",
    ]
    for r in results:
        lines.append(
            f"{r['dtype']:<6} {r['start_mb']:>9.0f} {r['after_distinct_mb']:>9.0f} "
            f"{r['after_repeat_mb']:>10.0f} {r['mb_per_length']:>10.2f} {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = module_parser(__doc__)
    parser.add_argument("--lengths", type=int, default=120)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--child", choices=["bf16", "fp32"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lengths < REPEATED:
        parser.error(f"--lengths must be at least {REPEATED}")
    if args.child is not None:
        result = measure(args.child, args.lengths, args.layers, args.vocab)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    results = [in_child(name, args.lengths, args.layers, args.vocab) for name in ("fp32", "bf16")]
    sys.stdout.write(format_results(results, args.lengths, args.layers) + "\n")


if __name__ == "__main__":
    main()
