"""Run-folder files: the metrics kept in memory match the CSV; long runs plot at a bounded cost; the cores a
process may use."""
import os

import numpy as np

from util import CORES_ENV, RunLog, plot_runs, read_metrics, usable_cores


def test_metrics_in_memory_equal_the_csv(tmp_path):
    log = RunLog(tmp_path, "train", {"env": "X"})
    rng = np.random.default_rng(0)
    for episode in range(1, 8):
        log.episode(episode, 10 * episode, rng.normal(), 0.5 * episode, rng.normal() if episode % 3 == 0 else None)
    in_memory = log.metrics()
    log.close()
    from_csv = read_metrics(tmp_path / "metrics.csv")
    for name, column in from_csv.items():   # the CSV rounds to 4 decimals (returns) and 2 (seconds)
        np.testing.assert_allclose(in_memory[name], column, atol=6e-3, equal_nan=True, err_msg=name)
    assert np.isnan(in_memory["eval_return"]).sum() == 5


def test_a_long_run_is_drawn_with_a_bounded_number_of_points(tmp_path, monkeypatch):
    import matplotlib.axes
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, *a, **kw: drawn.append(len(x)) or plot(self, x, *a, **kw))
    n = 50_000
    episodes = np.arange(1, n + 1, dtype=float)
    metrics = {"episode": episodes, "env_steps": 200 * episodes, "return": np.sin(episodes / 500),
               "wall_seconds": episodes, "eval_return": np.where(episodes % 10 == 0, 1.0, np.nan)}
    plot_runs([("run", metrics)], tmp_path / "curve.png", "long run", max_points=1000)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn and max(drawn) <= 1000


def test_a_run_without_episodes_still_plots(tmp_path):
    log = RunLog(tmp_path, "train", {})
    plot_runs([("run", log.metrics())], tmp_path / "curve.png", "stopped before its first episode")
    log.close()
    assert (tmp_path / "curve.png").is_file()


def test_usable_cores_follow_the_affinity_and_the_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv(CORES_ENV, raising=False)
    assert usable_cores() == 3
    for limit, cores in (("2", 2), ("64", 3), ("0", 1), (" 1 ", 1)):
        monkeypatch.setenv(CORES_ENV, limit)
        assert usable_cores() == cores
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none: all the machine's cores
    monkeypatch.delenv(CORES_ENV)
    assert usable_cores() == (os.cpu_count() or 1)
