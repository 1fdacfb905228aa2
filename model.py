"""Actor and critic networks in tinygrad, each holding all its parameters in one flat buffer.

A flat buffer lets the optimiser, the soft target update and checkpoint loading touch a whole
network in a handful of kernels; the layers read shaped views of it.
"""
from __future__ import annotations

import copy
import math

import numpy as np
from tinygrad import Tensor, dtypes

LANES = 16  # partial sums per candidate in the critic's scoring of candidates (see Critic._candidate_output)


class FlatParams:
    """Named parameter tensors stored back to back in one realised float32 buffer `flat`."""

    def __init__(self, init: dict[str, Tensor]):
        self.shapes = {name: tuple(t.shape) for name, t in init.items()}
        self.offsets, start = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = (start, start + math.prod(shape))
            start += math.prod(shape)
        self.flat = Tensor.cat(*[t.flatten() for t in init.values()]).cast(dtypes.float32).contiguous().realize()

    def view(self, name: str) -> Tensor:
        """The parameter `name` as a shaped view of the flat buffer."""
        lo, hi = self.offsets[name]
        return self.flat[lo:hi].reshape(self.shapes[name])

    def views(self) -> dict[str, Tensor]:
        """All parameters as views. Differentiate a loss with respect to these, not to `flat`: the gradient
        of a slice is a padded tensor, and summing six padded gradients costs far more than joining six."""
        return {name: self.view(name) for name in self.shapes}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays, by name (copied out once, no device kernel)."""
        flat = self.flat.numpy()
        return {name: flat[lo:hi].reshape(self.shapes[name]) for name, (lo, hi) in self.offsets.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy `state` into the existing buffer, so compiled graphs that read it see the new values."""
        if set(state) != set(self.shapes):
            raise ValueError(f"expected tensors {sorted(self.shapes)}, found {sorted(state)}")
        for name, shape in self.shapes.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, expected {shape}")
        self.flat.assign(Tensor.cat(*[state[n].to(self.flat.device).cast(dtypes.float32).flatten() for n in self.shapes])).realize()

    def copy_from(self, other: FlatParams) -> None:
        self.flat.assign(other.flat).realize()

    def replica(self, device: str):
        """A copy of this network whose flat buffer lives on `device` (kept current by writing into it)."""
        twin = copy.copy(self)
        twin.flat = self.flat.to(device).contiguous().realize()
        return twin


def _uniform(shape: tuple[int, ...], bound: float) -> Tensor:
    return Tensor.uniform(*shape, low=-bound, high=bound)


def _linear_init(n_in: int, n_out: int, weight_bound: float) -> tuple[Tensor, Tensor]:
    """Weight in torch layout (out, in) within +-weight_bound; bias with torch's default +-1/sqrt(in)."""
    return _uniform((n_out, n_in), weight_bound), _uniform((n_out,), 1 / math.sqrt(n_in))


def _dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight.T + bias for a weight in torch layout (out, in). The transpose is copied into a block of its own
    first: read in place, with the output units strided, tinygrad's CPU kernels for the batch's matmuls and their
    gradients ran slower (the compiled DDPG update with 20-d actions, batch 64, 2-core Intel Xeon: 3.0-3.1 instead
    of 3.7-4.0 ms)."""
    return x.linear(weight.T.contiguous(), bias)


def _hidden_bound(n_out: int) -> float:
    # The reference's fanin_init took size[0] of the torch weight, i.e. the OUT features; kept for parity.
    return 1 / math.sqrt(n_out)


class Actor(FlatParams):
    """state -> proto-action in (-1, 1)^action_dim: two ReLU layers and a softsign output."""

    def __init__(self, state_dim: int, action_dim: int, hidden1: int = 256, hidden2: int = 128, init_w: float = 3e-3):
        w1, b1 = _linear_init(state_dim, hidden1, _hidden_bound(hidden1))
        w2, b2 = _linear_init(hidden1, hidden2, _hidden_bound(hidden2))
        w3, b3 = _linear_init(hidden2, action_dim, init_w)
        super().__init__({"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2,
                          "fc3.weight": w3, "fc3.bias": b3})
        self.dims = (state_dim, action_dim, hidden1, hidden2, init_w)

    def __call__(self, states: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        p = params or self.views()
        x = _dense(states, p["fc1.weight"], p["fc1.bias"]).relu()
        # contiguous ends the kernel here: fused with fc3's reduction, the fc2 matmul ran 3x slower on
        # the CPU (batch 64: 570 instead of 180 us)
        x = _dense(x, p["fc2.weight"], p["fc2.bias"]).relu().contiguous()
        return _dense(x, p["fc3.weight"], p["fc3.bias"]).softsign()

    def clone(self) -> Actor:
        twin = Actor(*self.dims)
        twin.copy_from(self)
        return twin


class Critic(FlatParams):
    """Q(s, a) = fc3(relu(fc2([relu(fc1(s)), a]))), the action joining at the second layer.

    Because the action enters linearly at fc2, fc2's weight splits into a state part and an action
    part: `score` runs the state part once per state and only the action part per candidate.
    """

    def __init__(self, state_dim: int, action_dim: int, hidden1: int = 256, hidden2: int = 128, init_w: float = 3e-3):
        w1, b1 = _linear_init(state_dim, hidden1, _hidden_bound(hidden1))
        w2, b2 = _linear_init(hidden1 + action_dim, hidden2, _hidden_bound(hidden2))
        w3, b3 = _linear_init(hidden2, 1, init_w)
        super().__init__({"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2,
                          "fc3.weight": w3, "fc3.bias": b3})
        self.dims = (state_dim, action_dim, hidden1, hidden2, init_w)

    def clone(self) -> Critic:
        twin = Critic(*self.dims)
        twin.copy_from(self)
        return twin

    def __call__(self, states: Tensor, actions: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Q values, shape (batch,), for states (batch, state_dim) and actions (batch, action_dim)."""
        p = params or self.views()
        x = (self._state_part(states, p) + actions.matmul(self._action_weight(p))).relu()
        return _dense(x.contiguous(), p["fc3.weight"], p["fc3.bias"])[:, 0]  # contiguous: see Actor.__call__

    def _action_weight(self, p: dict[str, Tensor]) -> Tensor:
        """fc2's columns that multiply the action, transposed, in a block of their own: shape (action_dim, hidden2).
        (Read in place, as strided columns of the flat buffer, they made the candidates' kernel 1.5x slower:
        64 x 10,485 candidates of 20 or 40 dimensions.)"""
        return p["fc2.weight"][:, self.dims[2]:].T.contiguous()

    def _state_part(self, states: Tensor, p: dict[str, Tensor]) -> Tensor:
        """fc2's pre-activation without the action term, shape (batch, hidden2)."""
        h = _dense(states, p["fc1.weight"], p["fc1.bias"]).relu()
        return _dense(h, p["fc2.weight"][:, :self.dims[2]], p["fc2.bias"])

    def score(self, states: Tensor, candidates: Tensor) -> Tensor:
        """Q of every candidate action for its own state: states (B, S), candidates (B, K, A) -> (B, K)."""
        p = self.views()
        pre = self._state_part(states, p).unsqueeze(1) + candidates.matmul(self._action_weight(p))
        return self._candidate_output(pre, p)

    def score_tabulated(self, states: Tensor, rows: Tensor, tables: list[Tensor]) -> Tensor:
        """`score` of candidates given as rows (B, K, G) of G tables of points (rows_g, width_g) that cover
        consecutive blocks of the action's dimensions: fc2's action part is computed once per table row, then each
        candidate adds G of those (hidden2,) rows instead of multiplying action_dim columns."""
        p = self.views()
        action_weight, start = self._action_weight(p), 0
        pre = self._state_part(states, p).unsqueeze(1)
        for g, points in enumerate(tables):
            width = points.shape[1]
            pre = pre + (points @ action_weight[start:start + width]).contiguous()[rows[:, :, g]]
            start += width
        return self._candidate_output(pre, p)

    def _candidate_output(self, pre: Tensor, p: dict[str, Tensor]) -> Tensor:
        """fc3 over relu(pre) for pre-activations (B, K, hidden2) of candidates: (B, K).

        The sum over hidden units runs in two kernels: LANES interleaved partial sums per candidate, then their sum.
        As one reduction, tinygrad's CPU kernel added each unit's product into a scalar; split so, the first kernel
        keeps the partial sums in vector registers (MultiBinary(20), 32 states x 10,485 candidates, tabulated, 2-core
        Intel Xeon: 9.8 ms instead of 22 ms, the same arg-max)."""
        batch, k, hidden = pre.shape
        w_out = p["fc3.weight"][0]
        if hidden % LANES:
            return pre.relu().matmul(w_out) + p["fc3.bias"][0]
        partial = (pre.relu() * w_out).reshape(batch, k, hidden // LANES, LANES).sum(2).contiguous()
        return partial.sum(2) + p["fc3.bias"][0]

    def score_full(self, states: Tensor, candidates: Tensor) -> Tensor:
        """`score` computed the plain way: the whole critic over B*K (state, candidate) rows."""
        batch, k, action_dim = candidates.shape
        rows = states.unsqueeze(1).expand(batch, k, states.shape[1]).reshape(batch * k, -1)
        return self(rows, candidates.reshape(batch * k, action_dim)).reshape(batch, k)

    def kinks(self, states: Tensor) -> Tensor:
        """For a 1-d action: the action value at which each fc2 unit crosses zero, shape (B, hidden2).

        Q(s, .) is linear between consecutive kinks, so its maximum over an interval of actions lies
        at the interval's ends or beside a kink. Units with a zero action weight never cross (inf).
        """
        p = self.views()
        w_action = self._action_weight(p)[0]
        safe = (w_action == 0).where(1.0, w_action)
        return (w_action == 0).where(float("inf"), -self._state_part(states, p) / safe)
