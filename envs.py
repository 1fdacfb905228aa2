"""The built-in environments, each with an exactly known optimum; importing this module registers them with gymnasium.

    Recommender-v0   the recommender simulator of Dulac-Arnold et al. (2015): Discrete(n_items) actions whose items
                     carry embeddings (`env.unwrapped.action_embeddings`), the viewed item's embedding observed
    Configurator-v0  a profile is observed, a combination of n choices is picked (MultiBinary(n), or MultiDiscrete),
                     one step per episode

Each exposes `optimal_return` (the optimal policy's expected return from the start distribution) and `random_return`
(a uniformly random policy's), computed exactly, so that a result reads as a fraction of optimal above a random floor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

ACCEPT_CONTINUE, REJECT_CONTINUE = 0.9, 0.8  # probability that an episode goes on after an accepted / rejected item
# Recommender-v0's default density: 2% of the items acceptable from each item, at most 12 million non-zeros of W in
# all (1M items: 12 per item, built in seconds within 400 MB). Much sparser, random recommendations are almost never
# accepted (0.026% of them with 12 per item at 10,000 items) and exploration finds nothing to learn from.
DEFAULT_ACCEPTABLE_SHARE, MAX_DEFAULT_NONZEROS = 1 / 50, 12_000_000
CHUNK = 1 << 14  # rows of the sparse acceptance matrix handled at a time, to bound the memory of temporaries
APPEAL_LOW, APPEAL_SPREAD = 0.5, 0.5  # variants' appeal: uniform in [APPEAL_LOW, 1], an embedding feature in +-SPREAD


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int within [low, high]; a ValueError naming the keyword otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be an integer {bounds} (got {value!r})")
    return int(value)


def _check_float(name: str, value, low: float, high: float) -> float:
    """`value` as a float within [low, high]; a ValueError naming the keyword otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or \
            not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low:.6g} to {high:.6g} (got {value!r})")
    return float(value)


# ---------------------------------------------------------------------------------------------------------------------
# Recommender-v0
#
# Each item sits at a latent position z on the unit torus [0, 1)^2. Its embedding is B f(z): the four torus features
# f(z) = (cos 2 pi z1, sin 2 pi z1, cos 2 pi z2, sin 2 pi z2) in a random d-dimensional orientation B (orthonormal
# columns), so nearby embeddings are nearby positions. Recommending item j to a user viewing item i is accepted with
#     w_ij = q_j (1 - rho^2)^2,   rho = |z_j - (z_i + s)| / r   (torus distance; w_ij = 0 for rho >= 1),
# a smooth bump around the shifted position z_i + s, scaled by a smooth quality field q in [0.3, 1]. The good next
# items of i thus lie near T(e_i) = B R B^T e_i, R rotating each torus plane by 2 pi s: a fixed linear map of the
# embedding that the actor has to learn, while the items nearest to e_i itself are never accepted (|s| > r).
# The radius r makes about `neighbours` items acceptable from each item, so W has about n_items * neighbours
# non-zeros: items are spread evenly over a grid of cells of side >= r (the same number in each cell, give or take
# one), and only the 3 x 3 cells around z_i + s hold candidates. Policy iteration over this sparse W gives the optimal
# policy and its values exactly.
#
# With `variants` > 1 each position holds that many items, variants of one product: item j at position p has quality
# q_p a_j, its appeal a_j uniform in [APPEAL_LOW, 1], and its embedding gains a fifth feature, the appeal, along a fifth
# orthonormal direction. The dynamics from an item depend on its position only, so the MDP is solved over positions:
# the optimal policy recommends the most appealing variant of the best position (quality q_p max_p a), a uniformly
# random one accepts as quality q_p mean_p a. W then has (n_items / variants) x (neighbours / variants) x variants^2
# non-zeros without ever being held: a million items with 20,000 acceptable from each are solved over 10,000
# positions.
# ---------------------------------------------------------------------------------------------------------------------


def _torus_features(z: np.ndarray) -> np.ndarray:
    angle = 2 * np.pi * z
    return np.stack([np.cos(angle[..., 0]), np.sin(angle[..., 0]), np.cos(angle[..., 1]), np.sin(angle[..., 1])], -1)


def _accept(z_from: np.ndarray, z_to: np.ndarray, q_to: np.ndarray, shift: np.ndarray, radius: float) -> np.ndarray:
    """Acceptance probability w of recommending items at z_to (quality q_to) to users at z_from; broadcasts."""
    delta = (z_to - z_from - shift + 0.5) % 1.0 - 0.5
    rho2 = (delta ** 2).sum(-1) / radius ** 2
    return np.where(rho2 < 1.0, q_to * (1.0 - np.minimum(rho2, 1.0)) ** 2, 0.0)


def _segment(op: np.ufunc, values: np.ndarray, indptr: np.ndarray, empty: float) -> np.ndarray:
    """op.reduceat over the rows of a CSR matrix, `empty` for rows without entries."""
    counts = np.diff(indptr)
    out = np.full(len(counts), empty, values.dtype)
    filled = counts > 0
    if values.size:
        out[filled] = op.reduceat(values, indptr[:-1][filled])
    return out


def _evaluate(next_item: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """Exact expected return from each item of the policy that recommends next_item[i] (accepted w.p. accept[i]).

    V_i = p_i (1 + 0.9 V_next(i)) + (1 - p_i) 0.8 Vbar, Vbar the mean of V. Writing V = x + y Vbar, x and y solve
    x = a + b x[next] along the policy's functional graph, which pointer doubling sums in log2 steps, each step
    doubling the length of the paths summed, until the weight left (b <= 0.9 per step) is below 1e-18.
    """
    b = ACCEPT_CONTINUE * accept
    xy = np.stack([accept, REJECT_CONTINUE * (1.0 - accept)], axis=1)
    follow = next_item.copy()
    while b.max(initial=0.0) > 1e-18:
        xy += b[:, None] * xy[follow]
        b, follow = b * b[follow], follow[follow]
    x, y = xy.T
    return x + y * (x.mean() / (1.0 - y.mean()))


@dataclass(frozen=True)
class RecommenderWorld:
    """Items, their embeddings and the exact solution of the recommender MDP (arrays read-only, shared by envs)."""
    position: np.ndarray         # (N, 2) latent positions on the unit torus
    quality: np.ndarray          # (N,) peak acceptance probability of each item
    embeddings: np.ndarray       # (N, d) float32
    next_item_map: np.ndarray    # (d, d): an item's good next items lie near next_item_map @ its embedding
    shift: np.ndarray            # (2,) latent shift s
    radius: float                # r: w_ij > 0 only within this torus distance of z_i + s
    nonzeros: int                # non-zeros of W
    values: np.ndarray           # (N,) optimal expected return from each item
    optimal_actions: np.ndarray  # (N,) an optimal recommendation from each item
    random_return: float         # expected return of uniformly random recommendations
    cells: int                   # cells per side of the grid that W's candidates are searched in (_cell_candidates)
    slot_items: np.ndarray       # (N,) the item in each slot: slots run cell by cell, a position's variants together
    basis: np.ndarray            # (d, 4 or 5) B: the orthonormal directions of the features in the embeddings


def _cell_candidates(z: np.ndarray, shift: np.ndarray, cells: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots in the 3 x 3 cells around z + shift, for each row of z (m, 2): (m, 9 x the most slots in a cell)
    slot numbers, 0 where a cell holds fewer, and the mask of those that exist.

    Slot k of n lies in cell k * cells^2 // n (row-major), so the slots of a cell are contiguous.
    """
    n_cells = cells * cells
    first = -(-np.arange(n_cells + 1) * n // n_cells)  # the first slot of each cell
    size, place = np.diff(first), np.arange(-(-n // n_cells))
    offsets = np.array([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    around = (np.minimum(((z + shift) % 1.0 * cells).astype(np.int64), cells - 1)[:, None, :] + offsets) % cells
    cell = around[..., 0] + around[..., 1] * cells                                  # (m, 9)
    inside = (place < size[cell][..., None]).reshape(len(z), -1)
    return np.where(inside, (first[cell][..., None] + place).reshape(len(z), -1), 0), inside


def _sparse_acceptance(position: np.ndarray, quality: np.ndarray, shift: np.ndarray, radius: float,
                       cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W as CSR (indptr, column indices, values): for each slot, every slot with w > 0, from the 3 x 3 cells around it
    (see `_cell_candidates`)."""
    n = len(position)
    counts, cols, vals = np.zeros(n, np.int64), [], []
    for start in range(0, n, CHUNK):
        z = position[start:start + CHUNK]
        candidates, inside = _cell_candidates(z, shift, cells, n)
        w = _accept(z[:, None, :], position[candidates], quality[candidates], shift, radius)
        keep = inside & (w > 0)
        counts[start:start + len(z)] = keep.sum(1)
        cols.append(candidates[keep].astype(np.int32))
        vals.append(w[keep])
    cols = np.concatenate(cols)  # one list at a time, to bound the peak memory
    return np.concatenate([[0], np.cumsum(counts)]), cols, np.concatenate(vals)


def _row_blocks(indptr: np.ndarray, rows: int = CHUNK):
    """Blocks of consecutive CSR rows as (first row, end row, first entry, end entry): bounded temporaries."""
    n = len(indptr) - 1
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, indptr[r0], indptr[r1]


def _gain(accept: np.ndarray, next_values: np.ndarray, mean_value: float) -> np.ndarray:
    """w_ij (1 + 0.9 V_j - 0.8 Vbar): what recommending item j (accepted w.p. w_ij, value V_j) earns over a rejection."""
    return accept * (1.0 + ACCEPT_CONTINUE * next_values - REJECT_CONTINUE * mean_value)


def _greedy(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row i: max(0, max_j w_ij (1 + 0.9 V_j - 0.8 Vbar)), the gain of the best item over a rejection,
    and the entry of W that attains it (-1 where no item beats a rejection)."""
    mean_value = values.mean()
    best, arg = np.zeros(len(indptr) - 1), np.full(len(indptr) - 1, -1)
    for r0, r1, e0, e1 in _row_blocks(indptr):
        gain = _gain(w[e0:e1], values[cols[e0:e1]], mean_value)
        local = indptr[r0:r1 + 1] - e0
        top = np.maximum(_segment(np.maximum, gain, local, 0.0), 0.0)
        rows = np.repeat(np.arange(r1 - r0), np.diff(local))
        hit = np.flatnonzero((gain == top[rows]) & (gain > 0))
        hit = hit[np.concatenate([[True], rows[hit][1:] != rows[hit][:-1]])] if hit.size else hit  # first per row
        best[r0:r1], arg[r0 + rows[hit]] = top, e0 + hit
    return best, arg


def _solve_optimal(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Policy iteration with exact evaluation: the optimal values and an optimal recommendation per item.

    Where no item beats a rejection the item itself is recommended (w_ii = 0: the user moves to a random item).
    """
    n = len(indptr) - 1
    policy, accept = np.arange(n), np.zeros(n)
    values = _evaluate(policy, accept)
    while True:
        best, arg = _greedy(indptr, cols, w, values)
        current = _gain(accept, values[policy], values.mean())
        improve = best > current + 1e-12 * (1.0 + np.abs(current))  # strict, so that ties cannot cycle
        if not improve.any():
            return values, policy
        found = arg >= 0
        policy = np.where(improve, np.where(found, cols[arg], np.arange(n)), policy)
        accept = np.where(improve, np.where(found, w[arg], 0.0), accept)
        values = _evaluate(policy, accept)


def _random_return(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray) -> float:
    """Exact expected return of uniformly random recommendations: V = u + 0.9/N W V + 0.8 (1 - u) Vbar, u = W 1 / N.

    W/N (the CSR indptr, cols, w) holds the probabilities that a random recommendation at row i is accepted at item j:
    w_ij / N for one item, `_random_slate_weights` / N for slates. As for `_evaluate`, V = x + y Vbar; x and y are
    Neumann series in 0.9/N W, whose row sums (0.9 times the acceptance probability) are below 0.9.
    """
    n = len(indptr) - 1
    u = _segment(np.add, w, indptr, 0.0) / n
    xy0 = np.stack([u, REJECT_CONTINUE * (1.0 - u)], axis=1)
    xy = xy0.copy()
    for _ in range(1000):
        prev, xy = xy, xy0.copy()
        for r0, r1, e0, e1 in _row_blocks(indptr):
            products = w[e0:e1, None] * prev[cols[e0:e1]]
            xy[r0:r1] += ACCEPT_CONTINUE / n * np.stack(
                [_segment(np.add, products[:, i], indptr[r0:r1 + 1] - e0, 0.0) for i in range(2)], axis=1)
        if np.abs(xy - prev).max() <= 1e-15 * np.abs(xy).max():
            break
    x, y = xy.T
    return float(x.mean() / (1.0 - y.mean()))


@functools.lru_cache(maxsize=2)  # main.py makes a training and an evaluation env of the same world
def recommender_world(n_items: int, dim: int, neighbours: float, world_seed: int, variants: int = 1) -> RecommenderWorld:
    """Build the items and solve the MDP (checked arguments: see RecommenderEnv)."""
    rng = np.random.default_rng(world_seed)
    places = n_items // variants  # positions, each holding `variants` items
    radius = math.sqrt(neighbours / variants / (math.pi * places))
    cells = int(1.0 / radius)
    # the MDP is solved over positions ordered by cell (nearby positions, nearby memory); item numbers are shuffled
    cell = np.arange(places) * cells ** 2 // places
    position = (np.stack([cell % cells, cell // cells], 1) + rng.random((places, 2))) / cells
    modes = rng.integers(-2, 3, (3, 2))
    modes[(modes == 0).all(1)] = (1, 0)
    phase = rng.uniform(0, 2 * np.pi, 3)
    quality = 0.65 + 0.35 * np.cos(2 * np.pi * position @ modes.T + phase).mean(1)
    shift = rng.uniform(0.25, 0.75, 2)
    appeal = rng.uniform(APPEAL_LOW, 1.0, (places, variants)) if variants > 1 else np.ones((places, 1))
    best_variant, best_appeal, mean_appeal = appeal.argmax(1), appeal.max(1), appeal.mean(1)
    indptr, cols, w = _sparse_acceptance(position, quality * best_appeal, shift, radius, cells)
    values, policy = _solve_optimal(indptr, cols, w)
    random_return, nonzeros = _random_return(indptr, cols, w * (mean_appeal / best_appeal)[cols]), len(w) * variants ** 2
    del indptr, cols, w

    slot = rng.permutation(n_items)  # item i sits in slot[i]; a position's variants fill consecutive slots
    item = np.empty_like(slot)
    item[slot] = np.arange(n_items)
    place, item_appeal = slot // variants, appeal.ravel()[slot]  # each item's position and appeal
    best_slot = policy * variants + best_variant[policy]  # per position: the best variant of its best next position
    position, quality, values = position[place], quality[place] * item_appeal, values[place]
    policy = item[best_slot[place]]
    features = _torus_features(position)
    if variants > 1:
        scaled = (2 * item_appeal - 1 - APPEAL_LOW) / (1 - APPEAL_LOW)  # [APPEAL_LOW, 1] onto [-1, 1]
        features = np.concatenate([features, APPEAL_SPREAD * scaled[:, None]], 1)
    basis = np.linalg.qr(rng.standard_normal((dim, features.shape[1])))[0]
    rotation = np.zeros((4, 4))
    for axis, angle in enumerate(2 * np.pi * shift):
        c, s = math.cos(angle), math.sin(angle)
        rotation[2 * axis:2 * axis + 2, 2 * axis:2 * axis + 2] = ((c, -s), (s, c))
    embeddings = (features @ basis.T).astype(np.float32)
    next_item_map = basis[:, :4] @ rotation @ basis[:, :4].T
    for array in (position, quality, embeddings, next_item_map, shift, values, policy, item, basis):
        array.flags.writeable = False
    return RecommenderWorld(position, quality, embeddings, next_item_map, shift, radius, nonzeros, values, policy,
                            random_return, cells, item, basis)


def default_neighbours(n_items: int, variants: int = 1) -> float:
    """Recommender-v0's default mean number of acceptable items per item: 2% of the items, capped so that the W that
    is solved (over positions) holds at most 12 million non-zeros, and at least one position's variants."""
    return max(float(variants), min(n_items * DEFAULT_ACCEPTABLE_SHARE, MAX_DEFAULT_NONZEROS * variants ** 2 / n_items))


# ---------------------------------------------------------------------------------------------------------------------
# Slates (slate_size s > 1)
#
# The action is an ordered slate of s items. The user examines it from its first position: an examined item j is
# accepted with probability w_ij, the first acceptance ends the examination, and after each declined position the user
# goes on to the next with probability d (attention_decay) and otherwise stops looking. Position k (from 0) is thus
# reached, before any acceptance, with probability attention[k] = d^k, and it is where an item is accepted with
#     P_k = d^k w_{i a_k} prod_{l<k} (1 - w_{i a_l}).
# An item repeated in a slate was examined and declined when it is reached again: it counts as w = 0 there and adds
# nothing beyond its first position. Then the user moves and the episode ends as after the single-item env's
# recommendation, accepted or not; a slate of one item repeated s times is that item recommended alone.
#
# The optimum. Under values V, a slate earns over a rejection sum_k P_k g_k, g_j = 1 + 0.9 V_j - 0.8 Vbar, positive for
# every item (V_j >= 0.8 Vbar: a rejection is always possible). With x = w g and c = d (1 - w) per item this is
#     x_1 + c_1 (x_2 + c_2 (x_3 + ...)),
# and swapping the adjacent items a, b changes it by a non-negative multiple of x_a (1 - c_b) - x_b (1 - c_a): some
# optimal slate lists its items by decreasing x / (1 - c). Items that cannot be accepted (w = 0, or repeated) only cost
# attention. Which items is then a dynamic programme over the row's acceptable items in that order, the best tail with
# m slots left after each of them: O(K s) for K acceptable items, never the K^s slates. Policy iteration with this
# improvement, from the single-item optimum, gives the optimal values exactly: it stops where no slate improves on
# values evaluated to a relative 1e-14 (1e-8 while over 1% of the slates change, as their values will change again).
# Slates of fewer than s acceptable items are padded with their first item (adding nothing, as above). As an item's w
# and V are those of its position, this is done for variants = 1 only.
#
# A uniformly random slate of s distinct items accepts item j at position k with probability
#     (1/N) d^k w_ij E[prod over the other k items before it of (1 - w)],
# and for a random k-subset of the N - 1 other items E[prod (1 - w)] = sum_t (-1)^t e_t(w without j) k_(t) / (N-1)_(t),
# e_t the elementary symmetric polynomials of the row's non-zero w, (a)_(t) the falling factorials: exact in O(K s).
#
# Hidden users (hidden_user=True). Each item has one of HIDDEN_TOPICS = 4 topics, drawn uniformly and independently of
# its position, and its embedding gains TOPIC_SPREAD = 1 along its topic's direction (orthonormal directions, orthogonal
# to the torus features': dim >= 8). Each episode draws the user's interests, a preference vector u of one number per
# topic, each uniform in [0, 1]; it multiplies the acceptance: w_ij u[topic j]. The user never accepts more than W
# allows, and the acceptable items of an item mix topics, so that a policy that knows u picks among them by topic where
# one that does not must probe for it. The agent sees what the user did (the slate, its clicks, the moving
# average of the clicked embeddings), never u. The greedy oracle knows u and shows the s items of largest
# w_ij u[topic j] in decreasing order: this maximises the immediate acceptance probability, sum_k P_k being
# non-decreasing in each w and the order by w that of x / (1 - c) when g is constant. Its return and a random slate's
# are Monte Carlo estimates (ORACLE_EPISODES episodes from ORACLE_SEED).
# ---------------------------------------------------------------------------------------------------------------------

ATTENTION_DECAY = 0.8  # default attention_decay: after a declined position the user looks at the next w.p. 0.8
HISTORY_RATE = 0.3  # the weight of the newest clicked item in the observed moving average of clicked embeddings
SLATE_BLOCK = 1 << 24  # bytes of a slate programme's choices (acceptable items x slate size x rows of W) at a time
HIDDEN_TOPICS, TOPIC_SPREAD = 4, 1.0  # hidden users: the items' topics, and the length of a topic's direction
ORACLE_EPISODES, ORACLE_SEED = 10_000, 0  # the Monte-Carlo estimates of hidden users' returns


def _cascade(w: np.ndarray, decay: float) -> np.ndarray:
    """P_k = d^k w_k prod_{l<k} (1 - w_l) along the last axis: the probability that position k's item is accepted."""
    if w.shape[-1] == 1:  # the single-item env's step, at its speed
        return w
    reached = np.empty_like(w)
    reached[..., 0] = 1.0
    np.cumprod(decay * (1.0 - w[..., :-1]), axis=-1, out=reached[..., 1:])
    return w * reached


def _repeats(slates: np.ndarray) -> np.ndarray:
    """True where a slate (last axis) holds an item already shown at an earlier position."""
    same = slates[..., :, None] == slates[..., None, :]
    return np.tril(same, -1).any(-1)


def _slate_acceptance(world: RecommenderWorld, items: np.ndarray, slates: np.ndarray, decay: float,
                      interest: np.ndarray | None = None) -> np.ndarray:
    """P (..., s): the probability that each position of the slates (..., s) is accepted by users viewing items (...),
    `interest` (..., s) multiplying w where users are hidden."""
    w = _accept(world.position[items][..., None, :], world.position[slates], world.quality[slates], world.shift,
                world.radius)
    if interest is not None:
        w = w * interest
    if slates.shape[-1] > 1:
        w = np.where(_repeats(slates), 0.0, w)
    return _cascade(w, decay)


def _padding(local_indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each entry of a block of CSR rows goes in a (rows, width) array: its row, its column, and the width."""
    counts = np.diff(local_indptr)
    rows = np.repeat(np.arange(len(counts)), counts)
    return rows, np.arange(local_indptr[-1]) - local_indptr[:-1][rows], int(counts.max(initial=0))


def _padded(values: np.ndarray, fill, rows: np.ndarray, columns: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """CSR entries `values` placed at (rows, columns) of an array of `shape` filled with `fill` elsewhere."""
    out = np.full(shape, fill, values.dtype)
    out[rows, columns] = values
    return out


def _slate_blocks(indptr: np.ndarray, slate_size: int):
    """`_row_blocks` of as many rows as keep a slate programme's choices within SLATE_BLOCK bytes."""
    longest = int(np.diff(indptr).max(initial=1))
    return _row_blocks(indptr, max(1, SLATE_BLOCK // (longest * slate_size)))


def _slate_programme(x: np.ndarray, carry: np.ndarray, slate_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The best x_1 + c_1 (x_2 + c_2 (...)) over subsequences of at most `slate_size` of the candidates (K, R), in
    their order, for each of R rows: its value (R,) and take[t, m - 1] (K, s, R), whether the best tail from candidate
    t on with m slots left starts with t."""
    tail = np.zeros((slate_size + 1, x.shape[1]))  # tail[m]: the best tail after the candidates seen, m slots left
    take = np.empty((len(x), slate_size, x.shape[1]), bool)
    for t in range(len(x) - 1, -1, -1):
        with_t = x[t] + carry[t] * tail[:-1]
        take[t] = with_t > tail[1:]  # strictly: an item that adds nothing is left out
        np.maximum(tail[1:], with_t, out=tail[1:])
    return tail[slate_size], take


def _read_slates(take: np.ndarray, candidates: np.ndarray, accept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slates (R, s) that `_slate_programme` found, -1 after their last item, and their items' w (0 there)."""
    slate_size, n_rows = take.shape[1], take.shape[2]
    rows, left = np.arange(n_rows), np.full(n_rows, slate_size)
    slates, w = np.full((n_rows, slate_size), -1), np.zeros((n_rows, slate_size))
    for t in range(len(take)):
        took = (left > 0) & take[t, np.maximum(left - 1, 0), rows]
        at = (rows[took], slate_size - left[took])
        slates[at], w[at] = candidates[t, took], accept[t, took]
        left -= took
    return slates, w


def _best_slates(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, values: np.ndarray, slate_size: int,
                 decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row i: the largest gain over a rejection of any slate, max sum_k P_k g_k, a slate that attains it
    (padded with its first item, or with i where nothing is acceptable) and its items' w_ij (0 for the padding)."""
    n, mean_value = len(indptr) - 1, values.mean()
    best, slates, accept = np.zeros(n), np.empty((n, slate_size), np.int64), np.zeros((n, slate_size))
    for r0, r1, e0, e1 in _slate_blocks(indptr, slate_size):
        rows, columns, width = _padding(indptr[r0:r1 + 1] - e0)
        x = _gain(w[e0:e1], values[cols[e0:e1]], mean_value)
        index = _padded(x / (1.0 - decay * (1.0 - w[e0:e1])), -1.0, rows, columns, (r1 - r0, width))
        entry = _padded(np.arange(e0, e1), e1, rows, columns, (r1 - r0, width))  # e1: padding
        order = np.argsort(-index, axis=1)  # by decreasing x / (1 - c)
        entry = np.ascontiguousarray(np.take_along_axis(entry, order, 1).T)  # (K, R): candidate by candidate
        inside = entry < e1
        entry = np.where(inside, entry, e0)
        p, x = np.where(inside, w[entry], 0.0), np.where(inside, x[entry - e0], 0.0)
        best[r0:r1], take = _slate_programme(x, decay * (1.0 - p), slate_size)
        chosen, accept[r0:r1] = _read_slates(take, np.where(inside, cols[entry], -1), p)
        first = np.where(chosen[:, 0] >= 0, chosen[:, 0], np.arange(r0, r1))
        slates[r0:r1] = np.where(chosen >= 0, chosen, first[:, None])
    return best, slates, accept


def _evaluate_slates(slates: np.ndarray, probs: np.ndarray, start: np.ndarray | None = None,
                     tolerance: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """Expected returns (N,) of the policy showing slates[i] (N, s) at item i, accepted at position k w.p. probs[i, k].

    As for `_evaluate`, V = x + y Vbar, with x = A + 0.9 P x and y = 0.8 (1 - A) + 0.9 P y (A the total acceptance):
    Jacobi iterations from `start` (2, N), previous x and y, until a step changes them by at most `tolerance`
    relatively. Returns V and the (x, y) reached, to start the next evaluation from.
    """
    total = probs.sum(1)
    x0, y0 = total, REJECT_CONTINUE * (1.0 - total)
    x, y = (x0.copy(), y0.copy()) if start is None else start
    weights = ACCEPT_CONTINUE * probs
    while True:
        x_next = x0 + np.einsum("ns,ns->n", weights, x[slates])  # einsum: several times faster than a sum over s
        y_next = y0 + np.einsum("ns,ns->n", weights, y[slates])
        step = max(np.abs(x_next - x).max(), np.abs(y_next - y).max())
        x, y = x_next, y_next
        if step <= tolerance * max(np.abs(x).max(), np.abs(y).max()):
            return x + y * (x.mean() / (1.0 - y.mean())), np.stack([x, y])


def _solve_slates(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, values: np.ndarray, policy: np.ndarray,
                  slate_size: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Policy iteration over slates from the single-item optimum (`values`, `policy`, w of W in the row order):
    the optimal values and an optimal slate per row."""
    n = len(indptr) - 1
    slates = np.repeat(policy[:, None], slate_size, 1)
    accept = np.zeros((n, slate_size))
    rows = np.repeat(np.arange(n), np.diff(indptr))
    chosen = cols == policy[rows]
    accept[rows[chosen], 0] = w[chosen]
    xy, exact = None, True  # the single-item optimum's values are exact
    while True:
        best, better, better_accept = _best_slates(indptr, cols, w, values, slate_size, decay)
        current = (_cascade(accept, decay) * _gain(1.0, values[slates], values.mean())).sum(1)
        improve = best > current + 1e-12 * (1.0 + np.abs(current))  # strict, so that ties cannot cycle
        if not improve.any() and exact:
            return values, slates
        slates[improve], accept[improve] = better[improve], better_accept[improve]
        # while many rows change, their values are about to change again: a relative 1e-8 is enough to improve on
        exact = improve.mean() < 0.01
        values, xy = _evaluate_slates(slates, _cascade(accept, decay), xy, 1e-14 if exact else 1e-8)


def _random_slate_weights(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, slate_size: int,
                          decay: float) -> np.ndarray:
    """N times the probability that a uniformly random slate of distinct items shown at row i is accepted at item j,
    for each non-zero w_ij: w_ij sum_t (-1)^t e_t(row i's w without j) sum_{k>=t} d^k k_(t) / (N-1)_(t)."""
    n = len(indptr) - 1
    k = np.arange(slate_size)
    falling = np.ones((slate_size, slate_size))  # falling[t, k] = k_(t) / (N-1)_(t)
    for t in range(1, slate_size):
        falling[t] = falling[t - 1] * np.maximum(k - t + 1, 0) / (n - t)
    coefficient = (falling * decay ** k).sum(1) * (-1.0) ** np.arange(slate_size)
    out = np.empty_like(w)
    for r0, r1, e0, e1 in _slate_blocks(indptr, slate_size):
        rows, columns, width = _padding(indptr[r0:r1 + 1] - e0)
        p = _padded(w[e0:e1], 0.0, rows, columns, (r1 - r0, width))
        symmetric = np.zeros((slate_size, r1 - r0))  # e_t of each row's w
        symmetric[0] = 1.0
        for column in p.T:
            symmetric[1:] = symmetric[1:] + column * symmetric[:-1]
        without = np.ones_like(p)  # e_t of the row's w without the entry: e_t - w e_{t-1}(without)
        weight = coefficient[0] * without
        for t in range(1, slate_size):
            without = symmetric[t][:, None] - p * without
            weight += coefficient[t] * without
        out[e0:e1] = (p * weight)[rows, columns]
    return out


def _slots(world: RecommenderWorld) -> np.ndarray:
    """The slot of each item (the inverse of world.slot_items)."""
    slot = np.empty_like(world.slot_items)
    slot[world.slot_items] = np.arange(len(slot))
    return slot


def _slot_acceptance(world: RecommenderWorld) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W over slots as CSR, as the world solved it (one variant per position): rebuilt rather than kept by the world,
    whose other uses do not need its memory."""
    items = world.slot_items
    return _sparse_acceptance(world.position[items], world.quality[items], world.shift, world.radius, world.cells)


@dataclass(frozen=True)
class SlateSolution:
    """The exact solution of Recommender-v0 with slates (arrays read-only)."""
    values: np.ndarray           # (N,) optimal expected return from each item
    optimal_slates: np.ndarray   # (N, s) an optimal slate at each item
    random_return: float         # expected return of uniformly random slates of distinct items


@functools.lru_cache(maxsize=2)
def slate_solution(n_items: int, dim: int, neighbours: float, world_seed: int, slate_size: int,
                   decay: float) -> SlateSolution:
    """Solve the slate MDP of a world of one variant per position (checked arguments: see RecommenderEnv)."""
    world = recommender_world(n_items, dim, neighbours, world_seed, 1)  # as the env asks, to share the cached world
    slot_items, slot, (indptr, cols, w) = world.slot_items, _slots(world), _slot_acceptance(world)
    values, slates = _solve_slates(indptr, cols, w, world.values[slot_items], slot[world.optimal_actions[slot_items]],
                                   slate_size, decay)
    random_return = _random_return(indptr, cols, _random_slate_weights(indptr, cols, w, slate_size, decay))
    values, slates = values[slot], slot_items[slates[slot]]
    for array in (values, slates):
        array.flags.writeable = False
    return SlateSolution(values, slates, random_return)


@dataclass(frozen=True)
class HiddenTopics:
    """The items' topics for hidden users (arrays read-only)."""
    topic: np.ndarray       # (N,) each item's topic
    embeddings: np.ndarray  # (N, d) float32: the world's embeddings plus TOPIC_SPREAD along the topic's direction


@functools.lru_cache(maxsize=2)
def hidden_topics(n_items: int, dim: int, neighbours: float, world_seed: int) -> HiddenTopics:
    """Topics and embeddings of a world of one variant per position, from a random stream of their own (the world
    stays the one without hidden users). Checked arguments: see RecommenderEnv."""
    world = recommender_world(n_items, dim, neighbours, world_seed, 1)  # as the env asks, to share the cached world
    rng = np.random.default_rng([world_seed, 1])
    topic = rng.integers(HIDDEN_TOPICS, size=n_items)
    complete = np.linalg.qr(np.concatenate([world.basis, rng.standard_normal((dim, HIDDEN_TOPICS))], 1))[0]
    directions = complete[:, world.basis.shape[1]:].T  # (topics, d), orthogonal to the features' directions
    embeddings = (world.embeddings + TOPIC_SPREAD * directions[topic]).astype(np.float32)
    for array in (topic, embeddings):
        array.flags.writeable = False
    return HiddenTopics(topic, embeddings)


def _draw_users(rng: np.random.Generator, count: int) -> np.ndarray:
    """Hidden users' interests (count, HIDDEN_TOPICS): a preference for each topic, uniform in [0, 1]."""
    return rng.random((count, HIDDEN_TOPICS))


def _interest(users: np.ndarray, topic: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """u[topic j] (B, s) for users (B, topics) shown slates (B, s)."""
    return np.take_along_axis(users, topic[slates], axis=1)


def _cell_acceptable(world: RecommenderWorld, items: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The items of the 3 x 3 cells that hold every item acceptable from items (B,), and their w (B, K >= width); the
    viewed item itself (never accepted) fills what the cells lack."""
    slots, inside = _cell_candidates(world.position[items], world.shift, world.cells, len(world.position))
    candidates = np.where(inside, world.slot_items[slots], items[:, None])
    if candidates.shape[1] < width:
        candidates = np.concatenate([candidates, np.repeat(items[:, None], width - candidates.shape[1], 1)], 1)
    return candidates, _accept(world.position[items][:, None, :], world.position[candidates],
                               world.quality[candidates], world.shift, world.radius)


def _row_acceptable(indptr: np.ndarray, cols: np.ndarray, w: np.ndarray, rows: np.ndarray, items: np.ndarray,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """As `_cell_acceptable`, from the rows of a CSR W whose cols hold item numbers: the acceptable items only."""
    counts = indptr[rows + 1] - indptr[rows]
    place = np.arange(max(width, int(counts.max(initial=0))))
    inside = place < counts[:, None]
    entries = np.where(inside, indptr[rows][:, None] + place, 0)
    return np.where(inside, cols[entries], items[:, None]), np.where(inside, w[entries], 0.0)


def _oracle_slates(candidates: np.ndarray, w: np.ndarray, users: np.ndarray, topic: np.ndarray,
                   slate_size: int) -> np.ndarray:
    """The greedy oracle's slates (B, s) for users (B, topics): of each row's candidate items (B, K >= s) with
    acceptance w, the s of largest w u[topic], in decreasing order."""
    score = w * _interest(users, topic, candidates)
    top = np.argpartition(-score, slate_size - 1, axis=1)[:, :slate_size]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(candidates, top, 1)


def _random_slates(rng: np.random.Generator, n_items: int, count: int, slate_size: int) -> np.ndarray:
    """`count` uniformly random slates of distinct items: Floyd's sampling of a set, then a random order."""
    slates = np.empty((count, slate_size), np.int64)
    for k, top in enumerate(range(n_items - slate_size, n_items)):
        pick = rng.integers(top + 1, size=count)
        slates[:, k] = np.where((slates[:, :k] == pick[:, None]).any(1), top, pick)
    return rng.permuted(slates, axis=1)


def _hidden_user_returns(world: RecommenderWorld, topic: np.ndarray, slate_size: int, decay: float, choose,
                         episodes: int, rng: np.random.Generator) -> np.ndarray:
    """Returns of `episodes` episodes with hidden users, all stepped together; choose(items, users) gives the slates."""
    n = len(world.position)
    items, users = rng.integers(n, size=episodes), _draw_users(rng, episodes)
    totals, alive = np.zeros(episodes), np.arange(episodes)
    while alive.size:
        slates = choose(items[alive], users[alive])
        interest = _interest(users[alive], topic, slates)
        cumulative = np.cumsum(_slate_acceptance(world, items[alive], slates, decay, interest), axis=1)
        slot = (cumulative <= rng.random(len(alive))[:, None]).sum(1)  # the first position above the draw
        accepted = slot < slate_size
        moved = rng.integers(n, size=len(alive))  # drawn for every episode, used where nothing is accepted
        items[alive] = np.where(accepted, slates[np.arange(len(alive)), np.minimum(slot, slate_size - 1)], moved)
        totals[alive] += accepted
        alive = alive[rng.random(len(alive)) < np.where(accepted, ACCEPT_CONTINUE, REJECT_CONTINUE)]
    return totals


@functools.lru_cache(maxsize=2)
def hidden_user_returns(n_items: int, dim: int, neighbours: float, world_seed: int, slate_size: int,
                        decay: float) -> tuple[float, float, float, float]:
    """Monte-Carlo returns with hidden users (ORACLE_EPISODES each, from ORACLE_SEED): the greedy oracle's mean and
    standard error, then a uniformly random slate's (checked arguments: see RecommenderEnv)."""
    world = recommender_world(n_items, dim, neighbours, world_seed, 1)  # as the env asks, to share the cached world
    topic = hidden_topics(n_items, dim, neighbours, world_seed).topic
    slot, (indptr, cols, w) = _slots(world), _slot_acceptance(world)
    cols = world.slot_items[cols]

    def oracle_slates(items: np.ndarray, users: np.ndarray) -> np.ndarray:
        return _oracle_slates(*_row_acceptable(indptr, cols, w, slot[items], items, slate_size), users, topic,
                              slate_size)

    rng = np.random.default_rng(ORACLE_SEED)
    oracle = _hidden_user_returns(world, topic, slate_size, decay, oracle_slates, ORACLE_EPISODES, rng)
    random = _hidden_user_returns(world, topic, slate_size, decay,
                                  lambda items, users: _random_slates(rng, n_items, len(items), slate_size),
                                  ORACLE_EPISODES, rng)
    return tuple(float(f(r)) for r in (oracle, random)
                 for f in (np.mean, lambda r: r.std(ddof=1) / math.sqrt(len(r))))


class RecommenderEnv(gym.Env):
    """The recommender simulator of Dulac-Arnold et al. (2015), with a known optimum.

    The state is the item the user views, observed as its embedding. The action recommends item j (Discrete(n_items));
    accepted with probability w_ij: reward 1, the user moves to j, the episode ends with probability 0.1; rejected:
    reward 0, the user moves to a uniformly random item, the episode ends with probability 0.2. Episodes start at a
    uniformly random item. `action_embeddings` (n_items x dim, float32) are the items' embeddings; `optimal_return`
    and `random_return` are exact expected returns from the start; `optimal_actions[i]` is optimal from item i.

    Slates (slate_size s > 1): the action is an ordered slate of s items, MultiDiscrete([n_items] * s). The user
    examines it in order, goes on past a declined position with probability attention_decay, and accepts at most one
    item; a repeated item counts as declined (see "Slates" above). Reward 1 if an item is accepted, and the user moves
    to it; otherwise as after a rejection. info["slot"] is the accepted position, -1 for none. `optimal_return` is the
    optimal slate policy's exact return, `optimal_actions` (n_items, s) its slates, `random_return` that of uniformly
    random slates of distinct items, and `best_single_item_return` the single-item optimum: the best return of slates
    whose first item only counts (the first position is always examined), as the env with slate_size 1 has.

    Observations: observation="box" (the default) is the viewed item's embedding; "dict" is a Dict of "item" (that
    embedding), "slate" (s x dim, the last slate's embeddings), "clicks" (MultiBinary(s), its accepted position) and
    "history" (the moving average of the clicked items' embeddings, weight HISTORY_RATE = 0.3 to the newest); the last
    three are zeros until there is a slate or a click.

    Hidden users (hidden_user=True; observation "dict" unless given): items have topics, which their embeddings show
    (`action_embeddings` are then `topics.embeddings`, `topics.topic` the topics), and each episode draws a user whose
    hidden interest in each topic multiplies w (see "Hidden users" above). The optimum is unknown: there is no
    optimal_return, optimal_actions or best_single_item_return. `greedy_oracle_return`, the return of the greedy
    policy that knows the user (the slate of largest immediate acceptance probability), and `random_return` (uniformly
    random slates of distinct items) are Monte-Carlo means over ORACLE_EPISODES = 10,000 episodes from seed
    ORACLE_SEED = 0, with standard errors `greedy_oracle_stderr` and `random_stderr`; `oracle_slate()` is the
    oracle's action now. `accept_probability`, `recommendation_gain` and `policy_return` describe the world without
    hidden interests.

    Keywords: n_items (default 10,000), dim (embedding dimensions, at least 4, at least 5 with variants and 8 with
    hidden users; default 8), neighbours (mean number of items a user at any item may accept; default
    `default_neighbours(n_items, variants)`, 200 at 10,000 items and 12 at a million, 20,000 at a million in 100
    variants), variants (items per position, variants of one product that differ in appeal; default 1), world_seed
    (the items and W; default 0), slate_size (1 to n_items, default 1; above 1 with variants 1 only), attention_decay
    (0 to 1, default ATTENTION_DECAY = 0.8), observation ("box" or "dict"), hidden_user (default False; with variants
    1 only).
    """
    metadata = {"render_modes": []}

    def __init__(self, n_items: int = 10000, dim: int = 8, neighbours: float | None = None, world_seed: int = 0,
                 variants: int = 1, slate_size: int = 1, attention_decay: float = ATTENTION_DECAY,
                 observation: str | None = None, hidden_user: bool = False):
        n_items = _check_int("n_items", n_items, 2)
        variants = _check_int("variants", variants, 1, n_items // 2)
        if n_items % variants:
            raise ValueError(f"n_items must be a multiple of variants (got {n_items} and {variants})")
        if not isinstance(hidden_user, (bool, np.bool_)):
            raise ValueError(f"hidden_user must be True or False (got {hidden_user!r})")
        self.hidden_user = bool(hidden_user)
        dim = _check_int("dim", dim, 5 if variants > 1 else 4 + HIDDEN_TOPICS if self.hidden_user else 4)
        neighbours = default_neighbours(n_items, variants) if neighbours is None else neighbours
        # at least one position's variants; at most pi n / 10 keeps the acceptance radius below a third of the torus
        # (3 x 3 distinct cells, |s| > r)
        neighbours = _check_float("neighbours", neighbours, variants, math.pi * n_items / 10)
        world_seed = _check_int("world_seed", world_seed, 0)
        self.slate_size = _check_int("slate_size", slate_size, 1, n_items)
        self.attention_decay = _check_float("attention_decay", attention_decay, 0.0, 1.0)
        for name, used in (("slate_size", self.slate_size > 1), ("hidden_user", self.hidden_user)):
            if used and variants > 1:  # both work item by item, where W and V are kept per position
                raise ValueError(f"{name} other than its default needs variants = 1 (got {variants} variants)")
        self.observation = ("dict" if self.hidden_user else "box") if observation is None else observation
        if self.observation not in ("box", "dict"):
            raise ValueError(f"observation must be 'box' or 'dict' (got {observation!r})")
        self.world = recommender_world(n_items, dim, neighbours, world_seed, variants)
        self.n_items = n_items
        self.action_embeddings = self.world.embeddings
        key = (n_items, dim, neighbours, world_seed, self.slate_size, self.attention_decay)
        if self.hidden_user:
            self.topics = hidden_topics(*key[:4])
            self.action_embeddings = self.topics.embeddings
            self.greedy_oracle_return, self.greedy_oracle_stderr, self.random_return, self.random_stderr = \
                hidden_user_returns(*key)
        elif self.slate_size > 1:
            solution = slate_solution(*key)
            self.optimal_return = float(solution.values.mean())
            self.random_return = solution.random_return
            self.optimal_actions = solution.optimal_slates
            self.best_single_item_return = float(self.world.values.mean())
        else:
            self.optimal_return = self.best_single_item_return = float(self.world.values.mean())
            self.random_return = self.world.random_return
            self.optimal_actions = self.world.optimal_actions
        self.observation_space = self._observation_space()
        self.action_space = gym.spaces.Discrete(n_items) if self.slate_size == 1 else \
            gym.spaces.MultiDiscrete([n_items] * self.slate_size)
        self.item, self.user = 0, None
        self._forget()

    def _observation_space(self) -> gym.spaces.Space:
        """The viewed item's embedding as a Box, or the Dict of the class docstring."""
        bound = np.abs(self.action_embeddings).max(0)
        item = gym.spaces.Box(-bound, bound, bound.shape, np.float32)
        if self.observation == "box":
            return item
        slate_bound = np.broadcast_to(bound, (self.slate_size, len(bound)))
        return gym.spaces.Dict({"item": item, "slate": gym.spaces.Box(-slate_bound, slate_bound, dtype=np.float32),
                                "clicks": gym.spaces.MultiBinary(self.slate_size),
                                "history": gym.spaces.Box(-bound, bound, bound.shape, np.float32)})  # convex: inside

    def accept_probability(self, items: np.ndarray, recommended: np.ndarray) -> np.ndarray:
        """w_ij of recommending `recommended` to users viewing `items` (arrays of item numbers; broadcasts)."""
        world = self.world
        return _accept(world.position[items], world.position[recommended], world.quality[recommended], world.shift,
                       world.radius)

    def recommendation_gain(self, items: np.ndarray, recommended: np.ndarray) -> np.ndarray:
        """w_ij (1 + 0.9 V_j - 0.8 Vbar), V the optimal values: what recommending j to a user at i earns over a
        rejection under the optimal policy's values. An optimal policy recommends the item of largest gain."""
        values = self.world.values
        return _gain(self.accept_probability(items, recommended), values[recommended], values.mean())

    def policy_return(self, actions: np.ndarray) -> float:
        """Exact expected return from the start of the deterministic policy that recommends actions[i] at item i:
        an item (actions of shape (n_items,)) or a slate (shape (n_items, s), shown with this env's attention_decay).
        """
        actions = np.asarray(actions, np.int64)
        if actions.ndim == 2:
            return float(_evaluate_slates(actions, _slate_acceptance(self.world, np.arange(self.n_items), actions,
                                                                     self.attention_decay))[0].mean())
        return float(_evaluate(actions, self.accept_probability(np.arange(self.n_items), actions)).mean())

    def oracle_slate(self):
        """The greedy oracle's action for the current hidden user and item (hidden_user=True only)."""
        if self.user is None:
            raise ValueError("oracle_slate needs hidden_user=True and a reset")
        candidates, w = _cell_acceptable(self.world, np.array([self.item]), self.slate_size)
        slate = _oracle_slates(candidates, w, self.user[None], self.topics.topic, self.slate_size)[0]
        return int(slate[0]) if self.slate_size == 1 else slate

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.item = int(self.np_random.integers(self.n_items))
        if self.hidden_user:
            self.user = _draw_users(self.np_random, 1)[0]
        self._forget()
        return self._observe(), {"item": self.item}

    def step(self, action):
        slate = self._slate(action)
        interest = None if self.user is None else self.user[self.topics.topic[slate]]
        probabilities = _slate_acceptance(self.world, self.item, slate, self.attention_decay, interest)
        draw = self.np_random.random()
        # the first position whose cumulative probability exceeds the draw, slate_size for none (one: a comparison)
        slot = int(draw >= probabilities[0]) if self.slate_size == 1 else \
            int(np.searchsorted(np.cumsum(probabilities), draw, side="right"))
        accepted = slot < self.slate_size
        self.item = int(slate[slot]) if accepted else int(self.np_random.integers(self.n_items))
        ends = self.np_random.random() >= (ACCEPT_CONTINUE if accepted else REJECT_CONTINUE)
        self._remember(slate, slot)
        info = {"item": self.item, "accepted": accepted}
        if self.slate_size > 1:
            info["slot"] = slot if accepted else -1
        return self._observe(), float(accepted), bool(ends), False, info

    def _slate(self, action) -> np.ndarray:
        """The action as an array of item numbers; a ValueError if it is not in the action space."""
        if self.slate_size == 1:
            j = int(action)
            if not 0 <= j < self.n_items:
                raise ValueError(f"item {j} is outside 0..{self.n_items - 1}")
            return np.array([j])
        slate = np.asarray(action)
        if slate.shape != (self.slate_size,) or not np.issubdtype(slate.dtype, np.integer) or \
                slate.min() < 0 or slate.max() >= self.n_items:
            raise ValueError(f"{action!r} is not a slate of {self.slate_size} items in 0..{self.n_items - 1}")
        return slate.astype(np.int64)

    def _forget(self) -> None:
        """No slate shown and nothing clicked yet (the dict observation's zeros)."""
        self.last_slate = None
        self.clicks = np.zeros(self.slate_size, np.int8)
        self.history = np.zeros(self.action_embeddings.shape[1], np.float32)

    def _remember(self, slate: np.ndarray, slot: int) -> None:
        """The slate just shown and its click (slot == slate_size for none), for the dict observation."""
        if self.observation == "box":
            return
        self.last_slate, self.clicks = slate, np.zeros(self.slate_size, np.int8)
        if slot < self.slate_size:
            self.clicks[slot] = 1
            self.history = (1 - HISTORY_RATE) * self.history + HISTORY_RATE * self.action_embeddings[self.item]

    def _observe(self):
        """The observation now, in the layout of `observation_space`."""
        embeddings = self.action_embeddings
        if self.observation == "box":
            return embeddings[self.item].copy()
        slate = np.zeros((self.slate_size, embeddings.shape[1]), np.float32) if self.last_slate is None else \
            embeddings[self.last_slate]
        return {"item": embeddings[self.item].copy(), "slate": slate, "clicks": self.clicks.copy(),
                "history": self.history.copy()}


# ---------------------------------------------------------------------------------------------------------------------
# Configurator-v0
#
# A profile x (profile_dim features) is observed; the action sets each of n choices to a level in 0..levels-1 (levels 2:
# MultiBinary, each choice on or off). The choices sit in a hidden order on a chain; with x' = (x, 1) and v_i the level
# at place i of the chain, the hidden score is
#     sum_i U_i[v_i] . x'  +  sum_{0 < t <= band} P_{i,t}[v_{i-t}, v_i] . x'
# per-choice terms and terms for pairs at most `band` places apart, all linear in the profile; level 0 adds nothing
# (an option left off). The reward is the score plus Gaussian noise. Because the pairs are local on the chain, the best
# combination is a dynamic programme over the levels of the last `band` places (levels^band states): exact for any n.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfiguratorWorld:
    """The hidden score's tables and the profiles (arrays read-only)."""
    order: np.ndarray     # (n,) the choice at each place of the chain
    unary: np.ndarray     # (n, levels, profile_dim + 1): U_i[v]
    pair: np.ndarray      # (n, band, levels, levels, profile_dim + 1): P_{i,t}[a, b], zero where i < t
    profiles: np.ndarray  # (n_profiles, profile_dim) float32


def _profile_tables(world: ConfiguratorWorld, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U and P evaluated at each context: (B, n, levels) and (B, n, band, levels, levels)."""
    x = np.concatenate([np.asarray(contexts, np.float64), np.ones((len(contexts), 1))], axis=1)
    return np.einsum("ivk,bk->biv", world.unary, x), np.einsum("itavk,bk->bitav", world.pair, x)


def _score(world: ConfiguratorWorld, contexts: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Noise-free scores of actions (B, n; levels per choice) for contexts (B, profile_dim)."""
    u, p = _profile_tables(world, contexts)
    v = np.asarray(actions, np.int64)[:, world.order]
    batch, places = np.arange(len(v))[:, None], np.arange(v.shape[1])
    total = u[batch, places, v].sum(1)
    for t in range(1, p.shape[2] + 1):  # np.roll wraps places i < t around, where P_{i,t} is zero
        total += p[batch, places, t - 1, np.roll(v, t, axis=1), v].sum(1)
    return total


def _best(world: ConfiguratorWorld, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best combination (B, n) and its score (B,) for each context, by dynamic programming along the chain.

    State after place i: the levels of places i, i-1, ..., i-band+1 as digits of base `levels` (place i the lowest).
    """
    u, p = _profile_tables(world, contexts)
    batch, n, band, m = len(u), u.shape[1], p.shape[2], u.shape[2]
    states, keep = m ** band, m ** (band - 1)
    digits = np.arange(states)[:, None] // m ** np.arange(band) % m  # (states, band): column t - 1 the level at i - t
    value = np.full((batch, states), -np.inf)
    value[:, 0] = 0.0  # before place 0: virtual levels 0, which no term couples to (P_{i,t} = 0 for i < t)
    dropped = np.empty((n, batch, states), np.int64)
    for i in range(n):
        gain = u[:, i, None, :] + sum(p[:, i, t][:, digits[:, t], :] for t in range(band))  # (B, states, m)
        # the new state r * m + v keeps the lower band - 1 digits r of the old one, whose top digit is dropped
        options = (value[:, :, None] + gain).reshape(batch, m, keep, m)
        dropped[i] = options.argmax(1).reshape(batch, states)
        value = options.max(1).reshape(batch, states)
    state, levels = value.argmax(1), np.empty((batch, n), np.int64)
    rows = np.arange(batch)
    for i in range(n - 1, -1, -1):
        levels[:, i] = state % m
        state = state // m + keep * dropped[i, rows, state]
    actions = np.empty_like(levels)
    actions[:, world.order] = levels
    return actions, value.max(1)


class ConfiguratorEnv(gym.Env):
    """Pick a combination of n choices for an observed profile; one step per episode, with a known optimum.

    Observation: the profile, profile_dim floats, drawn uniformly from n_profiles fixed profiles. Action: a level for
    each choice, MultiBinary(n_choices) when levels is 2, else MultiDiscrete([levels] * n_choices). Reward: a hidden
    score with per-choice and pairwise terms that depend on the profile (see above), plus Gaussian noise of standard
    deviation `noise`; info holds the noise-free "score" and the profile's "optimal" score. `optimal_return` is the
    expected reward of the best combination for each profile and `random_return` that of uniformly random
    combinations, both exact; `optimal(contexts)` and `score(contexts, actions)` answer for any profiles.

    Keywords: n_choices (default 20), levels (default 2), band (pairs interact up to this many places apart on the
    hidden chain, default 2), profile_dim (default 8), n_profiles (default 10,000), noise (default 1.0), world_seed
    (default 0).
    """
    metadata = {"render_modes": []}

    def __init__(self, n_choices: int = 20, levels: int = 2, band: int = 2, profile_dim: int = 8,
                 n_profiles: int = 10000, noise: float = 1.0, world_seed: int = 0):
        n_choices = _check_int("n_choices", n_choices, 2)
        levels = _check_int("levels", levels, 2, 64)
        band = _check_int("band", band, 1, min(n_choices - 1, int(math.log(4096, levels) + 1e-9)))  # 4096 states
        profile_dim = _check_int("profile_dim", profile_dim, 1)
        n_profiles = _check_int("n_profiles", n_profiles, 1)
        self.noise = _check_float("noise", noise, 0.0, math.inf)
        rng = np.random.default_rng(_check_int("world_seed", world_seed, 0))
        scale = 1.0 / math.sqrt(profile_dim + 1)  # each term's value has unit variance over profiles
        unary = rng.standard_normal((n_choices, levels, profile_dim + 1)) * scale
        pair = rng.standard_normal((n_choices, band, levels, levels, profile_dim + 1)) * scale
        unary[:, 0] = 0.0
        pair[:, :, 0], pair[:, :, :, 0] = 0.0, 0.0
        for t in range(1, band + 1):
            pair[:t, t - 1] = 0.0
        self.world = ConfiguratorWorld(rng.permutation(n_choices), unary, pair,
                                       rng.standard_normal((n_profiles, profile_dim)).astype(np.float32))
        self.optimal_actions, self.optimal_rewards = self.optimal(self.world.profiles)
        self.optimal_return = float(self.optimal_rewards.mean())
        # E over uniform levels: every term's mean over its levels, and the score is linear in the profile
        mean_terms = unary.mean(1).sum(0) + pair.mean((2, 3)).sum((0, 1))
        self.random_return = float(np.concatenate([self.world.profiles.mean(0, dtype=np.float64), [1.0]]) @ mean_terms)
        bound = np.abs(self.world.profiles).max(0)
        self.observation_space = gym.spaces.Box(-bound, bound, (profile_dim,), np.float32)
        self.action_space = gym.spaces.MultiBinary(n_choices) if levels == 2 else \
            gym.spaces.MultiDiscrete([levels] * n_choices)
        self.profile = 0

    def optimal(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best combination (B, n_choices) and its noise-free score (B,) for each of the contexts (B, profile_dim)."""
        contexts = np.asarray(contexts)
        parts = [_best(self.world, contexts[i:i + 1024]) for i in range(0, len(contexts), 1024)]
        return np.concatenate([a for a, _ in parts]), np.concatenate([r for _, r in parts])

    def score(self, contexts: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Noise-free scores (B,) of combinations (B, n_choices) for contexts (B, profile_dim)."""
        return _score(self.world, contexts, actions)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.profile = int(self.np_random.integers(len(self.world.profiles)))
        return self.world.profiles[self.profile].copy(), {"profile": self.profile}

    def step(self, action):
        action = np.asarray(action, np.int64).reshape(1, -1)
        if not self.action_space.contains(action[0].astype(self.action_space.dtype)):
            raise ValueError(f"{action[0]} is not in {self.action_space}")
        context = self.world.profiles[self.profile]
        score = float(self.score(context[None], action)[0])
        reward = score + self.noise * float(self.np_random.standard_normal())
        return context.copy(), reward, True, False, {"score": score, "optimal": float(self.optimal_rewards[self.profile])}


for _id, _env in (("Recommender-v0", RecommenderEnv), ("Configurator-v0", ConfiguratorEnv)):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_env)


# python envs.py [N [V [S]]]: build time and peak memory of Recommender-v0, N items, V variants, slates of S items
if __name__ == "__main__":
    import resource
    import sys
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    variants = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    slate_size = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    env = gym.make("Recommender-v0", n_items=n, variants=variants, slate_size=slate_size).unwrapped
    seconds, peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"Recommender-v0, {n} items in {variants} variants, slates of {slate_size}: built in {seconds:.1f} s, peak RSS "
          f"{peak / 1024:.0f} MB ({before / 1024:.0f} MB before), {env.world.nonzeros} non-zeros in W; optimal return "
          f"{env.optimal_return:.4f}, random {env.random_return:.3g}, best single item {env.best_single_item_return:.4f}")
