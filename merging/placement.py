"""Where a resident merger's held tensors live (the placement tiers), and how each one reaches the
merge device for one `merge_tensor` call.

- device: held on the merge device, handed over as is (no copy).
- host: held in CPU memory, pinned on CUDA; each merge copies it to the device on a side stream,
  the copy of the next tensor running while this one merges (`Mover.stream`). On a CPU device the
  host *is* the device: the tensor is held once, in the same memory, and handed over as is.
- disk: written once to a cache folder as safetensors (one file per model: the base, or one
  fine-tune's task vectors, in the merge dtype) and memory-mapped: the process holds page cache,
  not memory of its own. A CPU merge reads the mapping in place; a CUDA one copies it to the
  device as the host tier does.

A tier changes only where a tensor's bytes are: every tier hands `merge_tensor` the same values in
the same dtype on the same device, so every placement merges the same bits.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from merging.errors import MergeError

PLACEMENTS = ("auto", "device", "host", "disk")
TIERS = ("device", "host", "disk")
BASE = -1  # the model index of the base in a tensor's key (model, name); fine-tunes count from 0
Key = tuple[int, str]

_SAFE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FROM_SAFE = {v: k for k, v in _SAFE_DTYPES.items()}


def default_cache_dir() -> Path:
    """Where task vectors of the disk tier are written when models.cache_dir is not set."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "basin" / "task-vectors"


def held_items(
    names: Sequence[str], numel: dict[str, int], full_models: Sequence[int], width: int
) -> list[tuple[Key, int]]:
    """(key, bytes) of every tensor a merger holds in a tier: the base's, then each full
    fine-tune's task vectors. A LoRA adapter's factors are not listed: they stay on the device
    (they are small)."""
    return [((k, n), numel[n] * width) for k in (BASE, *full_models) for n in names]


def assign_tiers(
    items: Sequence[tuple[Key, int]],
    placement: str,
    device_room: int | None = None,
    host_room: int | None = None,
) -> dict[Key, str]:
    """The tier of every held tensor. A named placement puts them all there; auto fills the
    device up to `device_room` bytes, then host memory up to `host_room`, then disk, largest
    tensor first (each candidate reads every tensor once, so which ones does not change the bytes
    moved; the largest on the device keep the staging of the others small). None: no limit."""
    if placement not in PLACEMENTS:
        raise MergeError(f"unknown placement '{placement}'. Known: {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return {key: placement for key, _ in items}
    room = {"device": device_room, "host": host_room}
    tiers = {}
    for key, nbytes in sorted(items, key=lambda item: -item[1]):  # stable: names keep their order
        tier = next((t for t in ("device", "host") if room[t] is None or nbytes <= room[t]), "disk")
        if room.get(tier) is not None:
            room[tier] -= nbytes
        tiers[key] = tier
    return {key: tiers[key] for key, _ in items}


def auto_device_room(
    items: Sequence[tuple[Key, int]], free: int, staging_per_byte: int, host_room: int | None
) -> tuple[int, int]:
    """(device room for `assign_tiers`, staging bytes) when `free` device bytes must hold both
    the tensors placed there and the staging of those that are not: `staging_per_byte` bytes per
    byte of the largest tensor held off the device (on CUDA two names' inputs: 2 x the models).
    The smallest staging that leaves every larger tensor on the device wins."""
    sizes = sorted({n for _, n in items}, reverse=True)
    for largest_off in [0, *sorted(sizes)]:
        staging = staging_per_byte * largest_off
        room = free - staging
        tiers = assign_tiers(items, "auto", room, host_room)
        off = max((n for key, n in items if tiers[key] != "device"), default=0)
        if off <= largest_off:
            return room, staging if off else 0
    return free - staging_per_byte * sizes[0], staging_per_byte * sizes[0]


def source_fingerprint(paths: Sequence[Path], extra: str) -> str:
    """A key for cached task vectors: the source files' names, sizes and times, and `extra`."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


class CacheWriter:
    """A safetensors file written tensor by tensor in a known order (its header first), so that a
    model larger than memory is never held whole; it appears under its name only when complete."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...]]], dtype) -> None:
        self.path, self._dtype = path, dtype
        self._order = [name for name, _ in entries]
        width = torch.empty((), dtype=dtype).element_size()
        header, offset = {}, 0
        for name, shape in entries:
            size = width * _numel(shape)
            header[name] = {
                "dtype": _SAFE_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish() or abort()
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: Tensor) -> None:
        if self._order[self._next] != name:
            raise MergeError(f"cache file {self.path}: expected '{self._order[self._next]}'")
        flat = t.detach().to("cpu", self._dtype).contiguous().view(-1).view(torch.uint8)
        self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def finish(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)  # atomic: a concurrent worker sees none or all of it

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class MappedFile:
    """A safetensors file memory-mapped: its tensors are views of the mapping (page cache)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            # a private mapping: writable for torch.frombuffer, never written, so the pages stay
            # the file's (page cache, shared, dropped under memory pressure)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (size,) = struct.unpack("<Q", self._map[:8])
        self.header = json.loads(self._map[8 : 8 + size])
        self._start = 8 + size

    def tensor(self, name: str) -> Tensor:
        meta = self.header[name]
        dtype = _FROM_SAFE[meta["dtype"]]
        begin, _ = meta["data_offsets"]
        n = _numel(meta["shape"])
        if n == 0:
            return torch.empty(meta["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=n, offset=self._start + begin)
        return flat.view(meta["shape"])

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget the file's pages (a cold read next time; benchmarks)."""
        self._map.madvise(mmap.MADV_DONTNEED)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hold(t: Tensor, tier: str, device: torch.device) -> Tensor:
    """`t` (on the merge device) as the device or host tier holds it; the disk tier writes it
    through a CacheWriter instead."""
    if tier == "device" or device.type == "cpu":  # on a CPU device the host is the device
        return t
    held = torch.empty(t.shape, dtype=t.dtype, pin_memory=device.type == "cuda")
    return held.copy_(t)


class Mover:
    """Hands held tensors to the merge device: as is when they are there already (or the device
    is the CPU); on CUDA copied on a side stream, ordered by events, one group ahead."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def get(self, held: Tensor) -> Tensor:
        """One tensor on the device, now."""
        if held.device.type == self.device.type:  # there already (a CPU device reads host memory)
            return held
        return held.to(self.device)

    def stream(self, groups: Iterable[list[Tensor]]) -> Iterator[list[Tensor]]:
        """Each group's tensors on the device; on CUDA the next group's copies are issued before
        this group is handed over, so they overlap with its merge."""
        if self._side is None:
            for group in groups:
                yield [self.get(t) for t in group]
            return
        main = torch.cuda.current_stream(self.device)
        pending = None
        for group in groups:
            issued = self._issue(group)
            if pending is not None:
                yield self._ready(pending, main)
            pending = issued
        if pending is not None:
            yield self._ready(pending, main)

    def _issue(self, group: list[Tensor]) -> tuple[list[Tensor], torch.cuda.Event]:
        with torch.cuda.stream(self._side):
            moved = [
                t if t.device.type == "cuda" else t.to(self.device, non_blocking=True)
                for t in group
            ]
            done = torch.cuda.Event()
            done.record(self._side)
        return moved, done

    def _ready(self, issued: tuple[list[Tensor], torch.cuda.Event], main) -> list[Tensor]:
        moved, done = issued
        main.wait_event(done)  # the merge reads them only after their copies
        for t in moved:
            # allocated on the side stream, used on the main one: not reused before the main
            # stream is done with it
            t.record_stream(main)
        return moved


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
