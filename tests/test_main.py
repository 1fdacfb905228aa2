"""End to end: main.py as a user runs it, in subprocesses, with real gymnasium, FLANN and tinygrad."""
import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORT_CARTPOLE = ["--env", "CartPole-v1", "--max-episode", "4", "--warmup", "20", "--save_per_epochs", "2",
                  "--eval-every", "2", "--eval-episodes", "1", "--seed", "3"]
NETWORKS = ("actor", "critic", "actor_target", "critic_target")


def run_main(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_run_files(run_dir: Path) -> None:
    for name in NETWORKS:
        assert (run_dir / f"{name}.safetensors").stat().st_size > 1000
    assert (run_dir / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".*.tmp"))


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    result = run_main(*SHORT_CARTPOLE, "--output", output)
    assert result.returncode == 0, result.stderr
    return output, output / "CartPole-v1-run1"


def test_cartpole_trains_and_writes_its_run_folder(cartpole):
    _, run_dir = cartpole
    lines = (run_dir / "RS_train_log").read_text().splitlines()
    assert lines[0] == "env: CartPole-v1" and "seed: 3" in lines and "k_ratio: 0.1" in lines
    episodes = [line for line in lines if line.startswith("Ep:")]
    assert [e.split(" | ")[0] for e in episodes] == ["Ep:1", "Ep:2", "Ep:3", "Ep:4"]
    assert all(float(e.split("R:")[1]) > 0 for e in episodes)
    assert "### Model Saved before Ep:3 ###" in lines and lines[-1] == "### Model Saved before Ep:5 ###"
    assert [line.split(" | ")[0] for line in lines if line.startswith("Eval")] == ["Eval after Ep:2", "Eval after Ep:4"]
    rows = metrics(run_dir)
    assert list(rows[0]) == ["episode", "env_steps", "return", "wall_seconds", "eval_return"]
    assert [r["episode"] for r in rows] == ["1", "2", "3", "4"]
    assert [bool(r["eval_return"]) for r in rows] == [False, True, False, True]
    steps = [int(r["env_steps"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] > 20  # past the warm-up, so updates ran
    assert_run_files(run_dir)


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """The scalars of a run folder's TensorBoard event file, read record by record (length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    data, scalars, at = next(run_dir.glob("events.out.tfevents.*")).read_bytes(), {}, 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 8], "little")
        event = Event.FromString(data[at + 12:at + 12 + length])
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        at += 16 + length
    return scalars


def test_cartpole_writes_tensorboard_scalars_per_episode(cartpole):
    _, run_dir = cartpole
    scalars, rows = tensorboard_scalars(run_dir), metrics(run_dir)
    for episode, row in enumerate(rows, 1):
        assert scalars["train/return"][episode] == pytest.approx(float(row["return"]), abs=1e-4)
        if row["eval_return"]:
            assert scalars["eval/mean_return"][episode] == pytest.approx(float(row["eval_return"]), abs=1e-4)
    assert sorted(scalars["eval/mean_return"]) == [2, 4]
    updated = sorted(scalars["loss/critic"])  # episodes with updates: from the one that passed the warm-up
    assert updated == sorted(scalars["loss/actor"]) == sorted(scalars["train/mean_q"]) and updated[-1] == 4
    assert all(v > 0 for v in scalars["loss/critic"].values())
    exploration = [scalars["train/exploration_scale"][e] for e in (1, 2, 3, 4)]
    assert exploration == sorted(exploration, reverse=True) and 0 < exploration[-1] < 1
    assert all(v > 0 for v in scalars["time/env_steps_per_second"].values())


@pytest.mark.parametrize("flags, expected", [
    (["--env", "CartPole-v1"], dict(k=2, tau=0.01, random_candidate=0.3)),
    (["--env", "Pendulum-v0"], dict(k=20000, tau=0.001, random_candidate=0.3)),
    (["--env", "CartPole-v1", "--k", "1", "--tau-update", "0.001", "--random-candidate", "0"],  # the reference
     dict(k=1, tau=0.001, random_candidate=0.0)),
    (["--env", "Pendulum-v0", "--max-actions", "15", "--tau-update", "0.02", "--random-candidate", "0.5"],
     dict(k=2, tau=0.02, random_candidate=0.5)),
])
def test_defaults_by_action_space_and_flags_that_override_them(flags, expected):
    import main
    args = main.parse_args(flags)
    setup = main.build(args)
    got = dict(k=setup.k, tau=setup.agent.cfg.tau, random_candidate=setup.agent.random_candidate)
    assert got == expected and (args.tau_update, args.random_candidate) == (expected["tau"], expected["random_candidate"])


def test_same_seed_same_returns(cartpole, tmp_path):
    _, first = cartpole
    assert run_main(*SHORT_CARTPOLE, "--output", tmp_path).returncode == 0
    again = metrics(tmp_path / "CartPole-v1-run1")
    assert [r["return"] for r in again] == [r["return"] for r in metrics(first)]
    assert [r["eval_return"] for r in again] == [r["eval_return"] for r in metrics(first)]


def test_pendulum_v0_maps_to_v1_and_trains(tmp_path):
    result = run_main("--env", "Pendulum-v0", "--max-actions", 101, "--max-episode", 2, "--max-episode-length", 30,
                      "--warmup", 10, "--eval-every", 0, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if "Pendulum-v1" in line] == \
        ["Pendulum-v0 is not in gymnasium; using Pendulum-v1 (same dynamics)"]
    run_dir = tmp_path / "Pendulum-v0-run1"
    assert [r["env_steps"] for r in metrics(run_dir)] == ["30", "60"]  # --max-episode-length cuts episodes
    assert_run_files(run_dir)


def test_best_evaluation_keeps_its_weights(cartpole):
    _, run_dir = cartpole
    first, last = [float(r["eval_return"]) for r in metrics(run_dir) if r["eval_return"]]
    best = run_dir / "best"
    assert sorted(p.name for p in best.iterdir()) == sorted(f"{name}.safetensors" for name in NETWORKS)
    # no update runs between the last evaluation and the final save: the same weights if and only if it was best
    assert ((best / "actor.safetensors").read_bytes() == (run_dir / "actor.safetensors").read_bytes()) == (last > first)


def test_test_mode_reloads_the_weights(cartpole):
    output, run_dir = cartpole
    before = snapshot(run_dir)
    result = run_main("--env", "CartPole-v1", "--mode", "test", "--load-model-dir", run_dir, "--test-episode", 2,
                      "--output", output)
    assert result.returncode == 0, result.stderr
    assert "return mean" in result.stdout and "std" in result.stdout
    test_dir = output / "CartPole-v1-run2"
    log = (test_dir / "RS_test_log").read_text().splitlines()
    assert len([line for line in log if line.startswith("Ep:")]) == 2
    assert snapshot(run_dir) == before


def test_continue_training_with_load(cartpole, tmp_path):
    _, run_dir = cartpole
    result = run_main(*SHORT_CARTPOLE, "--max-episode", 1, "--load", "--load-model-dir", run_dir, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert_run_files(tmp_path / "CartPole-v1-run1")


def corrupt(run_dir: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    damage(copy / "actor.safetensors")
    return copy


BAD_INPUTS = {
    "unknown env": lambda run, tmp: ["--env", "NoSuchEnv-v0"],
    "no actions": lambda run, tmp: ["--env", "Pendulum-v0", "--max-actions", 0],
    "k too large": lambda run, tmp: ["--env", "Pendulum-v0", "--max-actions", 11, "--k", 50],
    "unsupported action space": lambda run, tmp: ["--env", "tests.toy_envs:MultiDiscreteToy-v0"],
    "missing checkpoint folder": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test",
                                                   "--load-model-dir", tmp / "nowhere"],
    "missing checkpoint file": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                                 corrupt(run, tmp, Path.unlink)],
    "corrupt checkpoint": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                            corrupt(run, tmp, lambda p: p.write_bytes(b"\x07garbage" * 50))],
    "truncated checkpoint": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                              corrupt(run, tmp, lambda p: p.write_bytes(p.read_bytes()[:300]))],
    "checkpoint of another env": lambda run, tmp: ["--env", "Pendulum-v0", "--max-actions", 11, "--mode", "test",
                                                   "--load-model-dir", run],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_touches_nothing(case, cartpole, tmp_path):
    output, run_dir = cartpole
    before, runs_before = snapshot(run_dir), sorted(p.name for p in output.iterdir())
    result = run_main(*BAD_INPUTS[case](run_dir, tmp_path), "--output", output, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert snapshot(run_dir) == before and sorted(p.name for p in output.iterdir()) == runs_before


def test_unwritable_output_folder(tmp_path):
    (blocker := tmp_path / "a_file").write_text("not a folder")
    result = run_main("--env", "CartPole-v1", "--max-episode", 1, "--output", blocker / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_everything_and_exits_0(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "main.py", "--env", "CartPole-v1", "--max-episode", "100000",
                             "--warmup", "20", "--eval-every", "0", "--output", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv_path, deadline = tmp_path / "CartPole-v1-run1" / "metrics.csv", time.time() + 120
    while time.time() < deadline and not (csv_path.exists() and len(csv_path.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "saving" in stdout
    run_dir = tmp_path / "CartPole-v1-run1"
    log = (run_dir / "RS_train_log").read_text().splitlines()
    logged = len([line for line in log if line.startswith("Ep:")])
    assert logged >= 3 and log[-1] == f"### Model Saved before Ep:{logged + 1} ###"
    assert len(metrics(run_dir)) == logged
    assert_run_files(run_dir)


def test_plot_mode_compares_runs(cartpole, tmp_path):
    _, run_dir = cartpole
    other = shutil.copytree(run_dir, tmp_path / "CartPole-v1-run9")
    result = run_main("--mode", "plot", "--load-model-dir", run_dir, other, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
