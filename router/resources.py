"""The memory a drafter about to load may take: :func:`memory_room`.

On the CPU it is the smallest of the host's ``MemAvailable`` and, for each memory cgroup
the sidecar runs in (a container's limit, a systemd slice's), its limit less what the
cgroup uses, page cache that can be dropped (``inactive_file``) not counted as used: the
kernel kills a container that goes over its cgroup's limit however much the host has
free. On a CUDA device it is the device's free memory plus what PyTorch's allocator holds
unused. Anything unreadable is left out (no limit known: ``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GIB = float(1 << 30)
# cgroup v1 writes "no limit" as 2^63 - 1 rounded down to a page: anything this large.
NO_LIMIT_V1 = 1 << 62


@dataclass(frozen=True)
class MemoryRoom:
    """Bytes free, and what bounds them (said in an error that refuses a drafter)."""

    free_bytes: int
    bound: str


def memory_room(device: torch.device, root: Path = Path("/")) -> MemoryRoom | None:
    """The memory free for new tensors on ``device`` (``root``: where ``/proc`` and
    ``/sys`` are read, for tests)."""
    if device.type == "cuda":
        return _cuda_room(device)
    if device.type != "cpu":
        return None
    rooms = [_host_room(root), *_cgroup_rooms(root)]
    return min((r for r in rooms if r is not None), key=lambda r: r.free_bytes, default=None)


def _cuda_room(device: torch.device) -> MemoryRoom:
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return MemoryRoom(free + cached, f"{device}'s free memory (of {total / GIB:.1f} GiB)")


def _host_room(root: Path) -> MemoryRoom | None:
    for line in _read(root / "proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return MemoryRoom(int(line.split()[1]) * 1024, "the host's available memory")
    return None


def _cgroup_rooms(root: Path) -> list[MemoryRoom]:
    """The room under each limit of the cgroups the process is in, and their ancestors'
    (``/proc/self/cgroup``: ``0::<path>`` for cgroup v2, ``N:...memory...:<path>`` for
    v1's memory controller)."""
    rooms: list[MemoryRoom] = []
    for line in _read(root / "proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            rooms += _limited(root / "sys/fs/cgroup", path, _v2_room)
        elif "memory" in controllers.split(","):
            rooms += _limited(root / "sys/fs/cgroup/memory", path, _v1_room)
    return rooms


def _limited(
    mount: Path, path: str, room_of: Callable[[Path], MemoryRoom | None]
) -> list[MemoryRoom]:
    """``room_of`` each directory from the cgroup's up to the hierarchy's root that has a
    limit (a cgroup namespace shows the process's own cgroup as ``/``: the mount's)."""
    leaf = mount / path.lstrip("/")
    rooms = []
    for directory in (leaf, *leaf.parents):
        if not directory.is_relative_to(mount):
            break
        room = room_of(directory)
        if room is not None:
            rooms.append(room)
    return rooms


def _v2_room(directory: Path) -> MemoryRoom | None:
    limit = _number(directory / "memory.max")
    used = _number(directory / "memory.current")
    if limit is None or used is None:
        return None
    return _room(limit, used - _stat(directory, "inactive_file"), "memory.max")


def _v1_room(directory: Path) -> MemoryRoom | None:
    limit = _number(directory / "memory.limit_in_bytes")
    used = _number(directory / "memory.usage_in_bytes")
    if limit is None or used is None or limit >= NO_LIMIT_V1:
        return None
    return _room(limit, used - _stat(directory, "total_inactive_file"), "memory.limit_in_bytes")


def _room(limit: int, used: int, name: str) -> MemoryRoom:
    return MemoryRoom(
        max(0, limit - used),
        f"the cgroup's {name} ({limit / GIB:.1f} GiB, {used / GIB:.1f} GiB of it in use)",
    )


def _stat(directory: Path, key: str) -> int:
    for line in _read(directory / "memory.stat").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _number(path: Path) -> int | None:
    """An integer file's value; ``None`` for ``max`` (no limit) or a file not there."""
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
