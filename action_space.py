"""Discrete action sets embedded in [-1, 1]^d: their points, their mapping to env actions, and k-NN search.

Every action set is one class implementing `ActionSpace`; the agent sees only that interface. An action is
identified by an id that only its action set interprets (for a grid: an integer index); the agent stores
the id's point in replay memory and hands the id to `to_env`.

GridActionSpace: index i is the i-th point of itertools.product over the axes' linspaces (the last axis
varies fastest). `to_env` scales a point to the env exactly once.
"""
from __future__ import annotations

import math

import numpy as np

KNN_METHODS = ("auto", "lattice", "flann")


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
    """A uniform grid of `points_per_axis ** dim` actions in [-1, 1]^dim.

    Continuous envs map a grid point linearly onto [low, high]; a Discrete(n) env is a 1-d grid of
    n points whose i-th point is env action start + i.
    """

    def __init__(self, dim: int, points_per_axis: int, low: np.ndarray | None = None, high: np.ndarray | None = None,
                 discrete_start: int | None = None, knn: str = "auto"):
        if points_per_axis < 1:
            raise ValueError("the action grid needs at least one point per axis")
        if knn not in KNN_METHODS:
            raise ValueError(f"unknown k-NN method {knn!r}; choose one of {', '.join(KNN_METHODS)}")
        self.dim, self.points_per_axis = dim, points_per_axis
        self.n = points_per_axis ** dim
        self.low, self.high, self.discrete_start = low, high, discrete_start
        self.step = 2.0 / (points_per_axis - 1) if points_per_axis > 1 else 0.0
        self.knn = "lattice" if knn == "auto" else knn
        self._flann = {}

    @classmethod
    def continuous(cls, low, high, max_actions: int, knn: str = "auto") -> GridActionSpace:
        """round(max_actions ** (1/d)) points per axis of the box [low, high] (d = len(low))."""
        low, high = np.asarray(low, np.float64).ravel(), np.asarray(high, np.float64).ravel()
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError("a continuous action space needs finite bounds")
        return cls(len(low), round(max_actions ** (1 / len(low))), low=low, high=high, knn=knn)

    @classmethod
    def discrete(cls, n: int, start: int = 0, knn: str = "auto") -> GridActionSpace:
        return cls(1, n, discrete_start=start, knn=knn)

    def points(self, indices: np.ndarray) -> np.ndarray:
        """Grid coordinates in [-1, 1]^dim of action indices, shape indices.shape + (dim,)."""
        axes = np.stack(np.unravel_index(np.asarray(indices), (self.points_per_axis,) * self.dim), axis=-1)
        return (axes * self.step - 1.0 if self.points_per_axis > 1 else np.zeros(axes.shape)).astype(np.float32)

    def to_env(self, index: int):
        """The env action for one action index: a float32 array for a box, an int for Discrete."""
        if self.discrete_start is not None:
            return self.discrete_start + int(index)
        point = self.points(index).astype(np.float64)
        return (self.low + (point + 1.0) * (self.high - self.low) / 2.0).astype(np.float32)

    def search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k grid points nearest to each proto-action: (batch, dim) -> (batch, k)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {self.n}")
        protos = np.clip(np.asarray(protos, np.float64).reshape(-1, self.dim), -1.0, 1.0)
        return self._flann_search(protos, k) if self.knn == "flann" else self._lattice_search(protos, k)

    def _flann_search(self, protos: np.ndarray, k: int, exact: bool = False) -> np.ndarray:
        """FLANN search over all grid points: the reference's kd-tree (approximate), or FLANN's exact linear scan."""
        algorithm = "linear" if exact else "kdtree"
        if algorithm not in self._flann:
            import pyflann
            self._flann[algorithm] = pyflann.FLANN()
            self._flann[algorithm].build_index(self.points(np.arange(self.n)).astype(np.float64), algorithm=algorithm)
        indices, _ = self._flann[algorithm].nn_index(protos, k)
        return np.asarray(indices, np.int64).reshape(len(protos), k)

    def _lattice_search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Exact k-NN on the grid without an index: search a box of indices around each query.

        The box starts just large enough to hold a ball of k points and doubles until, for every
        query, the k-th nearest distance inside it is no larger than the distance to anything outside.
        """
        m, d = self.points_per_axis, self.dim
        if m == 1:
            return np.zeros((len(protos), 1), np.int64)
        pos = (protos + 1.0) / self.step                                   # continuous grid coordinates
        ball_volume = math.pi ** (d / 2) / math.gamma(d / 2 + 1)
        half = math.ceil((k / ball_volume) ** (1 / d)) + 1
        while True:
            width = min(2 * half + 1, m)
            lo = np.clip(np.rint(pos).astype(np.int64) - half, 0, m - width)   # (B, d) box corner
            offsets = np.stack(np.unravel_index(np.arange(width ** d), (width,) * d), axis=-1)
            cells = lo[:, None, :] + offsets[None]                            # (B, width^d, d)
            dist2 = ((cells - pos[:, None, :]) ** 2).sum(-1)
            nearest = np.argpartition(dist2, k - 1, axis=1)[:, :k] if k < dist2.shape[1] else \
                np.broadcast_to(np.arange(k), (len(pos), k))
            kth = np.take_along_axis(dist2, nearest, 1).max(1)
            gap_below = np.where(lo > 0, pos - (lo - 1), np.inf)
            gap_above = np.where(lo + width < m, lo + width - pos, np.inf)
            outside = np.minimum(gap_below, gap_above).min(1) ** 2
            if np.all(kth <= outside) or width == m:
                break
            half *= 2
        chosen = np.take_along_axis(cells, nearest[..., None], 1)             # (B, k, d)
        return np.ravel_multi_index(tuple(np.moveaxis(chosen, -1, 0)), (m,) * d).astype(np.int64)
