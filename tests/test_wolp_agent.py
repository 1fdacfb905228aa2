import os

import numpy as np
import pytest
from tinygrad import Device, Tensor
from tinygrad.helpers import getenv

from action_space import EmbeddingActionSpace, GridActionSpace
from ddpg import DDPGConfig
from runtime import read, write
from memory import ReplayMemory
from tests.test_action_space import every_id, flat
import util
import wolp_agent
from wolp_agent import WolpertingerAgent

S = 3


def numpy_nets(agent):
    p = {net: {n: getattr(agent, net).view(n).numpy().astype(np.float64) for n in getattr(agent, net).shapes}
         for net in ("actor", "critic", "actor_target", "critic_target")}

    def actor(net, s):
        w = p[net]
        x = np.maximum(s @ w["fc1.weight"].T + w["fc1.bias"], 0)
        x = np.maximum(x @ w["fc2.weight"].T + w["fc2.bias"], 0)
        x = x @ w["fc3.weight"].T + w["fc3.bias"]
        return x / (1 + np.abs(x))

    def critic(net, s, a):
        w = p[net]
        h = np.maximum(s @ w["fc1.weight"].T + w["fc1.bias"], 0)
        x = np.maximum(np.concatenate([h, a], 1) @ w["fc2.weight"].T + w["fc2.bias"], 0)
        return (x @ w["fc3.weight"].T + w["fc3.bias"])[:, 0]
    return actor, critic


def brute_force_choice(agent, states, protos):
    """Per state: its own k nearest grid points (brute force), scored by the online critic with that state."""
    _, critic = numpy_nets(agent)
    ids = every_id(agent.space)
    grid = agent.space.points(ids).astype(np.float64)
    chosen, best_q = [], []
    for s, proto in zip(states, protos):
        d2 = ((grid - np.clip(proto, -1, 1)) ** 2).sum(1)
        neighbours = np.argsort(d2, kind="stable")[:agent.k]
        q = critic("critic", np.repeat(s[None], agent.k, 0), grid[neighbours])
        chosen.append(ids[neighbours[np.argmax(q)]])
        best_q.append(q.max())
    return np.array(chosen), np.array(best_q)


CASES = {
    "1d-window": dict(space=lambda: GridActionSpace.continuous([-2.0], [2.0], 2001), k=200),  # kink path
    "1d-small-k": dict(space=lambda: GridActionSpace.continuous([-2.0], [2.0], 2001), k=20),
    "discrete": dict(space=lambda: GridActionSpace.discrete(5), k=2),
    "2d-lattice": dict(space=lambda: GridActionSpace.continuous([-1, -1], [1, 1], 400), k=17),
    "multi-discrete": dict(space=lambda: GridActionSpace.multi_discrete(np.array([2, 3, 1, 4, 2, 2]), np.zeros(6)),
                           k=19),
    # two groups of axes (8 + 2), each a table of points the critic scores candidates by
    "multi-binary": dict(space=lambda: GridActionSpace.multi_discrete(np.full(10, 2), np.zeros(10, np.int8)), k=37),
    # k = 1 (the reference's k on CartPole, --k 1): the nearest action, which needs no critic
    "discrete-k1": dict(space=lambda: GridActionSpace.discrete(2), k=1),
    "2d-k1": dict(space=lambda: GridActionSpace.continuous([-1, -1], [1, 1], 400), k=1),
    "embedding": dict(space=lambda: EmbeddingActionSpace(np.random.default_rng(5).normal(size=(300, 4))), k=20),
}


def make_agent(case, batch_size=32, seed=0, scoring="factored", random_candidate=0.0):
    Tensor.manual_seed(seed)
    cfg = DDPGConfig(hidden1=32, hidden2=16, batch_size=batch_size, init_w=0.3)  # a big init_w: varied Q values
    return WolpertingerAgent(S, CASES[case]["space"](), CASES[case]["k"], cfg, np.random.default_rng(seed), scoring,
                             random_candidate)


def explore_once(agent, state, actor):
    """One exploring action selection, and the noisy proto-action it started from (`actor` from numpy_nets)."""
    scale = max(agent.epsilon, 0.0)
    index = agent.select_action(state, explore=True)
    return index, actor("actor", state[None].astype(np.float64))[0] + scale * agent.noise.x


def assert_target_choice_is_brute_force(agent):
    next_states = np.random.default_rng(1).normal(size=(32, S)).astype(np.float32)
    write(agent.batch[3], next_states)
    agent._prepare_target_inputs()
    got = agent._target_actions(agent.batch[3], *agent.target_inputs).numpy()
    actor, critic = numpy_nets(agent)
    chosen, best_q = brute_force_choice(agent, next_states.astype(np.float64), actor("actor_target", next_states))
    # the same Q as the brute-force best (exact ties aside, also the same action)
    q_got = critic("critic", next_states.astype(np.float64), got.astype(np.float64))
    np.testing.assert_allclose(q_got, best_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, agent.space.points(chosen), atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_target_actions_equal_per_state_brute_force(case):
    assert_target_choice_is_brute_force(make_agent(case))


@pytest.mark.skipif(Device.DEFAULT != "CPU" or not getenv("HCQ2"), reason="CPU devices side by side need HCQ2")
def test_ranking_devices_stop_at_the_cores_allowed(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv(util.CORES_ENV, "1")
    assert wolp_agent.ranking_devices() == ["CPU"]
    monkeypatch.setenv(util.CORES_ENV, "64")
    assert wolp_agent.ranking_devices() == ["CPU"] + [f"CPU:{i}" for i in range(1, cores)]
    monkeypatch.delenv(util.CORES_ENV)
    assert len(wolp_agent.ranking_devices()) == cores


@pytest.mark.skipif(Device.DEFAULT != "CPU", reason="splits the ranking between CPU devices")
@pytest.mark.parametrize("case", ["2d-lattice", "multi-binary", "embedding"])
def test_ranking_split_between_devices_follows_the_online_critic(case, monkeypatch):
    """The minibatch's ranking in three uneven parts (11 + 11 + 10 rows) on three CPU devices, after updates have
    changed the online critic: every part ranks its own rows with the critic's current weights."""
    monkeypatch.setattr(wolp_agent, "ranking_devices", lambda: ["CPU", "CPU:1", "CPU:2"])
    agent = make_agent(case)
    assert [part.states.device for part in agent.candidates.ranking_parts] == ["CPU", "CPU:1", "CPU:2"]
    before = read(agent.critic.flat)
    memory = filled_memory(agent)
    for _ in range(3):
        agent.update(memory)
    assert not np.allclose(read(agent.critic.flat), before)
    assert_target_choice_is_brute_force(agent)


@pytest.mark.parametrize("case", ["1d-window", "2d-lattice", "multi-discrete", "multi-binary"])
def test_acting_without_noise_picks_the_brute_force_best(case):
    agent = make_agent(case)
    actor, _ = numpy_nets(agent)
    states = np.random.default_rng(2).normal(size=(6, S))
    expected, _ = brute_force_choice(agent, states, actor("actor", states))
    assert np.array([agent.select_action(s, explore=False) for s in states]).tolist() == expected.tolist()


@pytest.mark.parametrize("case", ["1d-window", "1d-small-k", "2d-lattice"])
def test_exploring_picks_the_best_neighbour_of_the_noisy_proto_action(case):
    agent = make_agent(case)
    agent.noise.sigma = 20.0  # noise large enough to move the proto-action by many grid points
    states = np.random.default_rng(2).normal(size=(6, S))
    actor, _ = numpy_nets(agent)
    picks = [explore_once(agent, s, actor) for s in states]
    expected, _ = brute_force_choice(agent, states, np.array([proto for _, proto in picks]))
    assert np.array([index for index, _ in picks]).tolist() == expected.tolist()


@pytest.mark.parametrize("case", ["1d-small-k", "2d-lattice", "discrete"])
def test_random_candidate_is_uniform_over_the_k_neighbours(case):
    agent = make_agent(case, random_candidate=1.0)
    agent.cfg.epsilon = 1e9  # keep the scale, and so the probability, at 1
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    state, counts, (actor, _) = np.random.default_rng(6).normal(size=S), {}, numpy_nets(agent)
    for _ in range(40 * agent.k):
        action, proto = explore_once(agent, state, actor)
        index = flat(agent.space, action)
        neighbours = np.argsort(((grid - np.clip(proto, -1, 1)) ** 2).sum(1), kind="stable")[:agent.k]
        assert index in neighbours
        position = int(np.flatnonzero(neighbours == index)[0])  # rank among the neighbours: 0 nearest
        counts[position] = counts.get(position, 0) + 1
    assert sorted(counts) == list(range(agent.k)) and max(counts.values()) < 80  # all ranks, none 2x its share


def test_plain_scoring_picks_the_same_actions():
    fast, plain = make_agent("2d-lattice"), make_agent("2d-lattice", scoring="full")
    states = np.random.default_rng(3).normal(size=(5, S)).astype(np.float32)
    assert np.array([fast.select_action(s, explore=False) for s in states]).tolist() == \
        np.array([plain.select_action(s, explore=False) for s in states]).tolist()


def filled_memory(agent, n=200):
    memory = ReplayMemory(1000, S, agent.space.dim)
    rng = np.random.default_rng(4)
    for _ in range(n):
        memory.append(rng.normal(size=S), agent.space.points(every_id(agent.space)[rng.integers(agent.space.n)]),
                      rng.normal(),
                      rng.normal(size=S), rng.random() < 0.1)
    return memory


@pytest.mark.parametrize("case", ["1d-window", "2d-lattice"])
def test_compiled_graphs_do_not_recompile(case, monkeypatch):
    from tinygrad.device import Compiler
    agent, state = make_agent(case, batch_size=16), np.zeros(S, np.float32)
    memory = filled_memory(agent)
    for _ in range(3):  # the first two calls of a TinyJit run and capture
        agent.update(memory)
        agent.select_action(state)
    compiles, compile_cached = [], Compiler.compile_cached
    monkeypatch.setattr(Compiler, "compile_cached", lambda self, src: compiles.append(src) or compile_cached(self, src))
    jits = [j for j in vars(agent).values() if hasattr(j, "captured")]
    captured = [j.captured for j in jits]
    for _ in range(5):
        agent.update(memory)
        agent.select_action(state)
    assert jits and all(c is not None for c in captured)
    assert [j.captured for j in jits] == captured and compiles == []


def test_reloaded_weights_reach_the_compiled_graphs(tmp_path):
    trained, fresh = make_agent("1d-window", seed=1), make_agent("1d-window", seed=2)
    states = np.random.default_rng(5).normal(size=(8, S)).astype(np.float32)
    before = [fresh.select_action(s, explore=False) for s in states]  # captures fresh's graphs
    [fresh.select_action(s, explore=False) for s in states]
    trained.save(tmp_path)
    fresh.load(tmp_path)
    after = [fresh.select_action(s, explore=False) for s in states]
    assert after == [trained.select_action(s, explore=False) for s in states]
    assert after != before
    for name, net in trained.networks().items():
        np.testing.assert_array_equal(read(getattr(fresh, name).flat), read(net.flat))
