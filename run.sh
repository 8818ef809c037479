#!/usr/bin/env bash
# One experiment: train.py in a locked-down container, then the trusted evaluator (evaluator.py) in a second one.
#
#   ./run.sh                 train + evaluate on val (the only thing the agent ever runs)
#   ./run.sh --wait          the same, but start the containers now, print "run.sh: ready" and read train.py only
#                            after a line "go" on stdin (the harness starts a run so while the model writes train.py)
#   ./run.sh --test RUN_DIR  evaluate an existing hand-off on the test split (the only time test data is read)
#   ./run.sh --build         build the sandbox image now (image mode; needs the network once), then exit
#
# The code being run was written by a model, so nothing in it is trusted: no network, code and data read-only,
# one writable hand-off directory, no capabilities, a non-root user, pids/memory limits and a hard wall clock.
# Output: train.py's lines prefixed with "train| " (so it can never forge a metric), then
# "--- trusted evaluation ---", the evaluator's `key: value` block (val_<METRIC> first), "train_wall_seconds: X" (the
# training container's wall time, measured here: the harness refuses runs that overran the budget) and
# "total_seconds: X".
# Exit codes, the verdict the harness reads (the last line, "run.sh: ...", says why in words):
#   0 complete run   1 train.py failed, or handed off no model   3 the evaluator refused the hand-off
#   2 usage or set-up error (data, the project's declarations, podman could not start a container)
#   124 time limit   137 out of memory   130/143 interrupted by SIGINT/SIGTERM (the containers are removed first)
#   130 also: --wait got no go
#
# The project (prepare_data.py) names the programs train.py exports (PROGRAMS) and the split's files the evaluator
# reads (EVAL_FILES); evaluator.py reads those for run.sh. The hand-off: train.py writes to a private tmpfs of
# AUTORESEARCH_HANDOFF_SIZE and at most 1000 files (RAM, counted in AUTORESEARCH_MEMORY). Once the container is gone,
# run.sh copies only the regular files named in PROGRAMS and train_stats.json (never symlinks, FIFOs or devices)
# into the run directory, which the sandbox never sees. Files are capped at that size too (ulimit fsize); core dumps
# are off.
#
# Environment: the AUTORESEARCH_* variables, each with its default and meaning in engine/settings.py (ENV), which
# the README's table and `python autoresearch.py --help` print.
# The process control (podman, the hand-off, the gates, the watchdogs, the output filter, signals, the verdict) is
# engine/sandbox.py, run on the host's python3 (standard library only). run.sh's own path goes along as the first
# argument, so that the process keeps "run.sh" in its command line: a harness restarted after kill -9 finds by it a
# run.sh it left running.
cd "$(dirname "${BASH_SOURCE[0]}")" && cd "$(pwd -P)" || exit 2
command -v python3 >/dev/null || { echo "run.sh: python3 is not installed (run.sh runs engine/sandbox.py on it)" >&2; exit 2; }
exec python3 -m engine.sandbox "$0" "$@"
