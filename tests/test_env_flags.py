"""--env-kwargs, observation spaces other than a Box, and the built-in envs through main.py."""
import gymnasium as gym
import numpy as np
import pytest

import main
from tests.test_main import metrics, run_main
from wolpertinger import make_env

TOY = "tests.toy_envs:ObservationToy-v0"


def test_env_kwargs_values_are_typed():
    def parsed(*items: str) -> dict:
        return main.options_of(main.parse_args(["--env-kwargs", *items]))["env_kwargs"]
    assert parsed("n=10", "x=0.5", "y=-2e3", "on=true", "off=False", "name=abc", "empty=") == \
        dict(n=10, x=0.5, y=-2000.0, on=True, off=False, name="abc", empty="")
    assert type(parsed("n=10")["n"]) is int


@pytest.mark.parametrize("observation", ["discrete", "multibinary", "multidiscrete", "dict"])
def test_observations_are_flattened_by_gymnasium_to_float32(observation):
    env = make_env(TOY, dict(observation=observation))
    raw_space = env.unwrapped.observation_space
    assert env.observation_space.dtype == np.float32 and env.observation_space.shape == (gym.spaces.flatdim(raw_space),)
    for act in (lambda: env.reset(seed=1), lambda: env.step(1), lambda: env.step(0)):
        obs = act()[0]
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs, gym.spaces.flatten(raw_space, env.unwrapped.last).astype(np.float32))
    if observation == "discrete":  # one-hot
        assert obs.sum() == 1 and obs[env.unwrapped.last - 1] == 1


def test_box_observations_stay_as_they_are():
    env = make_env("CartPole-v1")
    assert env.observation_space == gym.make("CartPole-v1").observation_space and env.unwrapped is not env


@pytest.mark.parametrize("observation, kind", [("text", "Text"), ("graph", "Graph"), ("sequence", "Sequence"),
                                               ("dict_with_text", "Text")])
def test_unflattenable_observations_are_refused(observation, kind):
    with pytest.raises(ValueError, match=f"observes a .*{kind}"):
        make_env(TOY, dict(observation=observation))


# The runs below stay within the warm-up (random actions, no compiled graphs: seconds, not a minute); updates on
# flattened observations are the same code as on a Box, which the CartPole and Pendulum runs of test_main cover.
@pytest.mark.parametrize("env, kwargs", [(TOY, ["observation=dict"]), ("Recommender-v0", ["n_items=1000", "world_seed=2"])])
def test_built_in_and_dict_observation_envs_run_through_main(env, kwargs, tmp_path):
    result = run_main("--env", env, "--env-kwargs", *kwargs, "--max-episode", 5, "--warmup", 10000, "--eval-every", 0,
                      "--seed", 1, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = next(tmp_path.iterdir())
    assert len(metrics(run_dir)) == 5 and f"env_kwargs: {main.options_of(main.parse_args(['--env-kwargs', *kwargs]))['env_kwargs']}" in (run_dir / "RS_train_log").read_text()
    assert all(float(r["return"]).is_integer() and float(r["return"]) >= 0 for r in metrics(run_dir))


@pytest.mark.parametrize("flags, words", [
    (["--env", "Recommender-v0", "--env-kwargs", "no_such_key=1"], "no_such_key"),
    (["--env", "Recommender-v0", "--env-kwargs", "n_items=many"], "n_items must be an integer"),
    (["--env", "Configurator-v0", "--env-kwargs", "noise=-1"], "noise must be"),
    (["--env", "Recommender-v0", "--env-kwargs", "n_items"], "KEY=VALUE"),
    (["--env", TOY, "--env-kwargs", "observation=text"], "observes a Text"),
])
def test_bad_env_kwargs_and_observations_are_one_line_errors(flags, words, tmp_path):
    result = run_main(*flags, "--output", tmp_path / "out", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
