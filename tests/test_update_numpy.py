"""One DDPG update of the Wolpertinger agent against an independent float64 numpy re-computation."""
import copy

import numpy as np
import pytest
from tinygrad import Tensor

from action_space import GridActionSpace
from ddpg import DDPGConfig, read
from memory import ReplayMemory
from wolp_agent import WolpertingerAgent

S, H1, H2, BATCH = 3, 16, 8, 8
NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias")
CFG = DDPGConfig(hidden1=H1, hidden2=H2, batch_size=BATCH, init_w=0.3, weight_decay=0.05, tau=0.1, gamma=0.9,
                 c_lr=1e-2, p_lr=1e-2)
SPACES = {
    "1d-kinks": (lambda: GridActionSpace.continuous([-2.0], [2.0], 41), 25),   # k > 2 * hidden2 + 2
    "1d-window": (lambda: GridActionSpace.continuous([-2.0], [2.0], 41), 3),
    "2d-search": (lambda: GridActionSpace.continuous([-1, -1], [1, 1], 49), 5),
}


def params(net) -> dict[str, np.ndarray]:
    return {name: net.view(name).numpy().astype(np.float64) for name in NAMES}


def relu(x):
    return np.maximum(x, 0)


def actor_forward(p, s):
    z1 = s @ p["fc1.weight"].T + p["fc1.bias"]
    z2 = relu(z1) @ p["fc2.weight"].T + p["fc2.bias"]
    u = relu(z2) @ p["fc3.weight"].T + p["fc3.bias"]
    return u / (1 + np.abs(u)), (z1, z2, u)


def critic_forward(p, s, a):
    z1 = s @ p["fc1.weight"].T + p["fc1.bias"]
    x = np.concatenate([relu(z1), a], 1)
    z2 = x @ p["fc2.weight"].T + p["fc2.bias"]
    return (relu(z2) @ p["fc3.weight"].T + p["fc3.bias"])[:, 0], (z1, x, z2)


def critic_backward(p, s, cache, dq):
    """Gradients of sum(dq * Q) for the critic's parameters and for its action input."""
    z1, x, z2 = cache
    g = {"fc3.weight": dq[None] @ relu(z2), "fc3.bias": np.array([dq.sum()])}
    dz2 = (dq[:, None] @ p["fc3.weight"]) * (z2 > 0)
    g["fc2.weight"], g["fc2.bias"] = dz2.T @ x, dz2.sum(0)
    dx = dz2 @ p["fc2.weight"]
    dz1 = dx[:, :H1] * (z1 > 0)
    g["fc1.weight"], g["fc1.bias"] = dz1.T @ s, dz1.sum(0)
    return g, dx[:, H1:]


def actor_backward(p, s, cache, du_out):
    z1, z2, u = cache
    du = du_out / (1 + np.abs(u)) ** 2
    g = {"fc3.weight": du.T @ relu(z2), "fc3.bias": du.sum(0)}
    dz2 = (du @ p["fc3.weight"]) * (z2 > 0)
    g["fc2.weight"], g["fc2.bias"] = dz2.T @ relu(z1), dz2.sum(0)
    dz1 = (dz2 @ p["fc2.weight"]) * (z1 > 0)
    g["fc1.weight"], g["fc1.bias"] = dz1.T @ s, dz1.sum(0)
    return g


def adam_first_step(p, grad, lr, wd):
    """torch.optim.Adam's first step with L2 weight decay: returns (new params, first moment m)."""
    new, m = {}, {}
    for name in NAMES:
        g = grad[name] + wd * p[name]
        m[name] = 0.1 * g
        m_hat, v_hat = m[name] / (1 - 0.9), 0.001 * g * g / (1 - 0.999)
        new[name] = p[name] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return new, m


def flat(d):
    return np.concatenate([d[name].ravel() for name in NAMES])


def expected_update(agent, s, a, r, s2, term):
    actor, critic = params(agent.actor), params(agent.critic)
    actor_t, critic_t = params(agent.actor_target), params(agent.critic_target)
    grid = agent.space.points(np.arange(agent.space.n)).astype(np.float64)
    # target action: for each next state, its own k nearest grid points ranked by the online critic
    protos = np.clip(actor_forward(actor_t, s2)[0], -1, 1)
    best = []
    for state, proto in zip(s2, protos):
        neighbours = grid[np.argsort(((grid - proto) ** 2).sum(1), kind="stable")[:agent.k]]
        q = critic_forward(critic, np.repeat(state[None], agent.k, 0), neighbours)[0]
        assert np.sort(q)[-1] - np.sort(q)[-2] > 1e-6 if agent.k > 1 else True, "near tie: pick another seed"
        best.append(neighbours[np.argmax(q)])
    y = r + CFG.gamma * (1 - term) * critic_forward(critic_t, s2, np.array(best))[0]
    q, cache = critic_forward(critic, s, a)
    critic_loss = np.mean((q - y) ** 2)
    critic_grad, _ = critic_backward(critic, s, cache, 2 * (q - y) / BATCH)
    critic_new, critic_m = adam_first_step(critic, critic_grad, CFG.c_lr, CFG.weight_decay)
    # the actor follows the critic as just updated
    proto, actor_cache = actor_forward(actor, s)
    q_pi, cache = critic_forward(critic_new, s, proto)
    _, dq_da = critic_backward(critic_new, s, cache, -np.ones(BATCH) / BATCH)
    actor_new, actor_m = adam_first_step(actor, actor_backward(actor, s, actor_cache, dq_da), CFG.p_lr,
                                         CFG.weight_decay)
    soft = lambda target, online: {n: CFG.tau * online[n] + (1 - CFG.tau) * target[n] for n in NAMES}
    return {"losses": np.array([critic_loss, -q_pi.mean()]), "critic": critic_new, "actor": actor_new,
            "critic_m": critic_m, "actor_m": actor_m, "critic_target": soft(critic_t, critic_new),
            "actor_target": soft(actor_t, actor_new)}


def agent_and_memory(case: str, seed: int = 0):
    make_space, k = SPACES[case]
    Tensor.manual_seed(seed)
    agent = WolpertingerAgent(S, make_space(), k, CFG, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    memory = ReplayMemory(100, S, agent.space.dim)
    for i in range(40):
        memory.append(rng.normal(size=S), agent.space.points(rng.integers(agent.space.n)), rng.normal(),
                      rng.normal(size=S), terminated=i % 3 == 0)
    return agent, memory


@pytest.mark.parametrize("case", SPACES)
def test_one_update_equals_numpy(case):
    agent, memory = agent_and_memory(case)
    idx = copy.deepcopy(agent.rng).integers(0, len(memory), BATCH)   # the batch the update will draw
    batch = [x.astype(np.float64) for x in (memory.states[idx], memory.actions[idx], memory.rewards[idx],
                                            memory.next_states[idx], memory.terminated[idx])]
    assert 0 < batch[4].sum() < BATCH  # both terminated and bootstrapped transitions
    expected = expected_update(agent, *batch)
    losses = agent.update(memory)
    np.testing.assert_allclose(losses, expected["losses"], rtol=1e-4)
    # Adam's first moment is 0.1 * (gradient + wd * p): the gradients themselves, not only their signs
    np.testing.assert_allclose(read(agent.critic_optim.m), flat(expected["critic_m"]), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(read(agent.actor_optim.m), flat(expected["actor_m"]), rtol=1e-3, atol=1e-7)
    for net in ("critic", "actor", "critic_target", "actor_target"):
        np.testing.assert_allclose(read(getattr(agent, net).flat), flat(expected[net]), rtol=1e-4, atol=1e-6)


def test_every_parameter_trains():
    agent, memory = agent_and_memory("1d-window", seed=3)
    before = {net: params(getattr(agent, net)) for net in ("actor", "critic")}
    agent.update(memory)
    for net, old in before.items():
        new = params(getattr(agent, net))
        for name in NAMES:
            assert np.all(new[name] != old[name]), f"{net}.{name} has entries that did not change"


def test_termination_cuts_the_return_and_truncation_bootstraps():
    agent, memory = agent_and_memory("1d-window", seed=4)
    memory.size = memory.next = 0
    state, action, next_state = np.ones(S), agent.space.points(7), np.full(S, 0.5)
    for _ in range(50):  # all identical, so the sampled batch is known
        memory.append(state, action, 1.0, next_state, terminated=False)  # time-limit truncation
    rows = lambda x: np.repeat(np.asarray(x, float)[None], BATCH, 0)
    q_next = expected_update(agent, rows(state), rows(action), np.ones(BATCH), rows(next_state), np.zeros(BATCH))
    bootstrapped = agent.update(memory)[0]
    assert bootstrapped == pytest.approx(q_next["losses"][0], rel=1e-4)

    agent, memory = agent_and_memory("1d-window", seed=4)
    memory.size = memory.next = 0
    for _ in range(50):
        memory.append(state, action, 1.0, next_state, terminated=True)
    q = critic_forward(params(agent.critic), state[None], action[None].astype(float))[0][0]
    terminal = agent.update(memory)[0]
    assert terminal == pytest.approx((q - 1.0) ** 2, rel=1e-4)   # y = r exactly, no bootstrap
    assert abs(terminal - bootstrapped) > 1e-3
