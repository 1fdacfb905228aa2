"""DDPG updates of the Wolpertinger agent against an independent float64 numpy re-computation of the spec.

The numpy side shares nothing with the library but the grid coordinates: forward passes, the target
action (brute-force k nearest grid points of the target actor's proto-action, ranked by the ONLINE
critic with each row's own next state), y = r + gamma * (1 - terminated) * Q'(s', a'), hand-written
backprop, torch's Adam with L2 weight decay, the actor step through the critic as just updated, and
the soft target updates. Adam's first moment m = (1 - b1) * (grad + wd * p) is compared as well: it
is the gradient itself, while the first parameter step is about lr * sign(grad) and hides its size.

The nets get explicit random weights (with targets that differ from the online nets, so swapping
the two anywhere shows) chosen so that the critic's best candidates are spread over the window,
kinks included; every seed below is checked for near-ties that would make the argmax ambiguous.
"""
import copy
import dataclasses

import numpy as np
import pytest
from tinygrad import Tensor

from action_space import GridActionSpace
from ddpg import DDPGConfig
from memory import ReplayMemory
from tests.test_action_space import every_id
from tests.test_action_space import flat as flat_index
from wolp_agent import WindowCandidates, WolpertingerAgent

S, H1, H2, BATCH = 3, 16, 8, 8
NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias")   # model.py's order
NETS = ("actor", "critic", "actor_target", "critic_target")
CFG = dict(hidden1=H1, hidden2=H2, batch_size=BATCH, weight_decay=1e-2, tau=0.1, gamma=0.9, c_lr=1e-2, p_lr=3e-3)
B1, B2, EPS = 0.9, 0.999, 1e-8
MARGIN = 1e-5   # float32 and float64 must agree on every ReLU, nearest-neighbour set and argmax

line = lambda **kw: GridActionSpace.continuous([-2.0], [2.0], 41, **kw)       # 41 points, step 0.1
square = lambda **kw: GridActionSpace.continuous([-1, -1], [1, 1], 49, **kw)  # 7 x 7 points
CASES = {   # name: (space, k, seed)
    "1d-kinks": (line, 25, 28),         # k > 2 * H2 + 2: window ends and the grid points beside the kinks
    "1d-window": (line, 3, 11),         # k <= 2 * H2 + 2: the whole window of k grid points
    "2d-search": (square, 5, 23),       # numpy lattice search and a candidate buffer
    "1d-flann": (lambda: line(knn="flann"), 5, 28),   # FLANN's kd-tree, candidate buffer, d = 1
    "multi-binary": (lambda: GridActionSpace.multi_discrete(np.full(6, 2), np.zeros(6)), 9, 5),  # tabulated scoring
}


# --- the nets in numpy -----------------------------------------------------------------------------------------
relu = lambda x: np.maximum(x, 0)


def clear_of_kinks(*pre_activations):
    for z in pre_activations:
        assert np.abs(z).min() > MARGIN, "a ReLU input within MARGIN of 0: pick another seed"


def actor_forward(p, s):
    z1 = s @ p["fc1.weight"].T + p["fc1.bias"]
    z2 = relu(z1) @ p["fc2.weight"].T + p["fc2.bias"]
    u = relu(z2) @ p["fc3.weight"].T + p["fc3.bias"]
    clear_of_kinks(z1, z2)
    return u / (1 + np.abs(u)), (s, z1, z2, u)


def critic_forward(p, s, a):
    z1 = s @ p["fc1.weight"].T + p["fc1.bias"]
    x = np.concatenate([relu(z1), a], 1)
    z2 = x @ p["fc2.weight"].T + p["fc2.bias"]
    clear_of_kinks(z1, z2)
    return (relu(z2) @ p["fc3.weight"].T + p["fc3.bias"])[:, 0], (s, z1, x, z2)


def critic_backward(p, cache, dq):
    """Gradients of sum(dq * Q) with respect to the critic's parameters and to its action input."""
    s, z1, x, z2 = cache
    dz2 = dq[:, None] * p["fc3.weight"] * (z2 > 0)
    dx = dz2 @ p["fc2.weight"]
    dz1 = dx[:, :H1] * (z1 > 0)
    grads = {"fc1.weight": dz1.T @ s, "fc1.bias": dz1.sum(0), "fc2.weight": dz2.T @ x, "fc2.bias": dz2.sum(0),
             "fc3.weight": dq[None] @ relu(z2), "fc3.bias": np.array([dq.sum()])}
    return grads, dx[:, H1:]


def actor_backward(p, cache, d_out):
    """Gradients of sum(d_out * actor(s)) with respect to the actor's parameters."""
    s, z1, z2, u = cache
    du = d_out / (1 + np.abs(u)) ** 2                      # softsign'(u)
    dz2 = (du @ p["fc3.weight"]) * (z2 > 0)
    dz1 = (dz2 @ p["fc2.weight"]) * (z1 > 0)
    return {"fc1.weight": dz1.T @ s, "fc1.bias": dz1.sum(0), "fc2.weight": dz2.T @ relu(z1), "fc2.bias": dz2.sum(0),
            "fc3.weight": du.T @ relu(z2), "fc3.bias": du.sum(0)}


def adam(p, grad, state, lr, wd):
    """torch.optim.Adam with L2 weight decay (added to the gradient); state = (m, v, t) per name, updated in place."""
    new = {}
    for name in NAMES:
        m, v, t = state.get(name, (0.0, 0.0, 0))
        g = grad[name] + wd * p[name]
        m, v, t = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g, t + 1
        new[name] = p[name] - lr * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
        state[name] = m, v, t
    return new


# --- the update in numpy ---------------------------------------------------------------------------------------
def nearest_k(grid, proto, k):
    d2 = ((grid - proto) ** 2).sum(1)
    order = np.argsort(d2, kind="stable")
    if k < len(grid):
        assert d2[order[k]] - d2[order[k - 1]] > MARGIN, "a proto-action halfway between grid points: pick another seed"
    return order[:k]


def target_actions(p, s2, grid, k, neighbours=nearest_k):
    """Per next state: the target actor's proto, its k nearest grid points, the online critic's best of them."""
    protos = np.clip(actor_forward(p["actor_target"], s2)[0], -1, 1)
    chosen = []
    for state, proto in zip(s2, protos):
        candidates = neighbours(grid, proto, k)
        q = critic_forward(p["critic"], np.repeat(state[None], k, 0), grid[candidates])[0]
        assert k == 1 or np.diff(np.sort(q))[-1] > MARGIN, "two candidates with almost the same Q: pick another seed"
        chosen.append(candidates[np.argmax(q)])
    return np.array(chosen)


def expected_update(p, adam_state, batch, grid, k, cfg, neighbours=nearest_k):
    """One update of the float64 parameters p (dict of the four nets); returns the new p, the losses and mean Q, and a'."""
    s, a, r, s2, terminated = batch
    chosen = target_actions(p, s2, grid, k, neighbours)
    y = r + cfg.gamma * (1 - terminated) * critic_forward(p["critic_target"], s2, grid[chosen])[0]
    q, cache = critic_forward(p["critic"], s, a)
    critic_loss = np.mean((q - y) ** 2)
    critic_grad, _ = critic_backward(p["critic"], cache, 2 * (q - y) / len(q))
    critic = adam(p["critic"], critic_grad, adam_state["critic"], cfg.c_lr, cfg.weight_decay)
    # the actor's loss goes through the critic as just updated
    proto, actor_cache = actor_forward(p["actor"], s)
    q_pi, cache = critic_forward(critic, s, proto)
    _, dq_da = critic_backward(critic, cache, -np.ones(len(s)) / len(s))
    actor_grad, actor_loss = actor_backward(p["actor"], actor_cache, dq_da), -q_pi.mean()
    if cfg.choice_pull:  # + pull * mean |actor(s') - a'|^2
        proto_next, next_cache = actor_forward(p["actor"], s2)
        gap = proto_next - grid[chosen]
        pull_grad = actor_backward(p["actor"], next_cache, 2 * cfg.choice_pull * gap / len(s2))
        actor_grad = {n: actor_grad[n] + pull_grad[n] for n in NAMES}
        actor_loss += cfg.choice_pull * (gap ** 2).sum(1).mean()
    actor = adam(p["actor"], actor_grad, adam_state["actor"], cfg.p_lr, cfg.weight_decay)
    soft = lambda target, online: {n: cfg.tau * online[n] + (1 - cfg.tau) * target[n] for n in NAMES}
    new = {"actor": actor, "critic": critic, "actor_target": soft(p["actor_target"], actor),
           "critic_target": soft(p["critic_target"], critic)}
    return new, np.array([critic_loss, actor_loss, q.mean()]), chosen


# --- the agent -------------------------------------------------------------------------------------------------
def numpy_params(agent):
    return {net: {n: getattr(agent, net).view(n).numpy().astype(np.float64) for n in NAMES} for net in NETS}


def flat(params):
    return np.concatenate([params[n].ravel() for n in NAMES])


def random_weights(net, rng, action_gain=1.0):
    """Gaussian weights (std 1.5 / sqrt(fan in)) and biases (std 0.3); the critic's action inputs scaled by
    action_gain, which puts its kinks (and best candidates) inside the action range."""
    weights = {}
    for name, shape in net.shapes.items():
        w = rng.normal(0, 1.5 / np.sqrt(shape[1]) if len(shape) == 2 else 0.3, shape)
        if name == "fc2.weight" and shape[1] > H1:
            w[:, H1:] *= action_gain
        weights[name] = Tensor(w.astype(np.float32))
    return weights


def make_agent(space, k, seed, **cfg):
    Tensor.manual_seed(seed)
    agent = WolpertingerAgent(S, space(), k, DDPGConfig(**{**CFG, **cfg}), np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 100)
    for net in NETS:   # the targets get weights of their own: using one net for the other must show
        getattr(agent, net).load_state_dict(random_weights(getattr(agent, net), rng, action_gain=4.0))
    return agent


def random_memory(agent, seed, n=40):
    """n random transitions, every third one terminated (the others bootstrap, truncated or not)."""
    rng = np.random.default_rng(seed + 200)
    memory = ReplayMemory(100, S, agent.space.dim)
    for i in range(n):
        action = every_id(agent.space)[rng.integers(agent.space.n)]
        memory.append(rng.normal(size=S), agent.space.points(action), rng.normal(), rng.normal(size=S),
                      terminated=i % 3 == 0)
    return memory


def next_batch(agent, memory):
    """The minibatch the next agent.update(memory) will draw (memory.sample with agent.rng), in float64."""
    idx = copy.deepcopy(agent.rng).integers(0, len(memory), agent.cfg.batch_size)
    return [x[idx].astype(np.float64) for x in (memory.states, memory.actions, memory.rewards, memory.next_states,
                                                 memory.terminated)]


def flann_neighbours(agent):
    """The library's FLANN kd-tree is approximate by design (the reference's); take its candidate set as given."""
    return lambda grid, proto, k: flat_index(agent.space, agent.space.search(proto[None], k)[0])


def assert_matches(agent, expected, losses, adam_state):
    np.testing.assert_allclose(losses, expected[1], rtol=1e-4, atol=1e-6)
    for net in ("critic", "actor"):   # m holds the gradient: this checks its size, not only its sign
        m = getattr(agent, f"{net}_optim").m.numpy()
        want = np.concatenate([adam_state[net][n][0].ravel() for n in NAMES])
        np.testing.assert_allclose(m, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=f"{net} Adam m")
    for net in NETS:
        np.testing.assert_allclose(getattr(agent, net).flat.numpy(), flat(expected[0][net]), rtol=1e-5, atol=1e-6,
                                   err_msg=net)


def assert_updates_match_numpy(agent, memory, k, exploring):
    """Consecutive updates against numpy, one per entry of `exploring`: whether exploration noise is left (epsilon
    > 0) at that update; without it the critic's rate is c_lr * c_lr_end."""
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    p, adam_state = numpy_params(agent), {"critic": {}, "actor": {}}
    for noise_left in exploring:
        agent.epsilon = 1.0 if noise_left else 0.0
        cfg = dataclasses.replace(agent.cfg, c_lr=agent.cfg.c_lr * (1.0 if noise_left else agent.cfg.c_lr_end))
        expected = expected_update(p, adam_state, next_batch(agent, memory), grid, k, cfg)
        assert_matches(agent, expected, agent.update(memory), adam_state)
        p = expected[0]


# --- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_one_update_equals_numpy(case):
    space, k, seed = CASES[case]
    agent = make_agent(space, k, seed)
    assert isinstance(agent.candidates, WindowCandidates) == (case in ("1d-kinks", "1d-window"))   # the target-action path under test
    memory = random_memory(agent, seed)
    batch = next_batch(agent, memory)
    assert 0 < batch[4].sum() < BATCH, "the batch needs terminated and bootstrapped transitions"
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    adam_state = {"critic": {}, "actor": {}}
    neighbours = flann_neighbours(agent) if agent.space.knn == "flann" else nearest_k
    expected = expected_update(numpy_params(agent), adam_state, batch, grid, k, agent.cfg, neighbours)
    if case == "1d-kinks":   # some best candidates lie inside the window, i.e. beside a kink
        protos = np.clip(actor_forward(numpy_params(agent)["actor_target"], batch[3])[0], -1, 1)
        windows = np.array([nearest_k(grid, proto, k) for proto in protos])
        assert np.any((expected[2] > windows.min(1)) & (expected[2] < windows.max(1)))
    rng_after = copy.deepcopy(agent.rng)
    rng_after.integers(0, len(memory), BATCH)
    losses = agent.update(memory)
    assert agent.rng.bit_generator.state == rng_after.bit_generator.state   # the update drew exactly that batch
    assert_matches(agent, expected, losses, adam_state)


@pytest.mark.parametrize("case", ["1d-kinks", "2d-search"])
def test_choice_pull_adds_its_gradient_and_loss(case):
    """--choice-pull: the actor's loss gains pull * mean |actor(s') - a'|^2, a' the action chosen for the next state
    s' (the online actor's proto-action pulled towards it), and the update still equals numpy's."""
    space, k, seed = CASES[case]
    agent, plain = make_agent(space, k, seed, choice_pull=0.5), make_agent(space, k, seed)
    memory = random_memory(agent, seed)
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    adam_state = {"critic": {}, "actor": {}}
    expected = expected_update(numpy_params(agent), adam_state, next_batch(agent, memory), grid, k, agent.cfg)
    losses, plain_losses = agent.update(memory), plain.update(memory)
    assert_matches(agent, expected, losses, adam_state)
    assert losses[1] > plain_losses[1] + 1e-3, "the pull adds a positive term to the actor's loss"
    assert not np.allclose(agent.actor_optim.m.numpy(), plain.actor_optim.m.numpy(), rtol=1e-2), \
        "the pull changes the actor's gradient"
    np.testing.assert_allclose(agent.critic.flat.numpy(), plain.critic.flat.numpy(), rtol=1e-6, atol=1e-7,
                               err_msg="the critic's update does not depend on the pull")


@pytest.mark.parametrize("case", ["1d-kinks", "2d-search"])
def test_three_updates_equal_numpy(case):
    """The second call of the compiled update captures it and the third replays it: new batches, new
    candidate buffers, Adam's bias corrections for t = 2, 3."""
    space, k, seed = CASES[case]
    agent = make_agent(space, k, seed)
    assert_updates_match_numpy(agent, random_memory(agent, seed), k, exploring=(True, True, True))


def test_critic_steps_at_c_lr_times_c_lr_end_once_exploration_has_run_out():
    """c_lr_end: updates 1-2 while exploring step the critic at c_lr; update 3, replayed by the compiled step after
    the noise's epsilon is spent, at c_lr * c_lr_end (so the rate is a buffer, not a constant frozen at capture);
    the actor's rate does not change."""
    space, k, seed = CASES["2d-search"]
    agent = make_agent(space, k, seed, c_lr_end=0.1)
    assert_updates_match_numpy(agent, random_memory(agent, seed), k, exploring=(True, True, False))


@pytest.mark.parametrize("weight_decay", [CFG["weight_decay"], 0.0])
def test_every_parameter_element_trains(weight_decay):
    """One update moves every element of the actor and the critic, biases included. Without weight decay
    an element moves by its own gradient only: exactly the elements whose numpy gradient is non-zero move
    (most of them; the others meet a ReLU that is off in every row of the batch)."""
    space, k, seed = CASES["2d-search"]
    agent = make_agent(space, k, seed, weight_decay=weight_decay)
    memory = random_memory(agent, seed)
    before = numpy_params(agent)
    adam_state = {"critic": {}, "actor": {}}
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    expected_update(before, adam_state, next_batch(agent, memory), grid, k, agent.cfg)
    agent.update(memory)
    after = numpy_params(agent)
    for net in ("critic", "actor"):
        for name in NAMES:
            moved = after[net][name] != before[net][name]
            if weight_decay:
                assert moved.all(), f"{net}.{name}: elements {np.argwhere(~moved).tolist()} did not change"
            else:
                gradient = adam_state[net][name][0]   # 0.1 * gradient
                assert np.all((gradient == 0) | (np.abs(gradient) > 1e-7)), "a tiny gradient: pick another seed"
                assert (gradient != 0).mean() > 0.6
                np.testing.assert_array_equal(moved, gradient != 0, err_msg=f"{net}.{name}: moved vs gradient")


def test_termination_cuts_the_return_and_truncation_bootstraps():
    """Transitions that differ only in `terminated` (the others time-limit truncations, stored as
    terminated = 0): a terminated one's target is r, a truncated one's r + gamma * Q'(s', a')."""
    space, k, seed = CASES["1d-window"]
    agent = make_agent(space, k, seed)
    memory = ReplayMemory(10, S, 1)
    s, a, r, s2 = np.array([0.3, -1.2, 0.8]), agent.space.points(12), 0.5, np.array([-0.4, 0.9, 0.1])
    for terminated in (True, False, False):
        memory.append(s, a, r, s2, terminated)
    s, a, r, s2, terminated = next_batch(agent, memory)
    assert 0 < terminated.sum() < BATCH and terminated.sum() != BATCH / 2, \
        "needs both kinds, in unequal numbers (an inverted mask would pass otherwise)"
    p = numpy_params(agent)
    grid = agent.space.points(every_id(agent.space)).astype(np.float64)
    a_next = grid[target_actions(p, s2[:1], grid, k)]
    bootstrap = CFG["gamma"] * critic_forward(p["critic_target"], s2[:1], a_next)[0][0]
    q = critic_forward(p["critic"], s[:1], a[:1])[0][0]
    loss = lambda y: np.mean((q - y) ** 2)
    right = loss(r + (1 - terminated) * bootstrap)
    wrong = {"never bootstraps": loss(r), "ignores terminated": loss(r + bootstrap),
             "inverted": loss(r + terminated * bootstrap)}
    assert all(abs(w - right) > 1e-2 * right for w in wrong.values()), f"cannot tell {right} from {wrong}"
    assert agent.update(memory)[0] == pytest.approx(right, rel=1e-4)
