"""Recommender-v0's slates, dict observations and hidden users against brute force, the definition and sampling."""
import itertools

import gymnasium as gym
import numpy as np
import pytest

import envs
from tests.test_envs import dense_acceptance


def make(**kwargs):
    return gym.make("Recommender-v0", **kwargs).unwrapped


def definition_probabilities(w: np.ndarray, slate, decay: float) -> np.ndarray:
    """P[i, k] that a user at item i accepts the slate's position k: examined in order, w = 0 for a repeated item,
    on past each declined position with probability `decay`."""
    probabilities, reached = np.zeros((len(w), len(slate))), np.ones(len(w))
    for k, item in enumerate(slate):
        accept = np.zeros(len(w)) if item in slate[:k] else w[:, item]
        probabilities[:, k] = reached * accept
        reached = reached * (1 - accept) * decay
    return probabilities


def solve_values(accepted: np.ndarray) -> np.ndarray:
    """V = sum_j accepted_ij (1 + 0.9 V_j) + (1 - sum_j accepted_ij) 0.8 Vbar, solved as one dense linear system."""
    n, total = len(accepted), accepted.sum(1)
    return np.linalg.solve(np.eye(n) - 0.9 * accepted - 0.8 / n * (1 - total)[:, None] * np.ones((1, n)), total)


# --- the optimum and the random return against every slate ------------------------------------------------------------

@pytest.mark.parametrize("n_items, neighbours, slate_size, decay, world_seed", [
    (6, 1.8, 2, 0.8, 0), (6, 1.8, 3, 0.8, 1), (20, 6, 3, 0.8, 0), (20, 6, 3, 1.0, 2), (20, 6, 2, 0.3, 3),
    (12, 3.7, 3, 0.0, 4)])
def test_slate_optimum_and_random_return_match_brute_force(n_items, neighbours, slate_size, decay, world_seed):
    env = make(n_items=n_items, neighbours=neighbours, slate_size=slate_size, attention_decay=decay,
               world_seed=world_seed)
    w = dense_acceptance(env.world)
    slates = np.array(list(itertools.product(range(n_items), repeat=slate_size)))  # every slate, repeats included
    p = np.stack([definition_probabilities(w, tuple(s), decay) for s in slates], 1)  # (items, slates, positions)
    chosen, v = np.zeros(n_items, np.int64), None
    while True:  # policy iteration over all slates, each policy evaluated by one dense linear solve
        q = None if v is None else np.einsum("isk,sk->is", p, 1 + 0.9 * v[slates]) + (1 - p.sum(2)) * 0.8 * v.mean()
        if q is not None and (q.max(1) <= q[np.arange(n_items), chosen] + 1e-13).all():
            break
        chosen = chosen if q is None else q.argmax(1)
        accepted = np.zeros((n_items, n_items))  # the probability that item i's slate is accepted at item j
        for k in range(slate_size):
            np.add.at(accepted, (np.arange(n_items), slates[chosen, k]), p[np.arange(n_items), chosen, k])
        v = solve_values(accepted)
    assert env.optimal_return == pytest.approx(v.mean(), rel=1e-12)
    optimal = (env.optimal_actions[:, None, :] == slates[None]).all(2).argmax(1)
    np.testing.assert_allclose(q[np.arange(n_items), optimal], v, rtol=1e-12)  # the optimal slates attain it
    assert env.policy_return(env.optimal_actions) == pytest.approx(env.optimal_return, rel=1e-12)
    assert env.best_single_item_return == make(n_items=n_items, neighbours=neighbours,
                                               world_seed=world_seed).optimal_return
    assert env.best_single_item_return <= env.optimal_return
    # uniformly random slates of distinct items: the mean acceptance of each item, then one linear system
    distinct = np.array([len(set(s)) == slate_size for s in slates])
    accepted = np.zeros((n_items, n_items))
    for k in range(slate_size):
        np.add.at(accepted.T, slates[distinct, k], p[:, distinct, k].T)
    assert env.random_return == pytest.approx(solve_values(accepted / distinct.sum()).mean(), rel=1e-12)


def test_slate_size_one_is_the_single_item_env_bit_for_bit():
    # items visited and rewards recorded before slates existed: seed 11, random and optimal recommendations in turn
    before = [40, 38, 162, 164, 21, 43, 104, 153, 282, 245, 247, 145, 266, 260, 265, 72, 44, 183, 9, 187, 59, 209, 256,
              16, 279, 95, 2, 139, 76, 8, 183, 108, 283, 65, 110, 282, 263, 12, 90, 222]
    runs = []
    for kwargs in ({}, dict(slate_size=1, attention_decay=0.3, observation="box")):
        env = make(n_items=300, **kwargs)
        assert env.optimal_return == 3.3367729214446085 and env.random_return == 0.02209419535028081
        assert env.action_space == gym.spaces.Discrete(300) and env.observation_space.shape == (8,)
        rng = np.random.default_rng(3)
        obs, info = env.reset(seed=11)
        items, rewards, observations = [info["item"]], [], [obs]
        for t in range(200):
            action = env.optimal_actions[items[-1]] if t % 2 else int(rng.integers(300))
            obs, reward, terminated, _, info = env.step(action)
            assert set(info) == {"item", "accepted"}
            if terminated:
                obs, info = env.reset()
            items.append(info["item"]), rewards.append(reward), observations.append(obs)
        assert items[:40] == before and sum(rewards) == 45.0
        runs.append(np.stack(observations))
    np.testing.assert_array_equal(runs[0], runs[1])


# --- the choice model -------------------------------------------------------------------------------------------------

def test_slate_positions_are_accepted_as_the_formula_says():
    env = make(n_items=50, neighbours=12, slate_size=5, attention_decay=0.7)
    w = dense_acceptance(env.world)
    item = int(np.argmax(np.sort(w, 1)[:, -3:].sum(1)))  # an item with three well acceptable items
    a, b, c = np.argsort(w[item])[::-1][:3]
    slate = np.array([b, a, b, 0 if w[item, 0] == 0 else item, c])  # a repeat, and an item never accepted
    expected = definition_probabilities(w, tuple(slate), 0.7)[item]
    assert expected[1] > 0.05 and expected[2] == 0 and expected[3] == 0 and expected[4] > 0.005
    env.reset(seed=0)
    counts, draws = np.zeros(6), 20000
    for _ in range(draws):
        env.item = item
        _, reward, _, _, info = env.step(slate)
        counts[info["slot"]] += 1  # slot -1: nothing accepted
        assert reward == float(info["accepted"]) == float(info["slot"] >= 0)
        assert info["item"] == slate[info["slot"]] or info["slot"] == -1
    frequencies = np.append(expected, 1 - expected.sum())
    seen = frequencies > 0
    assert counts[~seen].sum() == 0
    chi2 = ((counts[seen] - draws * frequencies[seen]) ** 2 / (draws * frequencies[seen])).sum()
    assert chi2 < 25, (counts, draws * frequencies)  # at most 4 degrees of freedom: p < 1e-4 above 23.5


def test_any_slate_in_the_action_space_steps_and_bad_actions_are_refused():
    env = make(n_items=6, neighbours=1.8, slate_size=6)
    assert env.action_space == gym.spaces.MultiDiscrete([6] * 6)
    env.reset(seed=1)
    env.action_space.seed(1)
    for _ in range(300):  # mostly with repeats
        _, _, terminated, _, _ = env.step(env.action_space.sample())
        if terminated:
            env.reset()
    env.step(np.full(6, 5, np.int32))
    for bad in (np.arange(5), np.arange(7), np.array([0, 1, 2, 3, 4, 6]), np.array([-1, 1, 2, 3, 4, 5]),
                np.arange(6.0)):
        with pytest.raises(ValueError, match="slate"):
            env.step(bad)


# --- observations -----------------------------------------------------------------------------------------------------

def check_dict_observations(env, policy, steps: int, seed: int):
    """Step `env` and check each observation against what happened: the viewed item, the last slate and its click,
    and the moving average of the clicked embeddings."""
    e, s = env.action_embeddings, env.slate_size
    obs, info = env.reset(seed=seed)
    history = np.zeros(e.shape[1])
    assert obs["slate"].shape == (s, e.shape[1]) and not obs["slate"].any() and not obs["clicks"].any()
    for _ in range(steps):
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs["item"], e[info["item"]])
        np.testing.assert_allclose(obs["history"], history, atol=1e-6)
        action = policy(info["item"])
        obs, _, terminated, _, info = env.step(action)
        slate = np.atleast_1d(action)
        np.testing.assert_array_equal(obs["slate"], e[slate])
        slot = info.get("slot", 0 if info["accepted"] else -1)
        np.testing.assert_array_equal(obs["clicks"], np.arange(s) == slot)
        if info["accepted"]:
            history = 0.7 * history + 0.3 * e[info["item"]]
        if terminated:
            obs, info = env.reset()
            history[:] = 0
            assert not obs["history"].any() and not obs["clicks"].any()


@pytest.mark.parametrize("slate_size", [1, 3])
def test_dict_observation_holds_the_item_the_last_slate_its_clicks_and_history(slate_size):
    env = make(n_items=200, slate_size=slate_size, observation="dict")
    assert set(env.observation_space.spaces) == {"item", "slate", "clicks", "history"}
    assert env.observation_space["clicks"] == gym.spaces.MultiBinary(slate_size)
    rng = np.random.default_rng(0)
    random_slate = (lambda item: int(rng.integers(200))) if slate_size == 1 else \
        (lambda item: rng.integers(200, size=slate_size))
    check_dict_observations(env, lambda item: env.optimal_actions[item] if rng.random() < 0.7 else random_slate(item),
                            400, seed=2)


# --- hidden users -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slate_size", [1, 10])
def test_hidden_users_stay_hidden_and_the_oracle_beats_random(slate_size):
    env = make(n_items=2000, slate_size=slate_size, hidden_user=True)
    assert env.observation == "dict" and not hasattr(env, "optimal_return")
    # the observation is what the user did: checked against the items, slates and clicks alone
    check_dict_observations(env, lambda item: env.oracle_slate(), 200, seed=3)
    _, info = env.reset(seed=4)
    user = env.user.copy()
    assert set(info) == {"item"} and user.shape == (envs.HIDDEN_TOPICS,)
    env.reset()
    assert not np.allclose(env.user, user)  # a new user each episode
    # the oracle knows the user: far above random, and its Monte-Carlo return is what the env gives it
    gap = env.greedy_oracle_return - env.random_return
    assert gap > 0.5 * env.greedy_oracle_return and gap > 10 * (env.greedy_oracle_stderr + env.random_stderr)
    blind = make(n_items=2000, slate_size=slate_size).optimal_actions  # optimal for users without hidden interests
    returns = {}
    for name, policy in (("oracle", lambda: env.oracle_slate()), ("blind", lambda: blind[env.item])):
        env.reset(seed=6)
        returns[name] = []
        for _ in range(600):
            env.reset()
            total, done = 0.0, False
            while not done:
                _, reward, done, _, _ = env.step(policy())
                total += reward
            returns[name].append(total)
    mean, stderr = np.mean(returns["oracle"]), np.std(returns["oracle"]) / np.sqrt(600)
    assert abs(mean - env.greedy_oracle_return) < 4 * np.hypot(stderr, env.greedy_oracle_stderr), mean
    # not knowing the user costs much (Monte Carlo: 1.86 against 2.95 at slates of 1, 4.80 against 5.89 of 10)
    blind_stderr = np.std(returns["blind"]) / np.sqrt(600)
    assert np.mean(returns["blind"]) < env.greedy_oracle_return - 4 * np.hypot(blind_stderr, env.greedy_oracle_stderr)


def test_hidden_users_interests_in_topics_multiply_acceptance():
    env = make(n_items=300, neighbours=24, slate_size=3, hidden_user=True)
    world, topic = env.world, env.topics.topic
    # each topic adds a unit direction to the embeddings, orthogonal to the other topics' and to the world's features
    directions = env.action_embeddings.astype(np.float64) - world.embeddings
    unit = np.stack([directions[topic == t][0] for t in range(envs.HIDDEN_TOPICS)])
    np.testing.assert_allclose(directions, unit[topic], atol=1e-6)
    np.testing.assert_allclose(unit @ unit.T, np.eye(envs.HIDDEN_TOPICS), atol=1e-6)
    assert np.abs(world.embeddings @ unit.T).max() < 1e-6
    env.reset(seed=0)
    item, user = env.item, env.user
    assert user.shape == (envs.HIDDEN_TOPICS,) and 0 <= user.min() and user.max() <= 1
    w = dense_acceptance(world)[item] * user[topic]
    slate = env.oracle_slate()
    np.testing.assert_allclose(w[slate], np.sort(w)[::-1][:3], rtol=1e-12)  # the oracle: the largest w u[topic]
    expected = definition_probabilities(w[None, :], tuple(slate), 0.8)[0]
    counts, draws = np.zeros(4), 10000
    for _ in range(draws):
        env.item = item
        counts[env.step(slate)[4]["slot"]] += 1
    frequencies = np.append(expected, 1 - expected.sum())
    chi2 = ((counts - draws * frequencies) ** 2 / (draws * frequencies)).sum()
    assert frequencies.min() > 0.01 and chi2 < 22, (counts, draws * frequencies)  # 3 degrees of freedom: p < 1e-4


# --- keywords ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(slate_size=0), "slate_size"), (dict(n_items=20, neighbours=3, slate_size=21), "slate_size"),
    (dict(slate_size=2.0), "slate_size"), (dict(slate_size=True), "slate_size"),
    (dict(n_items=100, variants=2, slate_size=2), "slate_size"), (dict(attention_decay=-0.1), "attention_decay"),
    (dict(attention_decay=1.5), "attention_decay"), (dict(attention_decay=float("nan")), "attention_decay"),
    (dict(attention_decay="high"), "attention_decay"), (dict(observation="image"), "observation"),
    (dict(hidden_user="yes"), "hidden_user"), (dict(hidden_user=1), "hidden_user"),
    (dict(hidden_user=True, dim=7), "dim"), (dict(n_items=100, variants=2, hidden_user=True), "hidden_user"),
])
def test_slate_keywords_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gym.make("Recommender-v0", **kwargs)
