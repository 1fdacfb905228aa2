"""Actor and critic networks in tinygrad, each holding all its parameters in one flat buffer.

A flat buffer lets the optimiser, the soft target update and checkpoint loading touch a whole
network in a handful of kernels; the layers read shaped views of it.
"""
from __future__ import annotations

import copy
import math

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.renderer.cstyle import ClangRenderer
from tinygrad.uop.ops import KernelInfo, Ops, UOp

from runtime import read

LANES = 16  # partial sums per candidate in the critic's scoring of candidates (see Critic._candidate_output)
VECTOR = 16  # floats per vector in the C kernel of the candidates' arg-max (hidden2 padded to a multiple)


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
        """The parameters as numpy arrays, by name (copied out once, no device kernel; `read`, not Tensor.numpy:
        a training loop takes this before every episode, 0.4 ms against 0.04 per network)."""
        flat = read(self.flat)
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
        pre = self._state_part(states, p).unsqueeze(1)
        for g, table in enumerate(self._tables(tables, p)):
            pre = pre + table[rows[:, :, g]]
        return self._candidate_output(pre, p)

    def best_of(self, states: Tensor, candidates: Tensor) -> Tensor:
        """Position (B,) of the candidate of highest Q for each state: states (B, S), candidates (B, K, A). On a CPU
        device that compiles C, one kernel (`_best_candidate_kernel`); elsewhere `score`'s arg-max."""
        if not self._has_candidate_kernel(states.device):
            return self.score(states, candidates).argmax(1)
        p = self.views()
        return _best_candidate_kernel(self._state_part(states, p), p["fc3.weight"][0], candidates,
                                      [self._action_weight(p)], tabulated=False)

    def best_of_tabulated(self, states: Tensor, rows: Tensor, tables: list[Tensor]) -> Tensor:
        """`best_of` for candidates given as rows (B, K, G) of G tables of points (see `score_tabulated`)."""
        if not self._has_candidate_kernel(states.device):
            return self.score_tabulated(states, rows.cast(dtypes.int32), tables).argmax(1)
        p = self.views()
        return _best_candidate_kernel(self._state_part(states, p), p["fc3.weight"][0], rows, self._tables(tables, p),
                                      tabulated=True)

    def _has_candidate_kernel(self, device: str) -> bool:
        return isinstance(Device[device].renderer, ClangRenderer)

    def _tables(self, tables: list[Tensor], p: dict[str, Tensor]) -> list[Tensor]:
        """fc2's action part of every row of each group's table: (rows_g, hidden2) per table."""
        action_weight, start, out = self._action_weight(p), 0, []
        for points in tables:
            out.append((points @ action_weight[start:start + points.shape[1]]).contiguous())
            start += points.shape[1]
        return out

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


# The candidates' arg-max as one C kernel. tinygrad's CPU code generator folds loads and arithmetic into vectors of
# at most 4 floats and sums the hidden units through partial sums written to memory (Critic._candidate_output);
# this loop keeps each candidate's pre-activations in vectors of 16 floats, sums them in registers, and keeps only
# the best candidate of each state. The pre-activation of unit block `m` starts at `start` and adds the `terms`: for
# points, the state part plus each coordinate times its row of fc2's action weight; for table rows, the first
# table's row (the state part added to a copy of that table once per state, so one addition less per candidate:
# 32 states of MultiBinary(20), 4.7-4.9 -> 4.4 ms) plus one row of each other table. "x > 0" gives a
# mask of all ones where true, so the relu is one "and".
_KERNEL_SOURCE = """{{
  typedef float v16 __attribute__((vector_size(64), aligned(4)));
  typedef int m16 __attribute__((vector_size(64), aligned(4)));
  const v16 *state = (const v16 *)({1}), *w_out = (const v16 *)({2});
  const %(entry)s *candidate = {3};
  %(prologue)s
  int best = 0;
  float best_q = -__builtin_inff();
  for (int c = 0; c < %(k)d; c++, candidate += %(width)d) {{
    %(rows)s
    v16 acc = {{0}};
    for (int m = 0; m < %(blocks)d; m++) {{
      v16 x = %(start)s;
      %(terms)s
      acc += (v16)((m16)x & (x > 0)) * w_out[m];
    }}
    float q = 0;
    for (int l = 0; l < 16; l++) q += acc[l];
    if (q > best_q) {{ best_q = q; best = c; }}
  }}
  *{0} = best;
}}"""
_C_ENTRY = {dtypes.uint8: "unsigned char", dtypes.int32: "int", dtypes.float32: "float"}


def _best_candidate_kernel(state_part: Tensor, w_out: Tensor, candidates: Tensor, terms: list[Tensor],
                           tabulated: bool) -> Tensor:
    """Position (B,) of the candidate of largest w_out . relu(pre) per state, pre = state_part[b] + the candidate's
    terms. Tabulated, the candidates (B, K, G) are rows, each within its table, of G tables (rows_g, hidden2), and
    pre adds one row of each; otherwise they are points (B, K, A) and pre adds the points times the one term, fc2's
    action part (A, hidden2). Ties go to the first candidate, as in argmax; fc3's bias is left out (it moves every
    candidate alike)."""
    batch, k, width = candidates.shape
    if candidates.dtype not in _C_ENTRY:  # rows of another integer type
        candidates = candidates.cast(dtypes.int32)
    if pad := -state_part.shape[1] % VECTOR:  # units of zero pre-activation and weight add nothing
        state_part, w_out = state_part.pad(((0, 0), (0, pad))), w_out.pad(((0, pad),))
        terms = [t.pad(((0, 0), (0, pad))) for t in terms]
    hidden = state_part.shape[1]
    blocks = hidden // VECTOR
    if tabulated:  # a pointer to the candidate's row of each table, the first table's copy in a scratch buffer
        rows0 = terms[0].shape[0]
        scratch = [Tensor.empty(rows0 * hidden, device=state_part.device)]
        code = {"prologue": f"v16 *first = (v16 *)({{{4 + width}}}); const v16 *table0 = (const v16 *)({{4}});\n"
                            f"  for (int i = 0; i < {rows0 * blocks}; i++) first[i] = state[i % {blocks}] + table0[i];",
                "rows": f"const v16 *row0 = first + candidate[0] * {blocks}" + "".join(f", *row{g} = (const v16 *)"
                        f"({{{4 + g}}}) + candidate[{g}] * {blocks}" for g in range(1, width)) + ";",
                "start": "row0[m]", "terms": " ".join(f"x += row{g}[m];" for g in range(1, width))}
    else:  # each coordinate times its row of fc2's action weight
        scratch = []
        code = {"prologue": "", "rows": "const v16 *weight = (const v16 *)({4});", "start": "state[m]",
                "terms": f"for (int i = 0; i < {width}; i++) x += candidate[i] * weight[i * {blocks} + m];"}
    source = _KERNEL_SOURCE % {"entry": _C_ENTRY[candidates.dtype], "k": k, "width": width, "blocks": blocks, **code}

    def kernel(best: UOp, state: UOp, weight_out: UOp, entries: UOp, *buffers: UOp) -> UOp:
        b = UOp.range(batch, 0)
        srcs = (best.index(b), state.index(b * hidden), weight_out.index(0), entries.index(b * (k * width)),
                *[t.index(0) for t in buffers])
        info = KernelInfo(name="best_candidate", opts_to_apply=())
        return UOp(Ops.CUSTOM, src=srcs, arg=source).end(b).sink(arg=info)

    best = Tensor.empty(batch, dtype=dtypes.int32, device=state_part.device)
    flat = [t.contiguous().reshape(-1) for t in (state_part, w_out, candidates, *terms)]
    return best.custom_kernel(*flat, *scratch, fxn=kernel)[0]
