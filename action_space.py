"""Discrete action sets embedded in [-1, 1]^d: their points, their mapping to env actions, and k-NN search.

Every action set is one class implementing `ActionSpace`; the agent sees only that interface. An action is
identified by an id that only its action set interprets (for a grid: its coordinates); the agent stores
the id's point in replay memory and hands the id to `to_env`.

GridActionSpace: counts[i] evenly spaced points on axis i (discretised Boxes, Discrete, MultiDiscrete,
MultiBinary). An action's id is its grid coordinates, never a flat index, so the number of actions may
exceed int64; its k-NN enumerates the k nearest points, never the grid.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

KNN_METHODS = ("auto", "lattice", "flann")
FLANN_MAX_ACTIONS = 10 ** 7  # FLANN indexes every action


class ActionSpace:
    """A set of `n` discrete actions, each with a point in [-1, 1]^dim that the actor's proto-action is compared to.

    `search` returns ids with shape (batch, k) + id_shape: `ids[b, j]` is one action, which `points` maps
    to coordinates and `to_env` to what the env's step takes.
    """
    dim: int
    n: int

    def points(self, ids: np.ndarray) -> np.ndarray:
        """float32 coordinates in [-1, 1]^dim of action ids, shape (...) + (dim,)."""
        raise NotImplementedError

    def to_env(self, action_id):
        """The env action for one action id, in the env's own format."""
        raise NotImplementedError

    def search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k actions nearest to each proto-action: (batch, dim) -> (batch, k) + id_shape."""
        raise NotImplementedError

    def nearest(self, protos: np.ndarray) -> np.ndarray:
        """Id of the action nearest to each proto-action, shape (batch,) + id_shape."""
        return self.search(protos, 1)[:, 0]


class GridActionSpace(ActionSpace):
    """A grid of prod(counts) actions in [-1, 1]^dim, counts[i] evenly spaced points on axis i (one: at 0).

    An action id is its coordinates, dim integers in [0, counts[i]); a 1-d grid's id is its one coordinate
    as a plain integer. A continuous env maps a point linearly onto [low, high]; a discrete env (Discrete,
    MultiDiscrete, MultiBinary) takes `start + coordinates` in `start`'s shape and dtype (an int for Discrete).
    """

    def __init__(self, counts: Sequence[int], low: np.ndarray | None = None, high: np.ndarray | None = None,
                 start: int | np.ndarray | None = None, knn: str = "auto"):
        counts = tuple(int(c) for c in counts)
        if not counts or min(counts) < 1:
            raise ValueError("the action grid needs at least one point per axis")
        if knn not in KNN_METHODS:
            raise ValueError(f"unknown k-NN method {knn!r}; choose one of {', '.join(KNN_METHODS)}")
        self.counts, self.dim, self.n = counts, len(counts), math.prod(counts)  # n: a Python int, unbounded
        if knn == "flann" and self.n > FLANN_MAX_ACTIONS:
            raise ValueError(f"FLANN indexes every action, at most {FLANN_MAX_ACTIONS:,} (this space has {self.n:,}); "
                             "the default k-NN needs no index")
        self.low, self.high, self.start = low, high, start
        self.steps = np.array([2.0 / (c - 1) if c > 1 else 0.0 for c in counts])
        self.step = float(self.steps[0])  # the 1-d grid's spacing, for the agent's in-graph window
        self._scale = self.steps.astype(np.float32)
        self._offset = np.where(self.steps > 0, -1.0, 0.0).astype(np.float32)
        self.coord_dtype = np.min_scalar_type(max(counts) - 1) if max(counts) <= 2 ** 31 else np.int64
        self.knn = "lattice" if knn == "auto" else knn
        self._flann = {}

    @classmethod
    def continuous(cls, low, high, max_actions: int, knn: str = "auto") -> GridActionSpace:
        """round(max_actions ** (1/d)) points per axis of the box [low, high] (d = len(low))."""
        low, high = np.asarray(low, np.float64).ravel(), np.asarray(high, np.float64).ravel()
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError("a continuous action space needs finite bounds")
        return cls((round(max_actions ** (1 / len(low))),) * len(low), low=low, high=high, knn=knn)

    @classmethod
    def discrete(cls, n: int, start: int = 0, knn: str = "auto") -> GridActionSpace:
        """Discrete(n): a 1-d grid whose i-th point is env action start + i."""
        return cls((n,), start=int(start), knn=knn)

    @classmethod
    def multi_discrete(cls, nvec: np.ndarray, start: np.ndarray, knn: str = "auto") -> GridActionSpace:
        """MultiDiscrete(nvec, start) (MultiBinary: nvec 2, start 0): one axis per entry, in C order; the env gets
        start + coordinates with start's shape and dtype."""
        return cls(np.asarray(nvec).ravel(), start=np.asarray(start), knn=knn)

    def points(self, ids: np.ndarray) -> np.ndarray:
        """Grid coordinates in [-1, 1]^dim of action ids, shape (...) + (dim,)."""
        return self._coordinate_points(np.asarray(ids)[..., None] if self.dim == 1 else np.asarray(ids))

    def _coordinate_points(self, coords: np.ndarray) -> np.ndarray:
        points = np.multiply(coords, self._scale, dtype=np.float32)  # float32 throughout: one pass, no copies
        points += self._offset
        return points

    def to_env(self, action_id):
        """The env action for one action id: a float32 array for a box, an int for Discrete, start + coordinates
        in the env's shape and dtype for MultiDiscrete and MultiBinary."""
        if self.start is None:
            point = self.points(action_id).astype(np.float64)
            return (self.low + (point + 1.0) * (self.high - self.low) / 2.0).astype(np.float32)
        if np.ndim(self.start) == 0:
            return self.start + int(action_id)
        return (self.start + np.asarray(action_id).reshape(self.start.shape)).astype(self.start.dtype)

    def search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k grid points nearest to each proto-action: (batch, dim) -> (batch, k) + id shape."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {self.n}")
        protos = np.clip(np.asarray(protos, np.float64).reshape(-1, self.dim), -1.0, 1.0)
        coords = self._flann_search(protos, k) if self.knn == "flann" else self._grid_search(protos, k)
        return coords[..., 0] if self.dim == 1 else coords

    def _flann_search(self, protos: np.ndarray, k: int, exact: bool = False) -> np.ndarray:
        """FLANN search over all grid points: the reference's kd-tree (approximate), or FLANN's exact linear scan."""
        algorithm = "linear" if exact else "kdtree"
        if algorithm not in self._flann:
            import pyflann
            every = np.stack(np.unravel_index(np.arange(self.n), self.counts), axis=-1)
            self._flann[algorithm] = pyflann.FLANN()
            self._flann[algorithm].build_index(self._coordinate_points(every).astype(np.float64), algorithm=algorithm)
        indices, _ = self._flann[algorithm].nn_index(protos, k)
        flat = np.asarray(indices, np.int64).reshape(len(protos), k)
        return np.stack(np.unravel_index(flat, self.counts), axis=-1).astype(self.coord_dtype)

    def _axis_nearest(self, protos: np.ndarray, axis: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The `width` coordinates of `axis` nearest to each proto-action, nearest first, and their squared
        distances: (B, width) each. On a line they form a window of consecutive coordinates."""
        m, step = self.counts[axis], self.steps[axis]
        pos = (protos[:, axis] + 1.0) / step
        lo = np.clip(np.ceil(pos - width / 2), 0, m - width).astype(np.int64)
        coords = lo[:, None] + np.arange(width)
        cost = (coords * step - 1.0 - protos[:, axis, None]) ** 2
        order = np.argsort(cost, axis=1, kind="stable")
        return np.take_along_axis(coords, order, 1), np.take_along_axis(cost, order, 1)

    def _grid_search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Exact k-NN, (B, dim) -> coordinates (B, k, dim): the k smallest sums of per-axis squared distances.

        Axis by axis, the k smallest partial sums over the axes so far are combined with the axis's nearest
        coordinates, the b-th nearest with only the k // (b + 1) smallest partial sums (see `_merge_blocks`),
        so the cost is about k * (dim + sum of log counts) per query, whatever the number of actions. Ties at
        the k-th distance are broken arbitrarily.
        """
        batch = len(protos)
        out = np.zeros((batch, k, self.dim), self.coord_dtype)  # axes of one point stay at coordinate 0
        axes = [i for i, m in enumerate(self.counts) if m > 1]
        if not axes:
            return out
        nearest = [self._axis_nearest(protos, i, min(self.counts[i], k)) for i in axes]
        sums = nearest[0][1]                        # ascending: the sums over the axes so far, k at most
        merges = []                                 # per later axis: its block sizes, the candidates kept
        for step, (_, cost) in enumerate(nearest[1:], 1):
            sizes = _merge_blocks(sums.shape[1], cost.shape[1], k)
            offsets = np.cumsum((0,) + sizes)
            candidates = np.empty((batch, offsets[-1]))
            for rank, size in enumerate(sizes):     # block b: the first size_b partial sums plus the b-th cost
                np.add(sums[:, :size], cost[:, rank, None], out=candidates[:, offsets[rank]:offsets[rank + 1]])
            keep = min(k, offsets[-1])
            # the next merge needs the t smallest sums in front for each of its block sizes t
            width = nearest[step + 1][1].shape[1] if step + 1 < len(nearest) else 1
            kth = sorted(set(_merge_blocks(keep, width, k)) | {keep}) if width > 1 else [keep]
            chosen = np.argpartition(candidates, np.array(kth) - 1, axis=1)[:, :keep] \
                if kth != [offsets[-1]] else np.broadcast_to(np.arange(keep), (batch, keep))
            sums = np.take_along_axis(candidates, chosen, 1)
            merges.append((sizes, chosen))
        position = np.broadcast_to(np.arange(k), (batch, k))
        for step in range(len(axes) - 1, -1, -1):   # walk back from the k sums to the coordinate of each axis
            rank = position
            if step > 0:
                sizes, chosen = merges[step - 1]
                candidate = np.take_along_axis(chosen, position, 1)
                block, first = _block_lookup(sizes)
                rank = block[candidate]
                position = first[candidate]
            out[:, :, axes[step]] = np.take_along_axis(nearest[step][0], rank, 1)
        return out


@lru_cache(maxsize=256)
def _merge_blocks(n_sums: int, n_axis: int, k: int) -> tuple[int, ...]:
    """How many of the smallest partial sums to pair with an axis's b-th nearest coordinate, for each b.

    With both lists ascending, the pair (a, b) is at least as large as the (a + 1)(b + 1) - 1 pairs before
    it in both, so only pairs with (a + 1)(b + 1) <= k can be among the k smallest: about k * ln(n_axis) of
    them. The partial sums need not be sorted, only partitioned so that the first t of them are the t
    smallest for each of these sizes t.
    """
    return tuple(min(n_sums, k // (b + 1)) for b in range(n_axis))


@lru_cache(maxsize=256)
def _block_lookup(sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For each position of blocks of these sizes laid end to end: its block, and its position in the block."""
    block = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    return block, np.arange(len(block), dtype=np.int32) - np.cumsum((0,) + sizes[:-1], dtype=np.int32)[block]
