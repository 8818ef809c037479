"""train.py: a short real training run on tiny data, evaluated by the trusted evaluator; failure paths."""
import json
import re

import pytest

from conftest import ROOT, run_py

RANDOM = (100 + 1) / 2  # random mean rank on the 100-example val split of tiny_data
STEPS = 240             # about 30 s on 2 quiet cores; 120 learned too little (mean rank 42-45 of a random 50.5)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    # train.py as shipped except a smaller batch, for a fixed number of steps (AUTORESEARCH_MAX_STEPS; the schedule
    # follows them), so that a busy machine trains exactly as much as a quiet one, only slower
    out = tmp_path_factory.mktemp("run")
    script = patched_copy(tmp_path_factory.mktemp("src"), BATCH_SIZE=32)
    r = run_py([script], env={"AUTORESEARCH_DATA": str(tiny_data), "AUTORESEARCH_OUT": str(out),
                              "AUTORESEARCH_TIME_BUDGET": "3600", "AUTORESEARCH_MAX_STEPS": str(STEPS),
                              "AUTORESEARCH_SEED": "1"}, timeout=900)
    return r, out


def test_training_lowers_the_loss_and_exports(trained):
    r, out = trained
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"^step \d+ \| loss ([0-9.]+) \| lr", r.stdout, re.M)]
    assert losses, r.stdout   # the first step is always logged; later ones every LOG_EVERY_S seconds
    stats = json.loads((out / "train_stats.json").read_text())
    assert set(stats) >= {"training_seconds", "num_steps", "peak_memory_mb", "num_params_m", "final_loss"}
    assert stats["num_steps"] == STEPS
    assert stats["final_loss"] < losses[0] - 0.1, (losses, stats)  # smoothed final vs first step
    assert (out / "image_encoder.pt2").is_file() and (out / "text_encoder.pt2").is_file()
    assert "val_" not in r.stdout  # train.py never prints metrics


def test_trained_model_beats_random_under_the_trusted_evaluator(trained, tiny_data):
    r, out = trained
    assert r.returncode == 0
    e = run_py([ROOT / "prepare_data.py", "--evaluate", out, "--data", tiny_data])
    assert e.returncode == 0, e.stderr
    vals = dict(line.split(": ", 1) for line in e.stdout.splitlines() if ": " in line)
    assert float(vals["val_mean_rank"]) < 0.75 * RANDOM, e.stdout
    assert int(vals["num_steps"]) == STEPS


def patched_copy(tmp_path, **constants):
    """A copy of train.py with some top-level constants replaced (as the research agent would edit them)."""
    src = (ROOT / "train.py").read_text()
    for name, value in constants.items():
        src, n = re.subn(rf"^(\s*){name} = .*$", rf"\g<1>{name} = {value}", src, flags=re.M)
        assert n >= 1, name
    (tmp_path / "train.py").write_text(src)
    return tmp_path / "train.py"


def test_nan_loss_exits_non_zero_with_a_clear_message(tiny_data, tmp_path):
    script = patched_copy(tmp_path, LOGIT_SCALE_INIT='float("nan")')
    r = run_py([script], env={"AUTORESEARCH_DATA": str(tiny_data), "AUTORESEARCH_OUT": str(tmp_path / "out"),
                              "AUTORESEARCH_TIME_BUDGET": "20"}, timeout=120)
    assert r.returncode == 1
    assert "diverged" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "image_encoder.pt2").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    r = run_py([ROOT / "train.py"], env={"AUTORESEARCH_DATA": str(tmp_path / "nothing"),
                                         "AUTORESEARCH_OUT": str(tmp_path / "out"), "AUTORESEARCH_TIME_BUDGET": "5"})
    assert r.returncode == 1 and "prepare_data.py" in r.stderr and "Traceback" not in r.stderr
