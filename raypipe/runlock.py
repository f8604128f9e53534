"""One run per output folder at a time: the lock a run holds on its folder while it writes there.

- Local disk: ``<out>/_lock.json`` held with ``flock`` for the whole run, holding the owner (pid, host,
  start time, command). The kernel releases the lock when its process dies, however it dies, so a lock
  left by a killed run is taken over at once by the next run (which says whose it was). A second run
  started while the first is alive stops before any work with one line naming the first.
- Object stores (``s3://``, ``gs://``) have no locks: the run writes the same file as a marker, rewrites
  its time every `HEARTBEAT_S` and removes it at the end. A marker whose time is older than `STALE_S` is
  a killed run's and is taken over. Without a conditional write, two runs started within a moment of each
  other can both pass: the marker catches the usual case (a second run minutes later), not that race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from raypipe import storage
from raypipe.errors import StorageError

HEARTBEAT_S = 60.0
STALE_S = 600.0


def _owner() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
        "token": uuid.uuid4().hex,
    }


def describe(owner: Any) -> str:
    if not isinstance(owner, dict) or not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started_at')}"


class RunLock:
    """``with RunLock(layout.lock_file, log): ...`` holds the folder for the block. `marker=True` uses the
    object-store marker on a local path too (tests); `stale_s` is the marker's age at which it is taken over."""

    def __init__(self, uri: str, log=print, marker: bool | None = None, stale_s: float = STALE_S):
        self.uri, self.log, self.stale_s = uri, log, stale_s
        self.marker = "://" in uri if marker is None else marker
        self.owner = _owner()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.folder, self._created = uri.rsplit("/", 1)[0], False

    def __enter__(self) -> RunLock:
        self._created = not storage.exists(self.folder)
        storage.makedirs(self.folder)
        try:
            self._acquire_marker() if self.marker else self._acquire_local()
        except BaseException:
            self._remove_if_empty()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _busy(self, holder: Any, extra: str = "") -> StorageError:
        return StorageError(
            f"another raypipe run ({describe(holder)}{extra}) is writing to '{self.folder}'; wait for it to end, "
            "or use another --out"
        )

    # -----------------------------------------------------------------------------------------
    # Local disk: flock.

    def _acquire_local(self) -> None:
        path = self.uri
        while True:
            with storage.writing(path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_owner(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(holder) from None
                raise
            try:  # the lock is ours, unless its holder removed the file meanwhile: then lock the new one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous is not None:
            self.log(f"[run] took over the lock of a run that ended without releasing it ({describe(previous)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    # -----------------------------------------------------------------------------------------
    # Object stores: a marker with a heartbeat.

    def _acquire_marker(self) -> None:
        found = storage.read_json_or_none(self.uri)
        if isinstance(found, dict):
            age_s = time.time() - float(found.get("heartbeat", 0.0))
            if age_s < self.stale_s:
                raise self._busy(found, f", last seen {age_s:.0f} s ago")
            self.log(f"[run] took over the marker of a run not seen for {age_s:.0f} s ({describe(found)})")
        self._write_marker()
        time.sleep(0.2)  # another run that wrote at the same moment: the later write wins, the other backs off
        if (storage.read_json_or_none(self.uri) or {}).get("token") != self.owner["token"]:
            raise self._busy(storage.read_json_or_none(self.uri))
        self._heartbeat = threading.Thread(target=self._beat, name="raypipe-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _write_marker(self) -> None:
        storage.write_json(self.uri, {**self.owner, "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed heartbeat only makes the marker look older
                self._write_marker()

    # -----------------------------------------------------------------------------------------

    def _remove_if_empty(self) -> None:
        """A run that stopped before writing anything leaves no folder it made (a local folder only: object
        stores have no empty folders)."""
        if self._created and "://" not in self.folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # fails, as it should, when anything is in it

    def release(self) -> None:
        self._release()
        self._remove_if_empty()

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.uri)  # while still holding it: a waiting run then locks a new file
            os.close(self._fd)
            self._fd = None
        elif self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
            with contextlib.suppress(Exception):
                if (storage.read_json_or_none(self.uri) or {}).get("token") == self.owner["token"]:
                    storage.remove_tree(self.uri)


def _read_owner(fd: int) -> Any:
    try:
        data = os.pread(fd, 1 << 16, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {}
