"""One writer per output, or per shard of it: the two implementations of
`Output.writer_lock`.

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
from pathlib import Path
from typing import Any

from ..errors import OutputLockedError
from .fs import HOST, process_alive
from .output import Output

log = logging.getLogger("pipeline")

RUN_LOCK = "_run.lock"
LOCK_RETRY_S = 0.25  # `status` holds a run lock for an instant to probe it; a real holder holds it for the run
LOCK_POLL_S = 0.02
LEASE = "_run.lease"
LEASE_TTL_S = 60.0  # a run killed on another host blocks its shard this long
RENEW_EVERY_S = LEASE_TTL_S / 4  # three renewals may fail before the lease lapses
SHARD_SUFFIX = re.compile(r"\.shard-(\d+)-of-(\d+)\Z")


def _suffixed(name: str, shard: tuple[int, int] | None) -> str:
    return name if shard is None else f"{name}.shard-{shard[0]}-of-{shard[1]}"


def _shard_of(name: str, base: str) -> tuple[int, int] | None:
    match = SHARD_SUFFIX.search(name) if name.startswith(base + ".") else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _in_use(output: object, holder: str, detail: str = "") -> OutputLockedError:
    return OutputLockedError(f"output {output} is in use: {holder} is writing to it{detail}; wait for it to end or stop it")


# -- locally: flock ---------------------------------------------------------------


class FlockLock:
    """Unsharded runs take `_run.lock` exclusively; a shard takes it shared
    (shards run side by side) and its own shard lock exclusively."""

    def __init__(self, folder: Path, shard: tuple[int, int] | None) -> None:
        self._dir = folder
        self._shard = shard
        self._handles: list[Any] = []

    def __enter__(self) -> FlockLock:
        try:
            if self._shard is None:
                self._take(RUN_LOCK, fcntl.LOCK_EX, "another run of this job")
            else:
                k, n = self._shard
                self._take(RUN_LOCK, fcntl.LOCK_SH, "an unsharded run of this job")
                self._take(_suffixed(RUN_LOCK, self._shard), fcntl.LOCK_EX, f"another run of shard {k}/{n}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take(self, name: str, mode: int, holder: str) -> None:
        path = self._dir / name
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
                raise _in_use(self._dir, holder) from None
        if mode == fcntl.LOCK_EX:
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n".encode())
            fh.flush()
        self._handles.append(fh)

    def __exit__(self, *exc: object) -> None:
        for fh in reversed(self._handles):
            fh.close()
        self._handles.clear()


def flock_holders(folder: Path) -> tuple[bool | None, list[tuple[int, int]]]:
    """Whether some run holds the output now, and the shards whose run holds its lock."""
    shards = []
    if folder.is_dir():
        for path in folder.glob(f"{RUN_LOCK}.shard-*-of-*"):
            shard = _shard_of(path.name, RUN_LOCK)
            if shard is not None and _held(path, fcntl.LOCK_EX):
                shards.append(shard)
    return _held(folder / RUN_LOCK, fcntl.LOCK_EX), sorted(shards)


def _held(path: os.PathLike[str], mode: int) -> bool:
    """Whether another process holds `path` so that `mode` cannot be had.
    Takes the lock for an instant when free; FlockLock retries past that."""
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


# -- object stores: the lease -------------------------------------------------------


def live_leases(output: Output, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The leases on `output` that have not expired nor lost their process, by name."""
    now = time.time() if now is None else now
    live = {}
    for rel in output.list("", f"{LEASE}*"):
        lease = _read(output, rel)
        if lease is not None and _alive(lease, now):
            live[rel] = lease
    return live


def lease_holders(output: Output) -> tuple[bool | None, list[tuple[int, int]]]:
    live = live_leases(output)
    shards = [s for s in (_shard_of(rel, LEASE) for rel in live) if s is not None]
    return bool(live), sorted(shards)


class Lease:
    def __init__(self, output: Output, shard: tuple[int, int] | None) -> None:
        self._output = output
        self._shard = shard
        self._name = _suffixed(LEASE, shard)
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lease:
        for rel, lease in live_leases(self._output).items():
            if self._conflicts(rel):
                raise self._in_use(lease)
        self._write()
        mine = _read(self._output, self._name)
        if mine is None or mine.get("token") != self._token:  # another writer started in the same instant
            raise self._in_use(mine or {})
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
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

    def _in_use(self, lease: dict[str, Any]) -> OutputLockedError:
        holder = lease.get("holder", "another run")
        until = time.strftime("%H:%M:%SZ", time.gmtime(lease["expires_at"])) if "expires_at" in lease else "soon"
        return _in_use(self._output, holder, f" (if it was killed, its lease lapses at {until})")

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
