"""The verdict of a run, defined once: the exit code of ./run.sh, the status the harness records, and what it means.

The sandbox exits with these codes (the evaluator's own codes map onto them: EVALUATOR), the SLURM launcher adds the
ways SLURM loses a job (SLURM_LOST), and the harness reads a run's status from the code alone, never from its output,
which the candidate writes part of. An experiment's row in results.tsv ends in one of STATUSES.
"""


class Status:
    """How a run ended (the first six), and how an experiment ended (its row's status: any of these but OK, SETUP)."""
    OK = "ok"
    CRASH = "crash"                  # train.py failed, or the evaluator refused what it handed off
    TIMEOUT = "timeout"
    INVALID = "invalid"              # over the time budget, or no valid proposal
    SETUP = "setup"                  # the sandbox could not run: not the candidate's fault, the loop stops
    INTERRUPTED = "interrupted"
    BASELINE = "baseline"
    KEEP = "keep"
    DISCARD = "discard"


STATUSES = (Status.BASELINE, Status.KEEP, Status.DISCARD, Status.CRASH, Status.TIMEOUT, Status.INVALID,
            Status.INTERRUPTED)


class Exit:
    """./run.sh's exit codes."""
    OK = 0             # a complete run with a metric
    FAILED = 1         # train.py failed, or handed off no program
    SETUP = 2          # usage or set-up error: no data, a broken declaration or score(), podman could not start
    REFUSED = 3        # the evaluator refused the hand-off
    TIMEOUT = 124      # a step ran past its time limit
    OOM = 137          # out of memory
    INTERRUPTED = 130  # SIGINT, or --wait got no go
    TERMINATED = 143   # SIGTERM


VERDICTS = {  # exit code: (status, what it means)
    Exit.OK: (Status.OK, "a complete run"),
    Exit.FAILED: (Status.CRASH, "train.py failed"),
    Exit.SETUP: (Status.SETUP, "the sandbox could not run"),
    Exit.REFUSED: (Status.CRASH, "the evaluator refused the hand-off"),
    Exit.TIMEOUT: (Status.TIMEOUT, "timed out"),
    Exit.OOM: (Status.CRASH, "out of memory"),
    Exit.INTERRUPTED: (Status.INTERRUPTED, "interrupted"),
    Exit.TERMINATED: (Status.INTERRUPTED, "terminated"),
}

EVALUATOR = {0: Exit.OK, 1: Exit.REFUSED, 2: Exit.SETUP, 124: Exit.TIMEOUT, 130: Exit.INTERRUPTED}  # its codes

SLURM_LOST = {  # a job SLURM ended itself, by its final state
    "CANCELLED": Status.INTERRUPTED, "NODE_FAIL": Status.INTERRUPTED, "PREEMPTED": Status.INTERRUPTED,
    "BOOT_FAIL": Status.INTERRUPTED, "DEADLINE": Status.INTERRUPTED, "REVOKED": Status.INTERRUPTED,
    "TIMEOUT": Status.TIMEOUT, "OUT_OF_MEMORY": Status.CRASH}
