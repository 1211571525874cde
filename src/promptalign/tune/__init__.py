"""Choosing hyper-parameters on the validation split, then reporting the test score once.

``promptalign tune`` (:func:`run_tune`) searches any config keys of one method on one dataset
with Optuna (TPE by default, random or grid on request; median or successive-halving pruning on
the validation score of every epoch). Each trial is an ordinary run folder scored on the few-shot
validation split, which is sampled like the training split (``run.eval_split=val``): the test
split is never read during the search. The trials run through the benchmark launchers (inline,
local worker processes, a Slurm job array): every worker runs trials against the study's shared
Optuna storage until the budget is spent, so workers on several hosts share one study and an
interrupted study resumes (:mod:`.study`). At the end the best trial's values are re-trained
once per seed on the normal protocol (a ``fewshot`` benchmark grid in the study folder) and
scored on test once; the study folder keeps the trials table, the chosen config, Optuna's plots
and the report (:mod:`.report`). ``promptalign benchmark ... --tuned STUDY`` runs a protocol
with a study's chosen values (:func:`tuned_overrides`).
"""

from .report import best_trial, tuned_overrides
from .runner import TuneSummary, finish, run_tune
from .space import Param, parse_space, split_items
from .study import StudyError, StudyFolder, StudySpec, WorkerTask, run_worker

__all__ = [
    "Param",
    "StudyError",
    "StudyFolder",
    "StudySpec",
    "TuneSummary",
    "WorkerTask",
    "best_trial",
    "finish",
    "parse_space",
    "run_tune",
    "run_worker",
    "split_items",
    "tuned_overrides",
]
