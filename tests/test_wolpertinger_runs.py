"""The public class on env instances learns exactly as main.py does on their ids: same seed, same options, same
returns and evaluations (a file of its own, so that the test runner runs it beside test_wolpertinger.py)."""
import gymnasium as gym
import pytest

import main
from tests.test_main import metrics
from wolpertinger import Wolpertinger

SHORT = dict(max_episode_length=20, warmup=10, eval_every=2, eval_episodes=1, seed=2, save_seconds=0)
RUNS = {  # env id, its instance, options, episodes (enough for updates after the warm-up)
    "CartPole-v1": ("CartPole-v1", lambda: gym.make("CartPole-v1"), {}, 2),
    "Pendulum-v0": ("Pendulum-v0", lambda: gym.make("Pendulum-v1"), {"max_actions": 200000}, 2),
    "Recommender-v0": ("Recommender-v0", lambda: gym.make("Recommender-v0", n_items=500),
                       {"env_kwargs": {"n_items": 500}}, 8),
    "Configurator-v0": ("Configurator-v0", lambda: gym.make("Configurator-v0", n_choices=8),
                        {"env_kwargs": {"n_choices": 8}}, 14),
}


def command_line(options: dict) -> list[str]:
    """main.py's flags for these options."""
    flags = []
    for name, value in options.items():
        values = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else [str(value)]
        flags += [main.option(name), *values]
    return flags


@pytest.mark.parametrize("run", RUNS)
def test_the_class_on_an_env_instance_learns_as_main_py_does(run, tmp_path):
    env_id, make, options, episodes = RUNS[run]
    assert main.main(["--env", env_id, "--max-episode", str(episodes), *command_line({**SHORT, **options}),
                      "--output", str(tmp_path / "cli")]) == 0
    kwargs = {name: value for name, value in options.items() if name != "env_kwargs"}
    run_dir = Wolpertinger(make(), **SHORT, **kwargs).learn(episodes=episodes, run_dir=tmp_path / "class")
    cli = metrics(next((tmp_path / "cli").iterdir()))
    assert [(r["return"], r["eval_return"]) for r in metrics(run_dir)] == [(r["return"], r["eval_return"]) for r in cli]
    assert int(cli[-1]["env_steps"]) > SHORT["warmup"] + 1  # updates ran
    assert {"RS_train_log", "metrics.csv", "checkpoint.safetensors", "reward_curve.png"} <= \
        {p.name for p in run_dir.iterdir()}


