"""--agent hybrid (engine/hybrid.py): who proposes each trial, the shift away from a failing model, the proposer column,
resume in the middle of a hybrid run, report --compare's sides. The loop runs for real on a real git repository with
its runs scripted (each run's value a function of the train.py it ran, no sandbox); the model is the loopback Ollama
server of tests/fake_ollama.py, reached through the real ollama client."""
import math
import os
import signal
import subprocess
import sys
import types

import ollama
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from conftest import git, scripted_loop  # noqa: E402
from engine.agent import LLMAgent  # noqa: E402
from engine.hybrid import (LLM_SHARE, SHARE_RANGE, Hybrid, llm_share, next_side, shift_note,  # noqa: E402
                           tuner_notes)
from engine.project import Metric  # noqa: E402
from engine.report import compare_line, sides_text  # noqa: E402
from engine.results import load_results  # noqa: E402
from engine.tuners import Tuner, parse_params  # noqa: E402
from engine.util import read_text  # noqa: E402
from fake_ollama import FakeOllama, text, tool_call  # noqa: E402

MIN = Metric("loss", "minimize")
MODEL = "qwen2.5-coder:7b"


def simulate(n, status_of, rows=None):
    """n trials from `rows` on: next_side picks the side, status_of(side) is the trial's verdict."""
    rows = rows or [{"status": "baseline"}]
    for _ in range(n):
        side = next_side(rows, [])
        rows.append({"status": status_of(side), "proposer": "llm" if side == "llm" else "optuna", "reason": "r"})
    return rows


def sides(rows):
    return "".join(r["proposer"][0] for r in rows if r.get("proposer"))


# ---------------------------------------------------------------- the share (pure)

def test_equal_records_give_the_llm_its_share_from_the_first_trial():
    alike = simulate(20, lambda side: "discard")
    assert sides(alike)[0] == "l" and sides(alike).count("l") == 6 and llm_share(alike) == LLM_SHARE
    count = {"llm": 0, "tuner": 0}

    def one_in_three(side):   # each side keeps one trial in three
        count[side] += 1
        return "keep" if count[side] % 3 == 1 else "discard"
    both = simulate(30, one_in_three)
    assert abs(llm_share(both) - LLM_SHARE) < 0.05, llm_share(both)


def test_the_share_follows_each_sides_record_within_its_range():
    good = simulate(20, lambda side: "keep" if side == "llm" else "discard")
    assert llm_share(good) == SHARE_RANGE[1] and sides(good).count("l") >= 10
    weak = simulate(20, lambda side: "discard" if side == "llm" else "keep")
    assert SHARE_RANGE[0] <= llm_share(weak) < LLM_SHARE and sides(weak).count("l") < 6


def test_a_failing_model_hands_its_trials_to_the_tuner_and_never_stalls():
    for failure in ("invalid", "crash", "timeout"):
        rows = simulate(30, lambda side: failure if side == "llm" else "discard")
        assert llm_share(rows) == SHARE_RANGE[0]
        llm = sides(rows).count("l")
        assert 2 <= llm <= 0.15 * 30, (failure, sides(rows))   # still asked now and then, far less than 30%
    first = simulate(1, lambda side: "invalid")
    note = shift_note(first)
    assert note.startswith("hybrid: the model's trial failed (invalid: r); its share of the trials falls from 30% to")
    assert shift_note(simulate(1, lambda side: "discard")) is None                 # a trial that ran: no shift
    assert shift_note(first + [{"status": "discard", "proposer": "optuna"}]) is None  # said once, not every trial


def test_interrupted_trials_are_asked_again_of_the_side_that_proposed_them():
    rows = simulate(7, lambda side: "discard")
    for side, proposer in (("llm", "llm"), ("tuner", "optuna")):
        assert next_side(rows + [{"status": "interrupted", "proposer": proposer}], []) == next_side(rows, [])
    assert next_side([{"status": "baseline"}], pending=[{"LR": 1.0}]) == "tuner"   # the tuner's to run again, first


def test_the_model_is_told_the_tuners_best_and_latest_trials():
    space = Tuner("optuna", "LR = 1.0\n", "## Search space\nLR: log 0.5 2\n", False, 0, MIN).space
    assert "no result yet" in tuner_notes([], space, MIN)
    notes = tuner_notes([({"LR": 0.5}, 90.0), ({"LR": 2.0}, None), ({"LR": 1.5}, 80.0)], space, MIN)
    assert "it has run 3 trials; its best, val_loss 80: LR=1.5" in notes and "- LR=2.0: failed" in notes
    assert "change what it cannot (the code)" in notes


# ---------------------------------------------------------------- through the loop

NOISE = (0.0, 0.03, -0.03, 0.01, -0.01)


def value(train, seed):
    """A run's value from the train.py it ran: each STEP line the model added is 20% better, LR far from 1 slightly
    worse, and seeds differ by up to 3% (the noise the baseline measures)."""
    lr = float(train.split("LR = ")[1].split()[0])
    return round(100 * 0.8 ** train.count("STEP") * (1 + 0.02 * abs(math.log(lr))) * (1 + NOISE[seed % 5]), 4)


@pytest.fixture
def repo(scripted_project):
    yield scripted_project
    signal.signal(signal.SIGINT, signal.default_int_handler)   # an interrupted round ignores a second Ctrl-C


def hybrid_loop(url, stop=None, **kw):
    a = types.SimpleNamespace(tag="t", resume=False, rule="screen", noise_runs=3, time_budget=60, allowance=None,
                              max_experiments=8, workers=1, fix_attempts=1, phase_every=10, phase_plateau=5,
                              model=MODEL, num_ctx=16384, temperature=0.0, max_turns=4, max_tool_calls=8,
                              max_nudges=1, max_invalid=2, agent="hybrid", **kw)
    llm = LLMAgent(a, ollama.Client(host=url), MIN, read_text("program.md"))
    return scripted_loop(a, Hybrid(llm, Tuner("optuna", read_text("train.py"), read_text("program.md"), False, 0, MIN)),
                         lambda label, seed, train: value(train, seed), stop)


def test_a_model_that_never_calls_a_tool_leaves_the_search_to_the_tuner(repo, capsys):
    with FakeOllama({MODEL: 32768}, [], on_exhausted=text("I would lower the learning rate.")) as fake:
        hybrid_loop(fake.url).main()
    rows = load_results(metric=MIN)
    trials = [r for r in rows if r["status"] != "baseline"]
    llm = [r for r in trials if r["proposer"] == "llm"]
    assert len(trials) == 8 and [r["status"] for r in llm] == ["invalid"] * len(llm) and 1 <= len(llm) <= 2
    assert all(r["agent"] == "hybrid" for r in rows) and all(r["reason"] == "no tool call after repeated nudges"
                                                             for r in llm)
    space = Tuner("optuna", "LR = 1.0\n", read_text("program.md"), False, 0, MIN).space
    tuned = [r for r in trials if r["proposer"] == "optuna"]
    assert len(tuned) >= 6 and all(r["status"] in ("keep", "discard") and parse_params(r["description"], space)
                                   for r in tuned)
    assert "its share of the trials falls from 30% to" in capsys.readouterr().out
    assert fake.remaining == 0 and git(repo, "status", "--porcelain") == ""
    assert sides_text(compare_line(rows, {}, MIN)["sides"]) == f"llm {len(llm)} ({len(llm) / 8:.0%}), 0 keeps; " \
                                                               f"optuna {len(tuned)} ({len(tuned) / 8:.0%}), " \
                                                               f"{sum(r['status'] == 'keep' for r in tuned)} keep" + \
        "s" * (sum(r["status"] == "keep" for r in tuned) != 1)


def adds_a_step(req):
    """The scripted model: it reads the tuner's notes in its prompt and adds a STEP line (a 20% gain) to train.py."""
    assert "The tuner (TPE over program.md's ## Search space)" in req["messages"][1]["content"]
    return tool_call("edit_file", path="train.py", old_text="LR = ", new_text="STEP = 1\nLR = ")


def the_model(req):
    return adds_a_step(req) if req["messages"][-1]["role"] == "user" else \
        tool_call("run_experiment", description="one more step")


def run_with_model(stop=None, resume=False):
    with FakeOllama({MODEL: 32768}, [], on_exhausted=the_model) as fake:
        loop = hybrid_loop(fake.url, stop)
        loop.args.resume = resume
        loop.main()
    return loop


def trial_rows(rows):
    return [(r["proposer"], r["description"], r["status"], r["runs"]) for r in rows if r["status"] != "interrupted"]


def test_resume_in_the_middle_of_a_hybrid_run_loses_and_repeats_no_trial(repo, tmp_path_factory):
    run_with_model()
    whole = load_results(metric=MIN)
    os.rename("results.tsv", str(tmp_path_factory.mktemp("whole") / "results.tsv"))
    assert [r["proposer"] for r in whole if r["proposer"] == "llm" and r["status"] == "keep"], whole   # it kept code
    assert {r["proposer"] for r in whole[1:]} == {"llm", "optuna"}
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-D", "autoresearch/t")
    for p in ("runs", "logs"):
        subprocess.run(["rm", "-rf", p], check=True)
    for stop, resume in ((5, False), (6, True)):   # Ctrl-C in the LLM's first trial, then in the tuner's first
        with pytest.raises(KeyboardInterrupt):
            run_with_model(stop, resume)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run_with_model(resume=True)
    rows = load_results(metric=MIN)
    assert [r["proposer"] for r in rows if r["status"] == "interrupted"] == ["llm", "optuna"]
    assert trial_rows(rows) == trial_rows(whole)
    assert git(repo, "status", "--porcelain") == ""
