"""End to end: main.py as a user runs it, in subprocesses, with real gymnasium, FLANN and tinygrad."""
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from util import read_tensors

ROOT = Path(__file__).resolve().parent.parent
SHORT_CARTPOLE = ["--env", "CartPole-v1", "--max-episode", "4", "--warmup", "20", "--save_per_epochs", "2", "--save-seconds", "0",
                  "--eval-every", "2", "--eval-episodes", "1", "--seed", "3"]
NETWORKS = ("actor", "critic", "actor_target", "critic_target")


def run_main(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} : (.*)")


def log_messages(path: Path) -> list[str]:
    """The messages of a log in the reference's format, `<asctime> : <message>`; fails on any other line."""
    lines = path.read_text().splitlines()
    matches = [LOG_LINE.fullmatch(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    return [m.group(1) for m in matches]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_run_files(run_dir: Path) -> None:
    arrays, state = read_tensors(run_dir / "checkpoint.safetensors")
    assert {f"{name}.fc1.weight" for name in NETWORKS} <= set(arrays) and state["episode"] == len(metrics(run_dir))
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
    lines = log_messages(run_dir / "RS_train_log")
    assert lines[0] == "env: CartPole-v1" and "seed: 3" in lines and "k_ratio: 0.1" in lines
    episodes = [line for line in lines if line.startswith("Ep:")]
    assert [e.split(" | ")[0] for e in episodes] == ["Ep:0", "Ep:1", "Ep:2", "Ep:3"]  # numbered from 0
    assert all(re.fullmatch(r"Ep:\d \| R:\d+\.0000", e) for e in episodes)  # CartPole's returns, 4 decimals
    assert lines.index("### Model Saved before Ep:2 ###") == lines.index(episodes[1]) + 2  # after Ep:1 and its eval
    assert lines[-1] == "### Model Saved before Ep:4 ###"
    assert [line.split(" | ")[0] for line in lines if line.startswith("Eval")] == ["Eval after Ep:1", "Eval after Ep:3"]
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
    (["--env", "CartPole-v1"], dict(k=2, tau=0.01, random_candidate=0.3, choice_pull=0.0, c_lr_end=1.0)),
    (["--env", "Pendulum-v0"], dict(k=20000, tau=0.001, random_candidate=0.3, choice_pull=0.0, c_lr_end=1.0)),
    (["--env", "CartPole-v1", "--k", "1", "--tau-update", "0.001", "--random-candidate", "0"],  # the reference
     dict(k=1, tau=0.001, random_candidate=0.0, choice_pull=0.0, c_lr_end=1.0)),
    (["--env", "Pendulum-v0", "--max-actions", "15", "--tau-update", "0.02", "--random-candidate", "0.5",
      "--choice-pull", "0.3"], dict(k=2, tau=0.02, random_candidate=0.5, choice_pull=0.3, c_lr_end=1.0)),
    (["--env", "Recommender-v0", "--env-kwargs", "n_items=300"],
     dict(k=30, tau=0.01, random_candidate=1.0, choice_pull=1.0, c_lr_end=0.1)),
    (["--env", "Recommender-v0", "--env-kwargs", "n_items=300", "--choice-pull", "0", "--random-candidate", "0.3",
      "--c-lr-end", "1"], dict(k=30, tau=0.01, random_candidate=0.3, choice_pull=0.0, c_lr_end=1.0)),
    (["--env", "Recommender-v0", "--env-kwargs", "n_items=300", "--k", "1"],  # random of one: the nearest item
     dict(k=1, tau=0.01, random_candidate=1.0, choice_pull=0.0, c_lr_end=0.1)),
    (["--env", "Configurator-v0", "--env-kwargs", "n_choices=6"],  # MultiBinary(6)
     dict(k=6, tau=0.001, random_candidate=0.3, choice_pull=1.0, c_lr_end=1.0)),
    (["--env", "Configurator-v0", "--env-kwargs", "n_choices=4", "levels=3"],  # MultiDiscrete([3, 3, 3, 3])
     dict(k=8, tau=0.001, random_candidate=0.3, choice_pull=0.0, c_lr_end=1.0)),
    (["--env", "Configurator-v0", "--env-kwargs", "n_choices=6", "--k", "1"],  # no choice to pull towards
     dict(k=1, tau=0.001, random_candidate=0.3, choice_pull=0.0, c_lr_end=1.0)),
])
def test_defaults_by_action_space_and_flags_that_override_them(flags, expected):
    import main
    args = main.parse_args(flags)
    setup = main.build(args)
    got = dict(k=setup.k, tau=setup.agent.cfg.tau, random_candidate=setup.agent.random_candidate,
               choice_pull=setup.agent.cfg.choice_pull, c_lr_end=setup.agent.cfg.c_lr_end)
    assert got == expected
    options = setup.options  # what the checkpoint records
    assert (options.tau_update, options.random_candidate, options.choice_pull, options.c_lr_end) == \
        (expected["tau"], expected["random_candidate"], expected["choice_pull"], expected["c_lr_end"])


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


def test_multibinary_env_trains_and_gets_its_own_action_format(tmp_path):
    """ContextToy asserts that each action it gets belongs to its MultiBinary space."""
    result = run_main("--env", "tests.toy_envs:ContextToy-binary6-v0", "--max-episode", 1, "--max-episode-length", 30,
                      "--warmup", 10, "--eval-every", 0, "--seed", 2, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "tests.toy_envs_ContextToy-binary6-v0-run1"
    assert [r["env_steps"] for r in metrics(run_dir)] == ["30"] and float(metrics(run_dir)[0]["return"]) > 0
    assert_run_files(run_dir)


def test_combinatorial_spaces_reach_the_env_in_its_format():
    import gymnasium as gym

    from action_space import action_set
    spaces = [gym.spaces.MultiDiscrete([[2, 3], [4, 1]], start=[[1, 0], [0, -2]]), gym.spaces.MultiBinary([2, 3]),
              gym.spaces.MultiDiscrete([7])]
    for act in spaces:
        space = action_set(act)
        ids = space.search(np.random.default_rng(0).uniform(-1, 1, (20, space.dim)), 3)
        assert space.n == np.prod(act.nvec if hasattr(act, "nvec") else np.full(act.shape, 2))
        assert all(act.contains(space.to_env(i)) for row in ids for i in row)


def test_default_k_is_capped_with_a_notice(capsys):
    import main
    from wolpertinger import DEFAULT_K_CAP
    setup = main.build(main.parse_args(["--env", "tests.toy_envs:ContextToy-binary20-v0"]))
    assert (setup.k, setup.space.n, setup.agent.cfg.tau) == (DEFAULT_K_CAP, 2 ** 20, 0.001)
    notice = [line for line in capsys.readouterr().out.splitlines() if "capped" in line]
    assert len(notice) == 1 and "104857" in notice[0]
    # not where 10% is below the cap, nor for a 1-d action set
    for env in ("tests.toy_envs:ContextToy-binary6-v0", "Pendulum-v0"):
        main.build(main.parse_args(["--env", env, "--max-actions", "400000"]))
        assert "capped" not in capsys.readouterr().out


@pytest.mark.parametrize("cores", ["two", "-1", "1.5"])
def test_a_bad_core_limit_is_one_line(monkeypatch, capsys, tmp_path, cores):
    import main
    monkeypatch.setenv("WOLPERTINGER_CORES", cores)
    assert main.main(["--env", "Configurator-v0", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: $WOLPERTINGER_CORES must be") and repr(cores) in err[0], err
    assert not (tmp_path / "out").exists()


def test_best_evaluation_keeps_its_weights(cartpole):
    _, run_dir = cartpole
    first, last = [float(r["eval_return"]) for r in metrics(run_dir) if r["eval_return"]]
    best = run_dir / "best"
    assert [p.name for p in best.iterdir()] == ["checkpoint.safetensors"]
    best_actor = read_tensors(best / "checkpoint.safetensors", ["actor.fc1.weight"])[0]["actor.fc1.weight"]
    final_actor = read_tensors(run_dir / "checkpoint.safetensors", ["actor.fc1.weight"])[0]["actor.fc1.weight"]
    # no update runs between the last evaluation and the final save: the same weights if and only if it was best
    assert np.array_equal(best_actor, final_actor) == (last > first)


def test_test_mode_reloads_the_weights(cartpole):
    output, run_dir = cartpole
    before = snapshot(run_dir)
    result = run_main("--env", "CartPole-v1", "--mode", "test", "--load-model-dir", run_dir, "--test-episode", 2,
                      "--output", output)
    assert result.returncode == 0, result.stderr
    assert "return mean" in result.stdout and "std" in result.stdout
    test_dir = output / "CartPole-v1-run2"
    log = log_messages(test_dir / "RS_test_log")
    assert [line.split(" | ")[0] for line in log if line.startswith("Ep:")] == ["Ep:0", "Ep:1"]
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("mode,weights,flags", [("test", "run", ["--k", 1]), ("test", "best", []),
                                               ("load", "best", ["--max-episode", 1])])
def test_loaded_weights_take_their_runs_settings_and_name_the_flags_that_differ(mode, weights, flags, cartpole,
                                                                                  tmp_path):
    """--mode test, and --load of best/ (weights only: the settings are its run's), load the agent trained."""
    _, run_dir = cartpole
    folder = run_dir if weights == "run" else run_dir / "best"
    how = ["--mode", "test", "--test-episode", 1] if mode == "test" else ["--load"]
    result = run_main(*how, "--load-model-dir", folder, "--output", tmp_path, *flags)
    assert result.returncode == 0, result.stderr
    log = log_messages(tmp_path / "CartPole-v1-run1" / f"RS_{mode.replace('load', 'train')}_log")
    assert "warmup: 20" in log and "seed: 3" in log and "save_per_epochs: 2" in log  # not the defaults
    k_given = "--k" in flags
    assert ("k: 1" in log) == k_given and ("k: None" in log) != k_given
    assert ("notice: --k 1 given; the run trained with its default" in result.stdout) == k_given


def test_continue_training_with_load(cartpole, tmp_path):
    _, run_dir = cartpole
    before = snapshot(run_dir)
    result = run_main("--load", "--load-model-dir", run_dir, "--max-episode", 6, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "CartPole-v1-run1"
    log = log_messages(resumed / "RS_train_log")
    assert log[:len(log_messages(run_dir / "RS_train_log"))] == log_messages(run_dir / "RS_train_log")
    assert f"### Resumed from {run_dir} before Ep:4 ###" in log and "max_episode: 6" in log
    assert [line.split(" | ")[0] for line in log if line.startswith("Ep:")] == [f"Ep:{i}" for i in range(6)]
    assert [r["episode"] for r in metrics(resumed)] == ["1", "2", "3", "4", "5", "6"]
    assert_run_files(resumed)
    assert snapshot(run_dir) == before


def corrupt(run_dir: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    damage(copy / "checkpoint.safetensors")
    return copy


BAD_INPUTS = {
    "unknown env": lambda run, tmp: ["--env", "NoSuchEnv-v0"],
    "no actions": lambda run, tmp: ["--env", "Pendulum-v0", "--max-actions", 0],
    "k too large": lambda run, tmp: ["--env", "Pendulum-v0", "--max-actions", 11, "--k", 50],
    "unsupported action space": lambda run, tmp: ["--env", "tests.toy_envs:TupleToy-v0"],
    "unknown device": lambda run, tmp: ["--env", "CartPole-v1", "--device", "NoSuchDevice"],
    "k beyond memory": lambda run, tmp: ["--env", "tests.toy_envs:ContextToy-binary40-v0", "--k", 10 ** 10],
    "FLANN on 2^40 actions": lambda run, tmp: ["--env", "tests.toy_envs:ContextToy-binary40-v0", "--knn", "flann"],
    "missing checkpoint folder": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test",
                                                   "--load-model-dir", tmp / "nowhere"],
    "missing checkpoint file": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                                 corrupt(run, tmp, Path.unlink)],
    "corrupt checkpoint": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                            corrupt(run, tmp, lambda p: p.write_bytes(b"\x07garbage" * 50))],
    "truncated checkpoint": lambda run, tmp: ["--env", "CartPole-v1", "--mode", "test", "--load-model-dir",
                                              corrupt(run, tmp, lambda p: p.write_bytes(p.read_bytes()[:300]))],
    "truncated checkpoint on resume": lambda run, tmp: ["--load", "--load-model-dir",
                                                        corrupt(run, tmp, lambda p: p.write_bytes(p.read_bytes()[:-99]))],
    "resume with another setting": lambda run, tmp: ["--load", "--load-model-dir", run, "--gamma", 0.5],
    "resume with nothing to do": lambda run, tmp: ["--load", "--load-model-dir", run, "--max-episode", 4],
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


def test_a_missing_clang_is_one_line(tmp_path):
    """The grid k-NN compiles grid_knn.c on first use (into the cache folder): without clang, a one-line error."""
    environment = {**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "main.py", "--env", "Configurator-v0", "--max-episode", "1", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "clang" in lines[0], result.stderr


def test_a_named_device_trains(tmp_path):
    result = run_main("--env", "CartPole-v1", "--max-episode", 1, "--warmup", 5, "--device", "cpu", "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "CartPole-v1-run1" / "checkpoint.safetensors").exists()


def test_unwritable_output_folder(tmp_path):
    (blocker := tmp_path / "a_file").write_text("not a folder")
    result = run_main("--env", "CartPole-v1", "--max-episode", 1, "--output", blocker / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def start_main(*args) -> subprocess.Popen:
    """main.py in its own process group, so that a signal can go to the whole group as `timeout` sends it."""
    return subprocess.Popen([sys.executable, "main.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_a_random_moment_saves_everything_and_exits_0(sig, tmp_path):
    delay = random.uniform(0.5, 8.0)  # from the imports, through the first compiles, into training
    proc = start_main("--env", "CartPole-v1", "--max-episode", 100000, "--warmup", 20, "--eval-every", 3,
                      "--eval-episodes", 1, "--output", tmp_path)
    time.sleep(delay)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, (delay, stderr)
    run_dir = tmp_path / "CartPole-v1-run1"
    if "stopped during set-up" in stdout:
        assert not run_dir.exists()
        return
    assert "saving" in stdout
    log = log_messages(run_dir / "RS_train_log")
    logged = len([line for line in log if line.startswith("Ep:")])
    assert log[-1] == f"### Model Saved before Ep:{logged} ###" and len(metrics(run_dir)) == logged
    assert_run_files(run_dir)


def test_a_second_signal_exits_at_once(tmp_path):
    proc = start_main("--env", "CartPole-v1", "--max-episode", 100000, "--output", tmp_path)
    log, deadline = tmp_path / "CartPole-v1-run1" / "RS_train_log", time.time() + 120
    while time.time() < deadline and not (log.exists() and "Ep:0 |" in log.read_text()):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # the first is saving (the plot alone takes longer than the pause)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=2)
    assert proc.returncode == 128 + signal.SIGINT


def test_plot_mode_compares_runs(cartpole, tmp_path):
    _, run_dir = cartpole
    other = shutil.copytree(run_dir, tmp_path / "CartPole-v1-run9")
    result = run_main("--mode", "plot", "--load-model-dir", run_dir, other, "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def invalid_values(valid, is_float: bool) -> list:
    """Values just outside a range (and non-finite ones for a float flag)."""
    values = [] if valid.low is None else [valid.low if valid.low_open else valid.low - (0.5 if is_float else 1)]
    if valid.high is not None:
        values.append(valid.high + (0.5 if is_float else 1))
    return values + (["nan", "inf", "-inf"] if is_float else [])


def test_every_numeric_flag_is_checked_before_a_run_folder_is_made(tmp_path, capsys):
    import main
    numeric = {a.dest: a for a in main.build_parser()._actions if a.type in (int, float)}
    assert set(main.RANGES) == set(numeric)  # a new numeric flag needs its range
    tried = 0
    for dest, action in numeric.items():
        for value in invalid_values(main.RANGES[dest], action.type is float):
            code = main.main([f"{action.option_strings[0]}={value}", "--output", str(tmp_path / "out")])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {action.option_strings[0]} must be"), \
                (dest, value, err)
            tried += 1
    assert tried >= 2 * len(numeric) and not (tmp_path / "out").exists()
    assert main.validate(main.parse_args([])) is None  # every default is valid


FINALISER_STOP = """
import gc, os, signal, main
stop = main.StopRequest()
class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
with stop.interruptible():
    Finalised()
    gc.collect()
stop.restore()
print("requested", stop.requested)
"""


def test_a_stop_that_lands_in_a_finaliser_prints_no_traceback():
    """Python swallows an exception raised while a __del__ runs (tinygrad's buffers have them) and prints it;
    the stop is then taken at the next check, with nothing printed but the stop's own line. In a process of its
    own: pytest catches such exceptions itself."""
    result = subprocess.run([sys.executable, "-c", FINALISER_STOP], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "requested True"
    assert "SIGINT: stopping and saving" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
