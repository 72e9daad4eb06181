"""One writer per output, or per shard of it.

Locally a kernel flock (`_run.lock`, `_run.lock.shard-K-of-N`): the kernel
drops it when its process dies, so a killed run never leaves it held. An
object store has no lock, so a run writes a lease object (`_run.lease`,
`_run.lease.shard-K-of-N`) naming its holder and when it expires, renews it
from a thread while it runs, and deletes it at the end. A second writer
finding a live lease refuses (exit 1), as the flock refuses locally; one
finding an expired lease, or one left on this host by a process that is
gone, takes it over. Two writers starting in the same instant both write:
each reads the lease back and only the one whose token stayed goes on.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from .errors import OutputLockedError
from .storage import HOST, LocalOutput, Output, process_alive

log = logging.getLogger("pipeline")

RUN_LOCK = "_run.lock"
LOCK_RETRY_S = 0.25  # `status` holds a run lock for an instant to probe it; a real holder holds it for the run
LOCK_POLL_S = 0.02

# -- object stores: the lease ---------------------------------------------

LEASE = "_run.lease"
LEASE_TTL_S = 60.0  # a run killed on another host blocks its shard this long
RENEW_EVERY_S = LEASE_TTL_S / 4  # three renewals may fail before the lease lapses


def lease_name(shard: tuple[int, int] | None) -> str:
    return LEASE if shard is None else f"{LEASE}.shard-{shard[0]}-of-{shard[1]}"


def live_leases(output: Output, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The leases on `output` that have not expired nor lost their process, by name."""
    now = time.time() if now is None else now
    live = {}
    for rel in output.list("", f"{LEASE}*"):
        lease = _read(output, rel)
        if lease is not None and _alive(lease, now):
            live[rel] = lease
    return live


def live_shards(output: Output) -> list[tuple[int, int]]:
    shards = []
    for rel in live_leases(output):
        match = re.fullmatch(re.escape(LEASE) + r"\.shard-(\d+)-of-(\d+)", rel)
        if match:
            shards.append((int(match.group(1)), int(match.group(2))))
    return sorted(shards)


class Lease:
    def __init__(self, output: Output, shard: tuple[int, int] | None) -> None:
        self._output = output
        self._shard = shard
        self._name = lease_name(shard)
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        for rel, lease in live_leases(self._output).items():
            if self._conflicts(rel):
                raise OutputLockedError(self._in_use(lease))
        self._write()
        mine = _read(self._output, self._name)
        if mine is None or mine.get("token") != self._token:  # another writer started in the same instant
            raise OutputLockedError(self._in_use(mine or {}))
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=RENEW_EVERY_S)
            current = _read(self._output, self._name)
            if current is not None and current.get("token") == self._token:
                self._output.delete(self._name)

    def _conflicts(self, rel: str) -> bool:
        """Unsharded runs exclude every other run; a shard excludes an
        unsharded run and the same shard."""
        return self._shard is None or rel in (LEASE, self._name)

    def _in_use(self, lease: dict[str, Any]) -> str:
        holder = lease.get("holder", "another run")
        until = time.strftime("%H:%M:%SZ", time.gmtime(lease["expires_at"])) if "expires_at" in lease else "soon"
        return (f"output {self._output} is in use: {holder} is writing to it (if it was killed, its lease "
                f"lapses at {until}); wait for it to end or stop it")

    def _write(self) -> None:
        body = {"holder": f"{HOST}:{os.getpid()}", "host": HOST, "pid": os.getpid(), "token": self._token,
                "expires_at": time.time() + LEASE_TTL_S}
        self._output.write(self._name, json.dumps(body).encode())

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self._write()
            except Exception as err:  # the store is down: commits will fail too and say so
                log.warning("could not renew %s on %s: %s", self._name, self._output, err)


def _read(output: Output, rel: str) -> dict[str, Any] | None:
    try:
        lease = json.loads(output.read_bytes(rel))
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _alive(lease: dict[str, Any], now: float) -> bool:
    if not isinstance(lease.get("expires_at"), (int, float)) or lease["expires_at"] <= now:
        return False
    if lease.get("host") == HOST and isinstance(lease.get("pid"), int) and lease["pid"] != os.getpid():
        return process_alive(lease["pid"])  # a killed run on this host frees it at once
    return True


# -- both ------------------------------------------------------------------

class RunLock:
    """One writer per output (per shard when sharded). The kernel drops a
    flock when its process dies, so a killed run never leaves it held.
    Object stores have no lock: there a renewed lease object stands in (above)."""

    def __init__(self, output: Output | os.PathLike[str], shard: tuple[int, int] | None) -> None:
        self._output = output if isinstance(output, Output) else LocalOutput(os.fspath(output))
        self._shard = shard
        self._handles: list[Any] = []
        self._lease: Lease | None = None

    def __enter__(self) -> RunLock:
        if not isinstance(self._output, LocalOutput):  # no flock on an object store: a lease
            self._lease = Lease(self._output, self._shard)
            self._lease.acquire()
            return self
        try:
            if self._shard is None:
                self._take(RUN_LOCK, fcntl.LOCK_EX, "another run of this job")
            else:
                k, n = self._shard
                self._take(RUN_LOCK, fcntl.LOCK_SH, "an unsharded run of this job")
                self._take(shard_lock_name(k, n), fcntl.LOCK_EX, f"another run of shard {k}/{n}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self, name: str, mode: int, holder: str) -> None:
        assert isinstance(self._output, LocalOutput)
        path = self._output.dir / name
        fh = open(path, "a+b")
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL_S)
                    continue
                fh.close()
                if name == RUN_LOCK and mode == fcntl.LOCK_EX and not _held(path, fcntl.LOCK_SH):
                    holder = "a sharded run of this job"  # shards share the output lock; none holds it alone
                else:
                    pid = path.read_text(errors="replace").strip()
                    holder += f" (pid {pid})" if pid.isdigit() else ""
                raise OutputLockedError(
                    f"output {self._output} is in use: {holder} is writing to it; wait for it to end or stop it"
                ) from None
        if mode == fcntl.LOCK_EX:
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n".encode())
            fh.flush()
        self._handles.append(fh)

    def __exit__(self, *exc: object) -> None:
        for fh in reversed(self._handles):
            fh.close()
        self._handles.clear()
        if self._lease is not None:
            self._lease.release()
            self._lease = None


def shard_lock_name(k: int, n: int) -> str:
    return f"{RUN_LOCK}.shard-{k}-of-{n}"


def run_lock_held(output: Output) -> bool | None:
    """Whether some run (any shard) holds the output now."""
    if not isinstance(output, LocalOutput):
        return bool(live_leases(output))
    return _held(output.dir / RUN_LOCK, fcntl.LOCK_EX)


def shard_locks_held(output: Output) -> list[tuple[int, int]]:
    """The shards (k, n) whose run holds its lock (or its lease) now."""
    if not isinstance(output, LocalOutput):
        return live_shards(output)
    held = []
    for path in output.dir.glob(f"{RUN_LOCK}.shard-*-of-*"):
        match = re.fullmatch(re.escape(RUN_LOCK) + r"\.shard-(\d+)-of-(\d+)", path.name)
        if match and _held(path, fcntl.LOCK_EX):
            held.append((int(match.group(1)), int(match.group(2))))
    return sorted(held)


def _held(path: os.PathLike[str], mode: int) -> bool:
    """Whether another process holds `path` so that `mode` cannot be had.
    Takes the lock for an instant when free; RunLock retries past that."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False
