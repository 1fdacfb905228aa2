"""Subnormal floats: the compiled update leaves none in any parameter, Adam moment or target network, and
flushing changes an update by no more than the flushed values (and what Adam's step makes of them)."""
import numpy as np
import pytest
from tinygrad import Tensor

from action_space import GridActionSpace
from ddpg import FLUSH_BELOW, DDPGConfig
from runtime import read, write
from memory import ReplayMemory
from wolp_agent import WolpertingerAgent

S, TINIEST_NORMAL = 3, np.finfo(np.float32).tiny   # 1.18e-38: anything smaller but not zero is subnormal


def make_agent(flush_below: float) -> WolpertingerAgent:
    Tensor.manual_seed(0)
    cfg = DDPGConfig(hidden1=16, hidden2=8, batch_size=8, flush_below=flush_below)
    return WolpertingerAgent(S, GridActionSpace.continuous([-2.0], [2.0], 101), 5, cfg, np.random.default_rng(0))


def memory_of(agent, n=30) -> ReplayMemory:
    rng = np.random.default_rng(1)
    memory = ReplayMemory(n, S, 1)
    for i in range(n):
        memory.append(rng.normal(size=S), agent.space.points(rng.integers(agent.space.n)), rng.normal(),
                      rng.normal(size=S), terminated=i % 4 == 0)
    return memory


def state_buffers(agent) -> dict:
    """The training state without the step counts, which flushing does not touch."""
    return {name: b for name, b in agent.training_buffers().items() if not name.endswith(".t")}


def set_state(agent, values: dict[str, np.ndarray]) -> None:
    for name, buffer in state_buffers(agent).items():
        write(buffer, values[name])


@pytest.mark.parametrize("flush_below", [FLUSH_BELOW, 0.0])
def test_updates_leave_no_subnormals(flush_below):
    """Every stored value at 1e-40: the nets output about zero, so gradients stay tiny and, unflushed, the
    subnormals persist through the updates (flush_below = 0 shows the test can fail)."""
    agent = make_agent(flush_below)
    set_state(agent, {name: np.full(b.shape, 1e-40, np.float32) for name, b in state_buffers(agent).items()})
    memory = memory_of(agent)
    for _ in range(3):
        agent.update(memory)
    subnormal = {name: int(np.count_nonzero((np.abs(read(b)) > 0) & (np.abs(read(b)) < TINIEST_NORMAL)))
                 for name, b in state_buffers(agent).items()}
    if flush_below:
        assert subnormal == dict.fromkeys(subnormal, 0)
    else:
        assert sum(subnormal.values()) > 0


def test_flushing_changes_an_update_only_by_the_flushed_values():
    """Same state and minibatch with and without flushing; a fifth of every buffer set to values just below the
    threshold (normal floats, so the unflushed run computes with them exactly). Adam's moments are consistent
    (v about m squared), as an optimiser's own would be."""
    rng = np.random.default_rng(2)
    below = lambda n: rng.uniform(1e-37, FLUSH_BELOW, n)
    agents = [make_agent(FLUSH_BELOW), make_agent(0.0)]
    state = {name: net.flat.numpy() for name, net in agents[0].networks().items()}
    for name in state:
        tiny = rng.random(state[name].shape) < 0.2
        state[name][tiny] = below(tiny.sum()) * rng.choice([-1, 1], tiny.sum())
    for net in ("actor", "critic"):
        m = rng.normal(0, 1e-3, state[net].shape)
        v = m ** 2 * rng.uniform(1, 4, m.shape)
        tiny = rng.random(m.shape) < 0.2
        m[tiny], v[tiny] = below(tiny.sum()) * rng.choice([-1, 1], tiny.sum()), below(tiny.sum())
        state[f"{net}_optim.m"], state[f"{net}_optim.v"] = m.astype(np.float32), v.astype(np.float32)
    memory = memory_of(agents[0])
    after = []
    for agent in agents:
        set_state(agent, state)
        agent.update(memory)
        after.append({name: read(b).astype(np.float64) for name, b in state_buffers(agent).items()})
    flushed, plain = after
    cfg = agents[0].cfg
    # a moment flushed to 0 moves a parameter by at most lr / (eps * (1 - b1)) times the moment's size
    step_bound = FLUSH_BELOW * max(cfg.c_lr, cfg.p_lr) / (1e-8 * (1 - 0.9))
    for name in flushed:
        diff = np.abs(flushed[name] - plain[name])
        bound = FLUSH_BELOW + (step_bound if name in agents[0].networks() else 0.0)
        assert diff.max() <= bound, name
        if name not in agents[0].networks():  # a moment differs only where the flushed run zeroed it
            assert np.all(flushed[name][diff > 0] == 0), name
        assert np.count_nonzero(diff) < diff.size // 2, name   # and most values are bit-identical
