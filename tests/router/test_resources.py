"""The memory room a drafter's registration is checked against (router/resources.py), read
from /proc and /sys trees laid out as the kernel shows them."""

from __future__ import annotations

from pathlib import Path

import torch

from router.resources import GIB, memory_room

CPU = torch.device("cpu")


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _meminfo(available_kib: int) -> str:
    return f"MemTotal: 99999999 kB\nMemFree: 1 kB\nMemAvailable: {available_kib} kB\n"


def test_a_containers_cgroup_v2_limit_bounds_the_room_not_the_hosts_memory(
    tmp_path: Path,
) -> None:
    """A pod limited to 4 GiB on a host with 64 GiB available: the kernel kills the pod at
    its limit. Page cache it may drop (inactive_file) is not counted as used; the parent's
    own limit counts where it is smaller."""
    root = _write(
        tmp_path,
        {
            "proc/meminfo": _meminfo(64 << 20),
            "proc/self/cgroup": "0::/kubepods/pod1/sidecar\n",
            "sys/fs/cgroup/kubepods/pod1/sidecar/memory.max": f"{4 << 30}\n",
            "sys/fs/cgroup/kubepods/pod1/sidecar/memory.current": f"{3 << 30}\n",
            "sys/fs/cgroup/kubepods/pod1/sidecar/memory.stat": (
                f"anon 1\nfile 2\ninactive_file {1 << 29}\n"
            ),
            "sys/fs/cgroup/kubepods/pod1/memory.max": "max\n",
            "sys/fs/cgroup/kubepods/pod1/memory.current": f"{3 << 30}\n",
            "sys/fs/cgroup/kubepods/memory.max": f"{100 << 30}\n",
            "sys/fs/cgroup/kubepods/memory.current": f"{10 << 30}\n",
        },
    )
    room = memory_room(CPU, root)
    assert room is not None
    assert room.free_bytes == (4 << 30) - (3 << 30) + (1 << 29)
    assert "memory.max (4.0 GiB, 2.5 GiB of it in use)" in room.bound
    # A parent limit tighter than the container's own.
    _write(root, {"sys/fs/cgroup/kubepods/memory.current": f"{(100 << 30) - (1 << 20)}\n"})
    room = memory_room(CPU, root)
    assert room is not None and room.free_bytes == 1 << 20


def test_cgroup_v1s_memory_controller_and_its_no_limit(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "proc/meminfo": _meminfo(8 << 20),
            "proc/self/cgroup": "9:pids:/\n4:memory:/docker/abc\n0::/\n",
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{2 << 30}\n",
            "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{1 << 30}\n",
            "sys/fs/cgroup/memory/docker/abc/memory.stat": f"total_inactive_file {1 << 28}\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{5 << 30}\n",
        },
    )
    room = memory_room(CPU, root)
    assert room is not None and room.free_bytes == (1 << 30) + (1 << 28)
    assert "memory.limit_in_bytes (2.0 GiB" in room.bound
    # No limit anywhere: the host's available memory.
    (root / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes").write_text(
        "9223372036854771712\n"
    )
    room = memory_room(CPU, root)
    assert room is not None and room.free_bytes == 8 << 30
    assert room.bound == "the host's available memory"


def test_nothing_readable_is_no_known_bound(tmp_path: Path) -> None:
    assert memory_room(CPU, tmp_path) is None
    assert memory_room(torch.device("meta"), tmp_path) is None


def test_this_hosts_room_is_read() -> None:
    room = memory_room(CPU)
    assert room is not None and 0 < room.free_bytes < 1 << 50
    assert room.free_bytes / GIB > 0.01
