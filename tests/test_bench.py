"""bench.py optimum: sweeps of a built-in env stated as fractions of its exact optimum, recomputed here from the
run folders and the env."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

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


def choice_fractions(run: Path, k: int) -> dict[str, float]:
    """`bench.py choice` on a Recommender-v0 run: its printed fractions of the optimum, by line."""
    flags = ["--env", "Recommender-v0", "--env-kwargs", "n_items=300", "neighbours=20", *TINY[:-2], "--k", str(k)]
    result = subprocess.run([sys.executable, "bench.py", "choice", str(run), "--", *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.strip().rsplit(": ", 1) for line in result.stdout.splitlines() if line.endswith("%") or "optimum" in line]
    return {name: float(value.split("%")[0]) / 100 for name, value in lines if "%" in value}


def test_choice_splits_the_loss_between_candidates_and_critic(tmp_path):
    """With k = every item, a perfect critic's pick is the optimal policy and every item's candidates hold an
    acceptable one; with k = 1 the agent plays the item nearest its proto-action. The agent's own fraction is its
    policy's exact return, recomputed here from its networks."""
    env_flags = ["--env", "Recommender-v0", "--env-kwargs", "n_items=300", "neighbours=20"]
    assert main.main([*env_flags, *TINY[:-2], "--k", "30", "--seed", "1", "--max-episode", "20",
                      "--output", str(tmp_path)]) == 0
    run = newest_run(tmp_path)
    env = gym.make("Recommender-v0", n_items=300, neighbours=20).unwrapped
    every = choice_fractions(run, 300)
    assert every["best of the k by true gain"] == pytest.approx(1.0, abs=5e-4)
    has_acceptable = np.mean([(env.accept_probability(np.full(300, i), np.arange(300)) > 0).any() for i in range(300)])
    assert every["items whose k neighbours hold an acceptable item"] == pytest.approx(has_acceptable, abs=5e-4)
    one = choice_fractions(run, 1)
    assert one["agent (critic's best of k)"] == one["item nearest the proto-action"] == one["best of the k by true gain"]

    setup = main.build(main.parse_args([*env_flags, *TINY[:-2], "--k", "300", "--mode", "test",
                                        "--load-model-dir", str(run)]))
    agent, space = setup.agent, setup.space
    chosen = [int(space.to_env(agent.select_action(env.action_embeddings[i].copy(), explore=False))) for i in range(300)]
    assert every["agent (critic's best of k)"] == pytest.approx(env.policy_return(np.array(chosen)) / env.optimal_return,
                                                                 abs=5e-4)


def test_cell_bounds_hold_over_each_cell_and_are_exact_for_single_points():
    """bench.py bounds: both upper bounds of Q over a cell of candidates reach each of its points' Q; the linear one is
    never looser than the interval one; a cell of one point is bounded by its exact Q."""
    from action_space import GridActionSpace
    from bench import cell_bounds
    rng = np.random.default_rng(0)
    hidden, space = 32, GridActionSpace((2, 2, 3, 2, 4, 2))
    w_action, w_out, pre_state = rng.normal(0, 0.5, (hidden, space.dim)), rng.normal(0, 1, hidden), rng.normal(0, 1, hidden)
    points = space.points(space.search(rng.uniform(-1, 1, (1, space.dim)), 60)[0]).astype(np.float64)
    q = np.maximum(pre_state + points @ w_action.T, 0) @ w_out
    free = np.array([4, 0, 2])
    fixed = np.setdiff1d(np.arange(space.dim), free)
    cells = np.unique(points[:, fixed], axis=0, return_inverse=True)[1].ravel()
    interval, linear = cell_bounds(pre_state, points, cells, free, w_action, w_out)
    assert len(interval) == len(linear) == cells.max() + 1 > 1
    best_in_cell = np.full(len(linear), -np.inf)
    np.maximum.at(best_in_cell, cells, q)
    assert np.all(linear >= best_in_cell - 1e-9) and np.all(linear <= interval + 1e-9)
    assert np.any(linear < interval - 1e-6)  # cancellation between units: tighter somewhere
    singles = np.arange(len(points))
    for bound in cell_bounds(pre_state, points, singles, np.array([], int), w_action, w_out):
        assert np.allclose(bound, q)


def test_profile_lists_where_a_step_goes_and_refuses_an_unknown_or_ambiguous_configuration():
    run = lambda *args: subprocess.run([sys.executable, "bench.py", "profile", *args], cwd=ROOT, capture_output=True,
                                       text=True, timeout=240)
    result = run("CartPole", "--steps", "5", "--top", "5")
    assert result.returncode == 0, result.stderr
    assert "CartPole-v1: " in result.stdout and "ms per env step under the profiler" in result.stdout
    assert "Ordered by: internal time" in result.stdout
    unknown = run("NoSuchConfiguration")
    assert unknown.returncode != 0 and unknown.stderr.strip().startswith("error: no configurations' names contain")
    ambiguous = run("Pendulum")  # two configurations: profile times one, so it asks which
    assert ambiguous.returncode != 0 and "error: 2 configurations' names contain 'Pendulum'" in ambiguous.stderr
    assert "k=2000" in ambiguous.stderr and "k=20000" in ambiguous.stderr
    whole = run("Pendulum-v0, 200000 actions, k=2000", "--steps", "1", "--top", "1")  # also a part of k=20000's
    assert whole.returncode == 0 and "Pendulum-v0, 200000 actions, k=2000: " in whole.stdout, whole.stderr


def test_act_times_one_observation_and_batches(tmp_path):
    """bench.py act: a result file per configuration with the CPU, commit, command and updates done, and per batch
    size (1, 64, 1,024) ms per call and observations per second."""
    argv = ["bench.py", "act", "--only", "CartPole", "--updates", "10", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "act_cartpole_steady.json").read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert saved["cpu"] and saved["commit"].startswith(head.strip()) and saved["command"] == "python " + " ".join(argv)
    row = saved["configs"]["CartPole-v1"]
    assert row["updates_before"] == 10 and row["k"] == 2 and list(row["batches"]) == ["1", "64", "1024"]
    for batch, figures in row["batches"].items():
        assert figures["ms_min"] <= figures["ms_per_call"] <= figures["ms_max"]
        assert figures["observations_per_second"] == pytest.approx(1e3 * int(batch) / figures["ms_per_call"])
    assert "| CartPole-v1 | 1024 |" in result.stdout
