import math

import numpy as np
import pytest
from tinygrad import Tensor

from model import Actor, Critic
from tests.test_update_numpy import critic_forward

S, A, H1, H2 = 3, 2, 256, 128


@pytest.fixture(scope="module")
def nets():
    Tensor.manual_seed(0)
    return Actor(S, A, H1, H2, 3e-3), Critic(S, A, H1, H2, 3e-3)


def test_shapes(nets):
    actor, critic = nets
    states, actions = Tensor.randn(5, S), Tensor.randn(5, A)
    assert actor(states).shape == (5, A)
    assert critic(states, actions).shape == (5,)
    assert critic.score(states, Tensor.randn(5, 7, A)).shape == (5, 7)
    assert critic.view("fc2.weight").shape == (H2, H1 + A)


def test_init_ranges(nets):
    actor, critic = nets
    # hidden weights within +-1/sqrt(out features) (the reference's fanin_init), last layer within init_w,
    # biases within torch's default +-1/sqrt(in features)
    bounds = {"fc1.weight": 1 / math.sqrt(H1), "fc2.weight": 1 / math.sqrt(H2), "fc3.weight": 3e-3}
    for net, fc2_in in ((actor, H1), (critic, H1 + A)):
        bias_bounds = {"fc1.bias": 1 / math.sqrt(S), "fc2.bias": 1 / math.sqrt(fc2_in), "fc3.bias": 1 / math.sqrt(H2)}
        for name, bound in {**bounds, **bias_bounds}.items():
            values = net.view(name).numpy()
            assert np.abs(values).max() <= bound
            if values.size >= 100:  # it spans the range, not a narrower one
                assert np.abs(values).max() > 0.9 * bound and abs(values.mean()) < 0.25 * bound


def test_actor_output_is_bounded(nets):
    actor, _ = nets
    out = actor(Tensor.randn(64, S) * 1000).numpy()
    assert np.all(np.abs(out) < 1)


def test_factored_score_equals_plain_critic(nets):
    _, critic = nets
    states, candidates = Tensor.randn(16, S), Tensor.uniform(16, 300, A, low=-1, high=1)
    fast, plain = critic.score(states, candidates).numpy(), critic.score_full(states, candidates).numpy()
    assert np.abs(fast - plain).max() < 1e-5
    # and the plain critic scores candidate j of state b with state b itself
    b, j = 11, 123
    single = critic(states[b:b + 1], candidates[b, j:j + 1]).numpy()[0]
    assert single == pytest.approx(plain[b, j], abs=1e-6)


@pytest.mark.parametrize("hidden2", [48, 20])
def test_factored_score_sums_every_hidden_unit(hidden2):
    """`score` against Q recomputed in numpy from the critic's weights, candidate by candidate with its own state,
    for hidden2 a multiple of model.LANES (partial sums per lane, then their sum) and not (one sum)."""
    Tensor.manual_seed(2)
    critic, rng = Critic(S, A, 32, hidden2, 0.3), np.random.default_rng(2)
    states, candidates = rng.normal(size=(4, S)).astype(np.float32), rng.uniform(-1, 1, (4, 40, A)).astype(np.float32)
    p = {name: critic.view(name).numpy().astype(np.float64) for name in critic.shapes}
    rows = np.repeat(states, candidates.shape[1], 0), candidates.reshape(-1, A)  # each candidate with its own state
    expected = critic_forward(p, *rows)[0].reshape(candidates.shape[:2])
    np.testing.assert_allclose(critic.score(Tensor(states), Tensor(candidates)).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1e-3  # Q differs between candidates: a lost or doubled lane would show


def test_tabulated_score_equals_the_score_of_the_points():
    """Candidates as rows of tables of points that cover blocks of the action (2 + 3 dimensions): the same Q as
    `score` of the points side by side, each candidate with its own state."""
    Tensor.manual_seed(1)
    critic, rng = Critic(S, 5, 32, 16, 0.3), np.random.default_rng(0)
    tables = [rng.uniform(-1, 1, (6, 2)).astype(np.float32), rng.uniform(-1, 1, (4, 3)).astype(np.float32)]
    rows = np.stack([rng.integers(0, 6, (7, 50)), rng.integers(0, 4, (7, 50))], axis=-1).astype(np.int32)
    points = np.concatenate([tables[0][rows[..., 0]], tables[1][rows[..., 1]]], axis=-1)
    states = Tensor.randn(7, S)
    tabulated = critic.score_tabulated(states, Tensor(rows), [Tensor(t) for t in tables]).numpy()
    np.testing.assert_allclose(tabulated, critic.score(states, Tensor(points)).numpy(), rtol=1e-5, atol=1e-6)
    assert tabulated.std() > 1e-3  # Q differs between candidates: a mixed-up row would show


def _q_numpy(critic: Critic, states: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Q (B, K) of each candidate point (B, K, A) with its own state, recomputed in float64 from the weights."""
    p = {name: critic.view(name).numpy().astype(np.float64) for name in critic.shapes}
    hidden = np.maximum(states @ p["fc1.weight"].T + p["fc1.bias"], 0)
    inputs = np.concatenate([np.repeat(hidden[:, None], points.shape[1], 1), points], axis=-1)
    return np.maximum(inputs @ p["fc2.weight"].T + p["fc2.bias"], 0) @ p["fc3.weight"][0] + p["fc3.bias"][0]


@pytest.mark.parametrize("hidden2, kernel", [(32, True), (20, True), (32, False)])
def test_best_of_is_the_arg_max_of_q_per_state(hidden2, kernel, monkeypatch):
    """`best_of` (the C kernel on the CPU, hidden2 padded to a multiple of its vector; without it, as on other
    devices, `score`'s arg-max) against the arg-max of Q recomputed in numpy, each candidate with its own state; a
    tie goes to the first."""
    Tensor.manual_seed(3)
    critic, rng = Critic(S, A, 32, hidden2, 0.3), np.random.default_rng(3)
    assert critic._has_candidate_kernel("CPU")
    if not kernel:
        monkeypatch.setattr(Critic, "_has_candidate_kernel", lambda self, device: False)
    states, points = rng.normal(size=(6, S)).astype(np.float32), rng.uniform(-1, 1, (6, 120, A)).astype(np.float32)
    q = _q_numpy(critic, states, points)
    assert (np.diff(np.sort(q, 1)[:, -2:], axis=1) > 1e-5).all()  # a clear best, beyond float32's rounding
    points[:, -1] = points[np.arange(6), q.argmax(1)]  # the best again, last: the first must win
    best = critic.best_of(Tensor(states), Tensor(points)).numpy()
    np.testing.assert_array_equal(best, q.argmax(1))
    assert len(set(best)) > 3  # states disagree: a state scored with another's pre-activation would show


@pytest.mark.parametrize("row_dtype, hidden2", [(np.uint8, 32), (np.int16, 32), (np.uint8, 24)])
def test_best_of_tabulated_is_the_arg_max_of_q_per_state(row_dtype, hidden2):
    """`best_of_tabulated` with rows of uint8 (as the search writes them; int16, cast on the way in) into tables of
    256, 256 and 16 rows of 8, 8 and 4 dimensions (MultiBinary(20)'s groups), hidden2 a multiple of the kernel's
    vector or padded to one: the arg-max of Q of the points the rows name, in numpy."""
    Tensor.manual_seed(4)
    critic, rng = Critic(S, 20, 32, hidden2, 0.3), np.random.default_rng(4)
    tables = [rng.uniform(-1, 1, (n, w)).astype(np.float32) for n, w in ((256, 8), (256, 8), (16, 4))]
    rows = np.stack([rng.integers(0, len(t), (5, 400)) for t in tables], axis=-1).astype(row_dtype)
    points = np.concatenate([t[rows[..., g]] for g, t in enumerate(tables)], axis=-1)
    states = rng.normal(size=(5, S)).astype(np.float32)
    q = _q_numpy(critic, states, points)
    assert (np.diff(np.sort(q, 1)[:, -2:], axis=1) > 1e-5).all()
    best = critic.best_of_tabulated(Tensor(states), Tensor(rows), [Tensor(t) for t in tables]).numpy()
    np.testing.assert_array_equal(best, q.argmax(1))
    assert len(set(best)) > 2


def test_q_is_linear_between_kinks():
    Tensor.manual_seed(1)
    critic = Critic(S, 1, 32, 16)
    state = Tensor.randn(1, S)
    kinks = np.sort(critic.kinks(state).numpy()[0])
    inside = kinks[np.abs(kinks) < 5]
    # Q at many points between two neighbouring kinks lies on one straight line; across a kink it bends
    lo, hi = (inside[0], inside[1]) if len(inside) > 1 else (inside[0], inside[0] + 1)
    xs = np.linspace(lo, hi, 9)[1:-1]
    q = critic.score(state, Tensor(xs.reshape(1, -1, 1).astype(np.float32))).numpy()[0]
    assert np.abs(np.diff(q, 2)).max() < 1e-5
    hidden = np.maximum(critic._state_part(state, critic.views()).numpy()[0][:, None]
                        + critic.view("fc2.weight").numpy()[:, 32:33] * xs[None], 0)
    assert np.allclose(q, critic.view("fc3.weight").numpy()[0] @ hidden + critic.view("fc3.bias").numpy()[0], atol=1e-5)


def test_saved_checkpoint_is_standard_safetensors(tmp_path):
    """save_tensors writes with numpy alone; tinygrad's own reader gets every tensor back exactly."""
    from tinygrad.nn.state import safe_load

    from util import save_tensors
    critic = Critic(3, 2, 8, 4)
    save_tensors(tmp_path / "critic.safetensors", critic.state_dict())
    loaded = safe_load(tmp_path / "critic.safetensors")
    assert list(loaded) == list(critic.shapes)
    for name, shape in critic.shapes.items():
        assert tuple(loaded[name].shape) == shape
        np.testing.assert_array_equal(loaded[name].numpy(), critic.view(name).numpy())
