"""bench.py optimum: sweeps of a built-in env stated as fractions of its exact optimum, recomputed here from the
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


def write_sweep(folder: Path, rows: list[dict], episodes: int = 30) -> None:
    """A sweep's folder as sweep.py leaves it, made without Ray: sweep.json and results.csv."""
    (folder / "sweep.json").write_text(json.dumps({"env": "Configurator-v0", "main_flags": ENV[2:] + TINY,
                                                   "episodes": episodes, "test_episodes": 5}))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["config", "seed", "test_return", "train_run"])
        writer.writeheader()
        writer.writerows(rows)


def test_optimum_states_sweeps_as_fractions_of_the_exact_optimum(tmp_path):
    rows = []
    for seed in (1, 2):  # each seed a sweep of its own: bench.py optimum reads them together
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        assert main.main([*ENV, *TINY, "--seed", str(seed), "--max-episode", "30", "--output", str(folder)]) == 0
        train = newest_run(folder)
        assert main.main([*ENV, *TINY, "--seed", str(seed), "--mode", "test", "--test-episode", "5",
                          "--load-model-dir", str(train), "--output", str(folder)]) == 0
        test = newest_run(folder)
        rows.append({"config": "k=4", "seed": seed, "test_return": read_metrics(test / "metrics.csv")["return"].mean(),
                     "train_run": train})
        write_sweep(folder, rows[-1:])
    result = subprocess.run([sys.executable, "bench.py", "optimum", str(tmp_path / "seed1"), str(tmp_path / "seed2")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "seed1" / "optimum.json").read_text())
    env = gym.make("Configurator-v0", n_choices=6, n_profiles=20).unwrapped
    assert np.isclose(summary["optimal_return"], env.optimal_return)
    assert np.isclose(summary["random_return"], env.random_return)
    config = summary["configs"]["k=4"]
    assert np.allclose(config["fraction_of_optimal"], [r["test_return"] / env.optimal_return for r in rows])
    for row, ms in zip(rows, config["ms_per_step"]):
        m = read_metrics(Path(row["train_run"]) / "metrics.csv")  # 30 one-step episodes: the second half is 16-30
        assert np.isclose(ms, 1e3 * (m["wall_seconds"][29] - m["wall_seconds"][14]) / 15)
    assert (tmp_path / "seed1" / "optimum.png").read_bytes()[:4] == b"\x89PNG"

    other = tmp_path / "other"  # a sweep of other settings cannot be shown beside them
    other.mkdir()
    write_sweep(other, rows[:1], episodes=60)
    result = subprocess.run([sys.executable, "bench.py", "optimum", str(tmp_path / "seed1"), str(other)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().startswith("error:") and "other settings" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
