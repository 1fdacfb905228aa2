import itertools

import numpy as np
import pytest

from action_space import GridActionSpace


def brute_force_knn(space: GridActionSpace, protos: np.ndarray, k: int) -> np.ndarray:
    grid = space.points(np.arange(space.n)).astype(np.float64)
    d2 = ((np.clip(protos, -1, 1)[:, None, :] - grid[None]) ** 2).sum(-1)
    return np.sort(d2, axis=1)[:, :k], d2


@pytest.mark.parametrize("dim,max_actions,per_axis", [(1, 200000, 200000), (2, 10000, 100), (3, 1000, 10)])
def test_grid_shape_and_order(dim, max_actions, per_axis):
    space = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    assert (space.points_per_axis, space.n) == (per_axis, per_axis ** dim)
    sample = np.arange(0, space.n, max(1, space.n // 500))
    axis = np.linspace(-1, 1, per_axis)
    expected = np.array(list(itertools.product(*[axis] * dim)))[sample] if space.n <= 10000 else axis[sample, None]
    np.testing.assert_allclose(space.points(sample), expected, atol=1e-6)


def test_pendulum_grid_covers_bounds_evenly():
    space = GridActionSpace.continuous([-2.0], [2.0], 200000)
    torques = np.array([space.to_env(i)[0] for i in range(0, space.n, 997)] + [space.to_env(space.n - 1)[0]])
    assert torques[0] == pytest.approx(-2.0) and torques[-1] == pytest.approx(2.0)
    np.testing.assert_allclose(np.diff(torques[:-1]), 997 * 4.0 / (space.n - 1), rtol=1e-4)


def test_box_scaling_per_axis():
    space = GridActionSpace.continuous([0.0, -3.0], [1.0, 3.0], 9)
    assert space.to_env(0).tolist() == [0.0, -3.0] and space.to_env(8).tolist() == [1.0, 3.0]
    assert space.to_env(4).tolist() == [0.5, 0.0]


def test_discrete_maps_back_to_its_actions():
    space = GridActionSpace.discrete(7, start=-2)
    assert [space.to_env(i) for i in range(7)] == list(range(-2, 5))
    # the nearest grid point of each action's own coordinate is that action
    assert space.nearest(space.points(np.arange(7))).tolist() == list(range(7))


@pytest.mark.parametrize("dim,max_actions,k", [(1, 1000, 1), (1, 1000, 37), (1, 1000, 1000), (2, 400, 1),
                                               (2, 400, 23), (2, 400, 400), (3, 512, 50), (3, 1000, 333)])
def test_lattice_search_equals_brute_force(dim, max_actions, k):
    space = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    rng = np.random.default_rng(dim * 1000 + k)
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=dim)))
    on_grid = space.points(rng.integers(0, space.n, 8))                 # exact ties between neighbours
    midpoints = on_grid + space.step / 2                                 # ties at equal distance
    protos = np.concatenate([rng.uniform(-1.2, 1.2, (40, dim)), corners, on_grid, midpoints])
    found = space.search(protos, k)
    assert found.shape == (len(protos), k)
    assert all(len(set(row)) == k for row in found)
    best, d2 = brute_force_knn(space, protos, k)
    # the same distances as brute force (ties may be broken either way)
    np.testing.assert_allclose(np.sort(np.take_along_axis(d2, found, 1), axis=1), best, atol=1e-6)
    # and, where the k-th distance is unique, the very same set
    sorted_d2 = np.sort(d2, axis=1)
    unique = (k == space.n) | (sorted_d2[:, k - 1] + 1e-6 < sorted_d2[:, min(k, space.n - 1)])
    for row, dist, u in zip(found, d2, unique):
        if u:
            assert set(row) == set(np.argsort(dist, kind="stable")[:k])


@pytest.mark.parametrize("dim,max_actions,k", [(1, 500, 20), (2, 400, 15)])
def test_flann_exact_search_returns_the_lattice_sets(dim, max_actions, k):
    lattice = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions)
    flann = GridActionSpace.continuous(-np.ones(dim), np.ones(dim), max_actions, knn="flann")
    protos = np.random.default_rng(0).uniform(-1, 1, (30, dim))
    exact = flann._flann_search(protos, k, exact=True)
    _, d2 = brute_force_knn(lattice, protos, k + 1)
    sorted_d2 = np.sort(d2, axis=1)
    unique = sorted_d2[:, k - 1] + 1e-9 < sorted_d2[:, k]
    assert unique.sum() > 20
    for a, b, u in zip(exact, lattice.search(protos, k), unique):
        if u:
            assert set(a) == set(b)


@pytest.mark.parametrize("k", [0, 11])
def test_impossible_k_is_rejected(k):
    with pytest.raises(ValueError, match="k = "):
        GridActionSpace.continuous([-1.0], [1.0], 10).search(np.zeros((1, 1)), k)
