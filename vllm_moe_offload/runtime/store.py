"""Expert stores: where every expert lives, outside the slot pool.

Both stores hold each expert in the kernel's ready-to-use layout (what the slot
buffers hold), as one record of `layout.record_bytes`: its tensors back to back.
Interface (LMCache-like): `put`, `read_into`, `contains`, `seal`, `close`.

- `HostStore`: one RAM tensor [L * E, record_bytes] (pinned when CUDA is there).
- `DiskStore`: one file per model, written once, read with positioned reads;
  after each read the range is dropped from the page cache (posix_fadvise), so
  RAM stays bounded and timings measure the disk. A header carries the model
  fingerprint and layout; a file that is truncated, unsealed or stale is
  detected and rebuilt, never read. Into GPU slots it reads through two pinned
  staging chunks: while chunk i crosses the link (copy stream), chunk i+1 is read
  from disk, with O_DIRECT where the file system allows it.

The disk store is a cache of the checkpoint, and heals like one. File layout:
header | L * E records | L * E checksums (u64, xxh3_64 or, without xxhash, crc32);
a store of a subset of the experts (`keys`) holds theirs alone, in key order.
NOTE #1: every read is checked (length and checksum) before the slot is used. A
short read, a mismatch or an I/O error re-derives that expert through `rederive`
(the checkpoint, converted as at load time), writes the record back and serves the
request, with a warning naming the file and the expert. The re-derived record must
have the checksum sealed at build time (a checkpoint changed or read under the
wrong names is not served), except in a quantized store (`exact_rederive` off): its
encoder's reductions no longer depend on the thread count, but its codes are not the
same on every CPU (vectorized rounding differs), so a record encoded again that
differs is served, with its own checksum and a warning that says so. The table of
checksums has its own checksum in the header.
Without `rederive`, or when it fails or differs, the read raises `StoreFileError`:
never garbage weights.
NOTE #2: a build writes `<name>.building`, reserves its full size first (a full
disk fails at once, naming the space needed) and is renamed only once sealed, so
a kill -9 or ENOSPC mid-build never leaves a file that looks valid.
NOTE #3: a build holds an exclusive lock on `<name>.lock` beside the file (a POSIX
record lock, `lockf`), from before it opens `.building` until the rename (or its
failure, or the process's end: the kernel drops a killed process's locks). Another
process (a second vLLM instance with the same store directory) that finds no sealed
file waits on the lock, logging the holder's pid, then reuses what was sealed or
builds it itself. Without the lock both truncated and wrote one `.building` file,
and the second rename failed (FileNotFoundError) while the first's records could
be zeroed. The lock is per process, and lockf lets its own process in: a second
build of the path in one process, while the first holds the lock, is refused
(store_dir.py `held`); one after a build that was abandoned (an in-process engine
that failed while loading) goes ahead. A sealed file is reused without the lock: a
read-only directory serves it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
import weakref
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vllm_moe_offload.runtime.store_dir import held, hold, let_go, scan, share, touch

try:
    import xxhash
except ImportError:  # a bare GPU box: crc32 from the standard library
    xxhash = None

logger = logging.getLogger("vllm.moe_offload")

_MAGIC = b"MOESTORE"
_FORMAT = 3  # 2: a checksum per record; 3: and one of that table, in the header
_ALIGN = 4096  # record alignment (O_DIRECT-friendly, page-sized fadvise ranges)
_HEADER_BYTES = 4096
_STAGING_BYTES = 16 << 20  # one of the two pinned staging chunks (disk -> GPU)
_LOCK_LOG_EVERY = 30  # seconds between "waiting for the builder" lines


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one expert's tensors in kernel layout (e.g. packed w13, w2)."""
    tensors: tuple[TensorSpec, ...]

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def record_bytes(self) -> int:
        return -(-self.expert_bytes // _ALIGN) * _ALIGN

    def describe(self) -> list:
        return [[list(t.shape), str(t.dtype)] for t in self.tensors]


def _byte_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    """Writable byte views of contiguous CPU tensors (no copies)."""
    return [memoryview(t.view(torch.uint8).reshape(-1).numpy()) for t in tensors]


class ExpertStore:
    kind = "abstract"
    reused = False  # True when the store already held every expert at open time
    keys: list[tuple[int, int]] | None = None  # None: every expert (see __init__)
    _rows: dict[tuple[int, int], int] | None = None

    def __init__(self, layout: ExpertLayout, num_layers: int, experts_per_layer: int,
                 keys: list[tuple[int, int]] | None = None):
        """`keys`: the (layer, expert) pairs this store holds, in record order (a
        mixed-precision store splits the experts over two); None: all of them."""
        self.layout = layout
        self.num_layers = num_layers
        self.experts_per_layer = experts_per_layer
        self.keys = None if keys is None else sorted(set(keys))
        self._rows = None if keys is None else {k: i for i, k in enumerate(self.keys)}
        self._present = [False] * self.num_records

    @property
    def num_records(self) -> int:
        return (self.num_layers * self.experts_per_layer if self.keys is None
                else len(self.keys))

    @property
    def nbytes(self) -> int:
        return self.num_records * self.layout.record_bytes

    @property
    def read_bytes(self) -> int:
        """Bytes one read of an expert moves (its record, not its slot, when quantized)."""
        return self.layout.expert_bytes

    @property
    def record_bytes(self) -> int:
        """One expert's record as the store keeps it, alignment included."""
        return self.layout.record_bytes

    def read_bytes_of(self, layer: int, expert: int) -> int:
        """`read_bytes` for this expert (they differ in a mixed-precision store)."""
        return self.read_bytes

    def record_bytes_of(self, layer: int, expert: int) -> int:
        return self.record_bytes

    def _all_keys(self) -> list[tuple[int, int]]:
        return self.keys if self.keys is not None else [
            (l, e) for l in range(self.num_layers) for e in range(self.experts_per_layer)]

    def holds(self, layer: int, expert: int) -> bool:
        """Whether (layer, expert) is one of this store's keys (stored or not yet)."""
        if self._rows is not None:
            return (layer, expert) in self._rows
        return 0 <= layer < self.num_layers and 0 <= expert < self.experts_per_layer

    def contains(self, layer: int, expert: int) -> bool:
        return self.holds(layer, expert) and self._present[self._index(layer, expert)]

    def is_complete(self) -> bool:
        return all(self._present)

    def missing(self) -> list[tuple[int, int]]:
        return [k for k, ok in zip(self._all_keys(), self._present) if not ok]

    def _index(self, layer: int, expert: int) -> int:
        if not self.holds(layer, expert):
            raise IndexError(f"expert ({layer}, {expert}) outside the store "
                             f"({self.num_layers} x {self.experts_per_layer}"
                             + ("" if self.keys is None else f", {len(self.keys)} of them")
                             + ")")
        if self._rows is not None:
            return self._rows[(layer, expert)]
        return layer * self.experts_per_layer + expert

    def put(self, layer: int, expert: int, tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def read_into(self, layer: int, expert: int, dst: list[torch.Tensor]) -> int:
        """Copy one expert into `dst` (slot views). Returns bytes read."""
        raise NotImplementedError

    def seal(self) -> None:
        """All experts are in: make the store durable / read-only."""

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        """A build that will not finish (the load failed): give back what it holds."""
        self.close()

    def _check(self, tensors: list[torch.Tensor]) -> None:
        specs = self.layout.tensors
        if len(tensors) != len(specs) or any(
                tuple(t.shape) != s.shape or t.dtype != s.dtype
                for t, s in zip(tensors, specs)):
            got = [(tuple(t.shape), t.dtype) for t in tensors]
            raise ValueError(f"expert tensors {got} do not match the store layout "
                             f"{self.layout.describe()}")


def _pwrite_all(fd: int, data, offset: int) -> None:
    """pwrite that says so when the disk took fewer bytes: where fallocate reserves
    nothing (copy-on-write file systems), a full disk shows as a short write."""
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")


_LIBCUDA = "libcuda.so.1"  # the CUDA driver (tests load a stand-in)
_REGISTER_FLAGS = 0x3  # PORTABLE | DEVICEMAP: what cudaHostRegister's default is on UVA


def _driver(device: int, call: str, *args, hold: int = 0) -> int:
    """libcuda's `call` with `device`'s primary context (torch's) current; its
    CUresult, 0 for success. The driver API leaves the runtime's last error alone:
    a refused cudaHostRegister would fail torch's next kernel launch instead.
    `hold`: 1 keeps this call's reference to the context after a success, -1 drops
    the one such a call kept. Memory registered with the context lives as long as
    it does, and the context resets when its last reference goes: where torch has
    not started it yet (its lazy start makes none), a registration would vanish."""
    import ctypes

    cuda = ctypes.CDLL(_LIBCUDA)
    ctx, dev = ctypes.c_void_p(), ctypes.c_int()
    err = (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device)
           or cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    if err:
        return err
    kept = False
    try:
        err = cuda.cuCtxPushCurrent_v2(ctx)
        if err:
            return err
        try:
            err = getattr(cuda, call)(*args)
            kept = err == 0 and hold > 0
            return err
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        for _ in range((not kept) + (hold < 0)):
            cuda.cuDevicePrimaryCtxRelease_v2(dev)


def _registered_is_mapped() -> bool:
    """Whether kernels may read registered host memory at its host address (CUDA's
    CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, 91; memory from cudaHostAlloc, torch's
    pinning, always can). Device mode reads the store there. False where the driver
    cannot be asked."""
    import ctypes

    try:
        cuda = ctypes.CDLL(_LIBCUDA)
        device, value = ctypes.c_int(), ctypes.c_int()
        return (cuda.cuInit(0) == 0
                and cuda.cuDeviceGet(ctypes.byref(device), torch.cuda.current_device()) == 0
                and cuda.cuDeviceGetAttribute(ctypes.byref(value), 91, device) == 0
                and value.value == 1)
    except (OSError, AttributeError):
        return False


def _whole_pages(nbytes: int) -> torch.Tensor:
    """`nbytes` of host memory in whole pages that no other allocation shares
    (registering a page twice fails), an anonymous mapping of its own, so the
    tensor's storage starts where it does: torch's `is_pinned` asks the driver about
    the storage's first byte, and a page-aligned slice of a larger tensor (as this
    was) had it in an unregistered page, so device mode refused the store."""
    import mmap

    size = max(-(-nbytes // mmap.PAGESIZE), 1) * mmap.PAGESIZE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=torch.uint8)  # (holds `buf`)


def _page_lock(owner, pages: torch.Tensor) -> bool:
    """Page-lock `pages` (whole pages: `_whole_pages`) where they lie, through the
    driver (cuMemHostRegister, holding the context), unlocked once `owner` is gone. torch's
    pin_memory=True rounds every block up to a power of two (its caching host
    allocator), so a 90 GB store would lock 128 GiB of a 128 GiB host. Only where the
    driver says kernels may read them at their host address (as they read pinned
    memory); else, or where there is no CUDA or it refuses, False: then the caller
    pins the torch way."""
    if not torch.cuda.is_available() or pages.nbytes == 0 or not _registered_is_mapped():
        return False
    import ctypes

    device = torch.cuda.current_device()
    try:
        err = _driver(device, "cuMemHostRegister_v2", ctypes.c_void_p(pages.data_ptr()),
                      ctypes.c_size_t(pages.nbytes), ctypes.c_uint(_REGISTER_FLAGS), hold=1)
    except (OSError, AttributeError) as e:
        err = e
    if err:
        logger.warning("expert offload: page-locking %d bytes of the store failed "
                       "(cuMemHostRegister: %s); pinning it with torch instead (rounded "
                       "up to a power of two)", pages.nbytes, err)
        return False
    weakref.finalize(owner, _page_unlock, device, pages)  # holds `pages` till then
    return True


def _page_unlock(device: int, pages: torch.Tensor) -> None:
    import ctypes

    _driver(device, "cuMemHostUnregister", ctypes.c_void_p(pages.data_ptr()), hold=-1)


class HostStore(ExpertStore):
    kind = "host"

    def __init__(self, layout, num_layers, experts_per_layer, pin_memory: bool = False,
                 keys=None):
        super().__init__(layout, num_layers, experts_per_layer, keys)
        shape = (self.num_records, layout.record_bytes)
        pages = _whole_pages(shape[0] * shape[1]) if pin_memory else None
        if pages is not None and _page_lock(self, pages):
            self._data = pages[:shape[0] * shape[1]].view(shape)
        else:
            del pages
            self._data = torch.empty(shape, dtype=torch.uint8, pin_memory=pin_memory)
        self._offsets = []
        off = 0
        for spec in layout.tensors:
            self._offsets.append(off)
            off += spec.nbytes

    def views(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The stored expert as typed tensors (no copy)."""
        row = self._data[self._index(layer, expert)]
        return [row[o:o + s.nbytes].view(s.dtype).view(s.shape)
                for o, s in zip(self._offsets, self.layout.tensors)]

    def put(self, layer, expert, tensors):
        self._check(tensors)
        for dst, src in zip(self.views(layer, expert), tensors):
            dst.copy_(src)
        self._present[self._index(layer, expert)] = True

    def read_into(self, layer, expert, dst):
        non_blocking = dst[0].device.type == "cuda"
        for d, s in zip(dst, self.views(layer, expert)):
            d.copy_(s, non_blocking=non_blocking)
        return self.layout.expert_bytes


class StoreFileError(ValueError):
    """A disk store file that cannot be used (truncated, stale, unsealed)."""


class ExpertUnavailable(StoreFileError):
    """One expert that could neither be read intact nor re-derived from the
    checkpoint. Under vLLM only the requests routed to it fail (expert_cache.py
    NOTE #5); the engine keeps serving."""

    def __init__(self, layer: int, expert: int, message: str):
        super().__init__(message)
        self.layer, self.expert = layer, expert


class _Digest:
    """Incremental record checksum: xxh3_64 where xxhash is installed, else crc32."""

    def __init__(self, name: str):
        self._h = xxhash.xxh3_64() if name == "xxh3_64" else None
        self._crc = 0

    @staticmethod
    def best() -> str:
        return "xxh3_64" if xxhash is not None else "crc32"

    @staticmethod
    def available(name: str) -> bool:
        return name == "crc32" or (name == "xxh3_64" and xxhash is not None)

    def update(self, data) -> None:
        if self._h is not None:
            self._h.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        return self._h.intdigest() if self._h is not None else self._crc


def read_header(head: bytes, path) -> dict:
    """A disk store file's header (its first page: magic, length, JSON) -> its JSON;
    StoreFileError naming `path` where it is not one."""
    if len(head) < 12 or head[:8] != _MAGIC:
        raise StoreFileError(f"{path}: not an expert store file")
    (n,) = struct.unpack("<I", head[8:12])
    try:
        return json.loads(head[12:12 + n])
    except ValueError:
        raise StoreFileError(f"{path}: corrupt header") from None


class DiskStore(ExpertStore):
    kind = "disk"

    def __init__(self, path: str | Path, layout: ExpertLayout, num_layers: int,
                 experts_per_layer: int, fingerprint: dict, keys=None):
        super().__init__(layout, num_layers, experts_per_layer, keys)
        self.path = Path(path)
        self.fingerprint = dict(fingerprint, layout=layout.describe(),
                                num_layers=num_layers,
                                experts_per_layer=experts_per_layer,
                                record_bytes=layout.record_bytes)
        if self.keys is not None:  # which experts, as a digest: the header is 4 KiB
            self.fingerprint["keys"] = keys_digest(self.keys)
        # (layer, expert) -> tensors as put() got them: the checkpoint's copy (NOTE #1)
        self.rederive: Callable[[int, int], list[torch.Tensor]] | None = None
        self.repairs = 0  # records re-derived after a bad read
        self.exact_rederive = True  # a re-derived record must match the sealed one
        self._unrepaired: set[tuple[int, int]] = set()  # could not be written back
        self._amend_lock = threading.Lock()  # the loader thread repairs too
        self._staging_lock = threading.Lock()  # and reads through the staging buffers
        self._sums = array("Q", bytes(8 * self.num_records))
        self.checksum = _Digest.best()
        self._lock_fd = None
        self._lock_held = False
        self.reused = self._open_existing() or self._build_or_reuse()

    # ---- file life cycle ----------------------------------------------------------

    def _header(self, sealed: bool, sums: array | None = None) -> bytes:
        table = self._digest((self._sums if sums is None else sums).tobytes()) \
            if sealed else None
        body = json.dumps({"format": _FORMAT, "sealed": sealed, "checksum": self.checksum,
                           "table": table, "fingerprint": self.fingerprint}).encode()
        head = _MAGIC + struct.pack("<I", len(body)) + body
        if len(head) > _HEADER_BYTES:  # (a bug: every part of it is of bounded size)
            raise ValueError(f"expert offload: the disk store's header takes {len(head)} "
                             f"bytes, more than {_HEADER_BYTES}; use --expert-store host")
        return head.ljust(_HEADER_BYTES, b"\0")

    def validate(self, fd: int | None = None) -> None:
        """Raise StoreFileError unless the file (`fd`, else at the path) is a sealed,
        complete store of this model."""
        try:
            own = fd is None
            fd = os.open(self.path, os.O_RDONLY) if own else fd
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, _HEADER_BYTES, 0)
                table = os.pread(fd, 8 * self.num_records, _HEADER_BYTES + self.nbytes)
            finally:
                if own:
                    os.close(fd)
        except OSError as e:
            raise StoreFileError(f"{self.path}: cannot read ({e})") from None
        meta = read_header(head, self.path)
        if meta.get("format") != _FORMAT or meta.get("fingerprint") != self.fingerprint:
            raise StoreFileError(f"{self.path}: stale (built for another model, "
                                 "dtype, layout or vLLM version, or by an older plugin)")
        if not _Digest.available(meta.get("checksum")):
            raise StoreFileError(f"{self.path}: checksums are {meta.get('checksum')}, "
                                 "which this host cannot compute (pip install xxhash)")
        if not meta.get("sealed"):
            raise StoreFileError(f"{self.path}: unsealed (an earlier build did not finish)")
        if size != self._file_bytes:
            raise StoreFileError(f"{self.path}: truncated ({size} bytes, expected "
                                 f"{self._file_bytes})")
        self.checksum = meta["checksum"]
        if self._digest(table) != meta.get("table"):  # NOTE #1: what repairs check against
            raise StoreFileError(f"{self.path}: its table of checksums is damaged")
        self._sums = array("Q", table)  # the table checked here is the one reads use

    @property
    def _file_bytes(self) -> int:
        return _HEADER_BYTES + self.nbytes + 8 * self.num_records

    def _open_existing(self) -> bool:
        """Open and check a sealed file; its shared lock is taken first, so a prune
        (store_dir.py) that removed it meanwhile is seen (no link left): rebuilt."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.problem = f"{self.path}: cannot read ({e})"
            return False
        share(fd)
        try:
            if os.fstat(fd).st_nlink == 0:
                raise StoreFileError(f"{self.path}: removed as it was opened")
            self.validate(fd)
        except (OSError, StoreFileError) as e:
            os.close(fd)
            self.problem = str(e)
            return False
        self._fd = fd
        hold(self.path)
        touch(self.path)
        self._present = [True] * self.num_records
        return True

    def _build_or_reuse(self) -> bool:
        """NOTE #3: build under the store's lock, or reuse what its holder built."""
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            if self._open_existing():  # the holder finished it
                self._unlock()
                return True
            tmp = self._building
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            self._unlock()
            raise ValueError(
                f"expert_offload.store_dir={str(directory)!r} is not writable ({e}); "
                "set --expert-store-dir / VLLM_MOE_OFFLOAD_STORE_DIR to a writable "
                "directory, or use --expert-store host.") from None
        self._tmp, self._fd = tmp, fd
        self._create()
        return False

    @property
    def _building(self) -> Path:
        return self.path.with_suffix(".building")

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _open_lock_file(self) -> int:
        return os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        """The store's lock (NOTE #3) if it is free now; False if another holds it."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return False

    def _lock(self) -> None:
        """Block until this process holds the store's lock, saying whom it waits for
        (NOTE #3: a holder that dies releases it, so this ends). Where there can be
        no lock (a lock file of another user's, a file system without POSIX locks),
        build without it, and say so."""
        if held(self._lock_path):  # store_dir.py NOTE #1: and lockf would let it in
            raise RuntimeError(
                f"expert offload: this process is building the disk store {self.path} "
                "already (a model loaded twice in one process); close or abandon that "
                "store first")
        try:
            self._lock_fd = self._open_lock_file()
            self._wait_for_lock()
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.ENOLCK, errno.ENOSYS,
                               errno.EOPNOTSUPP, errno.EROFS):
                raise
            self._unlock()
            logger.warning("expert offload: building the disk store %s without its lock "
                           "(%s): another instance building it at the same time would "
                           "fail", self.path, e)

    def _wait_for_lock(self) -> None:
        fd, waited = self._lock_fd, 0
        while not self._try_lock(fd):
            if waited % _LOCK_LOG_EVERY == 0:
                holder = os.pread(fd, 160, 0).decode(errors="replace").strip() or "?"
                try:
                    idle = f"{time.time() - self._building.stat().st_mtime:.0f}"
                except OSError:
                    idle = "?"
                logger.warning("expert offload: process %s is building the disk store %s; "
                               "waiting for it to finish (%d s so far; its partial file "
                               "was last written %s s ago: if that grows and the process "
                               "is stuck, stop it)", holder, self.path, waited, idle)
            time.sleep(1)
            waited += 1
        hold(self._lock_path)  # store_dir.py NOTE #1
        self._lock_held = True
        try:  # who holds it, for the others' message (a full disk: the build says so);
            os.ftruncate(fd, 0)  # pid@host: on a shared file system it may be another host
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()[:120]}\n".encode(), 0)
        except OSError:
            pass

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            if self._lock_held:
                let_go(self._lock_path)
                self._lock_held = False
            os.close(fd)  # releases the lock

    def _create(self) -> None:
        fd = self._fd
        try:  # NOTE #2: the whole file up front
            os.pwrite(fd, self._header(sealed=False), 0)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, self._file_bytes)
            else:
                os.ftruncate(fd, self._file_bytes)
        except OSError as e:
            self._abandon(e)

    def _drop_build(self) -> None:
        """A build that will not finish: its partial file and its lock go."""
        os.close(self._fd)
        self._fd = None
        self._tmp.unlink(missing_ok=True)
        self._unlock()

    def _abandon(self, error: OSError):
        """A build that cannot finish: drop it, say what it needs."""
        self._drop_build()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            directory = self._tmp.parent
            free = shutil.disk_usage(directory).free
            unused = [f for f in scan(directory, kinds=("store",)) if not f.in_use]
            others = (f" {len(unused)} stores there that no engine uses take "
                    f"{sum(f.nbytes for f in unused) / 2**30:.2f} GiB (`vllm-moe-offload "
                    f"store {str(directory)!r}` lists them, `... --prune` removes them)."
                    if unused else "")
            raise ValueError(
                f"expert_offload.store_dir={str(directory)!r}: the disk store of "
                f"this model needs {self._file_bytes / 2**30:.2f} GiB and "
                f"{free / 2**30:.2f} GiB are free there ({error.strerror}).{others} Free "
                "space, set --expert-store-dir to a larger disk, or use --expert-store host."
            ) from None
        raise StoreFileError(f"{self._tmp}: building the disk store failed ({error})") from None

    def put(self, layer, expert, tensors):
        if self.reused:
            return  # the sealed file already holds this expert
        self._check(tensors)
        data = self._record(tensors)
        try:
            _pwrite_all(self._fd, data, self._offset(layer, expert))
        except OSError as e:
            self._abandon(e)
        self._sums[self._index(layer, expert)] = self._digest(data)
        self._present[self._index(layer, expert)] = True

    @staticmethod
    def _record(tensors: list[torch.Tensor]) -> bytes:
        return b"".join(t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
                        .numpy().tobytes() for t in tensors)

    def _digest(self, *chunks) -> int:
        d = _Digest(self.checksum)
        for c in chunks:
            d.update(c)
        return d.value()

    def seal(self):
        if self.reused:
            return
        if not self.is_complete():
            raise RuntimeError(f"{self.path}: {len(self.missing())} experts never "
                               f"arrived, first {self.missing()[:4]}")
        try:
            _pwrite_all(self._fd, self._sums.tobytes(), _HEADER_BYTES + self.nbytes)
            os.fsync(self._fd)
            _pwrite_all(self._fd, self._header(sealed=True), 0)
            os.fsync(self._fd)
            share(self._fd)  # sealed, in use: from the rename on, prune leaves it
            os.replace(self._tmp, self.path)
            sealed = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            self._abandon(e)
        share(sealed)
        hold(self.path)
        os.close(self._fd)
        share(sealed)  # (NFS: closing the build's descriptor dropped it)
        self._unlock()
        self._fd, self.reused = sealed, True
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _offset(self, layer: int, expert: int) -> int:
        return _HEADER_BYTES + self._index(layer, expert) * self.layout.record_bytes

    def read_into(self, layer, expert, dst):
        if not self.reused:
            raise RuntimeError(f"{self.path}: read before the store was sealed")
        if (layer, expert) in self._unrepaired:
            return self._recover(layer, expert, dst, "was damaged earlier")
        try:
            if dst[0].device.type == "cuda":
                return self._read_staged(layer, expert, dst)
            return self._read_cpu(layer, expert, dst)
        except (OSError, StoreFileError) as e:  # NOTE #1
            return self._recover(layer, expert, dst, str(e))

    def _read_cpu(self, layer, expert, dst):
        offset = self._offset(layer, expert)
        views = _byte_views(dst)
        want = self.layout.expert_bytes
        got = os.preadv(self._fd, views, offset)
        self._check_read(got, want)
        self._check_sum(layer, expert, self._digest(*views))
        os.posix_fadvise(self._fd, offset, self.layout.record_bytes,
                         os.POSIX_FADV_DONTNEED)
        return got

    @staticmethod
    def _check_read(got, want):
        if got < want:
            raise StoreFileError(f"short read ({got} of {want} bytes)")

    def _check_sum(self, layer: int, expert: int, value: int) -> None:
        if value != self._sums[self._index(layer, expert)]:
            raise StoreFileError("checksum mismatch")

    def _recover(self, layer: int, expert: int, dst, why: str) -> int:
        """NOTE #1: the checkpoint's copy into `dst`, and the record repaired."""
        where = f"{self.path}: expert ({layer}, {expert})"
        if self.rederive is None:
            raise ExpertUnavailable(layer, expert, f"{where}: {why}, and there is no "
                                    "checkpoint to re-derive it from") from None
        try:
            tensors = self.rederive(layer, expert)
            self._check(tensors)  # (a wrong shape: the requests fail, not the engine)
            data = self._record(tensors)
        except Exception as e:
            raise ExpertUnavailable(
                layer, expert, f"{where}: {why}, and re-deriving it from the checkpoint "
                f"failed ({e}); restore the checkpoint, or delete the store file and "
                "restart to rebuild it") from None
        sealed = self._sums[self._index(layer, expert)]
        differs = self._digest(data) != sealed
        if self.exact_rederive and differs:
            raise ExpertUnavailable(
                layer, expert, f"{where}: {why}, and the checkpoint's copy of it differs "
                "from the record sealed when the store was built (checksum): the "
                "checkpoint changed since, or was read under other names. Delete the store "
                "file and restart to rebuild it") from None
        for d, t in zip(dst, tensors):
            d.copy_(t)
        if (layer, expert) in self._unrepaired:
            return self.layout.expert_bytes
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                if os.fstat(fd).st_ino != os.fstat(self._fd).st_ino:
                    raise OSError(errno.ESTALE, "the file was replaced since it was opened")
                _pwrite_all(fd, data, self._offset(layer, expert))
                os.fsync(fd)
                if differs:  # a quantized record encoded to other codes: its own
                    self._amend_checksum(fd, self._index(layer, expert), data)
            finally:
                os.close(fd)
                share(self._fd)  # (NFS: closing another descriptor dropped it)
        except OSError as e:
            self._unrepaired.add((layer, expert))
            logger.warning("expert offload: %s: %s; served from the checkpoint, but the "
                           "record could not be repaired (%s)", where, why, e)
            return self.layout.expert_bytes
        self.repairs += 1
        if differs:
            logger.warning(
                "expert offload: %s: %s; re-derived it from the checkpoint and repaired "
                "the record, encoded to codes that differ from the record sealed at "
                "build time (another CPU encodes differently, or the checkpoint changed "
                "since: then delete the store file and restart to rebuild it)", where, why)
            return self.layout.expert_bytes
        logger.warning("expert offload: %s: %s; re-derived it from the checkpoint and "
                       "repaired the record", where, why)
        return self.layout.expert_bytes

    def _amend_checksum(self, fd: int, index: int, data: bytes) -> None:
        """A record repaired to other codes: its checksum, here and in the file (else
        every start re-derives it). Under the store's lock and this process's, the
        file's table as it is now (another instance may have amended others), then
        the header's digest of it. Where the lock is busy (a rebuild), only here."""
        value = self._digest(data)
        self._sums[index] = value
        with self._amend_lock:
            try:
                lock = self._open_lock_file()
            except OSError:
                return
            try:
                for _ in range(20):  # another instance amending: a moment
                    if self._try_lock(lock):
                        break
                    time.sleep(0.05)
                else:
                    return  # (a rebuild holds it)
                table_at = _HEADER_BYTES + self.nbytes
                table = os.pread(fd, 8 * self.num_records, table_at)
                signed = read_header(os.pread(fd, _HEADER_BYTES, 0), self.path).get("table")
                if self._digest(table) != signed:
                    # damaged since it was checked: signing it would bless the damage
                    logger.warning("expert offload: %s: its table of checksums no longer "
                                   "matches its header; the repair is kept in memory only "
                                   "(the next start rebuilds the store)", self.path)
                    return
                sums = array("Q", table)
                sums[index] = value
                os.pwrite(fd, sums[index:index + 1].tobytes(), table_at + 8 * index)
                os.fsync(fd)
                os.pwrite(fd, self._header(sealed=True, sums=sums), 0)
                os.fsync(fd)
            except OSError:
                pass  # (the lock is busy, or the disk refuses: amended here alone)
            finally:
                os.close(lock)

    # ---- disk -> pinned staging -> GPU --------------------------------------------

    def _read_staged(self, layer, expert, dst):
        """Chunk by chunk through two pinned buffers on the current (copy) stream.

        Before a buffer is refilled, the host waits for the copy that last read it
        (an event, not a stream sync), so the disk read of chunk i+1 overlaps the
        link copy of chunk i, also across experts. One read at a time: host mode's
        prefetch thread and its demand misses share the two buffers.
        """
        with self._staging_lock:
            return self._read_staged_now(layer, expert, dst)

    def _read_staged_now(self, layer, expert, dst):
        self._ensure_staging()
        dst_bytes = [t.view(torch.uint8).reshape(-1) for t in dst]
        base, want = self._offset(layer, expert), self.layout.expert_bytes
        digest = _Digest(self.checksum)
        done = 0
        while done < want:
            b = self._next_buf
            self._next_buf ^= 1
            self._staging_done[b].synchronize()
            n = min(_STAGING_BYTES, self.layout.record_bytes - done)
            got = self._pread(self._staging_views[b][:n], base + done)
            self._check_read(done + got, min(done + n, want))
            useful = min(n, want - done)
            digest.update(self._staging_views[b][:useful])
            self._scatter(self._staging[b], done, useful, dst_bytes)
            self._staging_done[b].record()
            done += useful
        self._check_sum(layer, expert, digest.value())  # before any kernel reads the slot
        if self._direct_fd is None:
            os.posix_fadvise(self._fd, base, self.layout.record_bytes,
                             os.POSIX_FADV_DONTNEED)
        return want

    def _scatter(self, chunk: torch.Tensor, start: int, n: int, dst_bytes) -> None:
        """Copy record bytes [start, start + n) from `chunk` into the tensors they belong to."""
        off = 0
        for d in dst_bytes:
            lo, hi = max(start, off), min(start + n, off + d.numel())
            if lo < hi:
                d[lo - off:hi - off].copy_(chunk[lo - start:hi - start], non_blocking=True)
            off += d.numel()

    def _pread(self, view: memoryview, offset: int) -> int:
        if self._direct_fd is not None:
            try:
                return os.preadv(self._direct_fd, [view], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise  # a read error: the record's, as a buffered read's would be
                os.close(self._direct_fd)  # the file system refused O_DIRECT after all
                self._direct_fd = None
                share(self._fd)  # (NFS: closing another descriptor dropped it)
        return os.preadv(self._fd, [view], offset)

    def _ensure_staging(self) -> None:
        if getattr(self, "_staging", None) is not None:
            return
        self._staging = torch.empty((2, _STAGING_BYTES), dtype=torch.uint8, pin_memory=True)
        self._staging_views = [memoryview(b.numpy()) for b in self._staging]
        self._staging_done = [torch.cuda.Event(), torch.cuda.Event()]
        for ev in self._staging_done:
            ev.record()
        self._next_buf = 0
        self._direct_fd = None
        aligned = self._staging.data_ptr() % _ALIGN == 0 and _STAGING_BYTES % _ALIGN == 0
        if aligned and hasattr(os, "O_DIRECT"):
            try:  # the file this store opened and checked, not whatever has its name now
                self._direct_fd = os.open(f"/proc/self/fd/{self._fd}",
                                          os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some others: buffered reads + fadvise
                self._direct_fd = None

    @property
    def uses_direct_io(self) -> bool:
        return getattr(self, "_direct_fd", None) is not None

    def abandon(self) -> None:
        if not self.reused and self._fd is not None:  # a build, not dropped already
            self._drop_build()
        self.close()

    def close(self):
        self._unlock()
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            if self.reused:
                let_go(self.path)
            os.close(fd)
        direct, self._direct_fd = getattr(self, "_direct_fd", None), None
        if direct is not None:
            os.close(direct)


def keys_digest(keys: list) -> str:
    """A short, fixed-size name of a list of JSON values (expert keys, files)."""
    import hashlib

    text = json.dumps(sorted(list(k) for k in keys), default=int)  # (numpy ints too)
    return f"{len(keys)}:{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def store_file_name(fingerprint: dict) -> str:
    """Cache file name keyed by model, dtype, vLLM version and layout."""
    import hashlib

    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    model = Path(str(fingerprint.get("model", "model"))).name or "model"
    return f"{model}-{digest[:16]}.experts"

