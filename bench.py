"""Benchmarks: speed (env steps per second) and learning (reward curves across seeds).

    python bench.py                  # speed: prints a table, writes bench_results.json
    python bench.py speed --steps 500 --out results.json
    python bench.py learn --env CartPole-v1 --episodes 300 --seeds 5   # learning: see `learn`
    python bench.py learn --env Pendulum-v0 --episodes 200 -- --max-actions 200000
    python bench.py knn              # k-NN over 1M embedded items: recall against exact search, ms, index files

Speed:
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
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from main import build, parse_args, run_episode  # first: it sets runtime options that numpy reads on import

import numpy as np  # noqa: E402
from memory import ReplayMemory
from util import env_folder_name, plot_seed_band, read_metrics

CONFIGS = {
    "CartPole-v1": ["--env", "CartPole-v1"],
    "Pendulum-v0, 200000 actions, k=2000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "2000"],
    "Pendulum-v0, 200000 actions, k=20000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "20000"],
    # 1,000,000 items with clustered 16-d embeddings; fast: --knn auto (IVF), plain: FLANN and the full critic
    "1M embedded items, k=1000": ["--env", "tests.toy_envs:EmbeddedItems1M-v0", "--k", "1000"],
}
PATHS = {"fast": [], "plain": ["--knn", "flann", "--scoring", "full"]}
PLAIN_STEPS = {"CartPole-v1": 200, "Pendulum-v0, 200000 actions, k=2000": 20, "Pendulum-v0, 200000 actions, k=20000": 3,
               "1M embedded items, k=1000": 3}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


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
    """Milliseconds per env step (update included) after warm-up, and peak resident memory."""
    from tinygrad.helpers import Context
    with Context(BEAM=0):  # restores the search width that a --beam in argv sets
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


def speed(opts: argparse.Namespace) -> None:
    from tinygrad import Device
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, tinygrad {Device.DEFAULT}", "fast_path_beam": opts.beam,
               "configs": {}}
    for name, argv in CONFIGS.items():
        beam = ["--beam", str(opts.beam)] if opts.beam else []
        row = {path: measure(argv + extra + (beam if path == "fast" else []),
                             opts.steps if path == "fast" else PLAIN_STEPS[name]) for path, extra in PATHS.items()}
        row["speedup"] = row["plain"]["ms_per_step"] / row["fast"]["ms_per_step"]
        results["configs"][name] = row
        print(f"{name}: fast {row['fast']['ms_per_step']:.2f} ms/step, plain {row['plain']['ms_per_step']:.1f} "
              f"ms/step, {row['speedup']:.0f}x", flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print("\n| configuration | fast ms/step | plain ms/step | speed-up | fast peak RSS MB | plain peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, row in results["configs"].items():
        print(f"| {name} | {row['fast']['ms_per_step']:.2f} | {row['plain']['ms_per_step']:.1f} | "
              f"{row['speedup']:.0f}x | {row['fast']['peak_rss_mb']:.0f} | {row['plain']['peak_rss_mb']:.0f} |")
    print(f"\nwrote {opts.out}")


# Learning: the reference's published bucket means (first episode, last episode, mean return)
REFERENCE_CURVES = {
    "Pendulum-v0": [(1, 100, -900.0), (101, 200, -278.0), (201, 300, -137.0), (800, 1000, -100.0)],
    "CartPole-v1": [(1, 400, 12.0), (548, 548, 500.0)],
}


def run_main(argv: list[str], output: Path) -> Path:
    """Run main.py in its own process with `--output output`; returns the run folder it made."""
    before = set(output.glob("*-run*"))
    # HCQ2's host thread spin-waits for the kernels, taking a core that a parallel seed needs (roughly, 4 runs on
    # 2 cores: 22.6 ms per Pendulum step with it, 18.4 without); the numbers computed are the same
    env = {**os.environ, "HCQ2": os.environ.get("HCQ2", "0")}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("main.py")), *argv, "--output", str(output)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    return (set(output.glob("*-run*")) - before).pop()


def train_and_test_seed(job: tuple[list[str], Path, int]) -> tuple[Path, Path | None]:
    """Train one seed, then (test_episodes > 0) play its final weights without noise; returns both run folders."""
    argv, output, test_episodes = job
    train_run = run_main(argv, output)
    if test_episodes <= 0:
        return train_run, None
    return train_run, run_main([*argv, "--mode", "test", "--load-model-dir", str(train_run),
                                "--test-episode", str(test_episodes)], output)


def window_mean(values: np.ndarray, first: int, last: int) -> float:
    return float(np.mean(values[first - 1:last])) if len(values) >= last else float("nan")


def learn(opts: argparse.Namespace) -> None:
    """Train --seeds seeds in parallel processes, each then tested with its final weights (--test-episodes);
    write per-seed runs, summary.json and learning_curve.png."""
    out = Path(opts.out or f"bench_learn/{env_folder_name(opts.env)}")
    seeds = list(range(1, opts.seeds + 1))
    jobs = [(["--env", opts.env, "--max-episode", str(opts.episodes), "--seed", str(s), *opts.main_flags],
             out / f"seed{s}", opts.test_episodes) for s in seeds]
    start = time.time()
    if opts.summarize:  # run1: the training; run2, where present: the test of its final weights
        runs = [(folder / f"{env_folder_name(opts.env)}-run1", folder / f"{env_folder_name(opts.env)}-run2")
                for _, folder, _ in jobs]
        runs = [(train, test if test.is_dir() else None) for train, test in runs]
    else:
        for _, folder, _ in jobs:
            if folder.exists():
                raise SystemExit(f"error: {folder} exists; choose another --out (or --summarize it)")
            folder.mkdir(parents=True)
        with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
            runs = list(pool.map(train_and_test_seed, jobs))
    per_seed = {s: read_metrics(train / "metrics.csv") for s, (train, _) in zip(seeds, runs)}
    returns = np.array([m["return"] for m in per_seed.values()])
    evals = np.array([m["eval_return"] for m in per_seed.values()])
    evaluated = ~np.isnan(evals[0])
    episodes = per_seed[seeds[0]]["episode"]
    summary = {"env": opts.env, "episodes": opts.episodes, "seeds": seeds, "main_flags": opts.main_flags,
               "per_seed": {}}
    if not opts.summarize:
        summary["wall_seconds_total"] = time.time() - start
    for s, m in per_seed.items():
        ev, (train, test) = m["eval_return"], runs[seeds.index(s)]
        test_returns = read_metrics(test / "metrics.csv")["return"] if test else np.array([])
        summary["per_seed"][s] = {
            "run": str(train), "wall_seconds": float(m["wall_seconds"][-1]),
            "mean_return_1_100": window_mean(m["return"], 1, 100),
            "mean_return_101_200": window_mean(m["return"], 101, 200),
            "final_eval": float(ev[~np.isnan(ev)][-1]) if (~np.isnan(ev)).any() else None,
            "best_eval": float(np.nanmax(ev)) if (~np.isnan(ev)).any() else None,
            "first_eval_at_least_475": next((int(e) for e, v in zip(m["episode"], ev) if v >= 475), None),
            "first_return_500": next((int(e) for e, r in zip(m["episode"], m["return"]) if r >= 500), None),
            "final_weights_test_episodes": len(test_returns),
            "final_weights_test_mean": float(np.mean(test_returns)) if test else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_seed_band(episodes, returns, episodes[evaluated], evals[:, evaluated].mean(0),
                   REFERENCE_CURVES.get(opts.env, []), out / "learning_curve.png",
                   f"{' '.join([opts.env, *opts.main_flags])}: {len(seeds)} seeds")
    print(json.dumps(summary["per_seed"], indent=1))
    print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'}")


def knn(opts: argparse.Namespace) -> None:
    """k-NN over --items 16-d embeddings (clustered as the 1M toy env's, and uniform in [-1, 1]^16), 64 queries
    (items plus noise), k = 1000: ms per search and recall@k against exact search; index build, save, reload."""
    import tempfile

    from action_space import EmbeddingActionSpace
    from tests.toy_envs import EmbeddedItemsToy
    rng = np.random.default_rng(0)
    sets = {"clustered": EmbeddedItemsToy(opts.items, 16, clusters=1000).action_embeddings,
            "uniform": rng.uniform(-1, 1, (opts.items, 16)).astype(np.float32)}
    results = {"machine": cpu_model(), "items": opts.items, "k": 1000, "queries": 64, "sets": {}}

    def timed(f, repeats=1):
        start = time.perf_counter()
        for _ in range(repeats):
            out = f()
        return out, 1e3 * (time.perf_counter() - start) / repeats

    for name, embeddings in sets.items():
        exact = EmbeddingActionSpace(embeddings, knn="exact")
        queries = np.clip(exact.vectors[rng.integers(0, opts.items, 64)] + rng.normal(0, 0.05, (64, 16)), -1, 1)
        truth, exact_ms = timed(lambda: exact.search(queries, 1000))
        rows = {"exact": {"ms": exact_ms, "recall": 1.0}}
        for method, knob, values in (("ivf", "ivf_probes", (3, 4, 8, 16, 32, 64)),
                                     ("flann", "flann_checks", (0, 40000))):
            space = EmbeddingActionSpace(embeddings, knn=method)
            _, build_ms = timed(space.index)
            with tempfile.TemporaryDirectory() as folder:
                _, save_ms = timed(lambda: space.save_index(Path(folder)))
                again = EmbeddingActionSpace(embeddings, knn=method)
                _, reload_ms = timed(lambda: again.load_index(Path(folder)))
            rows[f"{method} index"] = {"build_s": build_ms / 1e3, "save_s": save_ms / 1e3, "reload_s": reload_ms / 1e3}
            for value in values:
                setattr(again, knob, value)
                again.search(queries, 1000)
                found, ms = timed(lambda: again.search(queries, 1000), 3)
                recall = np.mean([len(set(a) & set(b)) / 1000 for a, b in zip(found, truth)])
                rows[f"{method} {knob}={value}"] = {"ms": ms, "recall": float(recall)}
                print(f"{name}: {method} {knob}={value}: {ms:.1f} ms, recall {recall:.3f}", flush=True)
        results["sets"][name] = rows
        print(json.dumps(rows, indent=1), flush=True)
    results["training"] = {probes: training_search(["--env", "tests.toy_envs:EmbeddedItems1M-v0", "--k", "1000",
                                                    "--ivf-probes", str(probes)], opts.steps)
                           for probes in (8, 32)}
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


def training_search(argv: list[str], steps: int) -> dict:
    """Train for 2 x `steps` env steps, timing the second half; then recall@k against exact search of the
    target actions' search (the target actor's proto-actions of 5 fresh minibatches)."""
    from ddpg import read, write
    args = parse_args(argv + ["--seed", "1"])
    setup = build(args)
    memory = ReplayMemory(args.rmsize, setup.agent.state_dim, setup.agent.action_dim)
    step = play(setup, memory, args.warmup, args.warmup + steps, 0)
    start = time.perf_counter()
    play(setup, memory, args.warmup, steps, step)
    ms = 1e3 * (time.perf_counter() - start) / steps
    agent, space, recalls = setup.agent, setup.space, []
    for _ in range(5):
        write(agent.batch[3], memory.sample(args.bsize, agent.rng)[3])
        protos = read(agent._target_proto(agent.batch[3]))
        found, truth = space.search(protos, setup.k), space.exact_search(np.clip(protos, -1, 1), setup.k)
        recalls += [len(set(a) & set(b)) / setup.k for a, b in zip(found, truth)]
    row = {"flags": argv, "ms_per_step": ms, "steps_timed": steps, "target_search_recall": float(np.mean(recalls))}
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    sp = sub.add_parser("speed", help="env steps per second, fast against plain path (the default)")
    for parser in (p, sp):
        parser.add_argument("--steps", type=int, default=400, help="timed env steps of the fast path per config")
        parser.add_argument("--out", default="bench_results.json")
        parser.add_argument("--beam", type=int, default=0, help="BEAM width for the fast path (see main.py --beam)")
    lp = sub.add_parser("learn", help="reward curves of several seeds trained in parallel")
    lp.add_argument("--env", default="CartPole-v1")
    lp.add_argument("--episodes", type=int, default=300)
    lp.add_argument("--seeds", type=int, default=5)
    lp.add_argument("--out", default=None, help="folder for the runs and the summary (default bench_learn/<env>)")
    lp.add_argument("--test-episodes", type=int, default=100,
                    help="noise-free episodes played with each seed's final weights after training (0: none)")
    lp.add_argument("--summarize", action="store_true", help="skip training: summarise the runs already in --out")
    lp.add_argument("main_flags", nargs="*", help="after --: further main.py flags, e.g. -- --max-actions 200000")
    kp = sub.add_parser("knn", help="k-NN methods over 1M embedded items: speed, recall, index build and reload")
    kp.add_argument("--items", type=int, default=1_000_000)
    kp.add_argument("--out", default="bench_knn.json")
    kp.add_argument("--steps", type=int, default=300, help="timed env steps of the training rows (after as many)")
    opts = p.parse_args()
    {"learn": learn, "knn": knn}.get(opts.command, speed)(opts)


if __name__ == "__main__":
    main()
