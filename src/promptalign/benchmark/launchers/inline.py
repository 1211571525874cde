"""``inline``: every task in this process, one after another (the default)."""

from __future__ import annotations

from collections.abc import Sequence

from ..grid import Outcome, Submissions, execute
from . import LAUNCHERS, Launcher, LaunchTask, OnDone


@LAUNCHERS.register("inline")
class InlineLauncher(Launcher):
    """Runs the tasks here, in order; a backbone passed by the caller is shared by all of them."""

    def run(
        self,
        tasks: Sequence[LaunchTask],
        grid: Submissions,
        *,
        backbone=None,
        on_done: OnDone | None = None,
    ) -> list[Outcome]:
        sid = self.record(grid, tasks)
        try:
            return [self.done(execute(t, backbone), t, on_done) for t in tasks]
        finally:
            grid.update_submission(sid, state="ended")
