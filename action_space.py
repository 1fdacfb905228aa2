"""Discrete action sets embedded in [-1, 1]^d: their points, their mapping to env actions, and k-NN search.

Every action set is one class implementing `ActionSpace`; the agent sees only that interface. An action is
identified by an id that only its action set interprets (for a grid: its coordinates); the agent stores
the id's point in replay memory and hands the id to `to_env`.

GridActionSpace: counts[i] evenly spaced points on axis i (discretised Boxes, Discrete, MultiDiscrete,
MultiBinary). An action's id is its grid coordinates, never a flat index, so the number of actions may
exceed int64; its k-NN enumerates the k nearest points, never the grid.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from util import usable_cores, write_atomically

INDEX_META = "knn_index.json"  # beside the index file in a run folder: method, parameters, checksums
KNN_METHODS = ("auto", "lattice", "flann")
FLANN_MAX_ACTIONS = 10 ** 7  # FLANN indexes every action


GROUP_COMBINATIONS = 256  # point_map's groups of axes: at most this many combinations each
ROW_DTYPE = np.min_scalar_type(GROUP_COMBINATIONS - 1)  # a point's row in a group's table


class AxisGroup(NamedTuple):
    """Consecutive axes [start, stop) of a grid: a combination of their coordinates c is row c . weights (the
    first axis fastest) of `points` (combinations, stop - start), that combination's points."""
    start: int
    stop: int
    weights: np.ndarray
    points: np.ndarray


class PointMap(NamedTuple):
    """points(ids) == ids (coordinates, shape (...) + (dim,)) * scale + offset in float32; ids come as `dtype`.
    `groups` splits the axes into consecutive groups of at most GROUP_COMBINATIONS combinations, so a point is
    also the groups' tabulated points side by side; empty where an axis has more values than that (a table per
    value of a long axis would grow with the number of actions)."""
    scale: np.ndarray
    offset: np.ndarray
    dtype: np.dtype
    groups: tuple[AxisGroup, ...]


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

    def point_map(self) -> PointMap | None:
        """How points follow from ids where that is an affine map of the ids' integer coordinates (a grid), None
        where it is not. Lets a caller move ids, a quarter of the bytes or less, and map them where the points
        are used."""
        return None

    def to_env(self, action_id):
        """The env action for one action id, in the env's own format."""
        raise NotImplementedError

    def search(self, protos: np.ndarray, k: int, groups: Sequence[AxisGroup] = ()) -> np.ndarray:
        """Ids of the k actions nearest to each proto-action: (batch, dim) -> (batch, k) + id_shape; given
        `point_map().groups` (a grid's), each action as its row in each group's table instead."""
        raise NotImplementedError

    def nearest(self, protos: np.ndarray) -> np.ndarray:
        """Id of the action nearest to each proto-action, shape (batch,) + id_shape."""
        return self.search(protos, 1)[:, 0]

    def save_index(self, folder: Path) -> str:
        """Write the k-NN index, if the action set has one, into a run folder; returns what happened (empty when
        there is nothing to say)."""
        return ""

    def load_index(self, folder: Path) -> str:
        """Reuse the k-NN index that a run folder holds, if it fits this action set; returns what happened
        (empty when there is nothing to say)."""
        return ""


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
        if self.knn == "lattice":
            _grid_knn_function()  # compiled now: a missing clang fails here, in one line

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

    def point_map(self) -> PointMap:
        groups = self._axis_groups() if max(self.counts) <= GROUP_COMBINATIONS else ()
        return PointMap(self._scale, self._offset, np.dtype(self.coord_dtype), groups)

    def _axis_groups(self) -> tuple[AxisGroup, ...]:
        """The axes, in order, in groups of as many as fit in GROUP_COMBINATIONS combinations, each tabulated."""
        groups, start = [], 0
        while start < self.dim:
            stop = start + 1
            while stop < self.dim and math.prod(self.counts[start:stop + 1]) <= GROUP_COMBINATIONS:
                stop += 1
            counts = self.counts[start:stop]
            every = np.stack(np.unravel_index(np.arange(math.prod(counts)), counts, order="F"), axis=-1)
            groups.append(AxisGroup(start, stop, np.cumprod((1,) + counts[:-1]),
                                    self._coordinate_points(every, slice(start, stop))))
            start = stop
        return tuple(groups)

    def _coordinate_points(self, coords: np.ndarray, axes: slice = slice(None)) -> np.ndarray:
        # float32 throughout, in C order whatever the layout of coords: one pass, no copies
        points = np.multiply(coords, self._scale[axes], dtype=np.float32, order="C")
        points += self._offset[axes]
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

    def search(self, protos: np.ndarray, k: int, groups: Sequence[AxisGroup] = ()) -> np.ndarray:
        """Ids of the k grid points nearest to each proto-action: (batch, dim) -> (batch, k) + id shape. Given
        `point_map().groups`, each point comes instead as its row in each group's table, (batch, k, groups)
        (`group_coordinates` turns rows back into ids)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {self.n}")
        protos = np.clip(np.asarray(protos, np.float64).reshape(-1, self.dim), -1.0, 1.0)
        if self.knn == "flann":
            coords = self._flann_search(protos, k)
            if groups:
                return np.stack([(coords[..., g.start:g.stop].astype(np.int64) * g.weights).sum(-1)
                                 for g in groups], axis=-1).astype(ROW_DTYPE)
        else:
            coords = self._grid_search(protos, k, groups)
        return coords[..., 0] if self.dim == 1 and not groups else coords

    def group_coordinates(self, rows: np.ndarray, groups: Sequence[AxisGroup]) -> np.ndarray:
        """The ids (coordinates) of points given as their rows in the groups' tables: (..., groups) -> (..., dim)."""
        rows = np.asarray(rows, np.int64)
        return np.concatenate([rows[..., j, None] // g.weights % np.array(self.counts[g.start:g.stop])
                               for j, g in enumerate(groups)], axis=-1).astype(self.coord_dtype)

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

    def _grid_search(self, protos: np.ndarray, k: int, groups: Sequence[AxisGroup] = ()) -> np.ndarray:
        """Exact k-NN, (B, dim) -> coordinates (B, k, dim), or rows (B, k, groups), in grid_knn.c: the k points of
        smallest sums of per-axis squared distances, found among about 1.1 k listed points per query, whatever
        the number of actions. Ties at the k-th distance are broken arbitrarily. The queries are split between
        one thread per core this process may use (the compiled search releases the GIL)."""
        if groups:  # column g of a point: the sum of its group's coordinates times their weights
            column = np.concatenate([np.full(g.stop - g.start, j) for j, g in enumerate(groups)]).astype(np.int32)
            weight = np.concatenate([g.weights for g in groups]).astype(np.int64)
            out = np.empty((len(protos), k, len(groups)), ROW_DTYPE)
        else:
            column, weight = np.arange(self.dim, dtype=np.int32), np.ones(self.dim, np.int64)
            out = np.empty((len(protos), k, self.dim), self.coord_dtype)
        search = _grid_knn_function()
        counts, steps = np.array(self.counts, np.int64), np.ascontiguousarray(self.steps, np.float64)
        protos = np.ascontiguousarray(protos, np.float64)

        def run(rows: slice) -> int:
            return search(len(protos[rows]), self.dim, counts.ctypes.data, steps.ctypes.data, protos[rows].ctypes.data,
                          k, out.shape[2], column.ctypes.data, weight.ctypes.data, out.itemsize, out[rows].ctypes.data)

        parts = min(usable_cores(), len(protos))
        bounds = np.linspace(0, len(protos), parts + 1).round().astype(int)
        slices = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
        statuses = list(_search_threads(parts).map(run, slices)) if parts > 1 else [run(slice(None))]
        if -1 in statuses:
            raise MemoryError(f"the grid search ran out of memory (k = {k:,})")
        if any(statuses):
            raise RuntimeError(f"the grid search listed fewer than k = {k:,} points")
        return out


GRID_KNN_SOURCE = Path(__file__).with_name("grid_knn.c")


@lru_cache(maxsize=None)
def _grid_knn_function():
    """grid_knn.c's search, compiled once per version of the source with clang (which tinygrad's CPU backend needs
    too) into the user's cache folder."""
    source = GRID_KNN_SOURCE.read_bytes()
    function = _compiled_library(source, f"grid_knn-{hashlib.sha256(source).hexdigest()[:16]}.so").grid_knn
    function.restype = ctypes.c_int
    pointer = ctypes.c_void_p
    function.argtypes = [ctypes.c_int64, ctypes.c_int, pointer, pointer, pointer, ctypes.c_int64, ctypes.c_int, pointer,
                         pointer, ctypes.c_int, pointer]
    return function


def _compiled_library(source: bytes, name: str) -> ctypes.CDLL:
    """The library `name` compiled from C `source`: loaded from the cache folder, or compiled into it first (into a
    temporary folder there, then renamed, so that concurrent runs never load a half-written file)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wolpertinger"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir())
    library = cache / name
    if not library.exists():
        with tempfile.TemporaryDirectory(dir=cache) as folder:
            partial, copy = Path(folder) / name, Path(folder) / "source.c"
            copy.write_bytes(source)
            try:
                subprocess.run(["clang", "-O2", "-shared", "-fPIC", "-o", str(partial), str(copy)], check=True,
                               capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                reason = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[0]
                raise ValueError(f"the grid k-NN needs clang to compile {GRID_KNN_SOURCE.name} "
                                 f"(Debian/Ubuntu: sudo apt-get install clang): {reason}") from None
            os.replace(partial, library)
    return ctypes.CDLL(str(library))


@lru_cache(maxsize=None)
def _search_threads(count: int) -> ThreadPoolExecutor:
    """The `count` threads between which the grid search splits a minibatch."""
    return ThreadPoolExecutor(count)


EMBEDDING_KNN = ("auto", "exact", "ivf", "flann")
EXACT_MAX_ITEMS = 20000        # --knn auto: exact search up to this many items, the IVF index above
QUERY_BLOCK = 2 ** 24          # exact search: distances held at once (64 MB of float32)
FLANN_TREES = 4


class EmbeddingActionSpace(ActionSpace):
    """N discrete actions given by an N x d embedding; item i is env action `start + i`.

    The embedding is moved into [-1, 1]^d by one shift and one scale for all dimensions: each dimension is
    centred on the middle of its range and all are divided by the largest half-range. A single scale keeps
    the embedding's Euclidean neighbours (per-dimension scaling would change which items are nearest); the
    widest dimension spans [-1, 1] exactly, a constant dimension becomes 0.

    k-NN methods (`knn`): "exact" (brute-force distances and a partial sort in numpy), "flann" (FLANN kd-tree,
    FLANN_TREES trees, `flann_checks` leaves visited per query: the reference's library, approximate), "ivf"
    (an inverted file: k-means lists, the items stored sorted by list, `ivf_probes` nearest lists scanned
    exactly; approximate). An index is built on first use, or read back by `load_index` from a run folder.
    """

    def __init__(self, embeddings: np.ndarray, start: int = 0, knn: str = "auto", flann_checks: int = 0,
                 ivf_probes: int = 32):
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2:
            raise ValueError(f"action embeddings must be a 2-D array (items x dimensions), not of shape "
                             f"{embeddings.shape}")
        if embeddings.shape[1] == 0:
            raise ValueError("action embeddings have 0 dimensions")
        if not np.issubdtype(embeddings.dtype, np.number) or np.iscomplexobj(embeddings):
            raise ValueError(f"action embeddings must be real numbers, got dtype {embeddings.dtype}")
        if not np.all(np.isfinite(embeddings)):
            raise ValueError(f"action embeddings hold {np.size(embeddings) - np.isfinite(embeddings).sum()} "
                             "NaN or infinite values")
        if knn not in EMBEDDING_KNN:
            raise ValueError(f"--knn {knn} does not apply to action embeddings; choose one of "
                             f"{', '.join(EMBEDDING_KNN)}")
        if flann_checks < 0 or ivf_probes < 1:
            raise ValueError("--flann-checks must be at least 0 (0: automatic) and --ivf-probes at least 1")
        self.n, self.dim = embeddings.shape
        self.start = start
        self.vectors = normalize_embeddings(embeddings)
        self.sq_norms = (self.vectors.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.knn = knn if knn != "auto" else ("exact" if self.n <= EXACT_MAX_ITEMS else "ivf")
        self.flann_checks, self.ivf_probes = flann_checks, ivf_probes
        self._index = None

    def points(self, ids: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(ids)]

    def to_env(self, action_id) -> int:
        return self.start + int(action_id)

    def search(self, protos: np.ndarray, k: int, groups: Sequence[AxisGroup] = ()) -> np.ndarray:
        """Item ids of the k items nearest to each proto-action: (batch, dim) -> (batch, k), nearest first
        only where the method returns them so (FLANN); the agent's critic does not depend on the order. Items
        have no groups of axes (`point_map` is None)."""
        if groups:
            raise ValueError("embedded items have no groups of axes")
        if not 1 <= k <= self.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {self.n}")
        protos = np.clip(np.asarray(protos, np.float32).reshape(-1, self.dim), -1.0, 1.0)
        if self.knn == "exact":
            return self.exact_search(protos, k)
        return self._flann_search(protos, k) if self.knn == "flann" else self._ivf_search(protos, k)

    # --- exact search ----------------------------------------------------------------------------------------
    def exact_search(self, protos: np.ndarray, k: int) -> np.ndarray:
        """Exact k-NN by brute force: |x|^2 - 2 q.x for every item (|q|^2 does not change the order)."""
        out = np.empty((len(protos), k), np.int64)
        rows = max(1, QUERY_BLOCK // self.n)
        for lo in range(0, len(protos), rows):
            dist = self.sq_norms[None] - 2 * protos[lo:lo + rows] @ self.vectors.T
            out[lo:lo + rows] = top_k(dist, k)
        return out

    # --- indexes ---------------------------------------------------------------------------------------------
    def index_params(self) -> dict:
        """What the index depends on besides the embedding (a saved index with other values is rebuilt)."""
        if self.knn == "flann":
            return {"method": "flann", "algorithm": "kdtree", "trees": FLANN_TREES}
        if self.knn == "ivf":
            return {"method": "ivf", "lists": ivf_lists(self.n)}
        return {"method": "exact"}

    def checksum(self) -> str:
        """sha256 of the normalised embedding and the index parameters."""
        digest = hashlib.sha256(np.ascontiguousarray(self.vectors).tobytes())
        digest.update(json.dumps(self.index_params(), sort_keys=True).encode())
        return digest.hexdigest()

    def index(self):
        """The search index, built on first use: a pyflann.FLANN for "flann", an IVFIndex for "ivf"."""
        if self._index is None and self.knn != "exact":
            self._index = self._build_flann() if self.knn == "flann" else IVFIndex.build(self.vectors)
        return self._index

    def index_file_name(self) -> str:
        return "knn_index.flann" if self.knn == "flann" else "knn_index.npz"

    def _build_flann(self):
        import pyflann
        flann = pyflann.FLANN()
        flann.build_index(self.vectors, algorithm="kdtree", trees=FLANN_TREES, random_seed=1)
        return flann

    def _flann_search(self, protos: np.ndarray, k: int) -> np.ndarray:
        # fewer checks than k cannot even collect k items (FLANN's default is 32); 10 k gave recall 0.98 at k = 100
        checks = max(self.flann_checks, k) if self.flann_checks else max(256, 10 * k)
        ids, _ = self.index().nn_index(protos, k, checks=checks)
        return np.asarray(ids, np.int64).reshape(len(protos), k)

    def _ivf_search(self, protos: np.ndarray, k: int) -> np.ndarray:
        return self.index().search(protos, k, self.ivf_probes, fallback=self.exact_search)

    def save_index(self, folder: Path) -> str:
        if self.knn == "exact":
            return ""
        reused, start = self._index is not None, time.perf_counter()
        self.index()
        built = "" if reused else f"built in {time.perf_counter() - start:.1f} s, "
        index_file = folder / self.index_file_name()
        if self.knn == "flann":
            write_atomically(index_file, lambda tmp: self.index().save_index(str(tmp).encode()))
        else:
            write_atomically(index_file, lambda tmp: self.index().save(tmp))
        meta = {**self.index_params(), "checksum": self.checksum(), "file_sha256": file_sha256(index_file)}
        write_atomically(folder / INDEX_META, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        return f"k-NN index ({self.knn}) {built}saved in {folder}"

    def load_index(self, folder: Path) -> str:
        if self.knn == "exact":
            return ""
        meta_file = folder / INDEX_META
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return f"{folder} holds no k-NN index; building one"
        if meta.get("checksum") != self.checksum():
            return f"the k-NN index in {folder} was built for other embeddings or settings (checksum mismatch); " \
                   "rebuilding it"
        start = time.perf_counter()
        index_file = folder / self.index_file_name()
        if not index_file.is_file() or file_sha256(index_file) != meta.get("file_sha256"):
            return f"the k-NN index file in {folder} is missing or damaged; rebuilding it"
        try:
            self._index = self._load_flann(index_file) if self.knn == "flann" else \
                IVFIndex.load(index_file, self.vectors)
        except Exception as e:  # a damaged file fails in many ways inside FLANN or numpy
            self._index = None
            return f"cannot read the k-NN index in {folder} ({type(e).__name__}); rebuilding it"
        return f"k-NN index reused from {folder} ({time.perf_counter() - start:.2f} s)"

    def _load_flann(self, path: Path):
        import pyflann
        flann = pyflann.FLANN()
        flann.load_index(str(path).encode(), self.vectors)
        return flann


def normalize_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """float32 copy of an N x d embedding moved into [-1, 1]^d by one shift per dimension and one common scale."""
    emb = np.asarray(embeddings, np.float64)
    low, high = emb.min(0), emb.max(0)
    half_range = (high - low).max() / 2
    centred = emb - (low + high) / 2
    return (centred / half_range if half_range > 0 else np.zeros_like(emb)).astype(np.float32)


def top_k(dist: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the k smallest values of each row (in no particular order)."""
    if k == dist.shape[1]:
        return np.broadcast_to(np.arange(k), dist.shape).copy()
    return np.argpartition(dist, k - 1, axis=1)[:, :k]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def ivf_lists(n: int) -> int:
    """Number of k-means lists of the IVF index: about sqrt(n), so a list holds about as many items as there are
    lists."""
    return max(1, round(math.sqrt(n)))


class IVFIndex:
    """Inverted file: items grouped by their nearest k-means centroid and stored sorted by list, so a list is one
    contiguous slice. A query scans the items of its `probes` nearest lists exactly."""

    def __init__(self, centroids: np.ndarray, order: np.ndarray, offsets: np.ndarray, vectors: np.ndarray):
        self.centroids, self.order, self.offsets = centroids, order, offsets
        self.centroid_sq = (centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.sorted_vectors = vectors[order]
        self.sorted_sq = (self.sorted_vectors.astype(np.float64) ** 2).sum(1).astype(np.float32)

    @classmethod
    def build(cls, vectors: np.ndarray, iterations: int = 10, sample_per_list: int = 64) -> IVFIndex:
        """k-means (Lloyd, on a sample of `sample_per_list` items per list, seeded) and every item's list."""
        rng = np.random.default_rng(0)
        n_lists = ivf_lists(len(vectors))
        sample = vectors[rng.choice(len(vectors), min(len(vectors), n_lists * sample_per_list), replace=False)]
        centroids = sample[rng.choice(len(sample), n_lists, replace=False)].copy()
        for _ in range(iterations):
            assign = nearest_centroid(sample, centroids)
            counts = np.bincount(assign, minlength=n_lists)
            sums = np.stack([np.bincount(assign, sample[:, j], minlength=n_lists) for j in range(sample.shape[1])], 1)
            filled = counts > 0  # an empty list keeps its centroid
            centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        assign = nearest_centroid(vectors, centroids)
        order = np.argsort(assign, kind="stable")
        offsets = np.searchsorted(assign[order], np.arange(n_lists + 1))
        return cls(centroids, order, offsets, vectors)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, centroids=self.centroids, order=self.order, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path, vectors: np.ndarray) -> IVFIndex:
        with np.load(path) as saved:
            return cls(saved["centroids"], saved["order"], saved["offsets"], vectors)

    def search(self, protos: np.ndarray, k: int, probes: int, fallback) -> np.ndarray:
        """Ids of the k nearest items among those of each query's nearest lists (`probes` of them, or more where
        k needs more); a query whose lists hold fewer than k items is answered by `fallback(protos, k)`."""
        # lists for about 2k items at least: lists vary in size, and a query whose lists hold fewer than k items
        # falls back to the exact search (1M items, k = 1000: 2 lists fell back often, 3 seldom)
        probes = min(max(probes, math.ceil(2 * k * len(self.centroids) / len(self.order)) + 1), len(self.centroids))
        lists = top_k(self.centroid_sq[None] - 2 * protos @ self.centroids.T, probes)      # (B, P)
        starts, ends = self.offsets[lists], self.offsets[lists + 1]
        totals = (ends - starts).sum(1)
        # each row: the distances to the items of the query's lists, then padding at infinite distance
        dist = np.full((len(protos), max(int(totals.max()), k)), np.inf, np.float32)
        candidates = np.zeros(dist.shape, np.int64)
        for b, query in enumerate(protos):  # a list is a contiguous slice: a small product, no gather of rows
            column = 0
            for lo, hi in zip(starts[b].tolist(), ends[b].tolist()):
                dist[b, column:column + hi - lo] = self.sorted_sq[lo:hi] - 2 * (self.sorted_vectors[lo:hi] @ query)
                candidates[b, column:column + hi - lo] = self.order[lo:hi]
                column += hi - lo
        ids = np.take_along_axis(candidates, top_k(dist, k), 1)
        short = totals < k
        if short.any():
            ids[short] = fallback(protos[short], k)
        return ids


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray, block: int = 65536) -> np.ndarray:
    sq = (centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
    return np.concatenate([np.argmin(sq[None] - 2 * vectors[lo:lo + block] @ centroids.T, 1)
                           for lo in range(0, len(vectors), block)])


def action_set(space, embeddings: np.ndarray | None = None, max_actions: int = 200000, knn: str = "auto",
               flann_checks: int = 0, ivf_probes: int = 32) -> ActionSpace:
    """The action set for a gymnasium action space: its actions' embeddings (N x d) over a Discrete space's N
    actions, else a grid (a Box discretised into about `max_actions` points). ValueError for a space it cannot
    take."""
    import gymnasium as gym

    if embeddings is not None:
        if not isinstance(space, gym.spaces.Discrete):
            raise ValueError(f"action embeddings need a Discrete action space, not {type(space).__name__}")
        embedded = EmbeddingActionSpace(embeddings, int(space.start), knn, flann_checks, ivf_probes)
        if embedded.n != space.n:
            raise ValueError(f"{embedded.n} action embeddings for {space.n} actions")
        return embedded
    if isinstance(space, gym.spaces.Box):
        return GridActionSpace.continuous(space.low, space.high, max_actions, knn=knn)
    if isinstance(space, gym.spaces.Discrete):
        return GridActionSpace.discrete(int(space.n), int(space.start), knn=knn)
    if isinstance(space, gym.spaces.MultiBinary):
        return GridActionSpace.multi_discrete(np.full(space.shape, 2), np.zeros(space.shape, space.dtype), knn=knn)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return GridActionSpace.multi_discrete(space.nvec, space.start, knn=knn)
    raise ValueError(f"a {type(space).__name__} action space is not supported; supported: Box, Discrete, "
                     "MultiBinary and MultiDiscrete")
