"""The built-in envs against dense numpy re-computations, brute force and Monte-Carlo rollouts."""
import gymnasium as gym
import numpy as np
import pytest

import envs


def make(env_id: str, **kwargs):
    return gym.make(env_id, **kwargs).unwrapped


# --- Recommender-v0 ---------------------------------------------------------------------------------------------------

def dense_acceptance(world: envs.RecommenderWorld) -> np.ndarray:
    """w_ij for every pair, from the definition: q_j (1 - rho^2)^2 with rho = |z_j - z_i - s| / r on the torus."""
    delta = world.position[None, :, :] - world.position[:, None, :] - world.shift
    delta -= np.round(delta)
    rho2 = (delta ** 2).sum(-1) / world.radius ** 2
    return np.where(rho2 < 1, world.quality[None, :] * (1 - rho2) ** 2, 0.0)


def dense_value_iteration(w: np.ndarray, sweeps: int = 800) -> np.ndarray:
    """V_i = max over all j of w_ij (1 + 0.9 V_j) + (1 - w_ij) 0.8 Vbar, by plain value iteration."""
    v = np.zeros(len(w))
    for _ in range(sweeps):
        v = (w * (1 + 0.9 * v[None, :]) + (1 - w) * 0.8 * v.mean()).max(1)
    return v


def dense_random_return(w: np.ndarray) -> float:
    """Solve V = mean_j [w_ij (1 + 0.9 V_j) + (1 - w_ij) 0.8 Vbar] as one dense linear system."""
    n = len(w)
    a = np.eye(n) - 0.9 / n * w - 0.8 / n ** 2 * (1 - w).sum(1, keepdims=True) * np.ones((1, n))
    return float(np.linalg.solve(a, w.mean(1)).mean())


@pytest.mark.parametrize("n_items, neighbours, world_seed, variants", [(50, 12, 0, 1), (400, 5, 3, 1), (60, 12, 1, 3),
                                                                         (400, 24, 2, 4)])
def test_recommender_optimum_matches_dense_value_iteration(n_items, neighbours, world_seed, variants):
    env = make("Recommender-v0", n_items=n_items, neighbours=neighbours, world_seed=world_seed, variants=variants)
    w = dense_acceptance(env.world)
    assert env.world.nonzeros == np.count_nonzero(w)  # the cell search found every acceptable item
    np.testing.assert_allclose(env.accept_probability(np.arange(n_items)[:, None], np.arange(n_items)[None]), w,
                               atol=1e-15)
    v = dense_value_iteration(w)
    np.testing.assert_allclose(env.world.values, v, rtol=1e-9)
    assert env.optimal_return == pytest.approx(v.mean(), rel=1e-9)
    q = w * (1 + 0.9 * v[None, :]) + (1 - w) * 0.8 * v.mean()
    np.testing.assert_allclose(q[np.arange(n_items), env.optimal_actions], v, rtol=1e-9)  # optimal actions attain it
    assert env.policy_return(env.optimal_actions) == pytest.approx(env.optimal_return, rel=1e-12)
    assert env.random_return == pytest.approx(dense_random_return(w), rel=1e-9)
    assert env.random_return < 0.2 * env.optimal_return


def rollouts(env, policy, episodes: int, seed: int):
    """Returns per episode, and per step (w of the pair, accepted, terminated, next item)."""
    env.reset(seed=seed)
    returns, steps = [], []
    for _ in range(episodes):
        obs, info = env.reset()
        total, done = 0.0, False
        while not done:
            item = info["item"]
            np.testing.assert_array_equal(obs, env.action_embeddings[item])
            action = policy(item)
            w = float(env.accept_probability(item, action))
            obs, reward, done, truncated, info = env.step(action)
            assert not truncated and reward == float(info["accepted"])
            steps.append((w, info["accepted"], done, info["item"]))
            total += reward
        returns.append(total)
    return np.array(returns), np.array(steps)


def test_recommender_rollouts_agree_with_the_exact_returns_and_probabilities():
    env = make("Recommender-v0", n_items=50, neighbours=12)
    rng = np.random.default_rng(0)
    for policy, expected, seed in ((lambda i: env.optimal_actions[i], env.optimal_return, 1),
                                   (lambda i: int(rng.integers(50)), env.random_return, 2)):
        returns, steps = rollouts(env, policy, 4000, seed)
        # within 4 standard errors of the Monte-Carlo mean
        assert abs(returns.mean() - expected) < 4 * returns.std() / np.sqrt(len(returns)), (returns.mean(), expected)
        w, accepted, ended, nxt = steps.T
        assert abs(accepted.sum() - w.sum()) < 4 * np.sqrt((w * (1 - w)).sum())  # accepted with probability w
        for was_accepted, p_end in ((1, 0.1), (0, 0.2)):
            e = ended[accepted == was_accepted]
            assert abs(e.mean() - p_end) < 4 * np.sqrt(p_end * (1 - p_end) / len(e)), (was_accepted, e.mean())
    # after a rejection the user views a uniformly random item (chi-square, 49 degrees of freedom: p < 1e-6 above 110)
    counts = np.bincount(nxt[accepted == 0].astype(int), minlength=50)
    expected_count = counts.sum() / 50
    assert ((counts - expected_count) ** 2 / expected_count).sum() < 110


def test_recommender_nearby_items_alike_best_item_not_nearest():
    env = make("Recommender-v0", n_items=2000, neighbours=12, world_seed=5)  # the README quotes its figures
    e, v, best = env.action_embeddings.astype(np.float64), env.world.values, env.optimal_actions
    d2 = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nearest, shuffled = d2.argmin(1), np.random.default_rng(0).permutation(2000)
    # (a) an item and its nearest neighbour in embedding space accept alike (rows of W) and have close values
    w = dense_acceptance(env.world)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    assert (w * w[nearest]).sum(1).mean() > 0.8 and (w * w[shuffled]).sum(1).mean() < 0.02  # measured 0.87, 0.004
    assert np.abs(v - v[nearest]).mean() < 0.5 * np.abs(v - v[shuffled]).mean()  # measured 0.093 against 0.309
    # (b) the optimal next item is far from the item's own embedding and near the map T(e_i) of it
    assert (best != np.arange(2000)).all()
    rank_own = (d2 < d2[np.arange(2000), best][:, None]).sum(1)
    t = e @ env.world.next_item_map.T
    to_t = ((t[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    rank_t = (to_t < to_t[np.arange(2000), best][:, None]).sum(1)
    assert rank_own.min() > 100 and (rank_t < 10).mean() > 0.99, (rank_own.min(), (rank_t < 10).mean())  # 1360, 1.0
    # recommending the nearest item is never accepted; the item nearest T(e_i) is most of the optimum (measured 98%)
    assert env.policy_return(nearest) == 0.0
    assert env.policy_return(to_t.argmin(1)) > 0.9 * env.optimal_return


def test_recommender_world_seeds_and_episode_seeds_reproduce():
    first = envs.recommender_world.__wrapped__(300, 6, 8.0, 7)  # built afresh, not from the cache
    again, other = make("Recommender-v0", n_items=300, dim=6, neighbours=8.0, world_seed=7).world, \
        make("Recommender-v0", n_items=300, dim=6, neighbours=8.0, world_seed=8).world
    for name in ("embeddings", "values", "optimal_actions", "position"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.allclose(first.embeddings, other.embeddings) and first.random_return == again.random_return
    assert first.embeddings.shape == (300, 6) and first.embeddings.dtype == np.float32

    env = make("Recommender-v0", n_items=300)
    runs = []
    for _ in range(2):
        obs, info = env.reset(seed=11)
        steps = []
        for _ in range(60):  # the optimal recommendations, so that some are accepted
            steps.append(env.step(env.optimal_actions[steps[-1][4]["item"] if steps else info["item"]]))
        runs.append((np.stack([obs] + [s[0] for s in steps]), [s[1:4] for s in steps], [s[4]["item"] for s in steps]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:] and sum(r for r, *_ in runs[0][1]) > 0  # rewards, ends and items alike


def test_recommender_variants_share_a_position_and_differ_in_appeal():
    env = make("Recommender-v0", n_items=600, neighbours=40, variants=5, world_seed=2)
    world, w = env.world, dense_acceptance(env.world)
    key = [tuple(p) for p in world.position]
    groups = {}
    for i, p in enumerate(key):
        groups.setdefault(p, []).append(i)
    assert sorted(map(len, groups.values())) == [5] * 120
    rng = np.random.default_rng(0)
    for members in list(groups.values())[:20]:
        a, b = members[:2]
        np.testing.assert_array_equal(w[a], w[b])  # users at variants of one position accept alike
        np.testing.assert_array_equal(world.values[members], world.values[a])
        # the items of a position differ by their appeal only: their embeddings lie on one line
        diff = world.embeddings[members].astype(np.float64) - world.embeddings[a]
        assert np.linalg.matrix_rank(diff, tol=1e-5) == 1
        best_next = env.optimal_actions[a]  # the most appealing variant of its position
        assert world.quality[best_next] == max(world.quality[groups[key[best_next]]])
        other = rng.choice(groups[key[best_next]])
        assert w[a, other] <= w[a, best_next]
    assert world.nonzeros == np.count_nonzero(w)


def test_recommender_default_density_is_a_share_of_the_items_capped_in_total():
    assert envs.default_neighbours(10000) == 200 and envs.default_neighbours(1_000_000) == 12
    assert envs.default_neighbours(1_000_000, variants=100) == 20000 and envs.default_neighbours(600, variants=5) == 12
    assert envs.default_neighbours(50) == 1 and envs.default_neighbours(10) == 1
    world = make("Recommender-v0", n_items=2000).world  # 2%: 40 acceptable items per item
    assert world.nonzeros == pytest.approx(40 * 2000, rel=0.05)
    assert world is make("Recommender-v0", n_items=2000, neighbours=40).world


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_items=1), "n_items"), (dict(n_items=2.5), "n_items"), (dict(dim=3), "dim"), (dict(n_items="many"), "n_items"),
    (dict(neighbours=0), "neighbours"), (dict(n_items=100, neighbours=40), "neighbours"), (dict(world_seed=-1), "world_seed"),
    (dict(variants=0), "variants"), (dict(n_items=100, variants=51), "variants"), (dict(n_items=100, variants=3), "multiple"),
    (dict(dim=4, variants=2), "dim"), (dict(n_items=100, variants=5, neighbours=4), "neighbours"),
])
def test_recommender_rejects_bad_keywords(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gym.make("Recommender-v0", **kwargs)


# --- Configurator-v0 --------------------------------------------------------------------------------------------------

def definition_score(world: envs.ConfiguratorWorld, context: np.ndarray, action: np.ndarray) -> float:
    """The hidden score term by term: U_i[v_i] . x' plus P_{i,t}[v_{i-t}, v_i] . x' for every pair within the band."""
    x, v = np.append(context.astype(np.float64), 1.0), action[world.order]
    band = world.pair.shape[1]
    return sum(world.unary[i, v[i]] @ x for i in range(len(v))) + \
        sum(world.pair[i, t - 1, v[i - t], v[i]] @ x for i in range(len(v)) for t in range(1, band + 1) if i >= t)


@pytest.mark.parametrize("kwargs", [dict(n_choices=8), dict(n_choices=6, levels=3, band=3), dict(n_choices=7, band=1)])
def test_configurator_optimum_matches_brute_force(kwargs):
    env = make("Configurator-v0", n_profiles=6, profile_dim=3, world_seed=4, **kwargs)
    levels = kwargs.get("levels", 2)
    combos = np.array(np.meshgrid(*[np.arange(levels)] * kwargs["n_choices"], indexing="ij")).reshape(
        kwargs["n_choices"], -1).T
    profiles = env.world.profiles
    for p in range(2):
        assert env.score(profiles[p:p + 1], combos[7:8])[0] == pytest.approx(
            definition_score(env.world, profiles[p], combos[7]), rel=1e-12)
    scores = np.stack([env.score(np.repeat(profiles[p:p + 1], len(combos), 0), combos) for p in range(6)])
    np.testing.assert_allclose(env.optimal_rewards, scores.max(1), rtol=1e-12)
    np.testing.assert_array_equal(env.optimal_actions, combos[scores.argmax(1)])
    assert env.optimal_return == pytest.approx(scores.max(1).mean(), rel=1e-12)
    assert env.random_return == pytest.approx(scores.mean(), rel=1e-9, abs=1e-12)


def test_configurator_steps_give_the_score_plus_noise():
    env = gym.make("Configurator-v0", n_profiles=3, noise=0.5)  # the default 20 choices
    assert env.action_space == gym.spaces.MultiBinary(20) and env.observation_space.shape == (8,)
    assert gym.make("Configurator-v0", levels=3, n_choices=5).action_space == gym.spaces.MultiDiscrete([3] * 5)
    unwrapped = env.unwrapped
    env.reset(seed=0)
    env.action_space.seed(0)
    rewards = []
    for _ in range(2000):
        obs, info = env.reset()
        action = env.action_space.sample()
        _, reward, terminated, truncated, step_info = env.step(action)
        assert terminated and not truncated
        assert step_info["score"] == pytest.approx(unwrapped.score(obs[None], action[None])[0])
        assert step_info["optimal"] >= step_info["score"]
        rewards.append(reward - step_info["score"])
    assert abs(np.mean(rewards)) < 4 * 0.5 / np.sqrt(2000) and np.std(rewards) == pytest.approx(0.5, rel=0.1)
    best = unwrapped.optimal(unwrapped.world.profiles)
    np.testing.assert_array_equal(best[0], unwrapped.optimal_actions)
    # the default world: random combinations are far below the optimum
    default = make("Configurator-v0")
    assert default.random_return < 0.05 * default.optimal_return


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_choices=1), "n_choices"), (dict(levels=1), "levels"), (dict(band=0), "band"), (dict(n_choices=3, band=3), "band"),
    (dict(levels=8, band=5), "band"), (dict(noise=-1.0), "noise"), (dict(noise=float("nan")), "noise"),
    (dict(n_profiles=0), "n_profiles"), (dict(profile_dim=0), "profile_dim"),
])
def test_configurator_rejects_bad_keywords(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gym.make("Configurator-v0", **kwargs)


def test_configurator_optimum_at_2_to_the_20_matches_brute_force():
    env = make("Configurator-v0", n_profiles=2)
    world, x = env.world, np.append(env.world.profiles[1].astype(np.float64), 1.0)
    u, p = world.unary @ x, world.pair @ x  # this profile's terms: (20, 2) and (20, band, 2, 2)
    best, bits = -np.inf, np.arange(20)
    for start in range(0, 1 << 20, 1 << 16):  # every combination, 65536 at a time
        combos = (np.arange(start, start + (1 << 16))[:, None] >> bits) & 1
        v = combos[:, world.order]
        scores = u[bits, v].sum(1) + sum(p[bits[t:], t - 1, v[:, :-t], v[:, t:]].sum(1) for t in (1, 2))
        if scores.max() > best:
            best, arg = scores.max(), combos[scores.argmax()]
    assert env.optimal_rewards[1] == pytest.approx(best, rel=1e-12)
    np.testing.assert_array_equal(env.optimal_actions[1], arg)
