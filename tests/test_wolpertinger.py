"""The public class: the same runs as main.py, acting and ranking against numpy, save and load, bad input."""
import gymnasium as gym
import numpy as np
import pytest

from tests.test_main import metrics
from tests.test_update_numpy import critic_forward
from tests.toy_envs import ContextToy, EmbeddedItemsToy, ObservationToy
from wolpertinger import OptionError, Wolpertinger

def observations(agent: Wolpertinger, n: int) -> list:
    """n observations of the agent's env, in the env's own format."""
    env, found = agent.env.unwrapped, []
    obs, _ = env.reset(seed=0)
    while len(found) < n:
        found.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    return found


AGENTS = {  # each way of reaching candidates: the in-graph window, the host's search over a grid (tabulated and
    # not) and over embedded items
    "window": lambda: Wolpertinger("Pendulum-v1", max_actions=2001, k=40, seed=3),
    "grid, tabulated": lambda: Wolpertinger(ContextToy("binary", 12), k=30, seed=3),
    "grid": lambda: Wolpertinger(ContextToy("discrete", 4), k=30, seed=3),
    "embeddings": lambda: Wolpertinger(EmbeddedItemsToy(), k=25, seed=3),
}


@pytest.fixture(scope="module", params=AGENTS)
def agent(request) -> Wolpertinger:
    return AGENTS[request.param]()


def test_a_batch_acts_as_its_observations_one_by_one(agent):
    batch = np.stack(observations(agent, 9))
    one_by_one = [agent.act(obs) for obs in batch]
    together = agent.act(batch)
    assert len(together) == len(batch)
    for a, b in zip(together, one_by_one):
        np.testing.assert_array_equal(a, b)


def test_rank_gives_the_best_candidates_with_their_q_best_first(agent):
    """Each ranked candidate's value is Q(s, a) recomputed in numpy for its own state, best first, and the best is
    the action `act` plays."""
    obs = np.stack(observations(agent, 3))
    params = {name: agent.agent.critic.view(name).numpy().astype(np.float64) for name in agent.agent.critic.shapes}
    rankings = agent.rank(obs, n=5)
    assert len(rankings) == 3
    for state, ranking, action in zip(obs, rankings, agent.act(obs)):
        values = np.array([r.value for r in ranking])
        assert len(ranking) == 5 and np.all(np.diff(values) <= 1e-6)
        points = agent.space.points(np.array([r.action_id for r in ranking]))
        q = critic_forward(params, np.repeat(np.asarray(state, np.float64).reshape(1, -1), 5, 0), points)[0]
        np.testing.assert_allclose(values, q, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(ranking[0].action, action)
        for r in ranking:
            np.testing.assert_array_equal(r.action, agent.space.to_env(np.asarray(r.action_id)))
    assert agent.rank(obs[0], n=1)[0].action_id == rankings[0][0].action_id  # one observation: one list


def test_exploring_is_noisier_than_acting(agent):
    batch = np.stack(observations(agent, 64))
    plain = [np.asarray(a).tolist() for a in agent.act(batch)]
    explored = [np.asarray(a).tolist() for a in agent.act(batch, explore=True)]
    assert plain != explored


def test_saved_and_loaded_it_acts_the_same_on_an_unregistered_env(tmp_path):
    agent = Wolpertinger(ObservationToy("dict"), seed=4, warmup=5, eval_every=0, save_seconds=0)
    agent.learn(episodes=3, run_dir=tmp_path / "run")
    obs = observations(agent, 6)  # dicts: the env's own observations
    loaded = Wolpertinger.load(tmp_path / "run", env=ObservationToy("dict"))
    assert loaded.act(obs) == agent.act(obs) and loaded.k == agent.k
    with pytest.raises(ValueError, match="differ from the saved run"):
        Wolpertinger.load(tmp_path / "run", env=ObservationToy("discrete"))
    # and continued: the loaded run learns on from where it stopped, into a folder of its own
    run_dir = loaded.learn(episodes=4, run_dir=tmp_path / "more")
    assert [r["episode"] for r in metrics(run_dir)] == ["1", "2", "3", "4"]


def test_a_callback_sees_each_episode_and_can_stop_training(tmp_path):
    seen = []
    agent = Wolpertinger("CartPole-v1", seed=1, warmup=10, eval_every=0)
    agent.learn(episodes=50, run_dir=tmp_path / "run", callback=lambda info: seen.append(info) or len(seen) < 3)
    assert [info["episode"] for info in seen] == [1, 2, 3] and agent.episode == 3
    assert all(set(info) == {"episode", "env_steps", "return", "eval_return", "wall_seconds"} for info in seen)
    assert len(metrics(tmp_path / "run")) == 3 and (tmp_path / "run" / "checkpoint.safetensors").is_file()


@pytest.fixture(scope="module")
def cartpole() -> Wolpertinger:
    return Wolpertinger("CartPole-v1", seed=1)


@pytest.mark.parametrize("call, message", [
    (lambda a: a.act(np.zeros(3)), "shape"),
    (lambda a: a.act(np.zeros((2, 5))), "shape"),
    (lambda a: a.act(np.array([0, np.nan, 0, 0])), "not finite"),
    (lambda a: a.act(np.array(["a", "b", "c", "d"])), "numbers"),
    (lambda a: a.rank(np.zeros(4), n=3), "n must be"),
    (lambda a: a.rank(np.zeros(4), n=0), "n must be"),
])
def test_bad_observations_and_n_are_value_errors(cartpole, call, message):
    with pytest.raises(ValueError, match=message):
        call(cartpole)


def test_bad_options_and_folders_are_value_errors(tmp_path):
    with pytest.raises(OptionError, match="gama is not an option; did you mean gamma"):
        Wolpertinger("CartPole-v1", gama=0.5)
    with pytest.raises(OptionError, match=r"gamma must be in \[0, 1\] \(got 1.5\)"):
        Wolpertinger("CartPole-v1", gamma=1.5)
    with pytest.raises(ValueError, match="no such folder"):
        Wolpertinger.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no trained agent"):
        Wolpertinger.load(tmp_path)
    with pytest.raises(ValueError, match="already holds files"):
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "notes.txt").write_text("mine")
        Wolpertinger("CartPole-v1").learn(episodes=1, run_dir=tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_importable_from_another_folder_with_exactly_the_installed_modules(tmp_path):
    """From a scratch folder, with this checkout on the path as `pip install -e .` puts it (pyproject.toml's
    py-modules): the class imports, acts, and needs no module of this folder that the install leaves out."""
    import os
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    installed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    script = ("import sys; from wolpertinger import Wolpertinger; import numpy as np\n"
              "agent = Wolpertinger('CartPole-v1', seed=1); print(agent.act(np.zeros(4)))\n"
              "import os; print(sorted(n for n, m in sys.modules.items() if "
              f"os.path.dirname(getattr(m, '__file__', None) or '') == {str(root)!r}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert result.returncode == 0, result.stderr
    action, used = result.stdout.strip().splitlines()[-2:]
    assert action in ("0", "1") and set(eval(used)) <= installed, (used, installed)
