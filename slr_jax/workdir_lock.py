"""One training run per workdir: a lock file that names the run holding it.

``WORKDIR/slr_jax.lock`` holds JSON: ``pid``, ``host``, ``token`` (random, per start),
``started`` and ``heartbeat`` (Unix times). Process 0 of a run takes it before any work and
holds it to the end; the other processes of the same run do not touch it (``slr_jax.main``
shares process 0's outcome with them). A second start on the same workdir stops with one line
naming the holder.

- **Local or shared file systems**: an exclusive ``fcntl.flock`` on the lock file, held for the
  whole run. The kernel drops it when the holder dies (kill -9 included), so a lock left by a
  dead process is taken over at once, atomically (no two starts can both hold it). On a shared
  file system whose flock is per host only, the heartbeat rule below also applies: a holder on
  another host whose heartbeat is fresh keeps the workdir.
- **gs://** (no locks; written through ``etils.epath``): the start reads the lock; a lock of
  another run whose heartbeat is younger than :data:`STALE_AFTER_S` stops the start; otherwise
  it writes its own, waits :data:`SETTLE_S` and reads it back: if another start wrote in
  between, the later writer keeps it and this one stops. The holder rewrites ``heartbeat`` every
  :data:`HEARTBEAT_S`; a lost VM's lock goes stale after :data:`STALE_AFTER_S` and the next
  start takes it over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from slr_jax.errors import SlrJaxError

LOCK_FILE = "slr_jax.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # 10 heartbeats missed: the holder (or its VM) is gone
SETTLE_S = 2.0  # gs://: time for a concurrent start's write to land before reading back


class WorkdirInUse(SlrJaxError, RuntimeError):
    """Another training run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict, now: float) -> str:
    age = now - float(holder.get("heartbeat", now))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(holder.get('started', now)))}, "
        f"last heartbeat {age:.0f} s ago)"
    )


class WorkdirLock:
    """``with WorkdirLock(workdir): train()``; :meth:`acquire` raises :class:`WorkdirInUse`.

    ``took_over`` is the record of the dead or stale holder whose lock was taken, else None.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.workdir = str(workdir)
        self.path = epath.Path(self.workdir) / LOCK_FILE
        self.local = "://" not in self.workdir
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
        self.took_over: dict | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ shared rules

    def _busy_error(self, holder: dict) -> WorkdirInUse:
        return WorkdirInUse(
            f"--workdir {self.workdir} is in use by another training run: "
            f"{_describe(holder, time.time())}; wait for it or stop it, or pass another "
            f"--workdir (the lock is {self.path})."
        )

    def _holds_it(self, holder: dict, *, flocked: bool = False) -> bool:
        """Whether ``holder`` (another run's record) still owns the workdir. With the flock
        taken (``flocked``), a holder on this host is dead: the kernel dropped its lock."""
        if not holder or holder.get("token") == self.record["token"]:
            return False
        if holder.get("host") == self.record["host"]:
            return not flocked and _pid_alive(int(holder.get("pid", -1)))
        age = time.time() - float(holder.get("heartbeat", 0.0))
        return age < self.stale_after_s

    def _content(self) -> bytes:
        now = time.time()
        self.record.setdefault("started", now)
        self.record["heartbeat"] = now
        return json.dumps(self.record).encode()

    @staticmethod
    def _parse(raw: bytes | str) -> dict:
        try:
            holder = json.loads(raw or "{}")
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    # ------------------------------------------------------------------ local

    def _acquire_local(self) -> None:
        import fcntl  # noqa: PLC0415 (POSIX only; gs:// workdirs do not need it)

        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._parse(os.pread(fd, 65536, 0))
            os.close(fd)
            raise self._busy_error(holder) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logging.warning("%s takes no flock (%s): heartbeat rule only", self.path, error)
            self._acquire_by_heartbeat()
            return
        holder = self._parse(os.pread(fd, 65536, 0))
        if self._holds_it(holder, flocked=True):  # alive on another host of a shared disk
            os.close(fd)
            raise self._busy_error(holder)
        self._fd = fd
        self.took_over = holder or None
        self._write_local()

    def _write_local(self) -> None:
        content = self._content()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, content, 0)
        os.fsync(self._fd)

    # ------------------------------------------------------------------ gs:// (no locks)

    def _read_remote(self) -> dict:
        try:
            return self._parse(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _acquire_by_heartbeat(self) -> None:
        holder = self._read_remote()
        if self._holds_it(holder):
            raise self._busy_error(holder)
        self.path.write_bytes(self._content())
        time.sleep(SETTLE_S)
        winner = self._read_remote()
        if winner.get("token") != self.record["token"]:
            raise self._busy_error(winner)
        self.took_over = holder or None

    # ------------------------------------------------------------------ lifetime

    def acquire(self) -> WorkdirLock:
        if self.local:
            self._acquire_local()
        else:
            self._acquire_by_heartbeat()
        if self.took_over:
            logging.warning(
                "took over the lock of %s: that run is no longer running (%s)",
                self.workdir, _describe(self.took_over, time.time()),
            )  # fmt: skip
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._fd is not None:
                    self._write_local()
                    continue
                holder = self._read_remote()
                if holder.get("token") != self.record["token"]:
                    logging.error(
                        "the lock of %s now belongs to %s; this run no longer holds it",
                        self.workdir, _describe(holder, time.time()),
                    )  # fmt: skip
                    return
                self.path.write_bytes(self._content())
            except OSError as error:  # a transient storage error: try again next beat
                logging.warning("cannot refresh %s (%s)", self.path, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a finished run leaves no holder behind
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        elif self._read_remote().get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str):
    """The lock of ``workdir`` for one run of one or many processes: process 0 takes it and
    tells the others whether it could; every process raises :class:`WorkdirInUse` if not."""
    import jax  # noqa: PLC0415 (the lock itself needs no JAX: tests hold it from plain Python)
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirInUse as busy:
            error = busy
    if jax.process_count() > 1:
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken and error is None:
            error = WorkdirInUse(
                f"--workdir {workdir} is in use by another training run (process 0 names it)."
            )
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
