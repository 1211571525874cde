"""Exclusive claims on folders, on one host and across hosts sharing a file system.

One mechanism for every "only one process works here" rule: a training run folder (``train``)
and a benchmark job folder (one grid job). A claim is a small JSON file (``.lock``) naming its
holder: host, process id and start time, the scheduler's job id when it runs under one (Slurm),
and a random token. It is created atomically: the content is written to a temporary file that is
then hard-linked to the claim's name (``link`` fails when the name exists, on local disks and on
NFS alike), so no reader ever sees a half-written claim. A holder keeps its claim alive with a
heartbeat: a thread touches the file every ``heartbeat_s`` seconds.

A claim is stale, and is taken over, when

* its holder ran on this host and that process is gone (a process id is only checked on the
  host that wrote it, with the process's start time so a recycled id does not count);
* its holder ran under the scheduler job this process runs in, on another host (the job was
  requeued and restarted elsewhere), or the scheduler says that job is no longer running;
* its heartbeat is older than ``stale_after_s`` (the only rule for another host when no scheduler
  answers); an empty or unreadable claim file (left by a crash on a file system without hard
  links, or by an old version) counts from its modification time the same way.

Taking over goes through a short-lived breaker file, so two processes that find the same stale
claim never both remove it, and the heartbeat thread re-reads the claim: a holder whose claim was
taken over (it was suspended for longer than the timeout, say) notices, and :meth:`Claim.check`
raises :class:`ClaimLost` before it writes anything more. Host clocks are assumed synchronised
(NTP) to well within ``stale_after_s``.

This module imports nothing else from the package, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_BREAKER_STALE_S = 60.0


class ClaimBusy(FileExistsError):
    """The folder is claimed by a live holder; ``holder`` says who (None: unreadable claim)."""

    def __init__(self, message: str, holder: Holder | None = None, who: str = ""):
        super().__init__(message)
        self.holder = holder
        self.who = who


class ClaimLost(OSError):
    """This process's claim was taken over by another one; it must stop writing."""


# --------------------------------------------------------------------------- who holds a claim
def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def scheduler_job() -> tuple[str, str] | None:
    """(scheduler, job id) of the scheduler job this process runs in, e.g. ("slurm", "123_4")
    for task 4 of array job 123; None outside a scheduler."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return "slurm", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return "slurm", env["SLURM_JOB_ID"]
    return None


# scheduler name -> job id -> True (running), False (ended) or None (cannot tell: no answer)
_ACTIVE = {
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "STOPPED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


def _slurm_job_running(job_id: str) -> bool | None:
    if not shutil.which("squeue"):
        return None
    try:
        p = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode == 0:
        states = set(p.stdout.split())
        return bool(states & _ACTIVE)
    if "invalid job id" in p.stderr.lower():  # gone from the queue: it ended long enough ago
        return False
    return None


SCHEDULER_PROBES: dict[str, Callable[[str], bool | None]] = {"slurm": _slurm_job_running}


@dataclass(frozen=True)
class Holder:
    """Who holds a claim (the content of the claim file) and when it last gave a sign of life."""

    host: str
    pid: int
    token: str = ""
    started: float = 0.0
    proc_start: int | None = None
    scheduler: str | None = None
    job_id: str | None = None
    what: str = ""
    heartbeat: float = field(default=0.0, compare=False)  # the claim file's mtime when read

    @classmethod
    def me(cls, what: str = "") -> Holder:
        sched = scheduler_job()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            token=uuid.uuid4().hex,
            started=time.time(),
            proc_start=_proc_start(os.getpid()),
            scheduler=sched[0] if sched else None,
            job_id=sched[1] if sched else None,
            what=what,
        )

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("heartbeat")
        return json.dumps(d)

    def describe(self, now: float | None = None) -> str:
        """E.g. "process 4242 on node-a (slurm job 123_4), claimed 12 min ago, heartbeat 8 s
        ago"."""
        now = time.time() if now is None else now
        text = f"process {self.pid} on {self.host}"
        if self.job_id:
            text += f" ({self.scheduler} job {self.job_id})"
        if self.started:
            text += f", claimed {_ago(now - self.started)}"
        if self.token and self.heartbeat:
            text += f", heartbeat {_ago(now - self.heartbeat)}"
        return text


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


def read_holder(path: Path) -> tuple[Holder | None, float] | None:
    """The holder of the claim file ``path`` and the file's mtime; (None, mtime) when the file
    cannot be parsed; None when there is no claim. An old version's ``HOST PID`` claim is read
    too."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        try:
            return None, path.stat().st_mtime
        except OSError:
            return None
    try:
        d = json.loads(text)
        fields = set(Holder.__dataclass_fields__) - {"heartbeat"}
        holder = Holder(**{k: v for k, v in d.items() if k in fields}, heartbeat=mtime)
        if not isinstance(holder.host, str) or not isinstance(holder.pid, int):
            raise TypeError
        return holder, mtime
    except (ValueError, TypeError, AttributeError):
        parts = text.split()
        if len(parts) == 2 and parts[1].isdigit():  # "host pid": an earlier version's claim
            return Holder(host=parts[0], pid=int(parts[1]), heartbeat=mtime), mtime
        return None, mtime


def stale_reason(
    holder: Holder | None, mtime: float, stale_after_s: float = STALE_AFTER_S
) -> str | None:
    """Why the claim of ``holder`` (file mtime ``mtime``) is stale, or None while it holds."""
    now = time.time()
    if holder is None:
        if now - mtime > stale_after_s:
            return f"its claim file is unreadable and {now - mtime:.0f} s old"
        return None
    here = socket.gethostname()
    if holder.host == here:  # a process id means something on its own host only
        if not _pid_alive(holder.pid):
            return f"its process {holder.pid} has exited"
        start = _proc_start(holder.pid)
        if holder.proc_start is not None and start is not None and start != holder.proc_start:
            return f"its process {holder.pid} has exited (the id now names another process)"
        if holder.token and now - mtime > stale_after_s:  # alive but silent: hung or stopped
            return f"no heartbeat for {now - mtime:.0f} s"
        return None
    mine = scheduler_job()
    if holder.job_id and mine and (holder.scheduler, holder.job_id) == mine:
        return f"{holder.scheduler} job {holder.job_id} was restarted on {here}"
    probe = SCHEDULER_PROBES.get(holder.scheduler or "")
    if probe and holder.job_id and probe(holder.job_id) is False:
        return f"{holder.scheduler} job {holder.job_id} is no longer running"
    if now - mtime > stale_after_s:
        return f"no heartbeat for {now - mtime:.0f} s"
    return None


# --------------------------------------------------------------------------- the claim
def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; True if created. Atomic (hard link of
    a complete temporary file); without hard links, an exclusive create then a write."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            return _create_exclusive_no_link(path, text)
        with contextlib.suppress(OSError):  # NFS: the link may succeed with an error reported
            if tmp.stat().st_nlink == 2:
                return True
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive_no_link(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_if_unchanged(path: Path, seen: Holder | None, mtime: float) -> bool:
    """Remove the stale claim ``path`` if it still is the one judged stale; one process at a time
    (a breaker file), so a fresh claim made meanwhile by another process is never removed."""
    breaker = path.with_name(path.name + ".break")
    if not _create_exclusive(breaker, str(os.getpid())):
        with contextlib.suppress(OSError):
            if time.time() - breaker.stat().st_mtime > _BREAKER_STALE_S:
                breaker.unlink()  # its process died between creating and removing it
        return False
    try:
        now = read_holder(path)
        if now is None:
            return True  # already gone
        holder, now_mtime = now
        same = holder == seen if seen is not None else holder is None and now_mtime == mtime
        if not same:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        breaker.unlink(missing_ok=True)


class Claim:
    """An exclusive claim on a folder: ``with Claim(folder / LOCK): ...``.

    Args:
        path: the claim file (its folder is created).
        what: a word on what the holder does, shown to whoever finds the claim.
        heartbeat_s: seconds between heartbeats.
        stale_after_s: a claim without heartbeat for this long is taken over (see module doc).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        what: str = "",
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.path = Path(path)
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def try_acquire(self) -> str | None:
        """Claim the folder; returns None when claimed, else who holds it, in words."""
        busy = self._try()
        return None if busy is None else self.who(*busy)

    def _try(self) -> tuple[Holder | None, float] | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.me(self.what)
        for _ in range(20):
            if _create_exclusive(self.path, me.to_json()):
                self.holder, self.lost = me, None
                self._start_heartbeat()
                return None
            found = read_holder(self.path)
            if found is None:
                continue  # released meanwhile: try again
            holder, mtime = found
            reason = stale_reason(holder, mtime, self.stale_after_s)
            if reason is None:
                return holder, mtime
            if _remove_if_unchanged(self.path, holder, mtime):
                who = holder.describe() if holder else "an unreadable claim"
                log.info("%s: took over the stale claim of %s (%s)", self.path.parent, who, reason)
            else:
                time.sleep(0.05)
        found = read_holder(self.path)
        return found if found is not None else (None, time.time())

    def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.2) -> None:
        """Claim the folder, waiting up to ``wait_s`` seconds for a live holder; raises
        :class:`ClaimBusy` naming the holder."""
        deadline = time.monotonic() + wait_s
        while True:
            busy = self._try()
            if busy is None:
                return
            if time.monotonic() >= deadline:
                raise ClaimBusy(self.busy_message(*busy), busy[0], self.who(*busy))
            time.sleep(poll_s)

    def who(self, holder: Holder | None, mtime: float) -> str:
        """The holder found by :meth:`_try`, in words."""
        if holder is None:
            return (
                f"an unreadable claim file {self.path.name} ({time.time() - mtime:.0f} s old; "
                f"taken over after {self.stale_after_s:.0f} s)"
            )
        return holder.describe()

    def busy_message(self, holder: Holder | None, mtime: float) -> str:
        return f"{self.path.parent} is in use by {self.who(holder, mtime)}"

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.holder is not None:
            found = read_holder(self.path)
            if found and found[0] is not None and found[0].token == self.holder.token:
                self.path.unlink(missing_ok=True)
            self.holder = None

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ while held
    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"claim-heartbeat {self.path}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.still_mine():
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def still_mine(self) -> bool:
        """Re-read the claim; False (and :attr:`lost` set) when another process took it."""
        if self.holder is None:
            return False
        found = read_holder(self.path)
        if found is not None and found[0] is not None and found[0].token == self.holder.token:
            return True
        other = found[0].describe() if found and found[0] else "no one (the claim was removed)"
        self.lost = f"{self.path.parent}: this process's claim was taken over by {other}"
        return False

    def check(self) -> None:
        """Raise :class:`ClaimLost` when the claim no longer belongs to this process."""
        if self.lost or (self.holder is not None and not self.still_mine()):
            if self.holder is not None:
                self.still_mine()  # name whoever holds it now
            raise ClaimLost(
                f"{self.lost}; stopping without writing more (was this process suspended for "
                f"over {self.stale_after_s:.0f} s?)"
            )


def holder_of(folder: Path, stale_after_s: float = STALE_AFTER_S) -> Holder | None:
    """The live holder of ``folder``'s claim, None when unclaimed or stale (no side effects)."""
    found = read_holder(Path(folder) / LOCK)
    if found is None:
        return None
    holder, mtime = found
    if stale_reason(holder, mtime, stale_after_s) is not None:
        return None
    return holder if holder is not None else Holder(host="?", pid=0, what="unreadable claim")
