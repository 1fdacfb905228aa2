"""Stop-and-resume soak: stop a seeded training run at random moments, many times, and check that resuming
from whatever checkpoint each stop left ends exactly where the run never stopped ends.

    python soak.py [--stops 30] [--episodes 12] [--seed 1]

Each stop is one of: SIGINT or SIGTERM to the whole process group at a random moment (the run must save and
exit 0 within a few seconds), kill -9 at a random moment, or kill -9 while a checkpoint is being written.
After each stop the newest run folder is resumed with --load (a stop before the first save starts afresh).
A chain that reaches the last episode is compared with an uninterrupted run (returns and final checkpoint),
and so is the last chain, once resumed to the end without a stop.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from util import read_tensors

FLAGS = ["--env", "CartPole-v1", "--warmup", "20", "--save_per_epochs", "1", "--save-seconds", "0", "--eval-every", "3",
         "--eval-episodes", "1"]
KINDS = ("SIGINT", "SIGTERM", "kill -9", "kill -9 during a save")


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def newest_run(output: Path, with_checkpoint: bool = False) -> Path | None:
    runs = sorted(output.glob("*-run*"), key=lambda p: int(p.name.rsplit("run", 1)[1]))
    if with_checkpoint:
        runs = [run for run in runs if (run / "checkpoint.safetensors").exists()]
    return runs[-1] if runs else None


def returns(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row["return"] for row in csv.DictReader(f)]


def state_differences(a: Path, b: Path) -> list[str]:
    """Names of the arrays and scalars in which two runs' checkpoints differ, wall time and arguments aside."""
    arrays_a, scalars_a = read_tensors(a / "checkpoint.safetensors")
    arrays_b, scalars_b = read_tensors(b / "checkpoint.safetensors")
    arrays = sorted(set(arrays_a) ^ set(arrays_b)) + \
        [name for name in arrays_a if name in arrays_b and not np.array_equal(arrays_a[name], arrays_b[name])]
    return arrays + [k for k in scalars_a if k not in ("wall_seconds", "args") and scalars_a[k] != scalars_b.get(k)]


def stop_once(proc: subprocess.Popen, kind: str, output: Path, rng: random.Random) -> dict:
    """Stop `proc` as `kind` says; returns what happened."""
    if kind == "kill -9 during a save":
        time.sleep(rng.uniform(0.0, 8.0))  # some saves pass first
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            run = newest_run(output)
            if run is not None and (run / ".checkpoint.safetensors.tmp").exists():
                break
            time.sleep(0.0005)
        during_save = run is not None and (run / ".checkpoint.safetensors.tmp").exists()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"during_save": during_save}
    time.sleep(rng.uniform(0.5, 20.0))  # from the imports, through the first compiles, into training
    if proc.poll() is not None:
        return {"finished_first": True, "rc": proc.returncode}
    if kind == "kill -9":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {}
    sent = time.time()
    os.killpg(proc.pid, getattr(signal, kind))
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return {"hung": True}
    return {"rc": proc.returncode, "exit_s": round(time.time() - sent, 2), "stderr": proc.stderr.read()[-300:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stops", type=int, default=30)
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    opts = p.parse_args()
    rng = random.Random(opts.seed)
    run_flags = [*FLAGS, "--seed", str(opts.seed), "--max-episode", str(opts.episodes)]
    with tempfile.TemporaryDirectory() as tmp:
        whole_out, chain_out = Path(tmp) / "whole", Path(tmp) / "chain"
        assert subprocess.run([sys.executable, "main.py", *run_flags, "--output", str(whole_out)],
                              capture_output=True).returncode == 0
        whole = newest_run(whole_out)
        events, chains = [], []
        stops = 0
        while stops < opts.stops:
            parent = newest_run(chain_out, with_checkpoint=True)
            checkpoint = parent is not None
            if checkpoint and read_tensors(parent / "checkpoint.safetensors", [])[1]["episode"] >= opts.episodes:
                chains.append({"returns_equal": returns(parent) == returns(whole), "state_equal": not state_differences(parent, whole),
                               "folders": len(list(chain_out.iterdir()))})
                print(json.dumps(chains[-1]), flush=True)
                chain_out = Path(tmp) / f"chain{len(chains)}"
                continue
            args = ["--load", "--load-model-dir", str(parent), "--output", str(chain_out)] if checkpoint else \
                [*run_flags, "--output", str(chain_out)]
            kind = rng.choice(KINDS)
            event = {"kind": kind, "resumed_from": read_tensors(parent / "checkpoint.safetensors", [])[1]["episode"]
                     if checkpoint else None, **stop_once(start(args), kind, chain_out, rng)}
            stops += 1
            events.append(event)
            print(json.dumps(event), flush=True)
        parent = newest_run(chain_out, with_checkpoint=True)
        if parent is not None:  # resume the open chain to its end, unstopped, and compare it too
            subprocess.run([sys.executable, "main.py", "--load", "--load-model-dir", str(parent), "--output",
                            str(chain_out)], capture_output=True)
            last = newest_run(chain_out, with_checkpoint=True)
            chains.append({"returns_equal": returns(last) == returns(whole), "state_equal": not state_differences(last, whole),
                           "folders": len(list(chain_out.iterdir()))})
            print(json.dumps(chains[-1]), flush=True)
        summary = {"stops": len(events), "by_kind": {k: sum(e["kind"] == k for e in events) for k in KINDS},
                   "kills_during_save": sum(bool(e.get("during_save")) for e in events),
                   "signals_exit_0": sum(e.get("rc") == 0 for e in events if e["kind"].startswith("SIG")),
                   "hung": sum(bool(e.get("hung")) for e in events),
                   "max_exit_s": max([e["exit_s"] for e in events if "exit_s" in e], default=None),
                   "resumes": sum(e["resumed_from"] is not None for e in events),
                   "chains_completed": len(chains), "chains_exact": sum(c["returns_equal"] and c["state_equal"]
                                                                        for c in chains)}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
