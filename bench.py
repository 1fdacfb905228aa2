"""Benchmarks: speed (env steps per second) and learning (reward curves across seeds).

    python bench.py                  # speed: prints a table, writes docs/bench/<row>.json per configuration
    python bench.py speed --only CartPole --updates 5000 --no-plain --out /tmp/bench   # files in another folder
    python bench.py learn --env CartPole-v1 --episodes 300 --seeds 5   # learning: see `learn`
    python bench.py learn --env Pendulum-v0 --episodes 200 -- --max-actions 200000
    python bench.py flush                                       # cost of flushing subnormals, and of not
    python bench.py timeline output/Pendulum-v0-run1 --ranges 3-8 31-40   # step time along a finished run
    python bench.py knn              # k-NN over 1M embedded items: recall, ms, index files (docs/bench/knn.json)
    python bench.py optimum sweeps/configurator   # sweeps of a built-in env as fractions of its exact optimum
    python bench.py choice RUN -- --env Recommender-v0 --k 1000   # where a recommender agent loses return
    python bench.py bounds RUN -- --env Configurator-v0 --k 10485   # what exact pruning of the k would still score
    python bench.py profile "MultiBinary(20)" --steps 30   # where a step's time goes (cProfile)
    python bench.py act              # ms per agent.act call, one observation and batches, after 20,000 updates

Speed, in steady state:
Each configuration trains through the same loop as main.py (Wolpertinger's episodes, default replay memory).
The fast path (the default code path) is timed twice: early, right after warm-up and compilation, and
in steady state, after at least --updates (20,000) real training updates, so that a cost that grows
over a run (subnormal floats in the weights made Intel CPUs 5x slower after a few thousand updates)
cannot hide in the first hundred steps. The plain path, the reference's way of computing the same
thing (FLANN kd-tree search and the whole critic run on every candidate row), is far too slow to
train 20,000 updates itself: it is timed early on a fresh agent, and in steady state on a copy of the
fast agent's whole training state (networks, Adam moments, replay memory) after its 20,000 updates.
Peak resident memory is the process's high-water mark, reset before each measurement; the JSON records
the CPU model and the number of subnormal floats left in the training state after the updates.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

# main first: it sets runtime options that numpy reads on import
from main import build, given_flags, parse_args

import numpy as np  # noqa: E402

from ddpg import FLUSH_BELOW  # noqa: E402
from memory import ReplayMemory
from runtime import read, write
from wolpertinger import Wolpertinger
from util import env_folder_name, moving_average, plot_seed_band, read_metrics

CONFIGS = {
    "CartPole-v1": ["--env", "CartPole-v1"],
    "Pendulum-v0, 200000 actions, k=2000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "2000"],
    "Pendulum-v0, 200000 actions, k=20000": ["--env", "Pendulum-v0", "--max-actions", "200000", "--k", "20000"],
    # combinatorial and many-axis action sets, on the toy env of tests/toy_envs.py (a context, a hidden target)
    "MultiBinary(20), 1048576 actions, k=10485": ["--env", "tests.toy_envs:ContextToy-binary20-v0", "--k", "10485"],
    "MultiBinary(40), 2^40 actions, k=10485": ["--env", "tests.toy_envs:ContextToy-binary40-v0", "--k", "10485"],
    "Box d=3, 195112 actions, k=2000": ["--env", "tests.toy_envs:ContextToy-box3-v0", "--k", "2000"],
    "Box d=3, 195112 actions, default k (19511)": ["--env", "tests.toy_envs:ContextToy-box3-v0"],
    # 1,000,000 items with clustered 16-d embeddings; fast: --knn auto (IVF), plain: FLANN and the full critic
    "1M embedded items, k=1000": ["--env", "tests.toy_envs:EmbeddedItems1M-v0", "--k", "1000"],
}
DEFAULT_CONFIGS = ["CartPole", "Pendulum"]  # without --only: 20,000 updates of the others take hours on 2 cores
# bench.py act: its configurations by default (k = 20,000 is Pendulum's default k), and timed calls per batch size
ACT_CONFIGS = ["Pendulum-v0, 200000 actions, k=20000", "MultiBinary(20)", "1M embedded"]
ACT_BATCHES = {1: 50, 64: 20, 1024: 5}
PLAIN_FLAGS = ["--knn", "flann", "--scoring", "full"]  # the reference's way: FLANN, the whole critic per candidate
# timed plain-path steps; a configuration missing here has no plain path (FLANN cannot index 2^40 actions)
PLAIN_STEPS = {"CartPole-v1": 200, "Pendulum-v0, 200000 actions, k=2000": 20, "Pendulum-v0, 200000 actions, k=20000": 3,
               "MultiBinary(20), 1048576 actions, k=10485": 2, "Box d=3, 195112 actions, k=2000": 5,
               "Box d=3, 195112 actions, default k (19511)": 2, "1M embedded items, k=1000": 3}
# Where results go: one file per benchmark row, docs/bench/<row>.json, overwritten when the row is measured again
BENCH_DIR = Path(__file__).resolve().parent / "docs" / "bench"
ROW_NAMES = {"CartPole-v1": "cartpole", "Pendulum-v0, 200000 actions, k=2000": "pendulum_k2000",
             "Pendulum-v0, 200000 actions, k=20000": "pendulum_k20000",
             "MultiBinary(20), 1048576 actions, k=10485": "mb20", "MultiBinary(40), 2^40 actions, k=10485": "mb40",
             "Box d=3, 195112 actions, k=2000": "box3_k2000",
             "Box d=3, 195112 actions, default k (19511)": "box3_default_k", "1M embedded items, k=1000": "1m"}


def row_name(name: str, updates: int, plain: bool, beam: int, device: str) -> str:
    """A configuration's result-file name: e.g. mb20_steady, cartpole_steady_plain (with the plain path's figures),
    box3_k2000_early (--updates 0), mb20_steady_cuda (on another device than the CPU)."""
    row = ROW_NAMES.get(name) or re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    row += "_steady" if updates else "_early"
    row += "_plain" if plain else ""
    row += f"_beam{beam}" if beam else ""
    return row + ("" if device.split(":")[0] == "CPU" else f"_{device.split(':')[0].lower()}")


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


def play(setup: Wolpertinger, steps: int) -> int:
    """Train for `steps` env steps through the training loop's episodes (cut where the budget ends), with its
    replay memory; returns the total step count."""
    setup.learn_setup()
    target = setup.env_steps + steps
    while setup.env_steps < target:
        setup.play_episode(max_steps=target - setup.env_steps)
    return setup.env_steps


def fresh_run(argv: list[str], steps: int) -> tuple[argparse.Namespace, Wolpertinger, int]:
    """An agent of these main.py flags (seed 1) trained through its warm-up and `steps` more env steps, whose
    first updates compile the graphs; returns its flags, the agent and its step count."""
    args = parse_args(argv + ["--seed", "1"])
    setup = build(args)
    return args, setup, play(setup, args.warmup + steps)


def timed(setup: Wolpertinger, steps: int) -> dict:
    """Milliseconds per env step (update included) and peak resident memory over `steps` more steps."""
    reset_peak_memory()
    start = time.perf_counter()
    play(setup, steps)
    ms = 1e3 * (time.perf_counter() - start) / steps
    return {"ms_per_step": ms, "steps_per_second": 1e3 / ms, "peak_rss_mb": peak_memory_mb(), "steps_timed": steps}


def count_subnormals(arrays) -> int:
    """Non-zero values below float32's smallest normal number (1.2e-38) in these arrays."""
    return sum(int(np.count_nonzero((a > 0) & (a < np.finfo(np.float32).tiny))) for a in map(np.abs, arrays))


def measure(argv: list[str], plain_argv: list[str], early_steps: int, updates: int, steady_steps: int,
            plain_steps: int) -> dict:
    """Fast path early and after `updates` updates; plain path early and on the fast agent's trained state."""
    from tinygrad.helpers import Context
    with Context(BEAM=0):  # restores the search width that a --beam in argv sets
        args, setup, step = fresh_run(argv, 3)
        fast_early = timed(setup, early_steps)
        play(setup, max(0, args.warmup + updates - setup.env_steps))
        fast_steady = timed(setup, steady_steps)
        step, memory = setup.env_steps, setup.memory
        row = {"k": setup.k, "updates_before_steady": step - args.warmup - steady_steps,
               "subnormals_after_updates": count_subnormals(
                   buffer.numpy() for buffer in setup.agent.training_buffers().values()),
               "fast_early": fast_early, "fast_steady": fast_steady}
        if hasattr(setup.space, "exact_search"):  # an approximate index: how much of the exact k it finds
            row["target_search_recall_steady"] = target_search_recall(setup, memory, args.bsize)
        if plain_steps:
            plain_args, fresh, _ = fresh_run(argv + plain_argv, 1)
            row["plain_early"] = timed(fresh, plain_steps)
            trained = build(plain_args)  # the fast agent's state, computed the plain way from here on
            for name, buffer in trained.agent.training_buffers().items():
                buffer.assign(setup.agent.training_buffers()[name]).realize()
            trained.agent.epsilon, trained.memory, trained.env_steps = setup.agent.epsilon, memory, step
            play(trained, 1)  # compile
            row["plain_steady"] = timed(trained, plain_steps)
            row["speedup_steady"] = row["plain_steady"]["ms_per_step"] / fast_steady["ms_per_step"]
    return row


def selected(only: list[str], default: list[str]) -> list[str]:
    """The names of CONFIGS that contain one of the words `only` (case-insensitive), or one of `default`'s."""
    return [name for name in CONFIGS if any(word.lower() in name.lower() for word in only or default)]


def write_row(path: Path, header: dict, name: str, row: dict) -> Path:
    """One benchmark row's result file, <path>.json: the header's fields and the row as configs[name]."""
    out = path.with_name(path.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "configs": {name: row}}, indent=2))
    return out


def speed(opts: argparse.Namespace) -> None:
    from tinygrad import Device
    results = {"cpu": cpu_model(), "machine": f"{cpu_model()}, {os.cpu_count()} cores, tinygrad {Device.DEFAULT}",
               "fast_path_beam": opts.beam, "updates_before_steady": opts.updates, "configs": {}}
    for name in selected(opts.only, DEFAULT_CONFIGS):
        argv = CONFIGS[name]
        beam = ["--beam", str(opts.beam)] if opts.beam else []
        row = measure(argv + beam, PLAIN_FLAGS, opts.early_steps, opts.updates, opts.steps,
                      PLAIN_STEPS.get(name, 0) if opts.plain else 0)
        results["configs"][name] = row
        header = {key: value for key, value in results.items() if key != "configs"}
        out = write_row(Path(opts.out) / row_name(name, opts.updates, "plain_steady" in row, opts.beam, Device.DEFAULT),
                        header, name, row)
        print(f"{name}: fast {row['fast_early']['ms_per_step']:.2f} ms/step early, "
              f"{row['fast_steady']['ms_per_step']:.2f} after {row['updates_before_steady']} updates"
              + (f", target search recall {row['target_search_recall_steady']:.3f}"
                 if "target_search_recall_steady" in row else "") + f"; wrote {out}", flush=True)
    print(f"\n{results['machine']}; steady state after {opts.updates} updates")
    print("| configuration | fast ms/step, early | fast ms/step, steady | plain ms/step, early | plain ms/step, steady "
          "| speed-up, steady | fast peak RSS MB | subnormals after updates |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda row, key, spec: format(row[key]["ms_per_step"], spec) if key in row else "–"
    for name, row in results["configs"].items():
        speedup = f"{row['speedup_steady']:.0f}x" if "speedup_steady" in row else "–"
        print(f"| {name} | {fmt(row, 'fast_early', '.2f')} | {fmt(row, 'fast_steady', '.2f')} | "
              f"{fmt(row, 'plain_early', '.1f')} | {fmt(row, 'plain_steady', '.1f')} | {speedup} | "
              f"{row['fast_steady']['peak_rss_mb']:.0f} | {row['subnormals_after_updates']} |")


def observations(setup: Wolpertinger, n: int) -> np.ndarray:
    """n observations of the agent's own noise-free play in its evaluation env, episodes from seeds 0, 1, ...
    (the env's own observations where they are a Box, as in every configuration here)."""
    env, seen = setup.eval_env, []
    for seed in itertools.count():
        obs, _ = env.reset(seed=seed)
        while len(seen) < n:
            seen.append(obs)
            obs, _, terminated, truncated, _ = env.step(setup.act(obs))
            if terminated or truncated:
                break
        if len(seen) == n:
            return np.stack(seen)


def timed_act(setup: Wolpertinger, obs: np.ndarray, batch: int, calls: int) -> dict:
    """Milliseconds per noise-free `setup.act` call on one observation (batch 1) or a batch of them, each call on
    the next observations of `obs`: the median over `calls` calls, after two that compile the batch size's graphs."""
    inputs = [obs[i % len(obs)] if batch == 1 else obs[i * batch % len(obs):][:batch] for i in range(2 + calls)]
    ms = []
    for i, x in enumerate(inputs):
        start = time.perf_counter()
        setup.act(x)
        if i >= 2:
            ms.append(1e3 * (time.perf_counter() - start))
    median = float(np.median(ms))
    return {"ms_per_call": median, "observations_per_second": 1e3 * batch / median, "calls": calls,
            "ms_min": min(ms), "ms_max": max(ms)}


def commit() -> str:
    """The checked-out commit's short hash, with "-dirty" where tracked files differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    dirty = git("diff", "--quiet", "HEAD").returncode != 0
    return git("rev-parse", "--short", "HEAD").stdout.strip() + ("-dirty" if dirty else "")


def act(opts: argparse.Namespace) -> None:
    """Speed of acting in steady state: per configuration, an agent trained through --updates updates, then
    `agent.act` timed on one observation and on batches (ACT_BATCHES) of its own noise-free play's observations.
    Writes docs/bench/act_<row>.json per configuration and prints a table."""
    from tinygrad import Device
    header = {"cpu": cpu_model(), "machine": f"{cpu_model()}, {os.cpu_count()} cores, tinygrad {Device.DEFAULT}",
              "commit": commit(), "command": shlex.join(["python", "bench.py", *sys.argv[1:]])}
    rows = {}
    for name in selected(opts.only, ACT_CONFIGS):
        args, setup, steps = fresh_run(CONFIGS[name], opts.updates)
        obs = observations(setup, max(ACT_BATCHES))
        row = rows[name] = {"flags": CONFIGS[name], "k": setup.k, "updates_before": steps - args.warmup,
                            "load_average_before": os.getloadavg()[0],
                            "batches": {str(batch): timed_act(setup, obs, batch, calls)
                                        for batch, calls in ACT_BATCHES.items()}}
        out = write_row(Path(opts.out) / f"act_{row_name(name, opts.updates, False, 0, Device.DEFAULT)}", header,
                        name, row)
        print(f"{name}: wrote {out}", flush=True)
    print(f"\n{header['machine']}; commit {header['commit']}; {header['command']}")
    print("| configuration | batch | ms per call | observations per second | updates before |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        for batch, figures in row["batches"].items():
            print(f"| {name} | {batch} | {figures['ms_per_call']:.2f} | {figures['observations_per_second']:,.0f} | "
                  f"{row['updates_before']} |")


def window_mean(values: np.ndarray, first: int, last: int) -> float:
    return float(np.mean(values[first - 1:last])) if len(values) >= last else float("nan")


def learn(opts: argparse.Namespace) -> None:
    """Train --seeds seeds through sweep.py (Ray Tune trials, each then tested with its final weights,
    --test-episodes); write the sweep into <out>/sweep, and per-seed summary.json and learning_curve.png into <out>."""
    import sweep
    out = Path(opts.out or f"bench_learn/{env_folder_name(opts.env)}")
    sweep_opts = sweep.parse_args(["--env", opts.env, "--seeds", str(opts.seeds), "--episodes", str(opts.episodes),
                                   "--test-episodes", str(opts.test_episodes), "--output", str(out / "sweep"),
                                   "--", *opts.main_flags])
    if opts.summarize:
        with open(out / "sweep" / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        wall = None
    else:
        try:
            result = sweep.sweep(sweep_opts)
        except sweep.UsageError as e:
            raise SystemExit(f"error: {e}")
        rows, wall = result["rows"], result["wall_seconds"]
    runs = {int(r["seed"]): (Path(r["train_run"]), Path(r["test_run"]) if r["test_run"] else None) for r in rows}
    seeds = sorted(runs)
    per_seed = {s: read_metrics(runs[s][0] / "metrics.csv") for s in seeds}
    returns = np.array([m["return"] for m in per_seed.values()])
    evals = np.array([m["eval_return"] for m in per_seed.values()])
    evaluated = ~np.isnan(evals[0])
    episodes = per_seed[seeds[0]]["episode"]
    summary = {"env": opts.env, "episodes": opts.episodes, "seeds": seeds, "main_flags": opts.main_flags,
               "per_seed": {}}
    if wall is not None:
        summary["wall_seconds_total"] = wall
    for s, m in per_seed.items():
        ev, (train, test) = m["eval_return"], runs[s]
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
    plot_seed_band([("", episodes, returns, episodes[evaluated], evals[:, evaluated].mean(0))],
                   sweep.reference_curve(opts.env), out / "learning_curve.png",
                   f"{' '.join([opts.env, *opts.main_flags])}: {len(seeds)} seeds")
    print(json.dumps(summary["per_seed"], indent=1))
    print(f"wrote {out / 'summary.json'} and {out / 'learning_curve.png'}")


def flush_cost(opts: argparse.Namespace) -> None:
    """ms per compiled update with and without flushing tiny values, alternating in one process, from the same
    trained state: as trained (few tiny values) and with every Adam moment set to a subnormal 1e-40."""
    setups = []
    for flush_below in (FLUSH_BELOW, 0.0):
        setup = build(parse_args(CONFIGS[opts.config] + ["--seed", "1"]))
        agent = setup.agent  # set before the first update compiles the graph
        agent.cfg.flush_below = agent.actor_optim.flush_below = agent.critic_optim.flush_below = flush_below
        setups.append(setup)
    setups[0].memory = memory = ReplayMemory(opts.updates + 1000, setups[0].agent.state_dim,
                                             setups[0].agent.action_dim)
    play(setups[0], opts.updates + setups[0].options.warmup)
    trained = {name: buffer.numpy() for name, buffer in setups[0].agent.training_buffers().items()}
    times = {(state, flush): [] for state in ("trained", "subnormal moments") for flush in ("flush", "no flush")}
    for _ in range(opts.rounds):
        for state, flush in times:
            agent = setups[flush == "no flush"].agent
            for name, buffer in agent.training_buffers().items():
                values = np.full_like(trained[name], 1e-40) if state != "trained" and "_optim." in name \
                    and not name.endswith(".t") else trained[name]
                write(buffer, values)
            agent.update(memory)  # the first call of a graph compiles it
            start = time.perf_counter()
            for _ in range(opts.steps):
                agent.update(memory)
            times[(state, flush)].append(1e3 * (time.perf_counter() - start) / opts.steps)
    print(f"{cpu_model()}: {opts.config}, ms per update (median of {opts.rounds} rounds of {opts.steps})")
    for (state, flush), values in times.items():
        print(f"{state:>18}, {flush:>8}: {np.median(values):.2f}  (rounds: {', '.join(f'{v:.2f}' for v in values)})")


def ms_per_step(m: dict[str, np.ndarray], first: int, last: int) -> float:
    """Wall milliseconds per training env step over episodes first..last (1-based, evaluations included)."""
    wall, steps = np.insert(m["wall_seconds"], 0, 0.0), np.insert(m["env_steps"], 0, 0.0)
    return 1e3 * (wall[last] - wall[first - 1]) / (steps[last] - steps[first - 1])


def timeline(opts: argparse.Namespace) -> None:
    """Per-step time along a finished run, from its metrics.csv, and the subnormal floats in its saved networks."""
    from util import new_figure, read_tensors, write_atomically
    run = Path(opts.run)
    m = read_metrics(run / "metrics.csv")
    n = len(m["episode"])
    ranges = [tuple(map(int, r.split("-"))) for r in opts.ranges]
    edges = np.linspace(0, n, opts.windows + 1).astype(int)
    ranges += [(a + 1, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    print(f"{run}: {n} episodes, {int(m['env_steps'][-1])} env steps, {m['wall_seconds'][-1]:.0f} s")
    for first, last in ranges:
        print(f"episodes {first}-{last}: {ms_per_step(m, first, last):.2f} ms per env step")
    for path in sorted(run.glob("*.safetensors")) + sorted(run.glob("best/*.safetensors")):
        arrays = read_tensors(path)[0].values()
        print(f"{path.relative_to(run)}: {count_subnormals(arrays)} subnormal of {sum(a.size for a in arrays)}")
    per_episode = 1e3 * np.diff(np.insert(m["wall_seconds"], 0, 0)) / np.maximum(np.diff(np.insert(m["env_steps"], 0, 0)), 1)
    fig, ax = new_figure()
    ax.plot(m["episode"], per_episode, color="C0", alpha=0.3, lw=0.8, label="per episode")
    window = max(10, n // 100)
    ax.plot(m["episode"], moving_average(per_episode, window), color="C0", lw=2, label=f"{window}-episode average")
    ax.set(xlabel="episode", ylabel="ms per env step (update and evaluations included)", title=f"{run.name}: step time",
           ylim=(0, 3 * np.percentile(per_episode, 90)))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    write_atomically(run / "step_time.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    print(f"wrote {run / 'step_time.png'}")


def fraction_curve(m: dict[str, np.ndarray], optimal: float, steps: np.ndarray, window: int = 10) -> np.ndarray:
    """A run's noise-free evaluations as fractions of `optimal` (moving average over `window` evaluations),
    interpolated at the given env steps."""
    evaluated = ~np.isnan(m["eval_return"])
    return np.interp(steps, m["env_steps"][evaluated], moving_average(m["eval_return"][evaluated] / optimal, window))


def read_sweeps(folders: list[Path]) -> tuple[dict, list[dict]]:
    """The settings and the result rows of finished sweeps of one env with the same flags (their grids differ)."""
    settings, rows = None, []
    for folder in folders:
        mine = json.loads((folder / "sweep.json").read_text())
        shared = {key: mine[key] for key in ("env", "main_flags", "episodes", "test_episodes")}
        if settings is not None and shared != settings:
            raise SystemExit(f"error: {folder} is a sweep of other settings than {folders[0]}: {shared} != {settings}")
        settings = shared
        with open(folder / "results.csv", newline="") as f:
            rows += list(csv.DictReader(f))
    return settings, rows


def optimum(opts: argparse.Namespace) -> None:
    """Finished sweeps of a built-in env (envs.py: an exact optimal and random return) as fractions of the optimum:
    per configuration, each seed's final-weights test return / optimal and its ms per env step over the second
    half of the run; a figure of the evaluations along training (left) and of both against the configurations
    (right); a table for the README. Several sweeps of the same env and flags (other grids, say one more k) are
    shown together. Writes optimum.json and optimum.png into the first sweep's folder."""
    from main import options_of
    from util import new_figure, write_atomically
    from wolpertinger import make_env
    folders = [Path(f) for f in opts.sweeps]
    folder = folders[0]
    settings, rows = read_sweeps(folders)
    args = parse_args(["--env", settings["env"], *settings["main_flags"]])
    env = make_env(args.env, options_of(args)["env_kwargs"]).unwrapped
    if not hasattr(env, "optimal_return"):
        raise SystemExit(f"error: {args.env} has no exact optimal_return (built-in envs of envs.py have)")
    optimal, random_fraction = env.optimal_return, env.random_return / env.optimal_return
    configs = list(dict.fromkeys(r["config"] for r in rows))
    result = {"env": args.env, "main_flags": settings["main_flags"], "episodes": settings["episodes"],
              "test_episodes": settings["test_episodes"], "optimal_return": optimal, "random_return": env.random_return,
              "machine": cpu_model(), "configs": {}}
    fig, (curves, ends) = new_figure(ncols=2, figsize=(13, 5))
    for i, name in enumerate(configs):
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: int(r["seed"]))
        metrics = [read_metrics(Path(r["train_run"]) / "metrics.csv") for r in mine]
        fractions = [float(r["test_return"]) / optimal for r in mine]
        ms = [ms_per_step(m, len(m["episode"]) // 2 + 1, len(m["episode"])) for m in metrics]
        result["configs"][name] = {"seeds": [int(r["seed"]) for r in mine], "fraction_of_optimal": fractions,
                                   "ms_per_step": ms, "env_steps": [int(m["env_steps"][-1]) for m in metrics]}
        steps = np.linspace(0, min(m["env_steps"][-1] for m in metrics), 300)
        band = np.array([fraction_curve(m, optimal, steps) for m in metrics])
        curves.fill_between(steps, band.min(0), band.max(0), color=f"C{i}", alpha=0.2)
        curves.plot(steps, band.mean(0), color=f"C{i}", lw=2, label=f"{name} (mean, min-max of {len(mine)} seeds)")
        ends.plot([i] * len(fractions), fractions, "o", color=f"C{i}", mfc="white")
        ends.plot([i], [np.mean(fractions)], "_", color=f"C{i}", ms=30, mew=2)
        print(f"| {name} | {' / '.join(f'{x:.1%}' for x in fractions)} | {np.mean(fractions):.1%} | "
              f"{np.mean(ms):.1f} |")
    for ax in (curves, ends):
        ax.axhline(1.0, color="k", lw=1, ls="--", label="optimal")
        ax.axhline(random_fraction, color="C3", lw=1.5, ls=":", label=f"uniformly random ({random_fraction:.1%})")
        ax.grid(alpha=0.3)
    curves.set(xlabel="env steps", ylabel="evaluation return / optimal return",
               title=f"noise-free evaluations ({settings['episodes']} episodes per seed)")
    curves.legend(loc="upper left", fontsize=8)
    ends.set_xticks(range(len(configs)), configs)
    ends.set(xlabel="configuration", ylabel="final weights: test return / optimal", xlim=(-0.5, len(configs) - 0.5),
             title=f"final weights, {settings['test_episodes']} test episodes; ms per step (right axis)")
    times = ends.twinx()
    times.plot(range(len(configs)), [np.mean(result["configs"][c]["ms_per_step"]) for c in configs], "s-", color="C7",
               label="ms per env step (second half of training)")
    times.set(ylabel="ms per env step", ylim=(0, None))
    times.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{' '.join([args.env, *settings['main_flags']])}: optimal return {optimal:.3f}")
    fig.tight_layout()
    write_atomically(folder / "optimum.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    write_atomically(folder / "optimum.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    print(f"wrote {folder / 'optimum.json'} and {folder / 'optimum.png'}")


def trained_setup(opts: argparse.Namespace) -> Wolpertinger:
    """The agent of the run folder opts.run, with the settings it trained with and the flags given after --."""
    argv = ["--mode", "test", "--load-model-dir", opts.run, *opts.main_flags]
    return build(parse_args(argv), given_flags(argv))


def choice(opts: argparse.Namespace) -> None:
    """Where a trained Recommender-v0 agent loses return: with every item as the state, the exact returns (fractions of
    the optimum) of its noise-free policy (the critic's best of the k neighbours of the proto-action), of the item
    nearest the proto-action (k = 1), and of the best of the same k items by the true gain (a perfect critic); the
    share of items whose k neighbours hold any acceptable item; how far the proto-actions lie from the items."""
    from tinygrad import Tensor
    setup = trained_setup(opts)
    env, agent, space, k = setup.env.unwrapped, setup.agent, setup.space, setup.k
    if not hasattr(env, "recommendation_gain"):
        raise SystemExit(f"error: {setup.env_id} is not Recommender-v0 (no recommendation_gain)")
    items = np.arange(env.n_items)
    to_env = np.vectorize(space.to_env)
    policies = {"agent (critic's best of k)": [], "item nearest the proto-action": [], "best of the k by true gain": []}
    reachable, gaps = [], []
    for block in np.array_split(items, -(-len(items) // 256)):  # 256 states x k candidates at a time
        states = Tensor(env.action_embeddings[block])  # the observation at item i is its embedding
        protos = agent.actor(states).clip(-1, 1).numpy()
        ids = space.search(protos, k)
        points, actions = space.points(ids), to_env(ids)
        distances = np.sqrt(((points - protos[:, None]) ** 2).sum(2))
        gaps.append(distances.min(1))
        picks = (agent.critic.score(states, Tensor(points)).numpy().argmax(1), distances.argmin(1),
                 env.recommendation_gain(block[:, None], actions).argmax(1))
        for chosen, pick in zip(policies.values(), picks):
            chosen.append(actions[np.arange(len(block)), pick])
        reachable.append((env.accept_probability(block[:, None], actions) > 0).any(1))
    print(f"{opts.run}: k = {k}, {env.n_items} items, optimal return {env.optimal_return:.4f}")
    for name, chosen in policies.items():
        print(f"  {name}: {env.policy_return(np.concatenate(chosen)) / env.optimal_return:.1%} of the optimum")
    print(f"  items whose k neighbours hold an acceptable item: {np.concatenate(reachable).mean():.1%}")
    print(f"  mean distance from the proto-action to its nearest item: {np.concatenate(gaps).mean():.3f} "
          f"(in the actor's [-1, 1]^{space.dim})")


def cell_bounds(pre_state: np.ndarray, points: np.ndarray, cells: np.ndarray, free: np.ndarray,
                w_action: np.ndarray, w_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds of the critic's Q(s, a) - fc3.bias = w_out . relu(pre_state + w_action a) over each cell's box of
    candidate points (n, dim), `cells` numbering each point's cell, the box spanning the cell's points on the `free`
    axes (the other axes: one value per cell). Returns (interval bound, linear bound), one per cell: interval
    arithmetic per hidden unit, and the linear relaxation of each unit's relu over its range (above: the chord; below,
    where w_out < 0: the identity or zero, whichever is nearer), maximised over the box."""
    n_cells = cells.max() + 1
    lo, hi = np.full((n_cells, len(free)), np.inf), np.full((n_cells, len(free)), -np.inf)
    np.minimum.at(lo, cells, points[:, free])
    np.maximum.at(hi, cells, points[:, free])
    centre = np.zeros((n_cells, points.shape[1]))
    centre[cells] = points                                      # the fixed axes: one value per cell
    centre[:, free], half = (lo + hi) / 2, (hi - lo) / 2
    mid = pre_state + centre @ w_action.T                       # (cells, hidden)
    radius = half @ np.abs(w_action[:, free]).T
    low, high = mid - radius, mid + radius
    interval = np.where(w_out > 0, w_out * np.maximum(high, 0), w_out * np.maximum(low, 0)).sum(1)
    straddles = (low < 0) & (high > 0)
    chord = high / np.where(straddles, high - low, 1.0)
    slope = np.where(low >= 0, 1.0, np.where(high <= 0, 0.0, np.where(w_out > 0, chord, (high > -low) * 1.0)))
    offset = np.where(straddles & (w_out > 0), -chord * low, 0.0)
    gradient = (w_out * slope) @ w_action[:, free]              # the relaxation's slope along the free axes
    linear = (w_out * (slope * mid + offset)).sum(1) + (np.abs(gradient) * half).sum(1)
    return interval, linear


def bounds(opts: argparse.Namespace) -> None:
    """How many of the k candidates an exact branch and bound over cells would still score, for a trained run whose
    actions are a grid of d > 1 axes: from --states observations, each state's k candidates are grouped into cells
    that agree on all but m axes (those along which the candidates spread most), each bounded by `cell_bounds`. A
    cell whose bound reaches the best Q of the k must be scored by any branch and bound with that bound, however
    good its first guess; printed: the share of the k candidates in such cells (median and largest over the
    states), and the mean number of candidates per cell."""
    from tinygrad import Tensor

    from action_space import GridActionSpace
    setup = trained_setup(opts)
    agent, space, k = setup.agent, setup.space, setup.k
    if not isinstance(space, GridActionSpace) or space.dim < 2:
        raise SystemExit(f"error: {setup.env_id}'s action set is not a grid of more than one axis")
    # the critic in float64 numpy, not model.Critic's float32 graph: the bounds and the Q they must reach share
    # one arithmetic, so that the comparison below needs no float32 slack
    p = {name: a.astype(np.float64) for name, a in agent.critic.state_dict().items()}
    h1 = agent.cfg.hidden1
    w_state, w_action, w_out = p["fc2.weight"][:, :h1], p["fc2.weight"][:, h1:], p["fc3.weight"][0]
    observations = np.array([setup.env.reset(seed=i)[0] for i in range(opts.states)], np.float32)
    protos = agent.actor(Tensor(observations)).clip(-1, 1).numpy()
    pre_states = np.maximum(observations @ p["fc1.weight"].T + p["fc1.bias"], 0) @ w_state.T + p["fc2.bias"]
    free_axes = [m for m in opts.free_axes if m <= space.dim]
    shares = {(m, name): [] for m in free_axes for name in ("interval", "linear")}
    sizes = {m: [] for m in free_axes}
    for pre_state, ids in zip(pre_states, space.search(protos, k)):
        points = space.points(ids).astype(np.float64)
        q = np.maximum(pre_state + points @ w_action.T, 0) @ w_out
        spread = np.argsort(-points.var(0), kind="stable")  # MultiBinary: the cheapest flips first
        for m in free_axes:
            cells = np.unique(points[:, spread[m:]], axis=0, return_inverse=True)[1].ravel()
            sizes[m].append(len(cells) / (cells.max() + 1))
            for name, bound in zip(("interval", "linear"),
                                   cell_bounds(pre_state, points, cells, spread[:m], w_action, w_out)):
                shares[m, name].append(np.mean(bound[cells] >= q.max() - 1e-9 * np.abs(q).max()))
    print(f"{opts.run}: k = {k}, {space.dim} axes, {opts.states} states: share of the k candidates in cells whose "
          "upper bound reaches the best Q (median, largest); candidates per cell")
    for m in free_axes:
        print(f"  cells free on {m} axes: " + "; ".join(f"{name} {np.median(shares[m, name]):.1%}, "
                                                       f"{np.max(shares[m, name]):.1%}" for name in ("interval", "linear"))
              + f"; {np.mean(sizes[m]):.1f} per cell")


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
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.out}")


def training_search(argv: list[str], steps: int) -> dict:
    """Train for 2 x `steps` env steps, timing the second half; then the target actions' search's recall@k."""
    args, setup, _ = fresh_run(argv, steps)
    memory, start = setup.memory, time.perf_counter()
    play(setup, steps)
    ms = 1e3 * (time.perf_counter() - start) / steps
    row = {"flags": argv, "ms_per_step": ms, "steps_timed": steps,
           "target_search_recall": target_search_recall(setup, memory, args.bsize)}
    print(row, flush=True)
    return row


def target_search_recall(setup, memory: ReplayMemory, batch_size: int, minibatches: int = 5) -> float:
    """recall@k against exact search of the target actions' search: the target actor's proto-actions for the next
    states of `minibatches` fresh minibatches (an action set of embeddings)."""
    agent, space, recalls = setup.agent, setup.space, []
    for _ in range(minibatches):
        write(agent.batch[3], memory.sample(batch_size, agent.rng)[3])
        protos = read(agent.candidates._target_proto())
        found, truth = space.search(protos, setup.k), space.exact_search(np.clip(protos, -1, 1), setup.k)
        recalls += [len(set(a) & set(b)) / setup.k for a, b in zip(found, truth)]
    return float(np.mean(recalls))


def profile(opts: argparse.Namespace) -> None:
    """Where a training step's time goes: cProfile over --steps env steps of one configuration, after the warm-up
    and the graphs' capture; the functions with the most time of their own."""
    import cProfile
    import pstats
    names = [n for n in CONFIGS if opts.config.lower() == n.lower()] or \
        [n for n in CONFIGS if opts.config.lower() in n.lower()]  # a whole name, or a part of only one
    if len(names) != 1:
        raise SystemExit(f"error: {'no' if not names else len(names)} configurations' names contain {opts.config!r}; "
                         f"name one of {'; '.join(names or CONFIGS)}")
    name, = names
    args, setup, _ = fresh_run(CONFIGS[name], 13)
    profiler, start = cProfile.Profile(), time.perf_counter()
    profiler.runcall(play, setup, opts.steps)
    print(f"{name}: {1e3 * (time.perf_counter() - start) / opts.steps:.1f} ms per env step under the profiler")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(opts.top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    sp = sub.add_parser("speed", help="env steps per second, fast against plain path (the default)")
    for parser in (p, sp):
        parser.add_argument("--steps", type=int, default=1000, help="timed steady-state env steps per configuration")
        parser.add_argument("--early-steps", type=int, default=500, help="timed env steps right after warm-up")
        parser.add_argument("--updates", type=int, default=20000, help="training updates before the steady-state timing")
        parser.add_argument("--no-plain", dest="plain", action="store_false", help="time the fast path only")
        parser.add_argument("--only", nargs="*", default=[],
                            help="configurations whose name contains one of these (default: CartPole and Pendulum)")
        parser.add_argument("--out", default=str(BENCH_DIR),
                            help="folder of the result files, one per configuration: <row>.json (default docs/bench)")
        parser.add_argument("--beam", type=int, default=0, help="BEAM width for the fast path (see main.py --beam)")
    ap = sub.add_parser("act", help="ms per agent.act call, one observation and batches, after --updates updates")
    ap.add_argument("--updates", type=int, default=20000, help="training updates before the timing")
    ap.add_argument("--only", nargs="*", default=[],
                    help="configurations whose name contains one of these (default: Pendulum-v0 with 200,000 actions "
                         "and its default k, MultiBinary(20), 1M embedded items)")
    ap.add_argument("--out", default=str(BENCH_DIR), help="folder of the result files, act_<row>.json (default docs/bench)")
    lp = sub.add_parser("learn", help="reward curves of several seeds, trained in parallel through sweep.py")
    lp.add_argument("--env", default="CartPole-v1")
    lp.add_argument("--episodes", type=int, default=300)
    lp.add_argument("--seeds", type=int, default=5)
    lp.add_argument("--out", default=None, help="folder for the runs and the summary (default bench_learn/<env>)")
    lp.add_argument("--test-episodes", type=int, default=100,
                    help="noise-free episodes played with each seed's final weights after training (0: none)")
    lp.add_argument("--summarize", action="store_true", help="skip training: summarise the runs already in --out")
    lp.add_argument("main_flags", nargs="*", help="after --: further main.py flags, e.g. -- --max-actions 200000")
    fp = sub.add_parser("flush", help="cost of flushing tiny values, and of subnormals, per compiled update")
    fp.add_argument("--config", default="Pendulum-v0, 200000 actions, k=20000", choices=list(CONFIGS))
    fp.add_argument("--updates", type=int, default=2000, help="training updates before the timing")
    fp.add_argument("--rounds", type=int, default=5)
    fp.add_argument("--steps", type=int, default=200, help="timed updates per round and variant")
    tp = sub.add_parser("timeline", help="per-step time along a finished run, and subnormals in its networks")
    tp.add_argument("run", help="a run folder (holds metrics.csv)")
    tp.add_argument("--ranges", nargs="*", default=[], help="episode ranges to report, e.g. 3-8 31-40")
    tp.add_argument("--windows", type=int, default=10, help="also report this many equal windows of episodes")
    kp = sub.add_parser("knn", help="k-NN methods over 1M embedded items: speed, recall, index build and reload")
    kp.add_argument("--items", type=int, default=1_000_000)
    kp.add_argument("--out", default=str(BENCH_DIR / "knn.json"))
    kp.add_argument("--steps", type=int, default=300, help="timed env steps of the training rows (after as many)")
    op = sub.add_parser("optimum", help="a sweep of a built-in env as fractions of its exact optimum, with random")
    op.add_argument("sweeps", nargs="+", help="finished sweep.py --output folders of Recommender-v0 or Configurator-v0 "
                                                "with the same flags (results go into the first)")
    cp = sub.add_parser("choice", help="where a trained Recommender-v0 agent loses return: candidates or choice")
    cp.add_argument("run", help="a run folder of Recommender-v0")
    cp.add_argument("main_flags", nargs="*", help="after --: main.py flags to use instead of the run's own, e.g. -- --k 100")
    bp = sub.add_parser("bounds", help="how many of the k candidates an exact branch and bound over cells would score")
    bp.add_argument("run", help="a run folder whose action set is a grid of more than one axis (e.g. Configurator-v0)")
    bp.add_argument("--states", type=int, default=16, help="observations (the env's first ones after reset)")
    bp.add_argument("--free-axes", type=int, nargs="*", default=[2, 4, 6, 8], help="values of m: axes free in a cell")
    bp.add_argument("main_flags", nargs="*", help="after --: main.py flags to use instead of the run's own, e.g. -- --k 10485")
    pp = sub.add_parser("profile", help="where a training step's time goes (cProfile), for one configuration")
    pp.add_argument("config", help="a configuration's name, or a part of only one, e.g. 'MultiBinary(20)'")
    pp.add_argument("--steps", type=int, default=50, help="profiled env steps, after the warm-up")
    pp.add_argument("--top", type=int, default=15, help="functions listed")
    opts = p.parse_args()
    {"act": act, "profile": profile, "bounds": bounds, "choice": choice, "optimum": optimum, "learn": learn, "knn": knn, "timeline": timeline, "flush": flush_cost}.get(opts.command, speed)(opts)


if __name__ == "__main__":
    main()
