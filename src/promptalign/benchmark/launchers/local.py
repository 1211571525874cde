"""``local``: N worker processes on this machine, each pinned to its own GPU.

Each worker is a fresh Python process (``spawn``) that runs one job at a time through
:func:`~promptalign.benchmark.grid.execute`; the submitter hands the next job to whichever worker
is free. With GPUs visible, worker i sees only GPU i (``CUDA_VISIBLE_DEVICES``; more workers than
GPUs share them in turn); without GPUs each worker gets an equal share of the CPU threads
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``). A worker that dies (out of memory, a crash)
fails its job, which keeps its last checkpoint, and is replaced. Ctrl-C stops every worker; the
jobs stay resumable.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..grid import Outcome, Submissions, execute
from . import LAUNCHERS, Launcher, LauncherError, LaunchTask, OnDone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOptions:
    """Settings of the ``local`` launcher.

    Attributes:
        parallel: worker processes (default: one per visible GPU, else 1).
    """

    parallel: int | None = None


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()][:n]
    return [str(i) for i in range(n)]


def worker_env(index: int, workers: int, gpus: Sequence[str]) -> dict[str, str]:
    """The environment of worker ``index`` of ``workers``: its GPU, or its share of threads."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}


def _worker(env: dict[str, str], inbox: Any, outbox: Any, slot: int) -> None:
    os.environ.update(env)  # before anything initialises CUDA or the thread pools
    import torch

    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        while True:
            item = inbox.get()
            if item is None:
                return
            i, task = item
            outbox.put((slot, i, execute(task)))
    except KeyboardInterrupt:  # the submitter stops us; the job keeps its last checkpoint
        return


@LAUNCHERS.register("local")
class LocalLauncher(Launcher):
    Options = LocalOptions

    def workers(self) -> int:
        n = self.options.parallel
        return n if n is not None else max(1, len(visible_gpus()))

    def check(self, tasks: Sequence[LaunchTask]) -> None:
        n = self.options.parallel
        if n is not None and (not isinstance(n, int) or n < 1):
            raise LauncherError(
                f"--parallel {n}: the local launcher needs at least 1 worker process"
            )
        gpus = visible_gpus()
        for t in tasks:
            dev = t.device
            if gpus and dev.startswith("cuda:"):
                raise LauncherError(
                    f"--device {dev}: each local worker sees only its own GPU (as cuda:0); use "
                    "--device cuda or auto with --launcher local"
                )

    def run(
        self,
        tasks: Sequence[LaunchTask],
        grid: Submissions,
        *,
        backbone=None,
        on_done: OnDone | None = None,
    ) -> list[Outcome]:
        n = min(self.workers(), max(1, len(tasks)))
        gpus = visible_gpus()
        if gpus and n > len(gpus):
            log.warning("%d workers share %d GPU(s)", n, len(gpus))
        sid = self.record(grid, tasks, parallel=n, gpus=gpus)
        ctx = mp.get_context("spawn")
        outbox = ctx.Queue()
        slots: dict[int, tuple[Any, Any]] = {}  # slot -> (process, inbox)
        busy: dict[int, int] = {}  # slot -> index of the task it runs
        todo = list(range(len(tasks)))
        outcomes: dict[int, Outcome] = {}

        def start(slot: int) -> None:
            inbox = ctx.Queue()
            p = ctx.Process(
                target=_worker,
                args=(worker_env(slot, n, gpus), inbox, outbox, slot),
                name=f"promptalign-worker-{slot}",
                daemon=True,
            )
            p.start()
            slots[slot] = (p, inbox)

        def feed(slot: int) -> None:
            if todo:
                i = todo.pop(0)
                busy[slot] = i
                slots[slot][1].put((i, tasks[i]))
            else:
                slots[slot][1].put(None)

        try:
            for slot in range(n):
                start(slot)
                feed(slot)
            while busy:
                try:
                    slot, i, outcome = outbox.get(timeout=1.0)
                except queue.Empty:
                    self._replace_dead(slots, busy, tasks, outcomes, start, feed)
                    continue
                busy.pop(slot, None)
                outcomes[i] = self.done(outcome, tasks[i], on_done)
                feed(slot)
        except BaseException:
            self._stop(slots)
            raise
        finally:
            grid.update_submission(sid, state="ended")
        for p, _ in slots.values():
            p.join(timeout=30)
        return [outcomes[i] for i in range(len(tasks))]

    @staticmethod
    def _replace_dead(slots, busy, tasks, outcomes, start, feed) -> None:
        for slot, (p, _) in list(slots.items()):
            if p.is_alive() or slot not in busy:
                continue
            i = busy.pop(slot)
            outcomes[i] = Outcome(
                tasks[i].key,
                "failed",
                detail=f"its worker process died (exit code {p.exitcode}); it resumes from "
                "its last checkpoint when the grid is run again",
            )
            start(slot)
            feed(slot)

    @staticmethod
    def _stop(slots) -> None:
        import signal

        for p, _ in slots.values():
            if p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p, _ in slots.values():
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
