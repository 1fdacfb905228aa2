import itertools

import numpy as np
import pytest

import action_space
from action_space import GridActionSpace


def every_id(space) -> np.ndarray:
    """All action ids of a small grid, in flat (C) order (of an embedding action set: its item numbers)."""
    if not isinstance(space, GridActionSpace):
        return np.arange(space.n)
    ids = np.stack(np.unravel_index(np.arange(space.n), space.counts), axis=-1)
    return ids[:, 0] if space.dim == 1 else ids


def flat(space: GridActionSpace, ids: np.ndarray) -> np.ndarray:
    """Flat (C order) indices of coordinate ids, to compare with brute force over every_id."""
    return np.asarray(ids) if space.dim == 1 else np.ravel_multi_index(tuple(np.moveaxis(ids, -1, 0)), space.counts)


def brute_force_knn(space: GridActionSpace, protos: np.ndarray, k: int) -> np.ndarray:
    grid = space.points(every_id(space)).astype(np.float64)
    d2 = ((np.clip(protos, -1, 1)[:, None, :] - grid[None]) ** 2).sum(-1)
    return np.sort(d2, axis=1)[:, :k], d2


@pytest.mark.parametrize("dim,max_actions,per_axis", [(1, 200000, 200000), (2, 10000, 100), (3, 1000, 10)])
def test_grid_shape_and_order(dim, max_actions, per_axis):
    space = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    assert (space.counts, space.n) == ((per_axis,) * dim, per_axis ** dim)
    sample = np.arange(0, space.n, max(1, space.n // 500))
    axis = np.linspace(-1, 1, per_axis)
    expected = np.array(list(itertools.product(*[axis] * dim)))[sample] if space.n <= 10000 else axis[sample, None]
    np.testing.assert_allclose(space.points(every_id(space)[sample] if dim > 1 else sample), expected, atol=1e-6)


def test_pendulum_grid_covers_bounds_evenly():
    space = GridActionSpace.continuous([-2.0], [2.0], 200000)
    torques = np.array([space.to_env(i)[0] for i in range(0, space.n, 997)] + [space.to_env(space.n - 1)[0]])
    assert torques[0] == pytest.approx(-2.0) and torques[-1] == pytest.approx(2.0)
    np.testing.assert_allclose(np.diff(torques[:-1]), 997 * 4.0 / (space.n - 1), rtol=1e-4)


def test_box_scaling_per_axis():
    space = GridActionSpace.continuous([0.0, -3.0], [1.0, 3.0], 9)
    assert space.to_env([0, 0]).tolist() == [0.0, -3.0] and space.to_env([2, 2]).tolist() == [1.0, 3.0]
    assert space.to_env([1, 1]).tolist() == [0.5, 0.0]


@pytest.mark.parametrize("space", [GridActionSpace.continuous([-2.0, 0.0, 5.0], [2.0, 1.0, 6.0], 1000),
                                   GridActionSpace.multi_discrete(np.array([3, 1, 7, 2]), np.zeros(4, np.int64)),
                                   GridActionSpace.multi_discrete(np.full(9, 2), np.zeros(9, np.int8)),
                                   GridActionSpace((70000, 3)), GridActionSpace((2 ** 40, 2)),
                                   GridActionSpace((3, 5, 7, 2, 2, 2, 9))])
def test_point_map_gives_the_points_of_searched_ids(space):
    """Candidates may travel as ids and become points where they are scored: ids * scale + offset in float32, in
    the ids' own dtype, is `points` exactly."""
    ids = space.search(np.random.default_rng(0).uniform(-1, 1, (5, space.dim)), 7)
    scale, offset, dtype, groups = space.point_map()
    assert ids.dtype == dtype and scale.dtype == offset.dtype == np.float32
    np.testing.assert_array_equal(ids.astype(np.float32) * scale + offset, space.points(ids))
    if max(space.counts) > action_space.GROUP_COMBINATIONS:  # no table grows with a long axis
        assert groups == ()
        return
    # the groups' tables side by side: consecutive axes, at most GROUP_COMBINATIONS rows each
    assert [g.start for g in groups] == [0] + [g.stop for g in groups[:-1]] and groups[-1].stop == space.dim
    assert all(len(g.points) <= action_space.GROUP_COMBINATIONS for g in groups)
    tabulated = [g.points[ids[..., g.start:g.stop].astype(np.int64) @ g.weights] for g in groups]
    np.testing.assert_array_equal(np.concatenate(tabulated, axis=-1), space.points(ids))


def test_embeddings_have_no_point_map():
    assert action_space.EmbeddingActionSpace(np.eye(4)).point_map() is None


def test_discrete_maps_back_to_its_actions():
    space = GridActionSpace.discrete(7, start=-2)
    assert [space.to_env(i) for i in range(7)] == list(range(-2, 5))
    # the nearest grid point of each action's own coordinate is that action
    assert space.nearest(space.points(np.arange(7))).tolist() == list(range(7))


def assert_exact_knn(space: GridActionSpace, protos: np.ndarray, k: int) -> None:
    """search's k ids are distinct, have brute force's k smallest distances and, where the k-th distance is
    unique, are brute force's very set."""
    found = space.search(protos, k)
    assert found.shape == (len(protos), k) + ((space.dim,) if space.dim > 1 else ())
    points = space.points(found)  # C order whatever the ids' layout: copied into a graph's buffer as it is
    assert points.dtype == np.float32 and points.flags.c_contiguous
    found = flat(space, found)
    assert all(len(set(row)) == k for row in found)
    best, d2 = brute_force_knn(space, protos, k)
    # the same distances as brute force (ties may be broken either way)
    np.testing.assert_allclose(np.sort(np.take_along_axis(d2, found, 1), axis=1), best, atol=1e-6)
    sorted_d2 = np.sort(d2, axis=1)
    unique = (k == space.n) | (sorted_d2[:, k - 1] + 1e-6 < sorted_d2[:, min(k, space.n - 1)])
    for row, dist, u in zip(found, d2, unique):
        if u:
            assert set(row) == set(np.argsort(dist, kind="stable")[:k])


def awkward_protos(space: GridActionSpace, rng: np.random.Generator) -> np.ndarray:
    """Random proto-actions (some outside [-1, 1]), the corners, grid points and midpoints between them (ties)."""
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=space.dim)))[:16]
    on_grid = space.points(every_id(space)[rng.integers(0, space.n, 8)])
    midpoints = on_grid + space.steps / 2
    return np.concatenate([rng.uniform(-1.2, 1.2, (40, space.dim)), corners, on_grid, midpoints])


@pytest.mark.parametrize("dim,max_actions,k", [(1, 1000, 1), (1, 1000, 37), (1, 1000, 1000), (2, 400, 1),
                                               (2, 400, 23), (2, 400, 400), (3, 512, 50), (3, 1000, 333)])
def test_lattice_search_equals_brute_force(dim, max_actions, k):
    space = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    assert_exact_knn(space, awkward_protos(space, np.random.default_rng(dim * 1000 + k)), k)


@pytest.mark.parametrize("nvec,k", [((2,) * 8, 1), ((2,) * 8, 2), ((2,) * 8, 37), ((2,) * 8, 256), ((2,) * 10, 100),
                                    ((3, 1, 7, 2, 5), 1), ((3, 1, 7, 2, 5), 29), ((3, 1, 7, 2, 5), 210),
                                    ((40, 2, 3), 61), ((1, 1), 1), ((6, 5, 4, 3, 2, 2), 500),
                                    ((2,) * 12, 37), ((4,) * 6, 50), ((5, 5, 5, 5), 33), ((7,) * 5, 200)])
def test_combinatorial_search_equals_brute_force(nvec, k):
    """MultiBinary (the hypercube's corners) and uneven MultiDiscrete, axes of one point included; in the last
    four the merged halves hold more than k combinations, so they are cut to their k smallest."""
    space = GridActionSpace.multi_discrete(np.array(nvec), np.zeros(len(nvec), np.int64))
    rng = np.random.default_rng(k)
    protos = awkward_protos(space, rng)
    protos[:4, :] = 0.0                                                # every corner of a hypercube ties
    assert_exact_knn(space, protos, k)


@pytest.mark.parametrize("nvec,k,queries", [((300, 7), 20, 9), ((300, 7), 1, 9), ((2, 70000), 3, 5),
                                            ((9, 2, 9), 162, 1), ((5, 4, 3), 60, 2)])
def test_search_equals_brute_force_on_long_axes_and_any_batch(nvec, k, queries):
    """Axes longer than k (only the k nearest of each are ranked; wider coordinate dtypes), k = 1 and k = all,
    and batches of one and two queries (the search splits a batch between threads)."""
    space = GridActionSpace.multi_discrete(np.array(nvec), np.zeros(len(nvec), np.int64))
    protos = awkward_protos(space, np.random.default_rng(k))
    assert_exact_knn(space, protos[np.random.default_rng(queries).choice(len(protos), queries, replace=False)], k)


@pytest.mark.parametrize("cores", [2, 3, 16])
def test_search_splits_the_batch_between_threads_without_changing_it(monkeypatch, cores):
    """One thread per usable core, each a contiguous part of the batch (uneven parts, more cores than queries):
    the very ids one thread finds."""
    space = GridActionSpace.multi_discrete(np.array((3, 1, 7, 2, 5)), np.zeros(5, np.int64))
    protos = awkward_protos(space, np.random.default_rng(cores))[:11]
    monkeypatch.setattr(action_space, "usable_cores", lambda: 1)
    alone = space.search(protos, 29)
    monkeypatch.setattr(action_space, "usable_cores", lambda: cores)
    np.testing.assert_array_equal(space.search(protos, 29), alone)


@pytest.mark.parametrize("nvec,knn", [((2,) * 20, "lattice"), ((3, 5, 7, 2, 2, 2, 4), "lattice"), ((2,) * 9, "flann")])
def test_search_writes_rows_of_the_tables_on_request(nvec, knn):
    """Given point_map's groups, each found point comes as its row in each group's table: the rows of the very
    points found otherwise, which group_coordinates turns back into them."""
    space = GridActionSpace.multi_discrete(np.array(nvec), np.zeros(len(nvec), np.int64), knn=knn)
    groups = space.point_map().groups
    protos = awkward_protos(space, np.random.default_rng(len(nvec)))
    found, rows = space.search(protos, 50), space.search(protos, 50, groups)
    assert rows.shape == (len(protos), 50, len(groups)) and rows.dtype == action_space.ROW_DTYPE
    for g, group in enumerate(groups):
        np.testing.assert_array_equal(group.points[rows[..., g]], space.points(found)[..., group.start:group.stop])
    np.testing.assert_array_equal(space.group_coordinates(rows, groups), found)
    with pytest.raises(ValueError, match="no groups"):
        action_space.EmbeddingActionSpace(np.eye(4)).search(np.zeros((1, 4)), 2, groups)


def test_search_never_enumerates_a_huge_space():
    space = GridActionSpace.multi_discrete(np.full(100, 2), np.zeros(100, np.int8))   # 2^100 actions
    protos = np.random.default_rng(0).uniform(-1, 1, (4, 100))
    found = space.search(protos, 3)
    nearest = (protos > 0).astype(int)                                 # each axis's nearer corner
    # the runners-up flip the axis, then the next axis, nearest to 0
    flips = np.argsort(np.abs(protos), axis=1)[:, :2]
    for row, near, flip in zip(found, nearest, flips):
        expected = [near.copy() for _ in range(3)]
        expected[1][flip[0]] ^= 1
        expected[2][flip[1]] ^= 1
        assert sorted(map(tuple, row)) == sorted(map(tuple, expected))
    assert space.n == 2 ** 100 and found.dtype == np.uint8


def test_env_actions_of_combinations_keep_the_env_format():
    multi = GridActionSpace.multi_discrete(np.array([[2, 3], [4, 5]]), np.array([[1, 0], [0, -2]]))
    action = multi.to_env(np.array([1, 2, 3, 4]))
    assert action.tolist() == [[2, 2], [3, 2]] and action.dtype == np.int64
    binary = GridActionSpace.multi_discrete(np.full(3, 2), np.zeros(3, np.int8))
    assert binary.to_env(np.array([1, 0, 1])).tolist() == [1, 0, 1] and binary.to_env([1, 0, 1]).dtype == np.int8
    np.testing.assert_array_equal(binary.points(np.array([[1, 0, 1]])), [[1.0, -1.0, 1.0]])
    # an axis of one point sits at 0
    np.testing.assert_array_equal(GridActionSpace.multi_discrete(np.array([3, 1]), np.zeros(2)).points([2, 0]), [1, 0])


@pytest.mark.parametrize("dim,max_actions,k", [(1, 500, 20), (2, 400, 15)])
def test_flann_exact_search_returns_the_lattice_sets(dim, max_actions, k):
    lattice = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    flann = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions, knn="flann")
    protos = np.random.default_rng(0).uniform(-1, 1, (30, dim))
    exact = flann._flann_search(protos, k, exact=True)                   # coordinates, (30, k, dim)
    exact = exact[..., 0] if dim == 1 else exact
    _, d2 = brute_force_knn(lattice, protos, k + 1)
    sorted_d2 = np.sort(d2, axis=1)
    unique = sorted_d2[:, k - 1] + 1e-9 < sorted_d2[:, k]
    assert unique.sum() > 20
    for a, b, u in zip(flat(flann, exact), flat(lattice, lattice.search(protos, k)), unique):
        if u:
            assert set(a) == set(b)


@pytest.mark.parametrize("k", [0, 11])
def test_impossible_k_is_rejected(k):
    with pytest.raises(ValueError, match="k = "):
        GridActionSpace.continuous([-1.0], [1.0], 10).search(np.zeros((1, 1)), k)
