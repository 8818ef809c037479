"""The project's declarations (prepare_data.py): its metric and the direction that improves it."""
import functools
import os
from typing import NamedTuple

from engine.util import HarnessError, read_text


# results.tsv's columns after the contract's six (experiment commit val_<METRIC> delta status description)
MORE_COLUMNS = ["runs", "best", "sigma", "threshold", "reason", "phase", "best_commit", "model_seconds", "run_seconds",
                "wall_seconds", "prompt_tokens", "finished", "agent", "train_wall_seconds", "round", "worker",
                "time_budget", "t", "incumbent_runs", "after_runs", "honest", "proposer"]


TEXT_COLUMNS = {"commit", "status", "description", "reason", "phase", "best_commit", "finished", "agent", "proposer"}


INT_COLUMNS = {"experiment", "prompt_tokens", "round", "worker", "time_budget"}


LIST_COLUMNS = {"runs", "incumbent_runs", "after_runs"}   # the values of several runs, comma-separated


class Metric(NamedTuple):
    name: str           # the evaluation prints val_<name> (test_<name> on the test split)
    direction: str      # minimize | maximize

    @property
    def column(self):
        return f"val_{self.name}"

    @property
    def better(self):
        return "lower" if self.direction == "minimize" else "higher"

    @property
    def columns(self):
        return ["experiment", "commit", self.column, "delta", "status", "description", *MORE_COLUMNS]

    def gain(self, value, best):
        """How much value improves on best (negative: worse)."""
        return best - value if self.direction == "minimize" else value - best


def project_metric(root="."):
    """The (name, direction) that <root>/prepare_data.py declares as literal top-level lines, METRIC = "..." and
    DIRECTION = "minimize" | "maximize", read by the engine (evaluator.project_constants) with ast, never imported: no
    torch in the harness, nothing of train.py. Pure functions that take `metric=None` use this one, the project in the
    current directory."""
    path = os.path.join(root, "prepare_data.py")
    try:
        return _declared_metric(path, read_text(path))
    except OSError:
        raise HarnessError(f"{path} is missing: the project declares its metric there (METRIC, DIRECTION)") from None


@functools.lru_cache(maxsize=8)   # parsing takes ~15 ms; pure functions given no metric ask for it on every call
def _declared_metric(path, text):
    from engine import evaluator   # only a project needs it (numpy)
    try:
        c = evaluator.project_constants(path, ("METRIC", "DIRECTION"), text)
    except evaluator.SetupError as e:
        raise HarnessError(str(e)) from None
    return Metric(c["METRIC"], c["DIRECTION"])
