"""Unit tests of autoresearch.py's pure functions (plus results.tsv I/O and resume reconciliation on real git)."""
import json
import os
import re
import sys
import time
import types

import pytest
from pathlib import Path
from conftest import assert_plot_marks, git

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from engine.agent import (CHARS_PER_TOKEN, TOKEN_RESERVE, TOOLS, LLMAgent, apply_edit, build_system_prompt,
    build_user_message, check_path, parse_error, parse_phases, parse_tool_calls, phase_index, train_limit, unwritable)
from engine.branch import commit_keep, prepare, save_notes
from engine.judge import baseline_failure, budget_allowance, classify_run, last_loss, parse_metrics, pooled_cv
from engine.loop import Loop
from engine.project import MORE_COLUMNS, Metric, project_metric
from engine.repo import check_argv, spawn
from engine.report import report, summarize, write_report
from engine.results import (Outcome, append_row, commit_message, decision_line, load_results, make_row, noise_groups,
    parse_trailers, pending_baseline, state_from_rows, typed_row)
from engine.runs import run_memory
from engine.settings import MEMORY_RESERVE, MEMORY_WAITING, check_environment, env_int, parse_args, run_budget
from engine.util import HarnessError, clean_text, encodable, read_text, write_text


# ---------------------------------------------------------------- the metric, declared once by the project

ACC = Metric("accuracy", "maximize")   # a fork's metric: higher is better
MR = Metric("mean_rank", "minimize")   # this project's


def test_project_metric_is_read_from_prepare_data(tmp_path):
    assert project_metric(ROOT) == ("mean_rank", "minimize") == Metric("mean_rank", "minimize")
    (tmp_path / "prepare_data.py").write_text('"""METRIC = "fake" in a docstring is not a declaration"""\n'
                                              'import torch\nMETRIC = "accuracy"\nDIRECTION = "maximize"\n')
    name, direction = m = project_metric(str(tmp_path))      # read with ast: torch is never imported
    assert (name, direction, m.column, m.better) == ("accuracy", "maximize", "val_accuracy", "higher")
    assert m.columns[:6] == ["experiment", "commit", "val_accuracy", "delta", "status", "description"]
    for bad, example, found in (
            ('METRIC = "Accuracy"\nDIRECTION = "maximize"\n', 'METRIC = "accuracy"', "found 'Accuracy'"),
            ('METRIC = "accuracy"\nDIRECTION = "up"\n', 'DIRECTION = "maximize"  (or "minimize")', "found 'up'"),
            ('NAME = "acc"\nMETRIC = NAME\nDIRECTION = "maximize"\n', 'METRIC = "accuracy"',
             "found an expression, not a literal"),
            ('METRIC = "accuracy"\n', 'DIRECTION = "maximize"', "found none"),
            ('if True:\n    METRIC = "accuracy"\nDIRECTION = "maximize"\n', 'METRIC = "accuracy"', "found none"),
            ('METRIC = "accuracy"\nMETRIC = "r1"\nDIRECTION = "maximize"\n', 'METRIC = "accuracy"',
             "declares it more than once")):
        (tmp_path / "prepare_data.py").write_text(bad)
        with pytest.raises(HarnessError) as e:
            project_metric(str(tmp_path))
        assert found in str(e.value) and example in str(e.value), str(e.value)
    (tmp_path / "prepare_data.py").unlink()
    with pytest.raises(HarnessError, match="prepare_data.py is missing"):
        project_metric(str(tmp_path))


def test_no_metric_is_written_into_the_harness():
    src = "".join(p.read_text() for p in [Path(ROOT) / "autoresearch.py", *sorted((Path(ROOT) / "engine").glob("*.py"))])
    for literal in ("mean_rank", "median_rank", "lower is better", "higher is better"):
        assert literal not in src, literal


# ---------------------------------------------------------------- tool-call parsing

def test_native_tool_calls_win_over_content():
    calls = parse_tool_calls('{"name": "read_file", "arguments": {"path": "x"}}',
                                [{"function": {"name": "edit_file", "arguments": {"path": "train.py"}}}])
    assert calls == [("edit_file", {"path": "train.py"})]


def test_native_arguments_as_json_string():
    calls = parse_tool_calls("", [{"function": {"name": "run_experiment", "arguments": '{"description": "d"}'}}])
    assert calls == [("run_experiment", {"description": "d"})]


@pytest.mark.parametrize("content", [
    '{"name": "read_file", "arguments": {"path": "train.py"}}',
    'I will read it.\n```json\n{"name": "read_file", "arguments": {"path": "train.py"}}\n```',
    '<tool_call>\n{"name": "read_file", "arguments": {"path": "train.py"}}\n</tool_call>',
    '{"name": "read_file", "parameters": {"path": "train.py"}}',
    '{"function": {"name": "read_file", "arguments": "{\\"path\\": \\"train.py\\"}"}}',
    '[{"name": "read_file", "arguments": {"path": "train.py"}}]',
])
def test_tool_call_in_content(content):
    assert parse_tool_calls(content, []) == [("read_file", {"path": "train.py"})]


def test_content_calls_with_raw_newlines_and_several_calls():
    content = ('first {"name": "edit_file", "arguments": {"path": "train.py", "old_text": "A = 1\nB = 2",'
               ' "new_text": "A = 2\nB = 2"}} then\n{"name": "run_experiment", "arguments": {"description": "x"}}')
    calls = parse_tool_calls(content)
    assert [c[0] for c in calls] == ["edit_file", "run_experiment"]
    assert calls[0][1]["old_text"] == "A = 1\nB = 2"


def test_content_without_calls():
    assert parse_tool_calls("Let me think. CONFIG = {'lr': 1} and {\"lr\": 2}", None) == []
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}') == []   # unknown tools are not calls
    assert parse_tool_calls("{ broken json", None) == []
    assert parse_tool_calls("", None) == []


# ---------------------------------------------------------------- metric parsing

GOOD = ("train| step 1 | loss 3.1\n--- trusted evaluation ---\nval_mean_rank: 12.5\nval_median_rank: 9\nval_n: 64\n"
        "total_seconds: 20\n")


def test_metrics_from_trusted_block():
    m = parse_metrics(GOOD)
    assert m == {"val_mean_rank": 12.5, "val_median_rank": 9.0, "val_n": 64.0, "total_seconds": 20.0}


@pytest.mark.parametrize("forged", [
    "train| val_mean_rank: 0.5\n",                                   # prefixed line
    "train| x\rval_mean_rank: 0.5\n",                                # \r trick: splitlines() would split here
    "train| x\x0bval_mean_rank: 0.5\n",                              # vertical tab
    "train| x\x1cval_mean_rank: 0.5\n",                              # file separator
    "train| x\u2028val_mean_rank: 0.5\n",                            # unicode line separator
    "train| --- trusted evaluation ---\nval_mean_rank: 0.5\n",       # marker inside training output
])
def test_forged_metric_lines_are_ignored(forged):
    assert parse_metrics(forged + GOOD)["val_mean_rank"] == 12.5
    assert "val_mean_rank" not in parse_metrics(forged)


def test_metric_line_must_match_exactly():
    out = "--- trusted evaluation ---\nval_mean_rank: 1.0\rval_mean_rank: 0.1\nval_r5:0.3\n"
    assert parse_metrics(out) == {}
    assert parse_metrics("val_mean_rank: 3\n") == {}          # no trusted block at all
    # output that forges a block from inside the evaluator: a second marker or a repeated key voids the run
    assert parse_metrics(GOOD + "--- trusted evaluation ---\nval_mean_rank: 0.5\n") == {}
    assert parse_metrics(GOOD.replace("val_n: 64", "val_mean_rank: 0.5")) == {}


def test_classify_run():
    assert classify_run(0, GOOD, parse_metrics(GOOD), MR) == ("ok", "")
    assert classify_run(124, "x\nrun.sh: TIMEOUT after 305s\n", {}, MR)[0] == "timeout"
    # the exit code alone decides (README: run.sh exit codes); run.sh's last own line is only the reason, and text that reads
    # like another verdict (the candidate writes part of the output) changes nothing
    assert classify_run(1, "x\nrun.sh: TIMEOUT after 305s", {}, MR) == ("crash", "run.sh exit 1: run.sh: TIMEOUT after "
                                                                             "305s")
    assert classify_run(0, GOOD + "run.sh: OUT OF MEMORY\n", parse_metrics(GOOD), MR) == ("ok", "")
    refused = "train| run.sh: forged\nrun.sh: evaluation refused the hand-off: batch dependence\n"
    assert classify_run(3, refused, {}, MR) == ("crash", "run.sh exit 3: run.sh: evaluation refused the hand-off: batch "
                                                        "dependence")
    for rc, sig in ((130, "INT"), (143, "TERM")):
        out = f"train| step 9\nrun.sh: INTERRUPTED by SIG{sig}; training/evaluation stopped and cleaned up\n"
        assert classify_run(rc, out, {}, MR) == ("interrupted", out.split("\n")[1])
    assert classify_run(0, "no metric\n", {}, MR) == ("crash", "no trusted metric")
    assert classify_run(137, "run.sh: OUT OF MEMORY (16g)\n", {}, MR) == ("crash", "out of memory")
    status, reason = classify_run(1, "train| Traceback\ntrain| RuntimeError: boom\n", {}, MR)
    assert status == "crash" and "boom" in reason
    assert classify_run(0, "no metric\n", {}, MR)[0] == "crash"     # exit 0 without a metric is not ok


def test_classify_run_reads_the_declared_metric():
    out = "--- trusted evaluation ---\nval_accuracy: 0.75\nval_mean_rank: 3\n"
    assert classify_run(0, out, parse_metrics(out), ACC) == ("ok", "")
    rank_only = "--- trusted evaluation ---\nval_mean_rank: 3\n"
    assert classify_run(0, rank_only, parse_metrics(rank_only), ACC)[0] == "crash"


def test_last_loss():
    assert last_loss("train| step 120 | loss 3.1234 | lr 2.0e-04 | 45.2/120s") == "3.1234"
    assert last_loss("step 1 | loss 3.0") is None                 # only train| lines
    assert last_loss("train| params 1.1M") is None


# ---------------------------------------------------------------- editing and paths

def test_apply_edit():
    text = "A = 1\nB = 2\nB = 2\n"
    assert apply_edit(text, "A = 1", "A = 3") == ("A = 3\nB = 2\nB = 2\n", None)
    new, err = apply_edit(text, "B = 2", "B = 3")
    assert new is None and "2 times" in err
    new, err = apply_edit(text, "A = 9", "x")
    assert new is None and "not found" in err and "A = 1" in err          # closest line as a hint
    assert apply_edit(text, "", "x")[1]
    assert apply_edit(text, None, "x")[1]


def test_check_path(tmp_path):
    (tmp_path / "train.py").write_text("x")
    (tmp_path / "secret").write_text("s")
    os.symlink("/etc/passwd", tmp_path / "scratchpad.md")
    allowed = {"train.py", "scratchpad.md", "logs/3.log"}
    assert check_path(str(tmp_path), "train.py", allowed) == ("train.py", None)
    assert check_path(str(tmp_path), "./train.py", allowed) == ("train.py", None)
    assert check_path(str(tmp_path), "logs/3.log", allowed) == ("logs/3.log", None)
    for bad, why in [("/etc/passwd", "absolute"), ("../train.py", ".."), ("logs/../train.py", ".."),
                     ("secret", "not allowed"), ("prepare_data.py", "not allowed"), ("scratchpad.md", "symlink"),
                     ("", "non-empty"), (None, "non-empty"), ("~/x", "absolute"), ("C:/x", "absolute")]:
        rel, err = check_path(str(tmp_path), bad, allowed)
        assert rel is None and why in err, (bad, err)


def test_symlinked_directory_is_refused(tmp_path):
    os.symlink("/tmp", tmp_path / "logs")
    rel, err = check_path(str(tmp_path), "logs/3.log", {"logs/3.log"})
    assert rel is None and "symlink" in err


def test_allowlist():
    assert check_argv(["git", "status", "--porcelain"]) is None
    assert check_argv(["./run.sh", "--test", "runs/0"]) is None
    assert check_argv(["podman", "image", "exists", "localhost/autoresearch:abc"]) is None   # the start-up check
    assert check_argv(["ollama", "serve"]) is None
    for bad in ["git status", ["git", "push"], ["git", "clean", "-fdx"], ["git"], ["bash", "-c", "x"],
                ["ollama", "rm", "x"], ["python", "train.py"], [], ["git", 3], ("rm", "-rf", "/"), ["podman", "ps"],
                ["podman", "run", "x"], ["podman", "image", "exists", "a", "b"]]:
        assert check_argv(bad), bad
    with pytest.raises(PermissionError):
        spawn(["sh", "-c", "echo hi"])
    with pytest.raises(PermissionError):
        spawn("git status")


# ---------------------------------------------------------------- deciding: tests/test_keep_rule.py

# ---------------------------------------------------------------- phases and prompts

PROGRAM = ("# x\n## Phase 1: Hyperparameters\nfoo\n## Phase 2: Losses\n##Phase 3 : Architecture\n"
           "## Phase 4: Bold ideas\n")


def test_parse_phases():
    assert parse_phases(PROGRAM) == ["Phase 1: Hyperparameters", "Phase 2: Losses", "Phase 3: Architecture",
                                        "Phase 4: Bold ideas"]
    assert parse_phases("no phases") == ["Phase 1: free exploration"]
    with open(os.path.join(ROOT, "program.md")) as f:
        assert len(parse_phases(f.read())) == 4


def test_phase_index():
    assert phase_index(["baseline"], 4) == 0
    assert phase_index(["baseline"] + ["keep"] * 9, 4, every=10, plateau=5) == 0
    assert phase_index(["baseline"] + ["keep"] * 10, 4, every=10, plateau=5) == 1
    assert phase_index(["baseline"] + ["discard"] * 5, 4, every=10, plateau=5) == 1      # plateau
    assert phase_index(["baseline", "discard", "keep", "discard"], 4, every=10, plateau=2) == 0
    assert phase_index(["discard", "interrupted", "discard"], 4, every=10, plateau=2) == 1  # interrupted: no count
    assert phase_index(["discard"] * 100, 4, every=3, plateau=2) == 3                   # stays in the last


def rows_for(n):
    return [{"experiment": str(i), "status": "discard", "val_mean_rank": "50", "delta": "+1",
             "description": f"idea number {i}"} for i in range(n)]


def test_build_user_message():
    msg = build_user_message(MR, "LR = 1\n", "## Next ideas\n- a\n", rows_for(30), "val_mean_rank 40",
                                "Phase 2: Losses", "logs/29.log", max_rows=5)
    for part in ("Phase 2: Losses", "val_mean_rank 40", "LR = 1", "## Next ideas", "logs/29.log",
                 "idea number 29", "25 older experiments omitted"):
        assert part in msg, part
    assert "idea number 24" not in msg
    long = build_user_message(MR, "x", "A" * 5000 + "TAIL", [], "b", "p", scratch_chars=100)
    assert "TAIL" in long and "A" * 200 not in long and "cut" in long


def test_system_prompt_has_program_and_rules():
    s = build_system_prompt("PROGRAM TEXT", MR)
    assert s.startswith("PROGRAM TEXT") and "edit_file" in s and "run_experiment" in s and "exactly once" in s
    names = [t["function"]["name"] for t in TOOLS]
    assert names == ["read_file", "edit_file", "run_experiment"]
    assert TOOLS[1]["function"]["parameters"]["required"] == ["path", "old_text", "new_text"]


def test_prompts_name_the_declared_metric():
    program = "# fork\n## Research question\nWhich changes raise {metric}? ({better} is better)\n"
    system = build_system_prompt(program, ACC)
    assert "Which changes raise val_accuracy? (higher is better)" in system
    assert "only if val_accuracy (higher is better) improves" in system and "{" + "metric}" not in system
    rows = [{"experiment": "1", "status": "keep", "val_accuracy": 0.8125, "delta": 0.0625, "description": "wider"}]
    msg = build_user_message(ACC, "x", "", rows, "val_accuracy 0.8125", "p")
    assert "Recent results (higher val_accuracy is better):\nexp  status       val_accuracy   delta" in msg
    assert "1    keep         0.8125         0.0625    wider" in msg
    assert "(lower val_mean_rank is better)" in build_user_message(MR, "x", "", [], "b", "p")   # this project's


def test_commit_message_and_trailers():
    msg = commit_message(3, "raise lr\tto 4e-4\nbecause", "Phase 1: Hyperparameters", "keep", MR, 41.5, -2.25,
                            {"Runs": "41.5,42"})
    assert msg.split("\n")[0] == "exp 3: raise lr to 4e-4 because"
    tr = parse_trailers(msg)
    assert tr["Experiment"] == "3" and tr["Status"] == "keep" and tr["Metric"] == "val_mean_rank 41.5"
    assert tr["Delta"] == "-2.25" and tr["Phase"] == "Phase 1: Hyperparameters" and tr["Runs"] == "41.5,42"


# ---------------------------------------------------------------- results.tsv

def test_results_round_trip(tmp_path):
    path = str(tmp_path / "results.tsv")
    append_row({"experiment": 0, "commit": "abc", "val_mean_rank": "50", "delta": "0", "status": "baseline",
                   "description": "baseline", "runs": "50,51", "best": "50.5", "best_commit": "abc"}, MR, path)
    append_row({"experiment": 1, "commit": "def", "val_mean_rank": "45", "delta": "-5.5", "status": "keep",
                   "description": "tab\there\nnewline", "runs": "45,46", "best": "45.5", "best_commit": "def"}, MR, path)
    text = open(path).read()
    assert text.split("\n")[0].split("\t")[:6] == ["experiment", "commit", "val_mean_rank", "delta", "status",
                                                  "description"]
    rows = load_results(path)
    assert [r["status"] for r in rows] == ["baseline", "keep"]
    assert rows[1]["description"] == "tab here newline"
    assert state_from_rows(rows) == (45.5, "def", "1", "0")
    assert noise_groups(rows) == [[50.0, 51.0], [46.0]]   # a keep's group without the run that won its screen
    append_row({"experiment": 2, "status": "discard", "description": "d"}, MR, path)
    append_row({"experiment": 3, "status": "keep", "t": float("inf"), "sigma": 0.0}, MR, path)   # no noise: any gain
    assert [r["experiment"] for r in load_results(path)] == ["0", "1", "2", "3"] and load_results(path)[3]["t"] == "inf"


@pytest.mark.parametrize("damage, message", [
    (lambda t: "not a header\n" + t, "line 1 is not the header of a results file"),
    (lambda t: t + "2\tghi\t40\t-5", "line 4 is not a row autoresearch wrote (it has no newline at its end"),
    (lambda t: t.replace("\tkeep\t", "\tkeep\n", 1), f"line 3 is not a row autoresearch wrote (it has 5 cells, not {len(MR.columns)})"),
    (lambda t: t + "garbage here\n", "line 4 is not a row autoresearch wrote (it has 1 cells"),
    (lambda t: t.replace("\tkeep\t", "\tkept\t", 1), "line 3 is not a row autoresearch wrote (status is 'kept')"),
    (lambda t: t.replace("45,46", "45,x", 1), "line 3 is not a row autoresearch wrote (runs is '45,x')"),
    (lambda t: t.replace("\n1\t", "\none\t", 1), "line 3 is not a row autoresearch wrote (experiment is 'one')"),
], ids=["header", "torn", "short", "garbage", "status", "runs", "experiment"])
def test_a_damaged_results_tsv_is_refused_with_its_line_and_left_as_it_is(tmp_path, monkeypatch, damage, message):
    path = tmp_path / "results.tsv"
    for r in ({"experiment": 0, "commit": "abc", "val_mean_rank": 50.0, "status": "baseline", "runs": (50.0, 51.0)},
              {"experiment": 1, "commit": "def", "val_mean_rank": 45.0, "status": "keep", "runs": (45.0, 46.0)}):
        append_row(r, MR, str(path))
    path.write_text(damage(path.read_text()))
    text = path.read_text()
    with pytest.raises(HarnessError, match=re.escape(message)) as e:
        load_results(str(path), MR)
    assert "delete or repair that line" in str(e.value) or "move the file away" in str(e.value)
    assert path.read_text() == text


def test_one_row_builder_typed_rows_exact_in_results_tsv(tmp_path):
    """Every outcome makes its row in one place; best and sigma keep full precision, and results.tsv gives back the
    very same typed rows (it is read only on --resume)."""
    base = Outcome(0, "baseline", description="baseline", commit="c0", values=[48.123456789, 47.98765432],
                      delta=0.0, reason="2 seed(s)", started=100.0, round=0)
    row0 = make_row(base, [], MR, 130.0)
    s = pooled_cv([base.values])
    assert row0["best"] == (48.123456789 + 47.98765432) / 2 and row0["sigma"] == s * row0["best"]
    assert row0["honest"] == row0["best"]                    # the baseline's runs: none chosen for looking good
    assert (row0["val_mean_rank"], row0["runs"], row0["best_commit"], row0["wall_seconds"], row0["agent"]) == (
        48.123456789, (48.123456789, 47.98765432), "c0", 30.0, "llm")
    disc = Outcome(1, "discard", commit="c1", base="c0", values=[47.9], delta=47.9 - row0["best"],
                      threshold=0.2, model_seconds=1.5, prompt_tokens=1234, round=1, agent="random")
    row1 = make_row(disc, [row0], MR, 200.0)
    assert (row1["best"], row1["sigma"], row1["best_commit"], row1["wall_seconds"]) == (row0["best"], row0["sigma"],
                                                                                         "c0", None)
    crash = Outcome(2, "crash", commit="c2", base="c0", reason="run.sh exit 1: boom", round=2, worker=3)
    row2 = make_row(crash, [row0, row1], MR, 300.0)
    assert (row2["val_mean_rank"], row2["runs"], row2["best"], row2["worker"]) == (None, (), row0["best"], 3)
    path = str(tmp_path / "results.tsv")
    for r in (row0, row1, row2):
        append_row(r, MR, path)
    assert [typed_row(r, MR) for r in load_results(path, metric=MR)] == [row0, row1, row2]
    assert "\t48.123456789\t" in open(path).read() and "\t48.06\t" not in open(path).read()


def test_summarize():
    rows = [{"experiment": "0", "status": "baseline", "val_mean_rank": "100", "best": "100", "best_commit": "a",
             "wall_seconds": "600", "run_seconds": "600", "model_seconds": "0"},
            {"experiment": "1", "status": "keep", "val_mean_rank": "80", "best": "80", "best_commit": "b",
             "wall_seconds": "1200", "run_seconds": "900", "model_seconds": "250"},
            {"experiment": "2", "status": "crash", "val_mean_rank": "", "best": "80", "best_commit": "b",
             "wall_seconds": "1800", "run_seconds": "1200", "model_seconds": "500"}]
    s = summarize(rows)
    assert s["baseline"] == 100 and s["best"] == 80 and s["delta_pct"] == pytest.approx(-20)
    assert s["keep_rate"] == 0.5 and s["crashes"] == 1 and s["per_hour"] == pytest.approx(2.0)
    assert s["train_share"] == pytest.approx(0.75) and s["model_share"] == pytest.approx(750 / 3600)


def test_report_png(tmp_path):
    rows = []
    best = 120.0
    for i in range(25):
        st = "baseline" if i == 0 else ("keep" if i % 5 == 0 else "crash" if i % 7 == 0 else "discard")
        val = 120.0 - i * 1.5 + (0 if st == "keep" else 8)
        if st in ("keep", "baseline"):
            best = val
        rows.append({"experiment": str(i), "status": st, "val_mean_rank": "" if st == "crash" else str(val),
                     "best": str(best), "sigma": "1.5", "threshold": "3", "description": f"idea {i} lower lr",
                     "best_commit": "x", "wall_seconds": "300", "run_seconds": "250", "model_seconds": "30"})
    out = tmp_path / "progress.png"
    write_report(rows, MR, str(out), quiet=True)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 800 <= width <= 2000 and 400 <= height <= 1200
    assert 20_000 < len(data) < 2_000_000
    assert_plot_marks(out, rows, tmp_path)


def test_report_png_names_the_metric_and_marks_failures_at_the_worse_end(monkeypatch, tmp_path):
    """The y axis names the metric and its direction; a crash has no value, so its x sits at the worst value drawn:
    the top when lower is better, the bottom when higher is."""
    import matplotlib.figure
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig))
    for metric, values, label in ((MR, (50.0, 40.0, 45.0), "val_mean_rank (lower is better)"),
                                  (ACC, (0.5, 0.7, 0.6), "val_accuracy (higher is better)")):
        rows = [{"experiment": str(i), "status": st, metric.column: str(v), "best": str(values[0]), "description": "d",
                 "wall_seconds": "1", "run_seconds": "1", "model_seconds": "0"}
                for i, (st, v) in enumerate(zip(("baseline", "keep", "discard"), values))]
        rows.append(dict(rows[-1], experiment="3", status="crash", **{metric.column: ""}))
        write_report(rows, metric, str(tmp_path / "unused.png"), quiet=True)
        ax = drawn[-1].axes[0]
        crash = next(c for c in ax.collections if c.get_label() == "crash / timeout / invalid")
        assert ax.get_ylabel() == label and crash.get_offsets()[0][1] == values[0]


# ---------------------------------------------------------------- resume reconciliation on real git



@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@t")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "train.py").write_text("LR = 1\n")
    (tmp_path / "scratchpad.md").write_text("notes\n")
    (tmp_path / "program.md").write_text(PROGRAM)
    (tmp_path / "prepare_data.py").write_text('METRIC = "mean_rank"\nDIRECTION = "minimize"\n')
    (tmp_path / ".gitignore").write_text("results.tsv\nruns/\nlogs/\nprogress.png\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "init")
    git(tmp_path, "checkout", "-q", "-b", "autoresearch/t")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def llm(**kw):
    """The LLM agent of the project in the current directory, with no Ollama client (nothing here talks to it)."""
    return LLMAgent(loop_args(**kw), None, project_metric(), read_text("program.md"))


def loop_args(**kw):
    base = dict(tag="t", resume=True, phase_every=10, phase_plateau=5, rule="screen", noise_runs=2, num_ctx=16384,
                time_budget=300, allowance=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def baseline_row(commit):
    return {"experiment": 0, "commit": commit, "val_mean_rank": "50", "delta": "0", "status": "baseline",
            "description": "baseline", "runs": "50,52", "best": "51", "best_commit": commit}


def test_resume_recovers_keep_commit_without_row(repo):
    base = git(repo, "rev-parse", "HEAD")
    append_row(baseline_row(base), MR)
    (repo / "train.py").write_text("LR = 2\n")
    git(repo, "commit", "-qam", commit_message(1, "lr 2", "Phase 1: Hyperparameters", "keep", MR, 40.0, -11.0,
                                                   {"Runs": "40,41", "Best": "40.5", "Threshold": "2.8"}))
    head = git(repo, "rev-parse", "HEAD")
    loop = Loop(loop_args(), llm())
    prepare(loop)            # killed after the keep commit, before recording: the commit carries the result
    rows = load_results()
    assert [r["status"] for r in rows] == ["baseline", "keep"]
    assert rows[1]["commit"] == head and rows[1]["val_mean_rank"] == "40" and rows[1]["best"] == "40.5"
    assert git(repo, "rev-parse", "HEAD") == head and (repo / "train.py").read_text() == "LR = 2\n"


def test_resume_reverts_unrecorded_candidate_keeps_notes(repo):
    base = git(repo, "rev-parse", "HEAD")
    append_row(baseline_row(base), MR)
    (repo / "train.py").write_text("LR = 3\n")
    git(repo, "commit", "-qam", commit_message(1, "lr 3", "Phase 1: Hyperparameters", "candidate", MR))
    (repo / "scratchpad.md").write_text("notes\n- lr 3 in flight\n")       # killed mid-experiment
    (repo / "runs").mkdir()
    (repo / "runs" / ".running").write_text("999999")                      # stale pid file: ignored
    loop = Loop(loop_args(), llm())
    prepare(loop)
    rows = load_results()
    assert [r["status"] for r in rows] == ["baseline", "interrupted"] and rows[1]["experiment"] == "1"
    assert (repo / "train.py").read_text() == "LR = 1\n"
    assert "lr 3 in flight" in (repo / "scratchpad.md").read_text()
    assert git(repo, "status", "--porcelain") == ""
    assert not (repo / "runs" / ".running").exists()
    assert loop.next_exp() == 2


def test_resume_and_report_refuse_results_of_another_metric(repo):
    (repo / "results.tsv").write_text("\t".join(ACC.columns) + "\n" + "\t".join(
        ["0", "abc", "0.5", "0", "baseline", "baseline"] + [""] * len(MORE_COLUMNS)) + "\n")
    head = git(repo, "rev-parse", "HEAD")
    with pytest.raises(HarnessError) as e:
        prepare(Loop(loop_args(), llm()))
    assert "results.tsv records val_accuracy, but this project's prepare_data.py declares METRIC = 'mean_rank' " \
           "(val_mean_rank)" in str(e.value) and "mv results.tsv" in str(e.value)
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    for how in ({"compare": None}, {"compare": ["results.tsv"]}):
        with pytest.raises(HarnessError, match="records val_accuracy"):
            report(types.SimpleNamespace(test=False, **how))
    assert (repo / "results.tsv").read_text().count("\n") == 2                 # left as it was


def test_conclude_keeps_or_reverts_and_records_one_row(repo):
    base = git(repo, "rev-parse", "HEAD")
    append_row(baseline_row(base), MR)
    loop = Loop(loop_args(), llm())
    prepare(loop)

    def candidate(src, notes):
        (repo / "train.py").write_text(src)
        (repo / "scratchpad.md").write_text(notes)
        git(repo, "commit", "-qam", commit_message(len(loop.rows), src, "Phase 1: Hyperparameters", "candidate", MR))
        return git(repo, "rev-parse", "HEAD")

    # a discard goes back to where it started; the notes survive in a commit of their own
    worse = candidate("LR = 2\n", "notes\n- lr 2: worse\n")
    loop.conclude(loop.outcome(1, status="discard", description="lr 2", commit=worse, base=base, values=[53.0],
                               delta=2.0, threshold=1.0, reason="not > threshold", started=time.time()))
    save_notes("notes\n- lr 2: worse\n", "notes of round 1")
    assert (repo / "train.py").read_text() == "LR = 1\n" and "lr 2: worse" in (repo / "scratchpad.md").read_text()
    assert git(repo, "log", "-1", "--format=%s") == "scratchpad: notes of round 1"
    assert git(repo, "status", "--porcelain") == ""
    # a keep amends its candidate into the keep commit, whose trailers carry the row's numbers exactly
    notes_commit = git(repo, "rev-parse", "HEAD")
    cand = candidate("LR = 3\n", "notes\n- lr 2: worse\n- lr 3: better\n")
    o = loop.outcome(2, status="keep", description="lr 3", phase="Phase 1: Hyperparameters", commit=cand,
                     base=notes_commit, values=[45.123456, 46.987654, 45.5], inc_runs=[51.5], delta=-4.9, t=3.25,
                     threshold=2.5, reason="kept")
    commit_keep(o, MR)
    o.after = [46.25]
    loop.conclude(o)
    head = git(repo, "rev-parse", "HEAD")
    tr = parse_trailers(git(repo, "log", "-1", "--format=%B"))
    assert o.commit == head != cand and (tr["Status"], tr["Runs"], tr["Incumbent-Runs"], tr["T"], tr["Threshold"]) == (
        "keep", "45.123456,46.987654,45.5", "51.5", "3.25", "2.5")
    assert (repo / "train.py").read_text() == "LR = 3\n" and git(repo, "status", "--porcelain") == ""
    rows = load_results()
    assert [(r["experiment"], r["status"], r["commit"], r["best_commit"], r["round"], r["worker"]) for r in rows] == [
        ("0", "baseline", base, base, "", ""), ("1", "discard", worse, base, "1", "0"),
        ("2", "keep", head, head, "2", "0")]
    inc, s = loop.noise()
    assert inc == [45.123456, 46.987654, 45.5, 46.25] and rows[2]["honest"] == "46.25"
    # the noise pooled over the baseline's runs and its re-measure, and the kept commit's runs less its first
    assert s == pooled_cv([[50, 52, 51.5], [46.987654, 45.5, 46.25]])
    again = Loop(loop_args(), llm())          # --resume reads back the very numbers
    prepare(again)
    assert again.noise() == loop.noise() and again.rows == loop.rows
    assert [r["round"] for r in again.rows] == [0, 1, 2]


OLD_HEADER = ("experiment commit val_mean_rank delta status description runs best sigma threshold reason phase "
              "best_commit val_median_rank model_seconds run_seconds wall_seconds prompt_tokens finished agent "
              "train_wall_seconds").split()


def test_resume_upgrades_a_results_tsv_written_before_rounds_and_workers(repo):
    base = git(repo, "rev-parse", "HEAD")
    old = [dict(baseline_row(base), experiment="0", val_median_rank="9", agent="llm", sigma="1.414"),
           {"experiment": "1", "commit": "", "val_mean_rank": "", "delta": "", "status": "invalid",
            "description": "(no valid run)", "best": "51", "reason": "no tool call", "best_commit": base,
            "val_median_rank": "", "agent": "llm", "model_seconds": "12.5"}]
    text = "\t".join(OLD_HEADER) + "\n" + "".join("\t".join(r.get(c, "") for c in OLD_HEADER) + "\n" for r in old)
    (repo / "results.tsv").write_text(text)
    loop = Loop(loop_args(), llm())
    prepare(loop)
    header = (repo / "results.tsv").read_text().split("\n")[0].split("\t")
    assert header == MR.columns + ["val_median_rank"]          # what it no longer writes stays, at the end
    rows = load_results()
    for r, o in zip(rows, old):                                 # nothing recorded is lost or changed
        assert {c: r[c] for c in OLD_HEADER} == {c: o.get(c, "") for c in OLD_HEADER}
    assert [(r["round"], r["worker"]) for r in rows] == [("0", "0"), ("1", "0")]
    assert state_from_rows(loop.rows)[0] == 51.0 and [r["round"] for r in loop.rows] == [0, 1]
    loop.record(loop.outcome(2, status="invalid", base=base, reason="again"))
    rows = load_results()
    assert (rows[2]["experiment"], rows[2]["reason"], rows[2]["round"], rows[2]["val_median_rank"]) == ("2", "again",
                                                                                                      "2", "")
    text = (repo / "results.tsv").read_text()
    prepare(Loop(loop_args(), llm()))                        # once upgraded, left as it is
    assert (repo / "results.tsv").read_text() == text


# ---------------------------------------------------------------- context budget and flags

# An independent count, not the harness's estimate: qwen2.5's byte-level BPE first splits text with this
# pre-tokenizer (letters with one leading symbol, single digits, symbol runs, whitespace) and never merges across
# pieces, so the number of pieces is a lower bound on its tokens. A prompt above the budget by this count is
# certainly above it for the model.
PRE_TOKENS = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d| ?(?:[^\s\w]|_)+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def min_tokens(messages, tools=TOOLS):
    """Lower bound on the prompt Ollama builds: message contents, the tool schemas, and 4 template tokens a message
    (<|im_start|>, role, newline, <|im_end|>)."""
    text = "".join(m["content"] for m in messages) + json.dumps(tools)
    return len(PRE_TOKENS.findall(text)) + 4 * len(messages)


def test_prompt_shrinks_to_fit_num_ctx(repo):
    with open(os.path.join(ROOT, "train.py")) as f:
        train_src = f.read()
    (repo / "scratchpad.md").write_text("- old note\n" * 350 + "- NEWEST note\n")
    agent = llm(num_ctx=16384)
    roomy = agent.open(train_src, rows_for(40), "the best", "Phase 1: x", None)[1]["content"]
    assert "- old note\n" * 300 in roomy and "idea number 25" in roomy          # 15 rows, whole scratchpad
    budget = 8192 * (1 - TOKEN_RESERVE)
    assert min_tokens([{"content": agent.system}, {"content": roomy}]) > budget    # so 8192 needs the cuts below
    agent.args.num_ctx = 8192
    tight = agent.open(train_src, rows_for(40), "the best", "Phase 1: x", None)[1]["content"]
    assert min_tokens([{"content": agent.system}, {"content": tight}]) <= budget
    assert "NEWEST note" in tight and "older notes cut" in tight and "idea number 25" not in tight
    assert "def main():" in tight                                                 # train.py is never cut


def test_fit_context_elides_old_tool_results(repo):
    with open(os.path.join(ROOT, "train.py")) as f:
        code = f.read()
    agent = llm(num_ctx=4096)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for i in range(6):      # read_file results: slices of train.py, 3000 characters each
        msgs += [{"role": "assistant", "content": ""}, {"role": "tool", "content": code[i * 2000:i * 2000 + 3000]}]
    newest = msgs[-1]["content"]
    budget = 4096 * (1 - TOKEN_RESERVE)
    assert min_tokens(msgs) > budget
    agent.fit_context(msgs)
    assert min_tokens(msgs) <= budget
    assert "elided" in msgs[3]["content"] and msgs[-1]["content"] == newest     # oldest cut first, newest intact


def test_time_budget_flag_env_and_resume(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    a = parse_args([])
    assert (a.time_budget, a.num_ctx, a.model, a.host, a.noise_runs) == (None, 16384, "qwen2.5-coder:7b",
                                                                         "http://127.0.0.1:11434", 5)
    assert run_budget(None, []) == 300                           # nothing asked, nothing recorded: the default
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "42")
    monkeypatch.setenv("OLLAMA_HOST", "http://10.0.0.2:11434")
    assert env_int("AUTORESEARCH_TIME_BUDGET", None) == 42 and parse_args([]).host == "http://10.0.0.2:11434"
    assert parse_args(["--time-budget", "7"]).time_budget == 7
    recorded = [{"time_budget": ""}, {"time_budget": "120"}]        # the first row: written before budgets were
    assert run_budget(None, recorded) == 120                     # a resumed run keeps its own
    assert run_budget(120, recorded) == 120
    with pytest.raises(HarnessError, match=r"recorded with a 120s time budget, not the 300s asked for .*"
                                              r"resume with --time-budget 120"):
        run_budget(300, recorded)


def test_tools_edit_and_read(repo):
    agent = llm()
    assert agent.tool(".", None, "edit_file", {"path": "train.py", "old_text": "LR = 1", "new_text": "LR = 2"}).startswith("OK")
    assert (repo / "train.py").read_text() == "LR = 2\n"
    r = agent.tool(".", None, "edit_file", {"path": "train.py", "old_text": "LR = 2", "new_text": "LR = (2"})
    assert "does not parse" in r and r.startswith("OK")
    assert "does not parse" in agent.prerun_check(".", "LR = 1\n")
    (repo / "train.py").write_text("LR = 1\n")
    assert "identical" in agent.prerun_check(".", "LR = 1\n")
    (repo / "train.py").write_text("LR = 3\n")
    (repo / "other.py").write_text("x = 1\n")                           # a file the model could not have made
    assert "other.py" in agent.prerun_check(".", "LR = 1\n")
    (repo / "other.py").unlink()
    assert agent.prerun_check(".", "LR = 1\n") is None
    big = agent.tool(".", None, "edit_file", {"path": "scratchpad.md", "old_text": "notes", "new_text": "n" * 5000})
    assert "condense" in big and (repo / "scratchpad.md").read_text() == "notes\n"
    program = agent.tool(".", None, "read_file", {"path": "program.md"})
    assert "missing" not in program and "Phase 1" in program
    assert "not allowed" in agent.tool(".", None, "read_file", {"path": "logs/1.log"})      # only the last run's log
    (repo / "logs").mkdir()
    (repo / "logs" / "1.log").write_text("\n".join(f"line {i}" for i in range(500)))
    out = agent.tool(".", "logs/1.log", "read_file", {"path": "logs/1.log"})   # the last run's log
    assert out.startswith("line 350") and out.endswith("line 499")            # the tail
    assert "must be strings" in agent.tool(".", None, "edit_file", {"path": "train.py", "old_text": 3, "new_text": "x"})


# ---------------------------------------------------------------- writing files, tool arguments, limits

def test_write_text_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("LR = 1\n")
    inode = path.stat().st_ino
    with pytest.raises(UnicodeEncodeError):
        write_text(str(path), "LR = 2  # \ud800\n")      # what once truncated train.py to 0 bytes
    assert path.read_text() == "LR = 1\n" and os.listdir(tmp_path) == ["train.py"]
    write_text(str(path), "LR = 2\n")
    assert path.read_text() == "LR = 2\n" and path.stat().st_ino != inode   # a new file renamed over the old one
    assert os.listdir(tmp_path) == ["train.py"]


def test_tool_arguments_that_cannot_be_written_are_named():
    assert unwritable({"path": "train.py", "old_text": "a", "new_text": "b"}) is None
    why = unwritable({"path": "train.py", "new_text": "ok \ud800"})
    assert why.startswith("new_text holds '\\ud800' at character 3") and "UTF-8" in why
    assert encodable({"a": ["x\udfff", {"b": "\ud800"}], "n": 3}) == {"a": ["x?", {"b": "?"}], "n": 3}
    assert clean_text("exp \ud800\tdone\n") == "exp ? done"
    assert parse_error("A = 1\0\n").startswith("train.py does not parse") and parse_error("A = 1\n") is None


def test_train_py_size_limit(repo):
    agent = llm()
    assert agent.train_limit == train_limit(16384, len(agent.system)) > 20000      # room for the template's 15K
    assert train_limit(32768, 5000) - train_limit(16384, 5000) == int(16384 * 0.75 * CHARS_PER_TOKEN)
    big = "x = 1\n" * (agent.train_limit // 6 + 1)
    r = agent.tool(".", None, "edit_file", {"path": "train.py", "old_text": "LR = 1\n", "new_text": big})
    assert r.startswith("ERROR: train.py would grow to") and f"limit of {agent.train_limit}" in r
    assert (repo / "train.py").read_text() == "LR = 1\n"
    (repo / "train.py").write_text(big)
    with pytest.raises(HarnessError, match=r"train.py has \d+ characters, more than fit .* --num-ctx 16384 .*"
                                              r"pass --num-ctx (\d+) or more"):
        llm()
    need = int(re.search(r"--num-ctx (\d+) or more", str(pytest.raises(HarnessError, llm).value)).group(1))
    llm(num_ctx=need)                                        # what the message asks for is enough


def test_the_allowance_is_bounded_whatever_the_baseline(repo):
    assert budget_allowance(300) == 30.0 and budget_allowance(20) == 30.0 and budget_allowance(3600) == 360.0
    loop = Loop(loop_args(time_budget=20), llm(time_budget=20))
    loop.rows = [{"status": "baseline", "train_wall_seconds": 119.0, "round": 0}]   # a baseline on a busy machine
    assert loop.allowance() == 30.0          # it once allowed 2 x 99 s = 198 s: several times the budget
    assert budget_allowance(20, 90) == 90.0  # unless the user allows more (--allowance), for a slow start-up
    out = "--- trusted evaluation ---\nval_mean_rank: 3.5\ntrain_wall_seconds: {}\n"
    for wall, status in ((50.0, "ok"), (50.2, "invalid"), (119.0, "invalid")):
        assert classify_run(0, out.format(wall), parse_metrics(out.format(wall)), MR, 20, loop.allowance())[0] == status


GIB = 2 ** 30


def test_workers_share_the_hosts_memory():
    env = {}
    one = run_memory(1, 24 * GIB, env)
    assert one == {"AUTORESEARCH_MEMORY": "16384m", "AUTORESEARCH_HANDOFF_SIZE": "2048m"}      # the defaults fit
    four = run_memory(4, 24 * GIB, env)
    mem, hand = (int(four[k][:-1]) << 20 for k in ("AUTORESEARCH_MEMORY", "AUTORESEARCH_HANDOFF_SIZE"))
    room = 24 * GIB - max(MEMORY_RESERVE, 24 * GIB // 10)
    assert 4 * (mem + hand + MEMORY_WAITING) <= room and mem > 3 * GIB and hand <= 2 * GIB
    with pytest.raises(HarnessError, match=r"4 run\(s\) at once need 4 x \(AUTORESEARCH_MEMORY 16g .*export "
                                              r"AUTORESEARCH_MEMORY=[\d.]+g or less or run fewer --workers"):
        run_memory(4, 24 * GIB, {"AUTORESEARCH_MEMORY": "16g"})          # the user's own value: checked
    assert run_memory(2, 24 * GIB, {"AUTORESEARCH_MEMORY": "8g"})["AUTORESEARCH_MEMORY"] == "8192m"
    with pytest.raises(HarnessError, match="AUTORESEARCH_MEMORY must be a size like 16g"):
        run_memory(1, 24 * GIB, {"AUTORESEARCH_MEMORY": "lots"})
    with pytest.raises(HarnessError, match="too little memory"):
        run_memory(8, 3 * GIB, env)


@pytest.mark.parametrize("name, value, message", [
    ("AUTORESEARCH_TIME_BUDGET", "abc", "AUTORESEARCH_TIME_BUDGET must be a whole number above 0, got 'abc'"),
    ("AUTORESEARCH_GRACE", "0", "AUTORESEARCH_GRACE must be a whole number above 0, got '0'"),
    ("AUTORESEARCH_EVAL_TIMEOUT", "-5", "AUTORESEARCH_EVAL_TIMEOUT must be a whole number above 0, got '-5'"),
    ("AUTORESEARCH_PIDS", "1.5", "AUTORESEARCH_PIDS must be a whole number above 0, got '1.5'"),
    ("AUTORESEARCH_SHM_SIZE", "2 gigs", "AUTORESEARCH_SHM_SIZE must be a size like 16g or 500m, got '2 gigs'"),
    ("AUTORESEARCH_HANDOFF_SIZE", "0", "AUTORESEARCH_HANDOFF_SIZE must be a size like 16g or 500m, got '0'"),
    ("AUTORESEARCH_CPUS", "none", "AUTORESEARCH_CPUS must be a positive number of cores like 2 or 0.5, got 'none'"),
])
def test_each_bad_number_in_the_environment_is_named(name, value, message):
    check_environment({})
    check_environment({name: ""})          # empty: the default
    with pytest.raises(HarnessError) as e:
        check_environment({name: value})
    assert str(e.value) == message


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--num-ctx", "512"], "--num-ctx must be at least 2048, got 512"),
    (["--time-budget", "0"], "--time-budget must be at least 1, got 0"),
    (["--max-experiments", "-1"], "--max-experiments must be 0 (no limit) or more, got -1"),
])
def test_each_failed_argument_condition_is_named_on_its_own(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"autoresearch.py: error: {message} (python autoresearch.py --help lists " \
                                        f"the flags)\n"


def test_a_failed_baseline_says_why_and_what_is_kept():
    run = types.SimpleNamespace(status="timeout", reason="run.sh: TIMEOUT", log="logs/0-s4.log")
    slow = baseline_failure(run, 4, [27.0, 26.0, 28.0], 312.0, 300, 120)
    assert "seed 4 ran out of time (its limit of budget 300s + grace 120s (AUTORESEARCH_GRACE))" in slow
    assert "the machine was slower this time (busy?), not train.py over its budget" in slow
    assert "The 3 finished seeds are recorded" in slow and "AUTORESEARCH_GRACE=240" in slow
    first = baseline_failure(run, 1, [], None, 300, 120)
    assert "does train.py stop at TIME_BUDGET?" in first and "AUTORESEARCH_GRACE=240" in first
    crash = baseline_failure(types.SimpleNamespace(status="crash", reason="run.sh exit 1", log="logs/0-s2.log"), 2,
                                [27.0], 312.0, 300, 120)
    assert "see logs/0-s2.log (the 1 finished seeds are recorded)" in crash and "commit the fix" in crash
    rows = [{"status": "interrupted", "round": 0, "experiment": 0}, {"status": "interrupted", "round": 1}]
    assert pending_baseline(rows) is rows[0]
    assert pending_baseline(rows + [{"status": "baseline", "round": 0}]) is None


def test_decision_lines_read_as_sentences():
    base = {"experiment": 0, "status": "baseline", "runs": (27.0, 29.0), "best": 28.0, "sigma": 1.41, "reason": ""}
    assert decision_line(base, MR) == ("experiment 0: baseline val_mean_rank 28 (the mean of 2 runs), noise sigma "
                                          "1.41")
    disc = {"experiment": 3, "status": "discard", "runs": (30.0,), "best": 28.0, "reason": "worse"}
    assert decision_line(disc, MR) == "experiment 3: discard, val_mean_rank 30: worse. The best stays 28"
    crash = {"experiment": 4, "status": "crash", "runs": (), "best": 28.0, "reason": "run.sh exit 1; log: logs/4.log"}
    assert decision_line(crash, MR) == "experiment 4: crash: run.sh exit 1; log: logs/4.log. The best stays 28"
