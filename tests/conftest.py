"""Shared fixtures: a tiny real dataset built by prepare_data.py itself (no mocks), once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
