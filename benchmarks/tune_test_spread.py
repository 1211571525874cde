"""How much choosing on test would inflate a tuning study's result (for reports only).

`promptalign tune` never reads the test split while it searches: it chooses on the few-shot
validation split and scores the chosen setting on test once. This script does what the
protocol forbids, after the fact and outside it: it scores every finished trial's run (seed of
the trials) on the test split, and prints the spread of those test scores next to the test score
of the trial the validation split chose. The gap between the best test score over the trials and
the chosen trial's test score is what picking the setting (or the epoch) on test would have
added. Prints a Markdown table and one JSON line.

    python benchmarks/tune_test_spread.py bench-tune-coop --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from promptalign.engine import evaluate_run
from promptalign.tune import StudyFolder, best_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", help="a study folder written by promptalign tune")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    folder = StudyFolder(args.study)
    spec = folder.spec()
    trials = [t for t in folder.optuna_study().get_trials() if t.state.name == "COMPLETE"]
    chosen = best_trial(trials)
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        run = folder.trial_dir(t.number) / "run"
        test = evaluate_run(run, device=args.device)["accuracy"]
        rows.append((t.number, t.value, test))
    tests = [r[2] for r in rows]
    print("| trial | val accuracy | test accuracy |\n|---|---:|---:|")
    for n, val, test in rows:
        mark = " (chosen)" if chosen is not None and n == chosen.number else ""
        print(f"| {n}{mark} | {val:.2f} | {test:.2f} |")
    picked = next(r[2] for r in rows if chosen is not None and r[0] == chosen.number)
    out = {
        "study": str(Path(args.study)),
        "method": spec.method,
        "dataset": spec.dataset,
        "shots": spec.shots,
        "finished_trials": len(rows),
        "test_min": min(tests),
        "test_median": statistics.median(tests),
        "test_max": max(tests),
        "chosen_trial": chosen.number if chosen is not None else None,
        "chosen_test": picked,
        "inflation_if_chosen_on_test": max(tests) - picked,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
