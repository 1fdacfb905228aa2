"""Stop, crash, resume: checkpoints are whole or absent, and a stopped seeded run continues exactly."""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from soak import returns, state_differences
from util import read_tensors

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys, numpy as np
from pathlib import Path
from util import save_tensors
path, generation = Path(sys.argv[1]), 0
while True:
    generation += 1
    save_tensors(path, {"a": np.full(1_000_000, generation, np.float32), "b": np.full(7, generation, np.int64)},
                 {"generation": generation})
"""


def test_a_checkpoint_is_whole_or_absent_whatever_moment_kill_9_lands(tmp_path):
    path, landed_mid_write = tmp_path / "checkpoint.safetensors", 0
    for _ in range(12):
        path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT)
        while not path.exists():  # the first write is whole
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        landed_mid_write += (tmp_path / ".checkpoint.safetensors.tmp").exists()
        arrays, meta = read_tensors(path)
        assert (arrays["a"] == meta["generation"]).all() and (arrays["b"] == meta["generation"]).all()
    assert landed_mid_write > 0  # the kills did hit writes in progress


def main_in_process(*args) -> int:
    import main
    return main.main([str(a) for a in args])


def wait_for_line(log: Path, text: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {log}")


def check_resume_is_exact(flags: list, tmp_path: Path, crash) -> None:
    """Crash a run that `crash(flags, output)` starts and stops, resume it from its checkpoint for two more
    episodes, and compare with the same run never stopped: the same returns, the same training state."""
    crashed = tmp_path / "crashed"
    crash([*map(str, flags), "--max-episode", "1000", "--output", str(crashed)], crashed)
    parent = next(crashed.iterdir())
    total = read_tensors(parent / "checkpoint.safetensors", [])[1]["episode"] + 2
    assert main_in_process("--load", "--load-model-dir", parent, "--max-episode", total, "--output", crashed) == 0
    resumed = crashed / parent.name.replace("run1", "run2")
    assert main_in_process(*flags, "--max-episode", total, "--output", tmp_path / "whole") == 0
    whole = next((tmp_path / "whole").iterdir())
    assert len(returns(whole)) == total and returns(resumed) == returns(whole)
    assert state_differences(resumed, whole) == []


def test_cartpole_killed_9_just_after_a_save_resumes_exactly(tmp_path):
    def kill_9_after_the_second_save(args, out):
        proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_line(out / "CartPole-v1-run1" / "RS_train_log", "### Model Saved before Ep:2 ###", proc)
        proc.kill()
        proc.wait()

    check_resume_is_exact(["--env", "CartPole-v1", "--warmup", 20, "--save_per_epochs", 1, "--save-seconds", 0, "--eval-every", 2,
                           "--eval-episodes", 1, "--seed", 4], tmp_path, kill_9_after_the_second_save)


def test_pendulum_stopped_by_sigterm_resumes_exactly(tmp_path):
    def sigterm_during_episode_2(args, out):  # in this process: its handler is main's while main runs
        log = out / "Pendulum-v0-run1" / "RS_train_log"
        sender = threading.Thread(target=lambda: (wait_for_line(log, "Ep:1 |"), os.kill(os.getpid(), signal.SIGTERM)))
        sender.start()
        assert main_in_process(*args) == 0
        sender.join()

    check_resume_is_exact(["--env", "Pendulum-v0", "--max-actions", 101, "--max-episode-length", 40, "--warmup", 10,
                           "--save_per_epochs", 50, "--save-seconds", 0, "--eval-every", 2, "--eval-episodes", 1, "--seed", 5], tmp_path,
                          sigterm_during_episode_2)


def test_an_older_checkpoint_of_four_files_loads_weights_only_with_a_notice(tmp_path, capsys):
    import main
    from util import save_tensors
    setup = main.build(main.parse_args(["--env", "CartPole-v1", "--seed", "8"]))
    old = tmp_path / "old"
    old.mkdir()
    for name, net in setup.agent.networks().items():
        save_tensors(old / f"{name}.safetensors", net.state_dict())
    assert main_in_process("--env", "CartPole-v1", "--load", "--load-model-dir", old, "--max-episode", 1,
                           "--save_per_epochs", 1, "--save-seconds", 0, "--output", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert f"notice: {old} holds weights only" in out
    (run_dir,) = (tmp_path / "out").iterdir()
    arrays, state = read_tensors(run_dir / "checkpoint.safetensors")
    assert state["episode"] == 1 and len(returns(run_dir)) == 1  # counters start afresh
    # one CartPole episode stays within the warm-up, so no update has changed the loaded weights
    saved = setup.agent.actor.state_dict()
    assert all(np.array_equal(arrays[f"actor.{name}"], value) for name, value in saved.items())


DIVERGING = ["--env", "CartPole-v1", "--c-lr", 1e12, "--warmup", 60, "--save_per_epochs", 1, "--save-seconds", 0, "--eval-every", 1,
             "--eval-episodes", 1, "--seed", 2, "--max-episode", 50]


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    """--c-lr 1e12: the first updates (after a 60-step warm-up, so a few episodes in) blow the networks up."""
    import main
    assert main_in_process(*DIVERGING, "--output", tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = tmp_path / "CartPole-v1-run1"
    arrays, state = read_tensors(run_dir / "checkpoint.safetensors")
    assert len(err) == 1 and err[0].startswith(f"error: training diverged in Ep:{state['episode']}: the ") and \
        err[0].endswith(f"checkpoint: {run_dir / 'checkpoint.safetensors'} (before Ep:{state['episode']}); best/ untouched")
    assert state["episode"] >= 2 and all(np.isfinite(a).all() for a in arrays.values())
    best, _ = read_tensors(run_dir / "best" / "checkpoint.safetensors")
    assert all(np.isfinite(a).all() for a in best.values())
    assert main.main(["--load", "--load-model-dir", str(run_dir), "--c-lr", "1e-3"]) == 2  # a resume keeps c-lr


def test_an_env_that_returns_nan_stops_training_with_one_line(tmp_path, capsys):
    assert main_in_process("--env", "tests.toy_envs:NaNAfterToy-v0", "--warmup", 20, "--save_per_epochs", 2, "--save-seconds", 0,
                           "--eval-every", 0, "--max-episode", 10, "--output", tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: training diverged in Ep:4: the env returned a non-finite observation; last complete "
                   f"checkpoint: {tmp_path / 'tests.toy_envs_NaNAfterToy-v0-run1' / 'checkpoint.safetensors'} (before Ep:4)"]


CARTPOLE = ["--env", "CartPole-v1", "--warmup", 20, "--save_per_epochs", 1, "--save-seconds", 0, "--eval-every", 0, "--seed", 6]


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    assert main_in_process(*CARTPOLE, "--max-episode", 1, "--output", tmp_path / "probe") == 0
    size = (tmp_path / "probe" / "CartPole-v1-run1" / "checkpoint.safetensors").stat().st_size
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, limit[1]))  # room for a few transitions more, no episode
    try:
        code = main_in_process(*CARTPOLE, "--max-episode", 50, "--output", tmp_path / "full")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    run_dir = tmp_path / "full" / "CartPole-v1-run1"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"error: cannot write to {run_dir}: File too large; last complete checkpoint: "
                                 f"{run_dir / 'checkpoint.safetensors'} (before Ep:1)"]
    assert read_tensors(run_dir / "checkpoint.safetensors", [])[1]["episode"] == 1
    left = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.out.tfevents"))
    assert left == ["RS_train_log", "checkpoint.safetensors", "metrics.csv", "reward_curve.png"]  # no temporary file


def test_a_removed_run_folder_stops_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "CartPole-v1-run1"

    def remove_after_the_second_save():
        wait_for_line(run_dir / "RS_train_log", "### Model Saved before Ep:2 ###")
        while run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)

    thread = threading.Thread(target=remove_after_the_second_save)
    thread.start()
    assert main_in_process(*CARTPOLE, "--max-episode", 100000, "--output", tmp_path) == 1
    thread.join()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write to {run_dir}: No such file or directory"), err
    assert not run_dir.exists()


def test_no_save_memory_leaves_the_memory_out_and_still_resumes(tmp_path):
    assert main_in_process(*CARTPOLE, "--no-save-memory", "--max-episode", 2, "--output", tmp_path) == 0
    parent = tmp_path / "CartPole-v1-run1"
    arrays, state = read_tensors(parent / "checkpoint.safetensors")
    assert state["memory"] is None and not [name for name in arrays if name.startswith("memory.")]
    assert main_in_process("--load", "--load-model-dir", parent, "--max-episode", 3, "--output", tmp_path) == 0
    assert len(returns(tmp_path / "CartPole-v1-run2")) == 3
