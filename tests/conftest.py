"""Shared fixtures: a tiny real dataset built by prepare_data.py itself (no mocks), once per session; which tests
need the podman sandbox, and whether this user can start it."""
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.evaluator import project_constants  # noqa: E402

# Tests that start containers through run.sh: every test of these modules, and those marked `sandbox` elsewhere.
# As root they always run (a podman failure fails them); as a normal user they run where rootless podman can start
# the sandbox, and are skipped with the reason where it cannot.
SANDBOX_MODULES = {"test_sandbox.py", "test_integrity.py", "test_hostile.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "sandbox: starts containers through run.sh (podman, host mode)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SANDBOX_MODULES:
            item.add_marker(pytest.mark.sandbox)


def pytest_runtest_setup(item):
    if item.get_closest_marker("sandbox") and os.geteuid() != 0:
        why = rootless_sandbox_problem()
        if why:
            pytest.skip(why)


@functools.cache
def rootless_sandbox_problem():
    """None if run.sh starts its sandbox (host mode, as the tests use it) for this user, else why not and what would
    make it work. It really tries: run.sh with a train.py that prints a line, on an empty data cache."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copy_into(tmp, ("run.sh", "engine", "prepare_data.py"))
        (tmp / "train.py").write_text("print('sandbox-probe-ok')\nraise SystemExit(3)\n")
        for d in ("data/train", "data/val"):
            (tmp / d).mkdir(parents=True)
        (tmp / "data" / "meta.json").write_text("{}")
        for f in project_constants(ROOT / "prepare_data.py")["EVAL_FILES"]:   # run.sh checks they exist up front
            (tmp / "data" / "val" / f).write_bytes(b"")
        env = dict(os.environ, AUTORESEARCH_IMAGE="host", AUTORESEARCH_DATA=str(tmp / "data"),
                   AUTORESEARCH_TIME_BUDGET="1", AUTORESEARCH_GRACE="120")
        env.pop("AUTORESEARCH_SANDBOX", None)
        try:
            p = subprocess.run(["./run.sh"], cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=300)
            out = p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            out = "run.sh did not finish within 300 s"
    if "train| sandbox-probe-ok" in out:
        return None
    lines = [line.removeprefix("train| ").strip() for line in out.split("\n") if line.strip()]
    error = next((line for line in lines if line.startswith("Error")), lines[-1] if lines else "no output")
    if len(error) > 200:
        error = error[:110] + " ... " + error[-60:]
    return (f"rootless podman cannot start the sandbox for uid {os.getuid()} here ({error}). These tests need "
            f"podman to run a container without root in host mode (AUTORESEARCH_IMAGE=host: an overlay of / that "
            f"many kernels refuse to unprivileged users); run the suite as root (sudo) to include them")


def copy_into(dest, names):
    """The named files and folders of the repository (the engine/ package among them) copied into dest."""
    for name in names:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, Path(dest) / name)


def run_py(args, env=None, timeout=300, cwd=ROOT):
    """Runs a Python script of the repo in a subprocess; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset (word-level tokenizer: the weights dir is empty) in a temp dir."""
    base = tmp_path_factory.mktemp("tiny")
    data, weights = base / "data", base / "no-weights"
    weights.mkdir()
    r = run_py([ROOT / "prepare_data.py", "--out", data, "--weights", weights, "--seed", "3",
                "--n-train", "600", "--n-val", "100", "--n-test", "40"])
    assert r.returncode == 0, r.stderr
    return data


# A tiny deterministic "trainer" for hostile-train.py tests: no real training, but a valid hand-off (two torch.export
# encoders + train_stats.json), the same weights in the sandbox and on the host. Append e.g. TINY_TRAINER_MAIN.
TINY_TRAINER = r'''
import json, os, sys
import torch
OUT = os.environ.get("AUTORESEARCH_OUT", "runs/dev")
DATA = os.environ.get("AUTORESEARCH_DATA", "data")
meta = json.load(open(os.path.join(DATA, "meta.json")))
S, L, V = meta["image_size"], meta["max_len"], meta["vocab_size"]
torch.manual_seed(0)
class Img(torch.nn.Module):
    def __init__(s): super().__init__(); s.p = torch.nn.Linear(3, 8)
    def forward(s, images): return s.p(images.mean(dim=(2, 3)))
class Txt(torch.nn.Module):
    def __init__(s): super().__init__(); s.e = torch.nn.Embedding(V, 8)
    def forward(s, input_ids, attention_mask): return (s.e(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
def export(img, txt):
    B = torch.export.Dim("batch", min=1, max=4096)
    ids, mask = torch.ones(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.long)   # two tensors: export
    torch.export.save(torch.export.export(img, (torch.rand(2, 3, S, S),), dynamic_shapes=({0: B},)),  # would merge
                      os.path.join(OUT, "image_encoder.pt2"))                                        # aliased inputs
    torch.export.save(torch.export.export(txt, (ids, mask), dynamic_shapes=({0: B}, {0: B})),
                      os.path.join(OUT, "text_encoder.pt2"))
def stats(**extra):
    json.dump({"training_seconds": 0.5, "num_steps": 3, "peak_memory_mb": 1.0, "num_params_m": 0.001,
               "final_loss": 1.0, **extra}, open(os.path.join(OUT, "train_stats.json"), "w"))
'''
TINY_TRAINER_MAIN = "img, txt = Img(), Txt()\nexport(img, txt)\nstats()\n"


# progress.png's colours (autoresearch.write_report) and the least a plotted dot covers at its size and dpi
GREY, GREEN, RED = "#b0b0b0", "#2ca02c", "#d62728"
DOT_PIXELS = 40
MARKS = {GREY: ("discard",), GREEN: ("keep",), RED: ("crash", "timeout", "invalid")}


def assert_plot_marks(png, rows, tmp_dir):
    """progress.png shows a mark for each experiment: each kind's colour covers a dot's worth of pixels per
    experiment of that kind more than the same plot with those rows relabelled `interrupted` (not drawn as a mark;
    the running best, the axes and the other marks stay as they are); red marks nothing but failures."""
    sys.path.insert(0, str(ROOT))
    from engine.project import Metric
    from engine.report import write_report
    for color, statuses in MARKS.items():
        n = sum(r["status"] in statuses for r in rows)
        without = Path(tmp_dir) / f"without-{statuses[0]}.png"
        write_report([dict(r, status="interrupted") if r["status"] in statuses else r for r in rows], Metric("mean_rank", "minimize"), str(without),
                        quiet=True)
        assert color_pixels(png, color) - color_pixels(without, color) >= DOT_PIXELS * n, (statuses, n)
        if color == RED:
            assert color_pixels(without, RED) == 0


def color_pixels(png, color, tol=25):
    """Pixels of a PNG within `tol` (per channel) of a #rrggbb colour."""
    import numpy as np
    from PIL import Image
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=2) <= tol).sum())


GIT_IDENTITY = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def git(cwd, *args):
    """git in cwd, its output; with an identity: a normal user's HOME may have no git config."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=dict(os.environ, **GIT_IDENTITY)).stdout.strip()


@pytest.fixture
def scripted_project(tmp_path, monkeypatch):
    """A committed project of one constant (train.py is `LR = 1.0`, program.md's ## Search space ranges over it, the
    metric a loss to minimize) on main, as the current directory: for the loop with its runs scripted."""
    for k, v in GIT_IDENTITY.items():
        monkeypatch.setenv(k, v)   # the engine's own commits
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "train.py").write_text("LR = 1.0\n")
    (tmp_path / "scratchpad.md").write_text("notes\n")
    (tmp_path / "program.md").write_text("# x\n## Phase 1: a\n\n## Search space\nLR: log 0.25 4\n")
    (tmp_path / "prepare_data.py").write_text('METRIC = "loss"\nDIRECTION = "minimize"\n')
    (tmp_path / ".gitignore").write_text("results.tsv\nruns/\nlogs/\nprogress.png\n.worktrees/\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "init")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def scripted_loop(args, agent, value, stop=None):
    """The loop (engine/loop.py) with its runs scripted, no sandbox: run() answers value(label, seed, train.py of the
    checkout it ran in) and records (label, seed, checkout) in .asked; run number `stop` raises KeyboardInterrupt
    (Ctrl-C) as it starts."""
    from engine.loop import Loop
    from engine.runs import Run
    from engine.util import read_text

    class Scripted(Loop):
        def prestart(self, w):
            return None

        def run(self, label, seed, cwd=".", slot=None, allowance=None, cancel=None, started=None):
            self.asked.append((label, seed, "main" if cwd == "." else os.path.basename(cwd)))
            if len(self.asked) == stop:
                raise KeyboardInterrupt
            train = read_text(os.path.join(cwd, "train.py"))
            return Run("ok", "", {}, value(label, seed, train), 1.0, f"logs/{label}.log", train[-40:])
    loop = Scripted(args, agent)
    loop.asked = []
    return loop
