"""Memory the SMTP workers share: the counters behind the connection caps and rate limits.

With several worker processes the kernel hands a client's connections to any of them
(SO_REUSEPORT), so a cap that each worker counts alone is either too strict or too loose.
Instead the supervisor maps one region of shared memory before it forks; every worker
inherits it, and one restarted later is forked from the same supervisor and so sees the
same counters. A check is a few memory reads under a lock, never a message to another
process, so nothing is added per SMTP command but a pair of fcntl() calls.

The lock is a POSIX record lock (fcntl F_SETLKW) on the region's file, in front of which a
thread lock orders the threads of one process (record locks belong to a process, not to a
thread). The kernel drops a record lock when its process dies, so a worker killed while it
held the lock blocks nobody; at worst it leaves one entry half written, which costs one
client one count. Its share of the open-connection counts is then cleared by the
supervisor before the worker starts again (Counts.forget_worker).

The region is a memfd (an anonymous tmpfs file: nothing is written to disk) sized for the
configured tables up front; pages are only allocated as keys land on them. Tables are
found by name in a small directory at the start of the region, so a worker's table and the
same table after a reload are the same memory: a SIGHUP changes the limits, not the counts.

Keys (addresses, senders, users) are stored as a 64-bit keyed BLAKE2b hash; the key is made
at random with the region, so a client cannot choose keys that collide or fill one bucket.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import mmap
import os
import struct
import tempfile
import threading
import weakref

MAGIC = b"elemtashm1\0\0\0\0\0\0"
PAGE = mmap.PAGESIZE
MAX_WORKERS = 16  # queue IDs carry 4 bits of process number
BLOB_SIZE = 65536  # Region.put/get: small values such as the ports a supervisor picked
_HEADER = struct.Struct("<16sQ32s")  # magic, next free offset, hash secret
_ENTRY = struct.Struct("<16sQQQ")  # name digest, offset, size, evicted counter
_DIRECTORY_AT = _HEADER.size
_ENTRIES = 128
_DATA_AT = -(-(_DIRECTORY_AT + _ENTRIES * _ENTRY.size) // PAGE) * PAGE


class RegionFull(Exception):
    """No room (or no directory entry) left for another table: the caller counts alone."""


class Region:
    """One shared mapping, its lock, and the tables in it."""

    def __init__(self, size: int):
        """size: the bytes of the tables it will hold (each is rounded up to whole pages)."""
        size = _DATA_AT + -(-size // PAGE) * PAGE + _ENTRIES * PAGE
        self._fd = _anonymous_file()
        os.ftruncate(self._fd, size)
        self.size = size
        self.mem = mmap.mmap(self._fd, size)  # MAP_SHARED: forked children see the same pages
        _HEADER.pack_into(self.mem, 0, MAGIC, _DATA_AT, os.urandom(32))
        self.secret = _HEADER.unpack_from(self.mem, 0)[2]
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._hashes: dict[str, int] = {}  # key -> key_hash(key), a few thousand at most
        this = weakref.ref(self)

        def in_child() -> None:
            # A child forked while a thread of the parent held the lock: that thread is not in
            # the child, so its thread lock and depth are void there.
            region = this()
            if region is not None:
                region.after_fork()

        os.register_at_fork(after_in_child=in_child)

    # ---- the lock -------------------------------------------------------------------------

    def __enter__(self) -> Region:
        self._thread_lock.acquire()
        self._depth += 1
        if self._depth == 1:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._depth -= 1
                self._thread_lock.release()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def after_fork(self) -> None:
        """In a new child: a thread lock copied from a parent thread that held it is void."""
        self._thread_lock = threading.RLock()
        self._depth = 0

    # ---- keys and tables ------------------------------------------------------------------

    def derive(self, label: str) -> bytes:
        """A 32-byte secret for label, the same in every process of this region, new at
        each start (HMAC-SHA256 of the label under the region's secret)."""
        return hmac.new(self.secret, label.encode(), hashlib.sha256).digest()

    def key_hash(self, key: str) -> int:
        """A key's 64-bit hash, never 0 (0 marks a free slot). The same few keys come back
        many times per message (address, sender, user), so recent ones are remembered."""
        found = self._hashes.get(key)
        if found is None:
            digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, key=self.secret).digest()
            found = int.from_bytes(digest, "little") or 1
            if len(self._hashes) >= 4096:
                self._hashes.clear()
            self._hashes[key] = found
        return found

    def table(self, name: str, size: int) -> tuple[int, int]:
        """(offset, entry index) of the table called name of size bytes, zeroed when new.
        The same name and size always give the same memory, in every process."""
        digest = hashlib.blake2b(f"{name}/{size}".encode(), digest_size=16).digest()
        with self:
            for index in range(_ENTRIES):
                found, offset, length, _ = _ENTRY.unpack_from(self.mem, _DIRECTORY_AT + index * _ENTRY.size)
                if found == digest:
                    return offset, index
                if offset == 0:
                    break
            else:
                raise RegionFull(f"shared memory: no table entry left for {name}")
            start = _HEADER.unpack_from(self.mem, 0)[1]
            end = start + -(-size // PAGE) * PAGE
            if end > self.size:
                raise RegionFull(f"shared memory: no room for {name} ({size} bytes)")
            self.mem[start:start + size] = bytes(size)  # a table of an earlier run of this name
            _ENTRY.pack_into(self.mem, _DIRECTORY_AT + index * _ENTRY.size, digest, start, size, 0)
            magic, _, secret = _HEADER.unpack_from(self.mem, 0)
            _HEADER.pack_into(self.mem, 0, magic, end, secret)
            return start, index

    def put(self, name: str, data: bytes) -> None:
        """Keep a small value (at most BLOB_SIZE bytes) under name, for every process to read."""
        if len(data) > BLOB_SIZE - 4:
            raise RegionFull(f"shared memory: {name} is {len(data)} bytes, more than {BLOB_SIZE - 4}")
        with self:
            offset, _ = self.table(f"blob.{name}", BLOB_SIZE)
            self.mem[offset:offset + 4 + len(data)] = len(data).to_bytes(4, "little") + data

    def get(self, name: str) -> bytes:
        """What put() kept under name; b"" if nothing."""
        with self:
            offset, _ = self.table(f"blob.{name}", BLOB_SIZE)
            length = int.from_bytes(self.mem[offset:offset + 4], "little")
            return bytes(self.mem[offset + 4:offset + 4 + length])

    def add_evicted(self, index: int) -> None:
        """Count one live key pushed out of table index (a sign it is too small); locked."""
        at = _DIRECTORY_AT + index * _ENTRY.size
        digest, offset, size, evicted = _ENTRY.unpack_from(self.mem, at)
        _ENTRY.pack_into(self.mem, at, digest, offset, size, evicted + 1)

    def evicted(self, index: int) -> int:
        return _ENTRY.unpack_from(self.mem, _DIRECTORY_AT + index * _ENTRY.size)[3]

    def close(self) -> None:
        self.mem.close()
        os.close(self._fd)


def _anonymous_file() -> int:
    try:
        return os.memfd_create("elemta-shared", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd (an old kernel, a syscall filter): unlinked file
        handle = tempfile.TemporaryFile(prefix="elemta-shared-")
        fd = os.dup(handle.fileno())
        handle.close()
        return fd


class Counts:
    """How many of something each worker holds now, per key and in all: open connections.

    An open-addressing table (linear probing) of entries: a key hash, then one 32-bit count
    per worker. A key whose counts all reach zero is removed at once (backward-shift
    deletion, so no tombstones pile up), so the table holds only the keys in use; it is
    sized at four times the most keys that can be in use, keeping probes short."""

    _entry = struct.Struct(f"<Q{MAX_WORKERS}I")
    _total = struct.Struct(f"<{MAX_WORKERS}I")

    def __init__(self, region: Region, name: str, capacity: int):
        self.region = region
        self.slots = self._slots_for(capacity)
        self._base, _ = region.table(name, self.size_for(capacity))
        self._slots_at = self._base + self._total.size

    @staticmethod
    def _slots_for(capacity: int) -> int:
        return 1 << max(4, (4 * max(1, capacity) - 1).bit_length())

    @classmethod
    def size_for(cls, capacity: int) -> int:
        """Bytes the table takes in a region for up to capacity keys in use."""
        return cls._total.size + cls._slots_for(capacity) * cls._entry.size

    def total(self) -> int:
        """All workers' count of everything; locked by the caller or a snapshot."""
        return sum(self._total.unpack_from(self.region.mem, self._base))

    def of(self, key: str) -> int:
        with self.region:
            at = self._find(self.region.key_hash(key))
            return 0 if at is None else sum(self._entry.unpack_from(self.region.mem, at)[1:])

    def add(self, worker: int, key: str | None, delta: int, *, total: bool = True) -> None:
        """Add delta (+1, -1) to worker's count in all (unless total is False) and, when key
        is given, under key. RegionFull if a new key finds no free slot (nothing counted)."""
        mem = self.region.mem
        with self.region:
            at = values = None
            if key is not None:
                wanted = self.region.key_hash(key)
                at = self._find(wanted)
                if at is not None:
                    values = list(self._entry.unpack_from(mem, at))
                elif delta > 0:
                    at, values = self._free_slot(wanted), [wanted] + [0] * MAX_WORKERS
            if total:
                totals = list(self._total.unpack_from(mem, self._base))
                totals[worker] = max(0, totals[worker] + delta)
                self._total.pack_into(mem, self._base, *totals)
            if values is None:
                return
            assert at is not None  # found or given a slot together with values
            values[1 + worker] = max(0, values[1 + worker] + delta)
            if any(values[1:]):
                self._entry.pack_into(mem, at, *values)
            else:
                self._remove(at)

    def admit(self, worker: int, key: str | None, total_cap: int, key_cap: int) -> str | None:
        """Count one more for worker, in all and under key (if given), unless that would pass
        total_cap or key_cap: None when counted, else "total" or "key", the cap it met (checked
        in that order; nothing counted). One locked look at the table, for the connection caps.
        RegionFull if a new key finds no free slot (nothing counted)."""
        mem = self.region.mem
        with self.region:
            totals = list(self._total.unpack_from(mem, self._base))
            if sum(totals) >= total_cap:
                return "total"
            if key is not None:
                wanted = self.region.key_hash(key)
                at = self._find(wanted)
                if at is None:
                    if key_cap <= 0:
                        return "key"
                    at, values = self._free_slot(wanted), [wanted] + [0] * MAX_WORKERS
                else:
                    values = list(self._entry.unpack_from(mem, at))
                    if sum(values[1:]) >= key_cap:
                        return "key"
                values[1 + worker] += 1
                self._entry.pack_into(mem, at, *values)
            totals[worker] += 1
            self._total.pack_into(mem, self._base, *totals)
            return None

    def forget_worker(self, worker: int) -> None:
        """A worker died: what it held is open no more (the kernel closed its sockets)."""
        mem, size = self.region.mem, self._entry.size
        with self.region:
            totals = list(self._total.unpack_from(mem, self._base))
            totals[worker] = 0
            self._total.pack_into(mem, self._base, *totals)
            at = self._slots_at
            while at < self._slots_at + self.slots * size:
                values = list(self._entry.unpack_from(mem, at))
                if values[0] and values[1 + worker]:
                    values[1 + worker] = 0
                    if any(values[1:]):
                        self._entry.pack_into(mem, at, *values)
                    else:
                        self._remove(at)
                        continue  # a later entry may have moved here: look at it too
                at += size

    # ---- the probing (locked) -------------------------------------------------------------

    def _slot_of(self, key_hash: int) -> int:
        return self._slots_at + (key_hash % self.slots) * self._entry.size

    def _next(self, at: int) -> int:
        at += self._entry.size
        return self._slots_at if at >= self._slots_at + self.slots * self._entry.size else at

    def _find(self, wanted: int) -> int | None:
        at = self._slot_of(wanted)
        for _ in range(self.slots):
            found = struct.unpack_from("<Q", self.region.mem, at)[0]
            if found == wanted:
                return at
            if found == 0:
                return None
            at = self._next(at)
        return None

    def _free_slot(self, wanted: int) -> int:
        at = self._slot_of(wanted)
        for _ in range(self.slots):
            if struct.unpack_from("<Q", self.region.mem, at)[0] == 0:
                return at
            at = self._next(at)
        raise RegionFull("shared memory: the connection table is full")

    def _remove(self, hole: int) -> None:
        """Empty the slot at hole and move later entries of the same run back into it
        (Knuth's algorithm R for linear probing)."""
        mem, size = self.region.mem, self._entry.size
        at = hole
        while True:
            at = self._next(at)
            found = struct.unpack_from("<Q", mem, at)[0]
            if found == 0:
                break
            home = self._slot_of(found)
            # Move the entry at `at` into the hole unless its home lies cyclically in (hole, at].
            if (hole < at and (home <= hole or home > at)) or (hole > at and at < home <= hole):
                mem[hole:hole + size] = mem[at:at + size]
                hole = at
        mem[hole:hole + size] = bytes(size)
