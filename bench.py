"""Speed benchmark: env steps per second, one update per step included, fast path against plain path.

    python bench.py                  # prints a table, writes bench_results.json
    python bench.py --steps 500 --out results.json

For each configuration both paths run the same training loop (main.run_episode with the default
replay memory), alternating in one process so that a busy machine slows both alike:
- fast: exact lattice k-NN (for 1-d actions inside the compiled graph, scoring only the window's
  ends and the critic's kinks) and the factored critic;
- plain: the reference's way, FLANN kd-tree search and the whole critic run on every candidate row.
Timing starts after warm-up (random steps and the graphs' compilation). Peak resident memory is the
process's high-water mark, reset before each measurement.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from main import build, parse_args, run_episode
from memory import ReplayMemory

CONFIGS = {
    "CartPole-v1": ["--env", "CartPole-v1"],
    "Pendulum-v0, 200000 actions, k=2000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "2000"],
    "Pendulum-v0, 200000 actions, k=20000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "20000"],
}
PATHS = {"fast": [], "plain": ["--knn", "flann", "--scoring", "full"]}
PLAIN_STEPS = {"CartPole-v1": 200, "Pendulum-v0, 200000 actions, k=2000": 20, "Pendulum-v0, 200000 actions, k=20000": 3}


def reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the VmHWM high-water mark


def peak_memory_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def play(setup, memory: ReplayMemory, warmup: int, steps: int, step: int) -> int:
    """Train for `steps` env steps (episodes cut where the budget ends); returns the total step count."""
    target = step + steps
    while step < target:
        _, step = run_episode(setup, setup.env, True, target - step, None, memory, warmup, step)
    return step


def measure(argv: list[str], steps: int) -> dict:
    args = parse_args(argv + ["--seed", "1"])
    setup = build(args)
    memory = ReplayMemory(args.rmsize, setup.agent.state_dim, setup.agent.action_dim)
    step = play(setup, memory, args.warmup, args.warmup + 3, 0)  # random steps, then compile the graphs
    reset_peak_memory()
    start = time.perf_counter()
    play(setup, memory, args.warmup, steps, step)
    seconds = (time.perf_counter() - start) / steps
    return {"ms_per_step": 1e3 * seconds, "steps_per_second": 1 / seconds, "peak_rss_mb": peak_memory_mb(),
            "steps_timed": steps, "k": setup.k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="timed env steps of the fast path per configuration")
    p.add_argument("--out", default="bench_results.json")
    opts = p.parse_args()
    from tinygrad import Device
    results = {"machine": f"{platform.processor() or platform.machine()}, {Device.DEFAULT}", "configs": {}}
    for name, argv in CONFIGS.items():
        row = {path: measure(argv + extra, opts.steps if path == "fast" else PLAIN_STEPS[name])
               for path, extra in PATHS.items()}
        row["speedup"] = row["plain"]["ms_per_step"] / row["fast"]["ms_per_step"]
        results["configs"][name] = row
        print(f"{name}: fast {row['fast']['ms_per_step']:.2f} ms/step, plain {row['plain']['ms_per_step']:.1f} "
              f"ms/step, {row['speedup']:.0f}x", flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"\n| configuration | fast ms/step | plain ms/step | speed-up | fast peak RSS MB | plain peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, row in results["configs"].items():
        print(f"| {name} | {row['fast']['ms_per_step']:.2f} | {row['plain']['ms_per_step']:.1f} | "
              f"{row['speedup']:.0f}x | {row['fast']['peak_rss_mb']:.0f} | {row['plain']['peak_rss_mb']:.0f} |")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
