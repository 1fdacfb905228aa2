"""bench.py optimum: a sweep of a built-in env stated as fractions of its exact optimum, recomputed here from the
run folders and the env."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the built-in envs)
import main
from soak import newest_run
from util import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ENV = ["--env", "Configurator-v0", "--env-kwargs", "n_choices=6", "n_profiles=20"]
TINY = ["--warmup", "8", "--eval-every", "2", "--eval-episodes", "2", "--hidden1", "16", "--hidden2", "16",
        "--rmsize", "1000", "--k", "4"]


def test_optimum_states_a_sweep_as_fractions_of_the_exact_optimum(tmp_path):
    rows = []
    for seed in (1, 2):  # a sweep's folder, made without Ray: trained and tested runs, sweep.json, results.csv
        assert main.main([*ENV, *TINY, "--seed", str(seed), "--max-episode", "30", "--output", str(tmp_path)]) == 0
        train = newest_run(tmp_path)
        assert main.main([*ENV, *TINY, "--seed", str(seed), "--mode", "test", "--test-episode", "5",
                          "--load-model-dir", str(train), "--output", str(tmp_path)]) == 0
        test = newest_run(tmp_path)
        rows.append({"config": "k=4", "seed": seed, "test_return": read_metrics(test / "metrics.csv")["return"].mean(),
                     "train_run": train})
    (tmp_path / "sweep.json").write_text(json.dumps({"env": "Configurator-v0", "main_flags": ENV[2:] + TINY,
                                                     "episodes": 30, "test_episodes": 5}))
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["config", "seed", "test_return", "train_run"])
        writer.writeheader()
        writer.writerows(rows)
    result = subprocess.run([sys.executable, "bench.py", "optimum", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    env = gym.make("Configurator-v0", n_choices=6, n_profiles=20).unwrapped
    summary = json.loads((tmp_path / "optimum.json").read_text())
    assert np.isclose(summary["optimal_return"], env.optimal_return)
    assert np.isclose(summary["random_return"], env.random_return)
    config = summary["configs"]["k=4"]
    assert np.allclose(config["fraction_of_optimal"], [r["test_return"] / env.optimal_return for r in rows])
    for row, ms in zip(rows, config["ms_per_step"]):
        m = read_metrics(Path(row["train_run"]) / "metrics.csv")  # 30 one-step episodes: the second half is 16-30
        assert np.isclose(ms, 1e3 * (m["wall_seconds"][29] - m["wall_seconds"][14]) / 15)
    assert (tmp_path / "optimum.png").read_bytes()[:4] == b"\x89PNG"
