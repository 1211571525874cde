"""``inline``: every job in this process, one after another (the default)."""

from __future__ import annotations

from collections.abc import Sequence

from ..grid import Grid, Outcome, Task, execute
from . import LAUNCHERS, Launcher, OnDone


@LAUNCHERS.register("inline")
class InlineLauncher(Launcher):
    """Runs the jobs here, in order; a backbone passed by the caller is shared by all of them."""

    def run(
        self,
        tasks: Sequence[Task],
        grid: Grid,
        *,
        backbone=None,
        on_done: OnDone | None = None,
    ) -> list[Outcome]:
        sid = self.record(grid, tasks)
        try:
            return [self.done(execute(t, backbone), t, on_done) for t in tasks]
        finally:
            grid.update_submission(sid, state="ended")
