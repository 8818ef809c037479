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
# Environment (defaults in brackets):
#   AUTORESEARCH_TIME_BUDGET  training seconds, passed to train.py [300]
#   AUTORESEARCH_GRACE        extra seconds train.py gets for start-up and export before it is killed [120]
#                             (generous for a baseline or a manual run; the loop gives candidates 10 s more than
#                             the overhead it allows them, measured on the baseline: see autoresearch.py)
#   AUTORESEARCH_EVAL_TIMEOUT hard limit for the evaluation container, seconds [600]
#   AUTORESEARCH_MEMORY       podman --memory (no swap on top) [16g]
#   AUTORESEARCH_PIDS         podman --pids-limit, threads count too [1024]
#   AUTORESEARCH_SHM_SIZE     podman --shm-size, for data-loader workers [2g]
#   AUTORESEARCH_HANDOFF_SIZE size of the hand-off tmpfs and the largest file train.py may write [2g]
#                             (the GPU preset exports ~350 MB at fp32)
#   AUTORESEARCH_SEED         passed to train.py [unset]
#   AUTORESEARCH_GPUS         comma-separated GPU ids or "all", used when an NVIDIA CDI spec exists [all]
#   AUTORESEARCH_CPUS         cores for each container (podman --cpus, e.g. 1.5) and its threads (OMP_NUM_THREADS,
#                             the whole part, at least 1); autoresearch --workers N splits the cores so [all]
#   AUTORESEARCH_IMAGE        unset: image built from Containerfile; "host": the host's / as a throw-away overlay;
#                             anything else: that image, used as is
#   AUTORESEARCH_SANDBOX      "none": run without podman (development only, loud warning)
#   AUTORESEARCH_DATA         data cache written by prepare_data.py [./data]
#   AUTORESEARCH_RUN_DIR      host directory for the model hand-off [./runs/last]
#   AUTORESEARCH_WEIGHTS      HF cache, mounted read-only with HF offline mode [./weights]
#   AUTORESEARCH_PODMAN_ARGS  replaces the detected podman set-up flags below (word-split)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$REPO"
# Milliseconds since the epoch: the timeout verdict must not depend on whole-second rounding.
now_ms() { local t=${EPOCHREALTIME:-$(date +%s.%N)}; t=${t/,/.}; echo $(( ${t%.*} * 1000 + 10#$(cut -c1-3 <<<"${t#*.}000") )); }
START_MS=$(now_ms)

die() { ! declare -F stop_all >/dev/null || stop_all; echo "run.sh: $*" >&2; exit 2; }

TEST_SPLIT=0 BUILD_ONLY=0 WAIT=0
if [[ ${1:-} == --build && $# -eq 1 ]]; then
    BUILD_ONLY=1   # build the sandbox image ahead of the first experiment (it needs the network once)
    RUN_DIR=""
elif [[ $# -gt 0 && $1 != --wait ]]; then
    [[ $1 == --test && $# -eq 2 ]] || die "usage: ./run.sh [--wait]  |  ./run.sh --test RUN_DIR  |  ./run.sh --build"
    TEST_SPLIT=1
    [[ -d $2 ]] || die "no such run directory: $2"
    RUN_DIR="$(cd "$2" && pwd -P)"
else
    [[ $# == 0 || ($1 == --wait && $# == 1) ]] || die "usage: ./run.sh [--wait]  |  ./run.sh --test RUN_DIR  |  ./run.sh --build"
    WAIT=$#
    [[ -n ${AUTORESEARCH_RUN_DIR:-} ]] || mkdir -p runs/last
    RUN_DIR="${AUTORESEARCH_RUN_DIR:-runs/last}"
    mkdir -p "$RUN_DIR"
    RUN_DIR="$(cd "$RUN_DIR" && pwd -P)"
fi

# The numbers a user sets, each checked as the user named it (autoresearch.py checks the same before it starts).
for n in AUTORESEARCH_TIME_BUDGET AUTORESEARCH_GRACE AUTORESEARCH_EVAL_TIMEOUT AUTORESEARCH_PIDS; do
    [[ -z ${!n:-} || ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a whole number above 0, got '${!n}'"
done
for n in AUTORESEARCH_MEMORY AUTORESEARCH_SHM_SIZE AUTORESEARCH_HANDOFF_SIZE; do
    [[ -z ${!n:-} || ${!n,,} =~ ^[0-9]+(\.[0-9]+)?[kmgt]?$ && ${!n} =~ [1-9] ]] ||
        die "$n must be a size like 16g or 500m, got '${!n}'"
done
BATCH_TOLERANCE="${AUTORESEARCH_BATCH_TOLERANCE:-0}"
[[ $BATCH_TOLERANCE =~ ^[0-9]*\.?[0-9]+([eE]-?[0-9]+)?$ ]] ||
    die "AUTORESEARCH_BATCH_TOLERANCE must be a number of 0 or more like 1e-4, got '$BATCH_TOLERANCE'"
[[ -z ${AUTORESEARCH_CPUS:-} || ($AUTORESEARCH_CPUS =~ ^[0-9]*\.?[0-9]+$ && $AUTORESEARCH_CPUS =~ [1-9]) ]] ||
    die "AUTORESEARCH_CPUS must be a positive number of cores like 2 or 0.5, got '$AUTORESEARCH_CPUS'"
BUDGET="${AUTORESEARCH_TIME_BUDGET:-300}"
GRACE="${AUTORESEARCH_GRACE:-120}"
EVAL_TIMEOUT="${AUTORESEARCH_EVAL_TIMEOUT:-600}"
MEMORY="${AUTORESEARCH_MEMORY:-16g}"
PIDS="${AUTORESEARCH_PIDS:-1024}"
SHM_SIZE="${AUTORESEARCH_SHM_SIZE:-2g}"
HANDOFF_SIZE="${AUTORESEARCH_HANDOFF_SIZE:-2g}"
HANDOFF_FILES=1000
CPUS="${AUTORESEARCH_CPUS:-}" THREADS=""
[[ -n $CPUS ]] && { THREADS=$(( 10#0${CPUS%.*} )); (( THREADS >= 1 )) || THREADS=1; }
HANDOFF_BYTES=$(numfmt --from=iec "${HANDOFF_SIZE^^}")
TRAIN_LIMIT=$((BUDGET + GRACE))

DATA="${AUTORESEARCH_DATA:-data}"
EVAL_SPLIT=val; [[ $TEST_SPLIT == 1 ]] && EVAL_SPLIT=test
if [[ $BUILD_ONLY == 0 ]]; then
    DATA="$(cd "$DATA" 2>/dev/null && pwd -P)" || die "no data cache at '$DATA'. Run: python prepare_data.py"
fi
WEIGHTS="${AUTORESEARCH_WEIGHTS:-weights}"
[[ -d $WEIGHTS ]] && WEIGHTS="$(cd "$WEIGHTS" && pwd -P)" || WEIGHTS=""

# ---------------------------------------------------------------------------------------------------------------
# Output: every line train.py prints gets the "train| " prefix and carriage returns (progress bars) become new
# prefixed lines. A bash read loop rather than sed/awk: it streams line by line (sed's '$' look-ahead and mawk's
# input buffering both hold lines back) and still terminates a last line that has no newline, so the next line
# can't be glued to it. Lines longer than 4096 bytes are cut into several, so an endless line can't grow this
# shell's memory, and control characters (escape sequences, backspace; tab and CR aside) are dropped, so a log
# shown in a terminal can't move the cursor to draw an unprefixed line. ~15K lines/s on 2 busy cores.
prefix_train() {
    local LC_ALL=C line
    while IFS= read -r -n 4096 line || [[ -n $line ]]; do
        line=${line//[$'\x01'-$'\x08'$'\x0b'$'\x0c'$'\x0e'-$'\x1f'$'\x7f']/}
        line=${line//$'\xc2'[$'\x80'-$'\x9f']/}   # the 8-bit forms of the same (C1), as UTF-8
        printf 'train| %s\n' "${line//$'\r'/$'\n'train| }"
    done
}

# The evaluation's output is kept, to quote the evaluator's reason in the verdict.
keep_eval_log() { tee "$WORK/eval.log"; }
seconds() { printf '%s: %d.%d\n' "$1" $(($2 / 1000)) $(($2 % 1000 / 100)); }
finish() {
    [[ -n $TRAIN_MS ]] && seconds train_wall_seconds "$TRAIN_MS"   # trusted: the harness checks it against the budget
    seconds total_seconds $(( $(now_ms) - START_MS ))
}

# Environment train.py and the evaluator see, in every mode, one VAR=value a line.
common_env() {
    local out=$1 data=$2 weights=$3
    printf '%s\n' PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        "AUTORESEARCH_OUT=$out" "AUTORESEARCH_DATA=$data" "AUTORESEARCH_TIME_BUDGET=$BUDGET"
    [[ -n ${AUTORESEARCH_SEED:-} ]] && echo "AUTORESEARCH_SEED=$AUTORESEARCH_SEED"
    [[ -n $THREADS ]] && echo "OMP_NUM_THREADS=$THREADS"
    [[ -n $weights ]] && printf '%s\n' "AUTORESEARCH_WEIGHTS=$weights" "HF_HOME=$weights" "TORCH_HOME=$weights/torch"
    return 0
}

# ---------------------------------------------------------------------------------------------------------------
# A private working directory, removed on exit: podman runs from here (conmon drops an `oom` file into its working
# directory, which must never land in the repository), and it holds the hand-off tmpfs and the masks.
ROOTLESS=0; [[ $(id -u) != 0 ]] && ROOTLESS=1
# Rootless podman keeps its own user and mount namespace: the hand-off tmpfs is mounted, read and removed in there.
in_ns() { if [[ $ROOTLESS == 1 ]]; then podman unshare "$@"; else "$@"; fi; }
SANDBOX=${AUTORESEARCH_SANDBOX:-}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/autoresearch-run-$$.XXXXXX")"
HANDOFF="$WORK/out"
mkdir "$WORK/code"   # train.py, once it gets its go
MOUNTED=0    # the hand-off tmpfs is mounted
TRAIN_MS=""  # wall time of the training container (of train.py without a sandbox)
declare -A PID NAME WATCHDOG   # per step (train, eval): its background job, its container, its watchdog's session
unmount_handoff() { [[ $MOUNTED == 1 ]] || return 0; MOUNTED=0; in_ns umount "$HANDOFF" || in_ns umount -l "$HANDOFF"; }
cleanup() {
    local s
    [[ $BASHPID == "$$" ]] || return 0   # a subshell that kept run.sh's traps (a process substitution does)
    trap '' INT TERM   # a second signal must not cut the clean-up short (the harness's SIGKILL comes 20 s later)
    for s in "${!PID[@]}"; do stop_step "$s"; done
    for s in "${!WATCHDOG[@]}"; do kill -- "-${WATCHDOG[$s]}" 2>/dev/null || true; done
    unmount_handoff || true
    rm -rf --one-file-system "$WORK" || true   # never into a hand-off that failed to unmount
}
trap cleanup EXIT
on_signal() {
    [[ $BASHPID == "$$" ]] || exit 1
    trap - INT TERM
    cleanup
    wait 2>/dev/null || true   # let the output pipeline drain so the verdict below is the last line
    echo "run.sh: INTERRUPTED by SIG$1; training/evaluation stopped and cleaned up"
    [[ $1 == INT ]] && exit 130 || exit 143
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# ---------------------------------------------------------------------------------------------------------------
# The two steps, training and evaluation, start together, each held at a gate: its input (train.py, the split)
# reaches it only at its go. Meanwhile the training container's Python imports what train.py imports and the
# evaluation's loads torch, while the model still writes train.py (--wait) or while train.py trains: about 7 s of
# every run. A step's time limit counts from its go: a watchdog in a session of its own stops it then, even if
# run.sh is killed with SIGKILL meanwhile; conmon's --timeout (`timeout` without a sandbox) is only the backstop.
WAIT_MAX=0; [[ $WAIT == 1 ]] && WAIT_MAX=3600   # --wait: how long run.sh waits for its go
gate() {   # gate STEP CMD...: CMD's output once run.sh has said go to STEP; nothing if run.sh or WORK is gone first
    while [[ ! -e $WORK/$1.go ]]; do [[ -d $WORK ]] && kill -0 $$ 2>/dev/null || exit 0; sleep 0.1; done
    "${@:2}"
}   # (its stderr is /dev/null: it must never hold the harness's pipe open)

# launch STEP BACKSTOP FILTER FEED ARGS...: starts one step in the background, its output (stdout and stderr
# merged) through FILTER and FEED's output on its stdin once gated through; ARGS are podman run's, or without a
# sandbox the command itself; the pid of `timeout` goes to WORK/STEP.pid (a signal to run.sh's group may have
# killed this subshell by the time stop_step needs it). The subshell's own stderr carries only bash's "Killed" for a
# step that was stopped, which the verdict says better.
launch() {
    local step=$1 backstop=$2 filter=$3 feed=$4; shift 4
    if [[ $SANDBOX == none ]]; then
        # timeout leads a process group of its own with the step in it; stop_step signals it, it passes it on
        ( sh -c 'echo $$ >"$0"; exec "$@"' "$WORK/$step.pid" timeout -k 5 "$backstop" "$@" 2>&1 | $filter
          exit "${PIPESTATUS[0]}" ) < <(gate "$step" "$feed" 2>/dev/null) \
            2>/dev/null &
    else
        NAME[$step]="autoresearch-$$-$RANDOM$RANDOM"
        ( podman run -i --name "${NAME[$step]}" --timeout "$backstop" "$@" 2>&1 | $filter
          exit "${PIPESTATUS[0]}" ) < <(gate "$step" "$feed" 2>/dev/null) 2>/dev/null &
    fi
    PID[$step]=$!
}

# The command that stops a step at once: its container, or its `timeout` (SIGKILL to the group 5 s later).
stop_argv() {
    if [[ $SANDBOX == none ]]; then echo pkill -TERM -F "$WORK/$1.pid" -x timeout
    else echo podman rm -f -t 0 "${NAME[$1]}"; fi
}
stop_step() {
    if [[ $SANDBOX == none ]]; then
        $(stop_argv "$1") >/dev/null 2>&1 || true
        # until `timeout` is gone, having killed the step's group (SIGKILL 5 s after a SIGTERM ignored)
        while pkill -0 -F "$WORK/$1.pid" -x timeout 2>/dev/null; do sleep 0.1; done
    else
        # the client first (its command line names the container): a container it is still creating would escape
        # `podman rm`, and be left behind
        pkill -KILL -f -- "--name ${NAME[$1]} " 2>/dev/null || true
        while pgrep -f -- "--name ${NAME[$1]} " >/dev/null; do sleep 0.1; done
        remove_container "${NAME[$1]}"
    fi
}
# until it is gone: while a container dies (by itself, or killed by a first `podman rm`), podman's own clean-up of it
# can make `podman rm` fail or return early
remove_container() {
    local i
    for i in {1..20}; do
        podman rm -f -i -t 0 "$1" >/dev/null 2>&1 || true
        podman container exists "$1" || return 0
        sleep 0.5
    done
}
# Before run.sh's last line: the other step stopped and its output drained, so that nothing follows that line.
stop_all() {
    local s
    for s in "${!PID[@]}"; do stop_step "$s"; wait "${PID[$s]}" 2>/dev/null || true; unset "PID[$s]"; done
}

# go STEP LIMIT: opens the step's gate and waits for it to end, LIMIT seconds at most. Sets RC, WALL_MS, TIMED_OUT
# and OOM; exits 2 if podman could not start the container at all.
go() {
    local step=$1 limit=$2 t0 state
    RC=0 OOM=false
    t0=$(now_ms)
    : >"$WORK/$step.go"
    setsid bash -c 'sleep "$1"; shift; "$@"' watchdog "$limit" $(stop_argv "$step") </dev/null >/dev/null 2>&1 &
    WATCHDOG[$step]=$!   # setsid: its own session and process group, with the same id
    wait "${PID[$step]}" || RC=$?
    WALL_MS=$(( $(now_ms) - t0 ))
    kill -- "-${WATCHDOG[$step]}" 2>/dev/null || true
    unset "WATCHDOG[$step]" "PID[$step]"
    # Killed (non-zero) at or after the limit: that is the timeout, whatever code the kill produced (podman rm -f
    # gives 137 or 255 here, `timeout` 124 or 137; 137 would otherwise look like an OOM kill).
    TIMED_OUT=0
    [[ $RC != 0 ]] && (( WALL_MS >= limit * 1000 - 500 )) && TIMED_OUT=1
    [[ $SANDBOX == none ]] && return 0
    state="$(podman inspect --format '{{.State.OOMKilled}} {{.State.Status}} {{.State.ExitCode}}' "${NAME[$step]}" \
             2>/dev/null || echo "false none")"
    OOM=${state%% *}
    remove_container "${NAME[$step]}"
    # 125-127: podman or the runtime failed before the command ran (no container, or one that never exited with
    # that code itself), a set-up problem rather than the step's failure.
    [[ $TIMED_OUT == 0 && $RC =~ ^12[5-7]$ && ${state#* } != "exited $RC" ]] &&
        die "podman could not start the container (podman exit $RC, its error is above): check the podman set-up
  (podman info; AUTORESEARCH_PODMAN_ARGS) and, in host mode, that $PY exists"
    return 0
}

# verdict STEP LIMIT: after a step that failed, the run's last line and exit code (see the top); on stdout, so that
# in a merged log it really is the last line. The evaluator's own codes: 1 it refused the hand-off, 2 the project or
# the data is broken, 124 it ran out of time.
verdict() {
    local step=$1 limit=$2 why
    stop_all
    if [[ $TIMED_OUT == 1 || ($step == evaluation && $RC == 124) ]]; then
        echo "run.sh: TIMEOUT $step exceeded its limit of $limit"; exit 124
    elif [[ $OOM == true || $RC == 137 ]]; then
        echo "run.sh: OUT OF MEMORY $step was killed at the memory limit AUTORESEARCH_MEMORY=$MEMORY"; exit 137
    elif [[ $step == training ]]; then
        echo "run.sh: FAILED train.py exited with code $RC"; exit 1
    fi
    why=$(grep -as '^evaluator.py: error: ' "$WORK/eval.log" | tail -n 1 | cut -c 22-521 | tr -cd '[:print:]') || true
    why=${why:-evaluator.py exited with code $RC}
    [[ $RC == 2 ]] && die "the evaluator could not run: $why"
    echo "run.sh: REFUSED by the evaluator: $why"; exit 3
}

# ---------------------------------------------------------------------------------------------------------------
# The training step's entry point. Before its go it imports the heavy, installed packages (PRELOAD below) that the
# committed train.py imports (HEAD's, never a file the model is still writing; the working one outside git); at its
# go, run.sh copies train.py to PATH (read-only in the container) and says go on stdin, and it runs PATH as
# `python PATH` would. Only installed libraries on that list are preloaded, never a module of the candidate's
# choosing (a dead `import venv.__main__` once ran a CLI and ended every later run), and whatever a preload raises,
# SystemExit included, the run goes on without it. On the way out gc.freeze() spares Python a last collection over
# the ~2500 modules torch and export load: 1-2 s of every run.
LAUNCHER='
import ast, gc, importlib, os, re, runpy, sys
PRELOAD = {"numpy", "torch", "torchvision", "timm", "transformers", "tokenizers", "einops", "scipy", "sklearn", "PIL"}
if sys.argv[1] == "--imports":
    names = []
    for node in ast.walk(ast.parse(sys.stdin.buffer.read())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module + ":" + a.name for a in node.names]
    names = [n for n in names if re.fullmatch(r"[A-Za-z]\w*(\.[A-Za-z]\w*)*(:[A-Za-z]\w*)?", n)
             and re.split(r"[.:]", n)[0] in PRELOAD]
    print(*list(dict.fromkeys(names))[:200])
    sys.exit()
path = sys.argv[1]
for name in sys.argv[2:]:
    module, _, attr = name.partition(":")
    try:
        getattr(importlib.import_module(module), attr, None)
    except BaseException:
        pass
if sys.stdin.read() != "go\n":
    sys.exit(1)   # run.sh stopped before its go, and says so
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
sys.argv, sys.path[0] = [path], os.path.dirname(path)
try:
    runpy.run_path(path, run_name="__main__")
finally:
    gc.freeze()
'
read -r -a PRELOAD < <( { git -C "$REPO" show HEAD:./train.py 2>/dev/null || cat "$REPO/train.py"; } |
                        timeout 10 python3 -c "$LAUNCHER" --imports 2>/dev/null) || PRELOAD=()

# ---------------------------------------------------------------------------------------------------------------
# The two set-ups: each defines TRAIN and EVAL, the steps' arguments for `launch`.

# No sandbox: for development only. Same output format and time limits, but train.py can see and do anything
# the user can.
setup_none() {
    [[ $BUILD_ONLY == 1 ]] && { echo "run.sh: AUTORESEARCH_SANDBOX=none: no image to build"; exit 0; }
    {
        echo "################################################################################"
        echo "# run.sh: WARNING: AUTORESEARCH_SANDBOX=none -- train.py runs WITHOUT a sandbox: #"
        echo "# it has your network, your files and your secrets. Development use only.       #"
        echo "################################################################################"
    } >&2
    PY="${PYTHON:-python3}"
    local envs
    mapfile -t envs < <(common_env "$RUN_DIR" "$DATA" "$WEIGHTS")
    TRAIN=(env "${envs[@]}" "$PY" -c "$LAUNCHER" "$WORK/code/train.py" "${PRELOAD[@]}")
    EVAL=(env "${envs[@]}" TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 AUTORESEARCH_EVAL_TIMEOUT="$EVAL_TIMEOUT"
          AUTORESEARCH_BATCH_TOLERANCE="$BATCH_TOLERANCE"
          "$PY" evaluator.py --evaluate "$RUN_DIR" --split "$EVAL_SPLIT" --data -)
}

# The sandbox: podman, from the private working directory.
setup_sandbox() {
    command -v podman >/dev/null || die "podman is not installed. Install it (Debian/Ubuntu: sudo apt-get install podman;
  Fedora: sudo dnf install podman; see https://podman.io/docs/installation), or, for development only,
  run with AUTORESEARCH_SANDBOX=none"
    cd "$WORK"

    # Podman set-up.
    #  root (this machine): crun fails under hybrid cgroups, so use runc; podman's default ulimits exceed what the
    #    host allows and are refused, so pass explicit ones. Memory/pids limits work through cgroups as root.
    #  rootless (a workstation): the default runtime is fine and the user's own ulimits are inherited.
    #    --userns=keep-id makes the container user the invoking user (it owns the hand-off tmpfs).
    #    Memory and pids limits need cgroups v2 with delegation (the default on current Fedora/Ubuntu); on
    #    cgroups v1 rootless podman ignores them, so we warn.
    BUILD_SETUP=()
    if [[ -n ${AUTORESEARCH_PODMAN_ARGS:-} ]]; then
        read -r -a SETUP <<<"$AUTORESEARCH_PODMAN_ARGS"
    elif [[ $ROOTLESS == 0 ]]; then
        SETUP=(--runtime runc --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
        BUILD_SETUP=(--runtime runc)
    else
        SETUP=(--userns=keep-id)
        [[ -f /sys/fs/cgroup/cgroup.controllers ]] ||
            echo "run.sh: WARNING: rootless podman on cgroups v1 cannot enforce --memory/--pids-limit" >&2
    fi

    # GPU: only with the driver AND an NVIDIA CDI spec (nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml).
    GPU=()
    if command -v nvidia-smi >/dev/null && compgen -G "/etc/cdi/nvidia*.yaml" >/dev/null ||
            compgen -G "/var/run/cdi/nvidia*.yaml" >/dev/null && command -v nvidia-smi >/dev/null; then
        # In a SLURM job, only the GPUs it was granted (podman's containers run outside the job's cgroup).
        IFS=, read -r -a ids <<<"${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-${AUTORESEARCH_GPUS:-all}}}"
        for id in "${ids[@]}"; do GPU+=(--device "nvidia.com/gpu=$id"); done
    fi

    # Paths inside the container (the same in every mode).
    C_CODE=/workspace C_DATA=/data C_OUT=/out C_WEIGHTS=/weights

    # A run.sh killed with SIGKILL can't clean up: its containers are removed by their watchdogs at the time limit
    # (a waiting one only by conmon's backstop) or stay listed, and its work dir may still hold the hand-off tmpfs.
    # Remove those whose run.sh (the pid in the name) is gone; live ones belong to parallel runs.
    for c in $(podman ps -a --filter label=autoresearch=1 --format '{{.Names}}' 2>/dev/null); do
        pid=${c#autoresearch-}; pid=${pid%%-*}
        [[ $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null && podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    for d in "${TMPDIR:-/tmp}"/autoresearch-run-*.*; do
        pid=${d##*/autoresearch-run-}; pid=${pid%%.*}
        [[ -d $d && $pid =~ ^[0-9]+$ ]] && ! kill -0 "$pid" 2>/dev/null || continue
        in_ns umount "$d/out" 2>/dev/null || true
        rm -rf --one-file-system "$d" || true
    done

    # Image or host root filesystem. ROOTFS goes LAST among the options: with --rootfs the path takes the image's place.
    MODE_ARGS=()
    if [[ ${AUTORESEARCH_IMAGE:-} == host ]]; then
        # Host mode: the host's / as a copy-on-write overlay, read-only on top, run as "nobody". What the user
        # "nobody" could read on the host is readable in here, except what we mask: homes (secrets, the Python
        # tree is bound back), scratch dirs, mounts, the repository and the data cache (val/test!).
        # LIMITATION: only these exact paths are masked. Any OTHER copy of the data readable by "nobody" (e.g. a
        # dataset or a Ukiyo-eVG download under /opt, /var or /data, a second data dir, an old run
        # dir) is readable from inside the sandbox, val/test included. Keep held-out data only under the masked
        # paths (/root, /home, /mnt, /media, /srv, the repo, AUTORESEARCH_DATA, the run dir, the weights dir) or not
        # world-readable; the image built from the Containerfile (AUTORESEARCH_IMAGE unset) has no such gap.
        # The interpreter and its trees (base install, and the virtualenv or conda env) are bound back read-only at the
        # same paths, and the python3 on PATH runs as is: its realpath would be the base install without the venv.
        read -r PY PYTREES < <(python3 -c 'import sys; print(sys.executable, *{sys.base_prefix, sys.prefix})') ||
            die "host mode needs python3 (with torch) on the host"
        read -r -a PYTREES <<<"$PYTREES"
        SB_USER=65534:65534
        SKEL="$WORK/mask"
        mkdir -m 755 "$SKEL"
        # Runc gives a tmpfs the mode of the directory it covers (/root is 0700, so the bound-back Python would be
        # unreachable for "nobody"); an empty 0755 host directory bound over the path masks it without that problem.
        # Plain --tmpfs would copy the directory's content in (tmpcopyup): notmpcopyup is essential.
        MODE_ARGS+=(--tmpfs /tmp:rw,notmpcopyup --tmpfs /var/tmp:rw,notmpcopyup --tmpfs /run:rw,notmpcopyup)
        # A worker's git worktree (--workers N) lies inside the main checkout, whose runs/ hold the other workers'
        # hand-offs: mask the main checkout as well.
        MAIN="$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)" || MAIN=""
        MAIN="${MAIN%/.git}"; [[ $MAIN == "$REPO" || $MAIN == */.git* ]] && MAIN=""
        i=0
        for m in /root /home /mnt /media /srv ${MAIN:+"$MAIN"} "$REPO" "$DATA" "$RUN_DIR" ${WEIGHTS:+"$WEIGHTS"}; do
            [[ -d $m ]] || continue
            mkdir -p "$SKEL/$i"
            MODE_ARGS+=(-v "$SKEL/$i:$m")   # rw for runc (root) so it can create nested mount points; 0755 root-owned
            i=$((i + 1))
        done
        for t in "${PYTREES[@]}"; do MODE_ARGS+=(-v "$t:$t:ro"); done
        ROOTFS=(--rootfs /:O)
    else
        PY=python
        SB_USER=1000:1000   # the Containerfile's user
        MODE_ARGS+=(--tmpfs /tmp:rw,notmpcopyup)
        if [[ -n ${AUTORESEARCH_IMAGE:-} ]]; then
            IMAGE="$AUTORESEARCH_IMAGE"
        else
            # Rebuilt only when Containerfile or requirements.txt change: the tag is a hash of both.
            hash="$(cat "$REPO/Containerfile" "$REPO/requirements.txt" | sha256sum | cut -c1-12)"
            IMAGE="localhost/autoresearch:$hash"
            if ! podman image exists "$IMAGE"; then
                echo "run.sh: building $IMAGE from Containerfile (once; needs network access to pull the base image)" >&2
                ctx="$(mktemp -d)"; cp "$REPO/Containerfile" "$REPO/requirements.txt" "$ctx/"
                # Only these two files form the build context, so data/, runs/ and weights/ never enter the image.
                if ! podman build "${BUILD_SETUP[@]}" -t "$IMAGE" -f "$ctx/Containerfile" "$ctx" >&2; then
                    rm -rf "$ctx"
                    die "could not build the image from Containerfile (no registry access?). On a machine without a
  registry run the sandbox on the host's own root filesystem instead: AUTORESEARCH_IMAGE=host ./run.sh"
                fi
                rm -rf "$ctx"
            fi
        fi
        ROOTFS=("$IMAGE")
    fi
    if [[ $BUILD_ONLY == 1 ]]; then
        echo "run.sh: sandbox image ready: ${ROOTFS[*]}"
        exit 0
    fi
    [[ $ROOTLESS == 1 ]] && SB_USER=""   # keep-id already runs as the invoking user

    # Everything both containers share: the isolation and the limits.
    BASE=(
        "${SETUP[@]}"
        --network=none
        --cap-drop=all --security-opt no-new-privileges
        ${SB_USER:+--user "$SB_USER"}
        --read-only --read-only-tmpfs=false
        --memory "$MEMORY" --memory-swap "$MEMORY"
        --pids-limit "$PIDS" --shm-size "$SHM_SIZE"
        ${CPUS:+--cpus "$CPUS"}
        --ulimit core=0:0 --ulimit "fsize=$HANDOFF_BYTES:$HANDOFF_BYTES"
        --log-driver none   # podman's own copy of the output would be a second, unbounded file on the host
        "${GPU[@]}"
        --label autoresearch=1
        --workdir "$C_CODE"
    )
    local kv env=(-e HOME=/tmp)
    while read -r kv; do env+=(-e "$kv"); done < <(common_env "$C_OUT" "$C_DATA" "${WEIGHTS:+$C_WEIGHTS}")
    [[ -n $WEIGHTS ]] && BASE+=(-v "$WEIGHTS:$C_WEIGHTS:ro")
    # Training sees train.py (copied into WORK/code at its go), meta.json and the train split, and writes to the
    # hand-off tmpfs only.
    TRAIN=("${BASE[@]}" "${env[@]}" -v "$WORK/code:$C_CODE:ro" -v "$DATA/meta.json:$C_DATA/meta.json:ro"
           -v "$DATA/train:$C_DATA/train:ro" -v "$HANDOFF:$C_OUT:rw" "${MODE_ARGS[@]}" "${ROOTFS[@]}"
           "$PY" -c "$LAUNCHER" "$C_CODE/train.py" "${PRELOAD[@]}")
    # The evaluation sees the engine, the project and the copied hand-off, which can't hold anything executable.
    # The split is streamed in on stdin rather than mounted: no file in the container holds it, so only the trusted
    # evaluator has it, never the child process that runs the graphs.
    EVAL=("${BASE[@]}" "${env[@]}" -e TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 -e AUTORESEARCH_EVAL_TIMEOUT="$EVAL_TIMEOUT"
          -e AUTORESEARCH_BATCH_TOLERANCE="$BATCH_TOLERANCE"
          -v "$REPO/evaluator.py:$C_CODE/evaluator.py:ro" -v "$REPO/prepare_data.py:$C_CODE/prepare_data.py:ro"
          -v "$RUN_DIR:$C_OUT:ro,noexec,nosuid,nodev" "${MODE_ARGS[@]}" "${ROOTFS[@]}"
          "$PY" evaluator.py --evaluate "$C_OUT" --split "$EVAL_SPLIT" --data -)
}

if [[ $SANDBOX == none ]]; then setup_none; else setup_sandbox; fi

# The project's declarations, read by the engine without importing prepare_data.py: the programs train.py hands
# off, and the split's files the evaluator reads.
names=$(python3 "$REPO/evaluator.py" --names "$EVAL_SPLIT") ||
    die "cannot read the project's declarations in prepare_data.py (the engine's error is above)"
{ read -r -a PROGRAMS; read -r -a SPLIT_FILES; } <<<"$names"

# ---------------------------------------------------------------------------------------------------------------
# The data, checked again at go: with --wait the run may have waited a long time for it.
check_data() {
    local f train=(); [[ $TEST_SPLIT == 0 ]] && train=(meta.json train/)
    for f in "${train[@]}" "${SPLIT_FILES[@]}"; do   # files, and the train/ directory
        [[ $f == */ && -d $DATA/$f || $f != */ && -f $DATA/$f ]] ||
            die "no data cache in '$DATA' (no ${f%/} there). Run: python prepare_data.py"
    done
}
check_data
split_tar() { tar -C "$DATA" -cf - "${SPLIT_FILES[@]}"; }
# train.py is read at its go: with --wait the harness commits it just before.
feed_train() { cp "$REPO/train.py" "$WORK/code/train.py" && echo go; }
if [[ $TEST_SPLIT == 0 ]]; then
    # Remove only what a previous run left that we know, so a stale model can't be evaluated as this run's.
    for f in "${PROGRAMS[@]}" train_stats.json; do rm -f "$RUN_DIR/$f"; done
    if [[ $SANDBOX != none ]]; then
        # The sandbox never sees the run dir: it writes to a tmpfs owned by the sandbox user, with a size and a file
        # limit, so neither the host's disk nor its inodes can fill up.
        mkdir "$HANDOFF"
        in_ns mount -t tmpfs -o "size=$HANDOFF_BYTES,nr_inodes=$HANDOFF_FILES,mode=0700,noexec,nosuid,nodev${SB_USER:+,uid=${SB_USER%:*},gid=${SB_USER#*:}}" \
            autoresearch-handoff "$HANDOFF" || die "could not mount the hand-off tmpfs on $HANDOFF"
        MOUNTED=1
    fi
    launch train $((WAIT_MAX + TRAIN_LIMIT)) prefix_train feed_train "${TRAIN[@]}"
fi
launch eval $((WAIT_MAX + TRAIN_LIMIT + EVAL_TIMEOUT)) keep_eval_log split_tar "${EVAL[@]}"
if [[ $WAIT_MAX != 0 ]]; then
    echo "run.sh: ready"
    read -r -t "$WAIT_MAX" line && [[ $line == go ]] || { stop_all
        echo "run.sh: CANCELLED: no 'go' on stdin within ${WAIT_MAX}s"; exit 130; }
    START_MS=$(now_ms)   # the run starts now: total_seconds leaves the wait out
    check_data
fi
if [[ $TEST_SPLIT == 0 ]]; then
    go train "$TRAIN_LIMIT"
    TRAIN_MS=$WALL_MS
    if [[ $MOUNTED == 1 && $RC == 0 ]]; then
        # The container and every process in it are gone: nothing writes to the hand-off any more. Copy out only the
        # expected names that are regular files (find -type f never follows a symlink; FIFOs and devices are not
        # files), as new files of the user's with default permissions.
        wanted=()
        for f in "${PROGRAMS[@]}" train_stats.json; do wanted+=(-o -name "$f"); done
        in_ns find "$HANDOFF" -maxdepth 1 -type f \( "${wanted[@]:1}" \) \
            -exec cp --no-preserve=all -t "$RUN_DIR" -- {} +
    fi
    unmount_handoff
    [[ $RC == 0 ]] || verdict training "${TRAIN_LIMIT}s (AUTORESEARCH_TIME_BUDGET=$BUDGET + grace $GRACE)"
    for f in "${PROGRAMS[@]}"; do
        [[ -f $RUN_DIR/$f && ! -L $RUN_DIR/$f ]] || { stop_all; echo "run.sh: FAILED train.py handed off no $f (a" \
            "regular file in \$AUTORESEARCH_OUT, written with torch.export.save: prepare_data.py's PROGRAMS)"; exit 1; }
    done
fi

echo "--- trusted evaluation ---"
go eval "$EVAL_TIMEOUT"
[[ $RC == 0 ]] || verdict evaluation "${EVAL_TIMEOUT}s (AUTORESEARCH_EVAL_TIMEOUT)"
finish
