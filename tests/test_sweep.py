"""sweep.py as a user runs it: a small local Ray Tune sweep of real main.py trainings, its table and summary
recomputed from the run folders; bad input refused before anything is written."""
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from util import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--warmup", "8", "--eval-every", "1", "--eval-episodes", "1", "--hidden1", "16", "--hidden2", "16",
        "--rmsize", "1000", "--save_per_epochs", "100"]


def run_sweep(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sweep.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_local_sweep_of_two_configurations_and_two_seeds(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep("--env", "CartPole-v1", "--seeds", 2, "--episodes", 2, "--test-episodes", 1, "--target", 10,
                       "--num-cpus", 2, "--grid", "tau-update=0.01,0.02", "--output", out, "--", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["config"], r["seed"]) for r in rows) == [(c, s) for c in ("tau-update=0.01", "tau-update=0.02")
                                                              for s in ("1", "2")]
    summary = json.loads((out / "summary.json").read_text())
    for row in rows:
        train, test = read_metrics(Path(row["train_run"]) / "metrics.csv"), read_metrics(Path(row["test_run"]) / "metrics.csv")
        assert Path(row["train_run"]).parent == out / "runs" / row["config"] / f"seed{row['seed']}"
        assert list(train["episode"]) == [1, 2] and len(test["return"]) == 1
        assert float(row["final_eval"]) == train["eval_return"][-1] and float(row["test_return"]) == test["return"][0]
        reached = np.flatnonzero(train["eval_return"] >= 10)
        assert row["first_target"] == (str(int(train["episode"][reached[0]])) if len(reached) else "")
        assert (Path(row["train_run"]) / "checkpoint.safetensors").is_file() and row["node_id"]
    for name, config in summary["configs"].items():
        mine = [r for r in rows if r["config"] == name]
        for key, column in (("final_eval", "final_eval"), ("test_return", "test_return")):
            values = np.array([float(r[column]) for r in mine])
            assert config[key]["mean"] == np.mean(values) and config[key]["std"] == np.std(values)
            assert (config[key]["min"], config[key]["max"]) == (values.min(), values.max())
    assert summary["best"] == max(summary["configs"], key=lambda n: summary["configs"][n]["test_return"]["mean"])
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    for args in (["--grid", "k"], ["--grid", "no-such-flag=1,2"], ["--", "--seed", "3"], ["--seeds", "0"]):
        result = run_sweep("--output", tmp_path / "sweep", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error:")
        assert not (tmp_path / "sweep").exists()
    result = run_sweep("--output", tmp_path / "nothing", "--resume")
    assert result.returncode == 2 and "no sweep to resume" in result.stderr


@pytest.mark.parametrize("args, line", [
    (["--grid", "gamma=0.9,1.5"], "error: --gamma must be in [0, 1] (got 1.5)"),
    (["--grid", "knn=exact,nope"], "error: argument --knn: invalid choice: 'nope'"),
    (["--", "--env-kwargs", "oops"], "error: --env-kwargs 'oops': expected KEY=VALUE with each KEY a distinct name"),
])
def test_a_trial_that_main_py_refuses_is_refused_before_ray_starts(tmp_path, args, line):
    """Every trial's flags pass main.py's own checks first: its one-line error, exit 2, nothing written."""
    start = time.monotonic()
    result = run_sweep("--env", "CartPole-v1", "--seeds", 1, "--episodes", 2, "--output", tmp_path / "sweep", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), result.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()
    assert time.monotonic() - start < 20  # well under Ray's start on a busy machine: Ray was not started
