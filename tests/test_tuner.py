"""Tuner agents (--agent optuna|random) and report --compare.

Pure parts (search space, program.md override, applying a trial, history) are tested directly. The agents run
through the real loop: real git in a temp repo, the real run.sh (AUTORESEARCH_IMAGE=host), real training on tiny
data with a 2-second budget, no Ollama at all. As in test_loop.py, the temp repo's image encoder returns a
constant, so outcomes are exact: the test's search space has TEXT_ON (0: the text encoder is constant too, every
rank ties, val_mean_rank == N_VAL; 1: image->text ranks average (n+1)/2, val_mean_rank 36.25) and HEATMAP_HEADS
(3 or 5 do not divide EMBED_DIM 128: the run crashes building the model), so each trial's status is known from
its parameters.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import copy_into, git

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from engine.project import Metric, project_metric
from engine.report import sides_text, best_so_far, compare_line, load_test_scores
from engine.results import load_results, state_from_rows, typed_row
from engine.tuners import (OptunaSampler, Param, _number, apply_params, format_params, hyperparameters, parse_params,
    random_params, search_space, tuner_trials)
from engine.util import HarnessError

MR = Metric("mean_rank", "minimize")   # the template's metric

TRAIN = open(os.path.join(ROOT, "train.py")).read()
N_VAL = 48
IMG_OK = "        return self.proj(self.vit(self.prep(images)))\n"
IMG_BAD = "        return self.proj(self.vit(self.prep(images))) * 0 + 1\n"
TXT_OK = "        return self.proj(pooled)\n"
TXT_SWITCH = "        return self.proj(pooled) * TEXT_ON + (1 - TEXT_ON)\n"
HEADS = "HEATMAP_HEADS = 4\n"
SPACE_BLOCK = """
## Search space
```
TEXT_ON: int 0 1
HEATMAP_HEADS: int 3 5
LEARNING_RATE: log 1e-4 4e-3
```
"""
FILES = ["autoresearch.py", "engine", "train.py", "run.sh", "prepare_data.py", "program.md",
         "scratchpad.md", ".gitignore"]


def names(space):
    return [p.name for p in space]


# ---------------------------------------------------------------- the search space

def test_space_of_the_template_follows_the_active_preset():
    for cuda, lr, batch, dim in ((False, (0.00025, 0.004), (64, 256), (64, 256)),
                                 (True, (5e-05, 0.0008), (32, 128), (256, 1024))):
        space = {p.name: p for p in search_space(TRAIN, "", cuda)}
        assert (space["LEARNING_RATE"].kind, space["LEARNING_RATE"].low, space["LEARNING_RATE"].high) == ("log", *lr)
        assert (space["BATCH_SIZE"].kind, space["BATCH_SIZE"].low, space["BATCH_SIZE"].high) == ("int", *batch)
        assert (space["EMBED_DIM"].low, space["EMBED_DIM"].high) == dim
        assert (space["WARMUP_FRAC"].low, space["WARMUP_FRAC"].high) == (0.05, 0.8)            # x1/4 .. x4
        assert (space["EXPERT_LOSS_PROB"].low, space["EXPERT_LOSS_PROB"].high) == (0.2, 1.0)   # clipped at 1
        assert (space["LOGIT_SCALE_INIT"].low, space["LOGIT_SCALE_INIT"].high) == (3.571, 57.14)  # 1 / 0.07
        assert (space["HEATMAP_HEADS"].kind, space["HEATMAP_HEADS"].low, space["HEATMAP_HEADS"].high) == ("int", 2, 8)
        # env-derived, strings, dicts, booleans, dtypes, and what follows the preset block are not hyperparameters
        for skipped in ("TIME_BUDGET", "SEED", "DEVICE", "VIT", "TEXT", "POOL", "PRETRAINED", "AMP_DTYPE",
                        "LOG_EVERY_S", "PAD_ID", "ROOT"):
            assert skipped not in space
        assert len(space) == 13


def test_the_readmes_search_space_block_is_what_the_parser_reads():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```\n(## Search space\n.*?)```", readme, re.S).group(1)
    space = {p.name: (p.kind, p.low, p.high) for p in search_space(TRAIN, block, False)}
    assert space == {"LEARNING_RATE": ("log", 1e-4, 4e-3), "BATCH_SIZE": ("int", 32, 256),
                     "WARMUP_FRAC": ("float", 0, 0.5)}


def test_space_rules():
    src = textwrap.dedent("""
        import os
        LR = 0.1
        STEPS = 10
        DROP_PROB = 1
        MIX_FRAC = 0.5
        ON = True
        NAME = "x"
        ZERO = 0
        NEG = -2.0
        lower = 3.0
        BUDGET = float(os.environ.get("B", 5))
        HUGE = 10 ** 10
        SCALE = 2 * -3.0 / 4
        LR = 0.2
        if DEVICE != "cpu":
            WIDTH = 512
        elif DEVICE == "mps":
            WIDTH = 256
        else:
            WIDTH = 128
            DEPTH = 4
        AFTER = 5.0
    """)
    deep = src.replace("LR = 0.2", "LR = 0.2\nDEEP = " + "1 + " * 2000 + "1")   # model-written: no stack overflow
    space = {p.name: p for p in search_space(deep, "", cuda=False)}
    assert list(space) == ["LR", "STEPS", "DROP_PROB", "MIX_FRAC", "WIDTH", "DEPTH"]   # SCALE < 0: no scale
    assert (space["LR"].low, space["LR"].high) == (0.05, 0.8)                      # the last assignment wins
    assert (space["STEPS"].kind, space["STEPS"].low, space["STEPS"].high) == ("int", 5, 20)
    assert (space["DROP_PROB"].kind, space["DROP_PROB"].low, space["DROP_PROB"].high) == ("log", 0.25, 1.0)
    assert (space["MIX_FRAC"].low, space["MIX_FRAC"].high) == (0.125, 1.0)
    assert (space["WIDTH"].low, space["WIDTH"].high) == (64, 256)                  # the else branch runs on cpu
    gpu = {p.name: p for p in search_space(src, "", cuda=True)}
    assert (gpu["WIDTH"].low, gpu["WIDTH"].high) == (256, 1024) and "DEPTH" not in gpu
    no_preset = {p.name for p in search_space("A = 1.0\nB = 2\n", "", cuda=False)}
    assert no_preset == {"A", "B"}
    with pytest.raises(HarnessError, match="no numeric UPPER_CASE constants"):
        search_space("x = 1\nNAME = 'a'\n", "", cuda=False)
    with pytest.raises(HarnessError, match="does not parse"):
        search_space("A = (1\n", "", cuda=False)
    with pytest.raises(HarnessError, match="too large to record"):
        search_space("".join(f"CONSTANT_NUMBER_{i} = 1.0\n" for i in range(30)), "", cuda=False)


def test_program_md_block_overrides_and_bad_lines_name_the_line():
    program = "# x\n\n## Phase 1: a\ntext\n\n## Search space\n```\n- LEARNING_RATE: log 1e-4 4e-3\n\n" \
              "`BATCH_SIZE: int 32 256`\nWARMUP_FRAC: float 0 0.5\n```\n## Rules\nBATCH_SIZE: nonsense\n"
    space = search_space(TRAIN, program, cuda=False)
    assert space == [Param("LEARNING_RATE", "log", 1e-4, 4e-3), Param("BATCH_SIZE", "int", 32, 256),
                     Param("WARMUP_FRAC", "float", 0.0, 0.5)]
    head = "intro\n## Search space\nLEARNING_RATE: log 1e-4 4e-3\n"        # the bad line is line 4
    for line, why in (("BATCH_SIZE: int 32", "not a search-space line"),
                      ("BATCH_SIZE: cubic 32 256", "unknown kind 'cubic'"),
                      ("BATCH_SIZE: int 32 big", "must be numbers"),
                      ("BATCH_SIZE: int 256 32", "below HIGH"),
                      ("BATCH_SIZE: int 32 inf", "below HIGH"),
                      ("WEIGHT_DECAY: log 0 1e-3", "LOW > 0"),
                      ("BATCH_SIZE: int 32.5 256", "whole numbers"),
                      ("BATCH_SIZ: int 32 256", "BATCH_SIZ is not a numeric constant of train.py's cpu preset"),
                      ("TIME_BUDGET: float 1 2", "TIME_BUDGET is not a numeric constant"),
                      ("LEARNING_RATE: log 1e-3 1e-2", "listed twice"),
                      ("learning_rate: log 1e-3 1e-2", "not a search-space line")):
        with pytest.raises(HarnessError) as e:
            search_space(TRAIN, head + line + "\n", cuda=False)
        msg = str(e.value)
        assert f"program.md line 4 ({line!r})" in msg and why in msg and "expected NAME: log|float|int" in msg, msg
    with pytest.raises(HarnessError, match="lists no constants"):
        search_space(TRAIN, "## Search space\n\n## Rules\n", cuda=False)


def test_apply_params_edits_only_the_active_preset():
    space = search_space(TRAIN, "", cuda=False)
    params = {"LEARNING_RATE": 0.002, "BATCH_SIZE": 96, "LOGIT_SCALE_INIT": 20.0, "WARMUP_FRAC": 0.1}
    sub = [p for p in space if p.name in params]
    new = apply_params(TRAIN, {p.name: p.literal(params[p.name]) for p in sub}, cuda=False)
    assert "    LEARNING_RATE = 0.002\n    BATCH_SIZE = 96\n" in new                # the cpu (else) block
    assert "    LEARNING_RATE = 2e-4\n    BATCH_SIZE = 64\n" in new                 # the cuda block untouched
    assert "LOGIT_SCALE_INIT = 20.0\n" in new and "WARMUP_FRAC = 0.1  # fraction of the time budget" in new
    changed = [(a, b) for a, b in zip(TRAIN.split("\n"), new.split("\n")) if a != b]
    assert len(changed) == 4 and len(TRAIN.split("\n")) == len(new.split("\n"))
    consts = hyperparameters(new, cuda=False)
    assert {n: _number(consts[n].value) for n in params} == params
    # ast offsets are bytes: a non-ASCII character earlier on the same line must not shift the edit
    assert apply_params("A = 'é'; LR = 0.1  # é\n", {"LR": "0.5"}, cuda=False) == "A = 'é'; LR = 0.5  # é\n"
    with pytest.raises(HarnessError, match="no longer has the searched constant"):
        apply_params("X = 1\n", {"LR": "0.5"}, cuda=False)


def test_literals_descriptions_and_random_trials():
    space = [Param("LR", "log", 1e-5, 1e-2), Param("CAP", "float", 10.0, 400.0), Param("B", "int", 8, 64)]
    assert [space[1].literal(100.0), space[0].literal(1.234567e-4), space[2].literal(32)] == ["100.0", "0.0001235",
                                                                                                "32"]
    trials = [random_params(space, 7, k) for k in range(40)]
    assert trials[:3] == [random_params(space, 7, k) for k in range(3)]          # reproducible from (seed, k)
    assert trials[0] != random_params(space, 8, 0) and len({str(t) for t in trials}) == 40
    for t in trials:
        assert 1e-5 <= t["LR"] <= 1e-2 and 10 <= t["CAP"] <= 400 and 8 <= t["B"] <= 64 and isinstance(t["B"], int)
        desc = format_params(space, t)
        assert parse_params(desc, space) == t and "\t" not in desc
    lrs = sorted(t["LR"] for t in trials)
    assert lrs[0] < 1e-4 and lrs[-1] > 1e-3          # log-uniform: every decade is visited
    assert parse_params("LR=0.001 CAP=20.0", space) is None                  # not a whole trial
    assert parse_params("raise the learning rate", space) is None


def test_history_from_rows_failed_and_interrupted_trials():
    space = [Param("LR", "log", 1e-5, 1e-2)]

    def row(exp, status, lr, runs="", value="", agent="random"):
        return {"experiment": str(exp), "status": status, "description": f"LR={lr}" if lr else "",
                "runs": runs, "val_mean_rank": value, "agent": agent}
    rows = [row(0, "baseline", None, "50", "50"), row(1, "discard", 0.001, "40,42", "40"),
            row(2, "crash", 0.002, "12", "12"), row(3, "timeout", 0.003), row(4, "interrupted", 0.004),
            row(5, "keep", 0.005, "", "30"), row(6, "interrupted", None), row(7, "discard", 0.009, agent="llm"),
            row(8, "interrupted", 0.006)]
    done, pending = tuner_trials(rows, "random", space, MR)      # a crash is a failed trial, whatever it printed
    assert done == [({"LR": 0.001}, 41.0), ({"LR": 0.002}, None), ({"LR": 0.003}, None), ({"LR": 0.005}, 30.0)]
    assert pending == [{"LR": 0.004}, {"LR": 0.006}]
    mr = Metric("mean_rank", "minimize")                    # the loop's own rows are typed: the same history
    assert tuner_trials([typed_row(r, mr) for r in rows], "random", space, mr) == (done, pending)
    done, pending = tuner_trials(rows + [row(9, "discard", 0.004, "45", "45")], "random", space, MR)
    assert pending == [{"LR": 0.006}] and done[-1] == ({"LR": 0.004}, 45.0)
    with pytest.raises(HarnessError, match="experiment 9 .* not a trial of this search space"):
        tuner_trials(rows + [row(9, "discard", None)], "random", space, MR)


def test_optuna_sees_every_result_and_asks_for_new_trials():
    optuna = pytest.importorskip("optuna")
    space = [Param("LR", "log", 1e-5, 1e-2), Param("B", "int", 8, 64)]
    s = OptunaSampler(space, 0, MR)
    done = [({"LR": 1e-3, "B": 16}, 40.0), ({"LR": 5e-3, "B": 60}, None)]            # recorded before: --resume
    first = s.propose(done)
    assert 1e-5 <= first["LR"] <= 1e-2 and first == {p.name: p.snap(first[p.name]) for p in space}
    study = s.study(done + [(first, 35.0)])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                               optuna.trial.TrialState.COMPLETE]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE and study.best_value == 35.0
    assert OptunaSampler(space, 0, MR).propose(done) == first      # a fresh sampler, as after --resume: the same
    assert first != s.propose([])                                  # ... and not seeded like the run's start
    assert s.propose(done + [(first, 35.0)]) not in (first, s.propose([]))
    up = OptunaSampler(space, 0, Metric("accuracy", "maximize"))   # a fork's metric
    study = up.study(done)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.best_value == 40.0


def test_optuna_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)                   # import optuna raises ImportError
    with pytest.raises(HarnessError, match=r"pip install optuna"):
        OptunaSampler([Param("LR", "log", 1e-5, 1e-2)], 0, MR)


def test_compare_line_counts_keeps_confirmed_by_the_run_after_them():
    def row(exp, status, best, runs="", after="", wall="1800", agent="optuna", commit="c"):
        return {"experiment": str(exp), "status": status, "best": best, "runs": runs, "after_runs": after,
                "val_mean_rank": runs.split(",")[0], "wall_seconds": wall, "agent": agent, "best_commit": commit,
                "model_seconds": "0", "run_seconds": "0"}
    rows = [row(0, "baseline", "50", "49,51", commit="c0"), row(1, "keep", "44", "40,48", "51", commit="c1"),
            row(2, "discard", "44", "47", commit="c1"), row(3, "keep", "37", "36,38", "40", commit="c3"),
            row(4, "keep", "30", "30", commit="c4"), row(5, "crash", "30", commit="c4")]
    c = compare_line(rows, {"c4": 31.5, "c1": 99.0}, MR)
    # keep 1: the run after it, 51, does not beat the 50 before it; keep 3's, 40, beats 44; keep 4 has none
    assert (c["survived"], c["checked"], c["keeps"], c["experiments"]) == (1, 2, 3, 5)
    assert (c["best"], c["test"], c["agent"], c["per_hour"]) == (30.0, 31.5, "optuna", 5 / 3)
    assert c["sides"] == {"optuna": [5, 3]} and sides_text(c["sides"]) == "optuna 5 (100%), 3 keeps"
    assert best_so_far(rows)[-1] == (5, 3.0, 30.0) and best_so_far(rows)[1] == (1, 1.0, 44.0)
    # higher is better: keep 1's run after, 52, beats 50; keep 2's, 53, does not beat 54
    up = [row(0, "baseline", "50", "49,51"), row(1, "keep", "54", "55,53", "52"), row(2, "keep", "57.5", "60,55", "53")]
    c = compare_line(up, {}, Metric("accuracy", "maximize"))
    assert (c["survived"], c["checked"], c["best"]) == (1, 2, 57.5)


# ---------------------------------------------------------------- through the real loop



def harness(repo, env, *args, timeout=600):
    p = subprocess.run([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def interrupt_at(repo, env, exp, *args):
    """Start the harness and Ctrl-C it as soon as experiment `exp` has started its run.sh."""
    p = subprocess.Popen([sys.executable, "autoresearch.py", *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log, running, t0 = repo / "logs" / f"{exp}.log", repo / "runs" / ".running", time.time()
    while not (log.exists() and running.exists()):     # the pid file is written once run.sh is spawned
        assert p.poll() is None and time.time() - t0 < 600, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, out + err


def expected_status(params, best_before):
    if params["HEATMAP_HEADS"] != 4:
        return "crash", None
    value = 36.25 if params["TEXT_ON"] == 1 else float(N_VAL)
    return ("keep" if value < best_before else "discard"), value


def check_run(repo, rows, agent):
    """Every trial's outcome follows from its parameters; git holds exactly the keeps; train.py is the best."""
    cuda = __import__("torch").cuda.is_available()
    space = search_space(TRAIN.replace(HEADS, HEADS + "TEXT_ON = 0\n"), SPACE_BLOCK, cuda)
    assert all(r["agent"] == agent for r in rows)
    best, best_params = float(N_VAL), None
    for r in rows[1:]:
        params = parse_params(r["description"], space)
        assert params is not None, r
        if r["status"] == "interrupted":
            continue
        status, value = expected_status(params, best)
        assert r["status"] == status, (r, params)
        if value is not None:
            assert float(r["val_mean_rank"]) == value
        if status == "keep":
            best, best_params = value, params
            assert git(repo, "log", "-1", "--format=%s", r["commit"]).startswith(f"exp {r['experiment']}: TEXT_ON=1")
    subjects = git(repo, "log", "--format=%s", "main..HEAD").split("\n")
    assert [s.split(":")[0] for s in subjects if s] == [f"exp {r['experiment']}" for r in reversed(rows)
                                                        if r["status"] == "keep"]
    assert git(repo, "status", "--porcelain") == ""
    src = (repo / "train.py").read_text()
    if best_params:
        consts = hyperparameters(src, cuda)
        assert {n: _number(consts[n].value) for n in best_params} == best_params
    else:
        assert src.strip() == git(repo, "show", "main:train.py")
    return space


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One repo, two tuner runs (random, then optuna from main), each interrupted once and resumed."""
    base = tmp_path_factory.mktemp("tuner")
    data, repo = base / "data", base / "repo"
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--out", str(data), "--n-train", "128",
                    "--n-val", str(N_VAL), "--n-test", "40"], check=True, capture_output=True)
    repo.mkdir()
    copy_into(repo, FILES)
    assert TRAIN.count(IMG_OK) == 1 and TRAIN.count(TXT_OK) == 1 and TRAIN.count(HEADS) == 1
    (repo / "train.py").write_text(TRAIN.replace(IMG_OK, IMG_BAD).replace(TXT_OK, TXT_SWITCH)
                                   .replace(HEADS, HEADS + "TEXT_ON = 0\n"))
    shipped = (repo / "program.md").read_text()
    (repo / "program.md").write_text(shipped[:shipped.index("## Search space")] + SPACE_BLOCK)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "template")
    env = dict(os.environ, OLLAMA_HOST="http://127.0.0.1:9", AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(data),
               AUTORESEARCH_TIME_BUDGET="2", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PYTHONUNBUFFERED="1")   # nothing listens on port 9: no Ollama
    env.pop("AUTORESEARCH_SANDBOX", None)
    common = ["--noise-runs", "2", "--max-experiments", "3"]
    interrupt_at(repo, env, 2, "--agent", "random", "--tag", "rnd", *common)
    random_rows = [dict(r) for r in load_results(str(repo / "results.tsv"))]
    harness(repo, env, "--resume", *common)               # the agent comes from results.tsv
    out = {"random_before": random_rows, "random": load_results(str(repo / "results.tsv"))}
    out["random_space"] = check_run(repo, out["random"], "random")
    shutil.move(repo / "results.tsv", repo / "results-rnd.tsv")
    shutil.rmtree(repo / "logs")                          # experiment numbers start again at 0
    git(repo, "checkout", "-q", "main")
    common = ["--noise-runs", "2", "--max-experiments", "2"]
    interrupt_at(repo, env, 2, "--agent", "optuna", "--tag", "opt", *common)
    harness(repo, env, "--resume", *common)
    out["optuna"] = load_results(str(repo / "results.tsv"))
    out["optuna_space"] = check_run(repo, out["optuna"], "optuna")
    out["repo"], out["env"] = repo, env
    return out


@pytest.mark.sandbox
def test_random_agent_through_the_loop_and_resume(tuned):
    rows, space = tuned["random"], tuned["random_space"]
    assert [r["status"] for r in tuned["random_before"]] == ["baseline", "discard", "interrupted"]
    statuses = [r["status"] for r in rows]
    assert statuses == ["baseline", "discard", "interrupted", "crash", "keep"], statuses
    trials = [parse_params(r["description"], space) for r in rows[1:]]
    # seed 0: trial k is random_params(space, 0, k); the interrupted trial 1 ran again, none lost or repeated
    expect = [random_params(space, 0, k) for k in range(3)]
    assert trials == [expect[0], expect[1], expect[1], expect[2]]


@pytest.mark.sandbox
def test_optuna_agent_through_the_loop_and_resume(tuned):
    rows, space = tuned["optuna"], tuned["optuna_space"]
    statuses = [r["status"] for r in rows]
    assert statuses[:3] == ["baseline", statuses[1], "interrupted"] and len(statuses) == 4, statuses
    assert "interrupted" not in statuses[3:] and statuses[1] in ("keep", "discard", "crash")
    trials = [parse_params(r["description"], space) for r in rows[1:]]
    assert trials[2] == trials[1] and trials[0] != trials[1]          # the interrupted trial ran again, once
    assert (tuned["repo"] / "results-rnd.tsv").exists()


@pytest.mark.sandbox
def test_report_compare_draws_both_runs(tuned):
    repo = tuned["repo"]
    p = harness(repo, tuned["env"], "report", "--compare", "rnd", "opt")
    assert "wrote compare.png" in p.stdout
    lines = {line.split()[0]: line.split() for line in p.stdout.split("\n") if line.split()[:1] in (["rnd"], ["opt"])}
    scores = load_test_scores(project_metric(str(repo)), str(repo / "test_scores.tsv"))
    for tag, rows in (("rnd", tuned["random"]), ("opt", tuned["optuna"])):
        best, best_commit, _, _ = state_from_rows(rows)
        cells = lines[tag]
        assert cells[1] == {"rnd": "random", "opt": "optuna"}[tag] and int(cells[2]) == sum(r["status"] not in ("baseline", "interrupted") for r in rows)
        assert float(cells[3]) == best and float(cells[4]) == float(f"{scores[best_commit]:.4g}")  # tested at the end
        assert int(cells[5]) == sum(r["status"] == "keep" for r in rows)
        # every keep has its run after it, and the project is deterministic: each one held ("-": no keep to check)
        confirmed = sum(r["status"] == "keep" and bool(r.get("after_runs")) for r in rows)
        assert cells[7] == (f"{confirmed}/{confirmed}" if confirmed else "-"), (cells, rows)
    assert lines["rnd"][7] == "1/1"   # random's one keep (the text encoder switched on) held
    assert scores[tuned["random"][-1]["commit"]] == 30.25    # the kept text encoder: ((40 + 1) / 2 + 40) / 2
    from matplotlib.image import imread
    img = imread(str(repo / "compare.png"))[..., :3]
    h, w, _ = img.shape
    assert 1200 <= w <= 1600 and 500 <= h <= 700
    for color in ("#1f77b4", "#ff7f0e"):                  # C0 = rnd, C1 = opt: a line in each panel
        rgb = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        near = (abs(img - rgb).max(axis=2) < 0.08)
        # (over wall-clock hours a run's line is as long as the run: the shorter one can be a short stroke)
        assert near[:, : w // 2].sum() > 400 and near[:, w // 2:].sum() > 100, color
    r = subprocess.run([sys.executable, "autoresearch.py", "report", "--compare", "rnd", "nosuch"], cwd=repo,
                       env=tuned["env"], capture_output=True, text=True)
    assert r.returncode == 2 and "results-nosuch.tsv does not exist" in r.stderr and "mv results.tsv" in r.stderr
