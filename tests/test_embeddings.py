"""Embeddings as the action set: normalisation, exact / IVF / FLANN k-NN against numpy brute force, index files,
and the command line's handling of embeddings (in-process for the bad inputs, end to end for the runs)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import main
from action_space import INDEX_META, EmbeddingActionSpace

ROOT = Path(__file__).resolve().parent.parent
TOY = "tests.toy_envs:EmbeddedItemsToy-v0"
TOY_FOLDER = "tests.toy_envs_EmbeddedItemsToy-v0"


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Items in 50 Gaussian clusters: an embedding with structure, as learnt item embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-5, 5, (50, d))
    return centres[rng.integers(0, 50, n)] + rng.normal(size=(n, d))


def brute_force(vectors: np.ndarray, protos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k smallest squared distances per query in float64, and all distances."""
    d2 = ((np.clip(protos, -1, 1)[:, None, :].astype(np.float64) - vectors[None].astype(np.float64)) ** 2).sum(-1)
    return np.sort(d2, 1)[:, :k], d2


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def test_normalisation_keeps_neighbours_and_fills_the_box():
    rng = np.random.default_rng(1)
    emb = np.column_stack([rng.uniform(3, 7, 100), rng.uniform(-1, 0, 100), np.full(100, 42.0)])
    v = EmbeddingActionSpace(emb).vectors
    half = (emb[:, 0].max() - emb[:, 0].min()) / 2                   # the widest dimension's half-range
    mid = (emb.max(0) + emb.min(0)) / 2
    np.testing.assert_allclose(v, (emb - mid) / half, atol=1e-6)
    assert v[:, 0].min() == pytest.approx(-1) and v[:, 0].max() == pytest.approx(1)
    assert np.all(np.abs(v) <= 1) and np.all(v[:, 2] == 0)          # a constant dimension becomes 0
    # one scale for all dimensions: distances scale alike, so every item keeps its nearest neighbours
    d_emb, d_v = (((x[:, None] - x[None]) ** 2).sum(-1) for x in (emb, v.astype(np.float64)))
    np.testing.assert_allclose(d_v, d_emb / half ** 2, atol=1e-5)
    assert np.all(EmbeddingActionSpace(np.ones((5, 2))).vectors == 0)  # identical items


@pytest.mark.parametrize("n,d,k", [(2000, 5, 1), (2000, 5, 17), (2000, 5, 2000), (500, 1, 40)])
def test_exact_search_equals_numpy_brute_force(n, d, k):
    space = EmbeddingActionSpace(clustered(n, d, seed=k), knn="exact")
    protos = np.random.default_rng(k).uniform(-1.3, 1.3, (70, d))  # some outside the box (clipped)
    found = space.search(protos, k)
    assert found.shape == (70, k) and all(len(set(row)) == k for row in found)
    best, d2 = brute_force(space.vectors, protos, k)
    np.testing.assert_allclose(np.sort(np.take_along_axis(d2, found, 1), 1), best, atol=1e-5)
    assert space.to_env(found[0, 0]) == found[0, 0] and space.nearest(space.points([3, 9])).tolist() == [3, 9]


def test_ivf_and_flann_recall_against_exact():
    space = EmbeddingActionSpace(clustered(20000, 8), knn="exact")
    protos = np.random.default_rng(2).uniform(-1, 1, (64, 8)) * 0.3 + space.vectors[:64]
    exact = space.search(protos, 100)
    recalls = {}
    for knn, extra in (("ivf", {}), ("flann", {}), ("flann", {"flann_checks": 150})):
        approx = EmbeddingActionSpace(clustered(20000, 8), knn=knn, **extra)
        found = approx.search(protos, 100)
        assert found.shape == (64, 100) and all(len(set(row)) == 100 for row in found)
        recalls[knn + str(extra)] = recall(found, exact)
    print(recalls)
    assert recalls["ivf{}"] >= 0.95 and recalls["flann{}"] >= 0.9
    assert recalls["flann{'flann_checks': 150}"] < recalls["flann{}"]  # the accuracy knob takes effect
    # scanning every list is exact
    every = EmbeddingActionSpace(clustered(20000, 8), knn="ivf", ivf_probes=10 ** 6)
    assert recall(every.search(protos, 100), exact) == 1.0


@pytest.mark.parametrize("knn", ["ivf", "flann"])
def test_index_is_saved_with_a_checksum_and_reused(knn, tmp_path):
    emb = clustered(3000, 6)
    protos = np.random.default_rng(3).uniform(-1, 1, (16, 6))
    space = EmbeddingActionSpace(emb, knn=knn)
    assert space.save_index(tmp_path).startswith(f"k-NN index ({knn}) built in")
    meta = json.loads((tmp_path / INDEX_META).read_text())
    assert meta["method"] == knn and meta["checksum"] == space.checksum() and not list(tmp_path.glob(".*.tmp"))
    again = EmbeddingActionSpace(emb, knn=knn)
    assert again.load_index(tmp_path).startswith("k-NN index reused")
    np.testing.assert_array_equal(np.sort(again.search(protos, 30), 1), np.sort(space.search(protos, 30), 1))
    (copy := tmp_path / "copy").mkdir()
    assert again.save_index(copy) == f"k-NN index ({knn}) saved in {copy}"   # reused: not built again
    shifted = EmbeddingActionSpace(emb * 1.5 + 2, knn=knn)   # the same normalised embedding: the same index
    assert shifted.load_index(tmp_path).startswith("k-NN index reused")
    other = EmbeddingActionSpace(emb[::-1], knn=knn)          # other items' order: rebuilt
    assert "checksum mismatch" in other.load_index(tmp_path) and other._index is None
    index_file = tmp_path / space.index_file_name()
    index_file.write_bytes(index_file.read_bytes()[:100])
    assert "missing or damaged" in EmbeddingActionSpace(emb, knn=knn).load_index(tmp_path)
    assert "no k-NN index" in EmbeddingActionSpace(emb, knn=knn).load_index(tmp_path / "elsewhere")


def write_npy(tmp_path: Path, array) -> Path:
    np.save(path := tmp_path / "emb.npy", array)
    return path


BAD_EMBEDDINGS = {
    "missing file": (lambda tmp: ["--action-embeddings", tmp / "none.npy"], "No such file"),
    "not an npy file": (lambda tmp: ["--action-embeddings", (tmp / "x.npy").write_text("hello") and tmp / "x.npy"],
                        "not a .npy array"),
    "npz archive": (lambda tmp: ["--action-embeddings", np.savez(tmp / "x.npz", a=np.ones((300, 2))) or tmp / "x.npz"],
                    "not a single .npy array"),
    "not 2-D": (lambda tmp: ["--action-embeddings", write_npy(tmp, np.ones(300))], "2-D"),
    "wrong count": (lambda tmp: ["--action-embeddings", write_npy(tmp, np.ones((299, 3)))], "299 action embeddings"),
    "NaN": (lambda tmp: ["--action-embeddings", write_npy(tmp, np.where(np.eye(300, 3), np.nan, 1.0))], "NaN"),
    "infinite": (lambda tmp: ["--action-embeddings", write_npy(tmp, np.full((300, 3), np.inf))], "infinite"),
    "no dimensions": (lambda tmp: ["--action-embeddings", write_npy(tmp, np.ones((300, 0)))], "0 dimensions"),
    "k above N": (lambda tmp: ["--k", 301], "k = 301"),
    "lattice over embeddings": (lambda tmp: ["--knn", "lattice"], "does not apply"),
    "no probes": (lambda tmp: ["--ivf-probes", 0], "--ivf-probes"),
    "embeddings of a Box env": (lambda tmp: ["--env", "Pendulum-v1", "--action-embeddings",
                                             write_npy(tmp, np.ones((3, 3)))], "need a Discrete"),
}


@pytest.mark.parametrize("case", BAD_EMBEDDINGS)
def test_bad_embeddings_are_one_line_errors_before_any_run_folder(case, tmp_path, capsys):
    flags, expected = BAD_EMBEDDINGS[case]
    output = tmp_path / "out"
    code = main.main(["--env", TOY, *map(str, flags(tmp_path)), "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not output.exists()


def test_the_file_wins_over_the_env_attribute(tmp_path):
    emb = np.random.default_rng(4).uniform(size=(300, 5))
    setup = main.build(main.parse_args(["--env", TOY, "--action-embeddings", str(write_npy(tmp_path, emb))]))
    assert setup.space.dim == 5 and setup.agent.action_dim == 5
    np.testing.assert_allclose(setup.space.vectors, EmbeddingActionSpace(emb).vectors)
    setup = main.build(main.parse_args(["--env", TOY]))  # without the flag: the env's own embeddings
    assert setup.embeddings is setup.env.unwrapped.action_embeddings


def run_main(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_train_test_and_load_reuse_the_index(tmp_path):
    common = ["--env", TOY, "--knn", "ivf", "--warmup", 20, "--seed", 2, "--output", tmp_path]
    train = run_main(*common, "--max-episode", 1, "--eval-every", 1, "--eval-episodes", 1)
    assert train.returncode == 0, train.stderr
    run_dir = tmp_path / f"{TOY_FOLDER}-run1"
    assert "k-NN index (ivf) built in" in train.stdout and (run_dir / INDEX_META).is_file()
    assert (run_dir / "checkpoint.safetensors").is_file() and (run_dir / "best" / "checkpoint.safetensors").is_file()
    test = run_main(*common, "--mode", "test", "--load-model-dir", run_dir, "--test-episode", 1)
    assert test.returncode == 0, test.stderr
    assert "k-NN index reused from" in test.stdout and "return mean" in test.stdout
    assert not (tmp_path / f"{TOY_FOLDER}-run2" / INDEX_META).exists()      # a test run trains no index
    # other embeddings (a --load keeps its run's own, so a test of them): the saved index does not fit, and is rebuilt
    emb = write_npy(tmp_path, np.random.default_rng(5).normal(size=(300, 3)))
    other = run_main(*common, "--mode", "test", "--load-model-dir", run_dir, "--test-episode", 1,
                     "--action-embeddings", emb)
    assert other.returncode == 0, other.stderr
    assert "checksum mismatch" in other.stdout and "return mean" in other.stdout
    resumed = run_main(*common, "--max-episode", 2, "--load", "--load-model-dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "k-NN index reused from" in resumed.stdout and (tmp_path / f"{TOY_FOLDER}-run4" / INDEX_META).is_file()
