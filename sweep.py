"""Many trainings at once: main.py runs as Ray Tune trials, seeds times a grid of flags, summarised across seeds.

    python sweep.py --env CartPole-v1 --seeds 5 --episodes 300 --output sweeps/cartpole
    python sweep.py --env Pendulum-v0 --episodes 200 --grid tau-update=0.001,0.005 --output sweeps/tau -- --max-actions 200000
    python sweep.py --output sweeps/tau --resume          # finish an interrupted sweep; finished trials stay done
    python sweep.py --address auto ...                     # run the trials on a running Ray cluster

Each trial is one seed of one configuration: `main.py` trains it (and, with --test-episodes, tests its final
weights) in its own process, writing the usual run folders under <output>/runs/<configuration>/seed<N>/.
The sweep then writes <output>/results.csv (one row per trial, with the Ray node that ran it),
<output>/summary.json (per configuration: mean and spread across seeds) and <output>/learning_curves.png.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from util import CORES_ENV

PROJECT = Path(__file__).resolve().parent
OWN_FLAGS = ("--env", "--seed", "--max-episode", "--mode", "--output", "--load", "--load-model-dir")  # set per trial
SETTINGS = "sweep.json"  # the sweep's arguments, read back by --resume


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Seeds and flag grids of main.py trainings as Ray Tune trials.")
    p.add_argument("--env", default="CartPole-v1", help="gymnasium env id, as for main.py")
    p.add_argument("--seeds", type=int, default=5, help="seeds 1..N of every configuration")
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="a main.py flag and its values (repeatable: the cross product is swept), e.g. k=2,20")
    p.add_argument("--episodes", type=int, default=300, help="training episodes per trial (main.py --max-episode)")
    p.add_argument("--test-episodes", type=int, default=100,
                   help="noise-free episodes played with each trial's final weights (0: no test)")
    p.add_argument("--target", type=float, default=None,
                   help="an evaluation mean to reach: the summary gives the first episode that reached it")
    p.add_argument("--output", default="sweeps/sweep", help="folder for the runs, the Tune experiment and the summary")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in --output with its own arguments (only --address, "
                        "--num-cpus taken from this command line)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (a cluster started on this machine) or ray://host:port "
                        "(default: start Ray on this machine for this sweep)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray started here (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs per trial (below 2, tinygrad's HCQ2 is off: its spin-waiting thread needs a core)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial")
    p.add_argument("main_flags", nargs="*", help="after --: further main.py flags, e.g. -- --max-actions 200000")
    return p.parse_args(argv)


class UsageError(Exception):
    """Bad input: reported as one line and exit status 2."""


def parse_grid(items: list[str]) -> list[list[tuple[str, str]]]:
    """--grid FLAG=V1,V2 items as the list of configurations, each a list of (flag, value); [[]] for no grid."""
    axes = []
    for item in items:
        flag, sep, values = item.partition("=")
        flag = flag.lstrip("-")
        if not sep or not flag or not all(values.split(",")) or flag in (a[0][0] for a in axes):
            raise UsageError(f"--grid {item!r}: expected FLAG=V1,V2,... with each FLAG once and no empty value")
        axes.append([(flag, value) for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)]


def config_name(flags: list[tuple[str, str]]) -> str:
    """A configuration's name, also its folder: 'k=2,tau-update=0.01', or 'default' without grid flags."""
    return ",".join(f"{flag}={value}" for flag, value in flags) or "default"


def trial_argv(opts: argparse.Namespace, flags: list[tuple[str, str]], seed: int) -> list[str]:
    grid = [word for flag, value in flags for word in (f"--{flag}", value)]
    return ["--env", opts.env, "--max-episode", str(opts.episodes), "--seed", str(seed), *grid, *opts.main_flags]


def refuse(message: str) -> None:
    """argparse's complaint about a trial's flags as a UsageError: one line, instead of its usage text and exit."""
    raise UsageError(message)


def check(opts: argparse.Namespace) -> list[list[tuple[str, str]]]:
    """The configurations; raises UsageError for anything main.py or the sweep would refuse. Each trial's flags
    pass main.py's own checks here, so that a bad one stops the sweep before Ray starts or anything is written."""
    with warnings.catch_warnings():
        # main.py's settings for numpy come too late for this process, which does no numerical work; its trials
        # run main.py in processes of their own, which get them in time
        warnings.filterwarnings("ignore", "OPENBLAS_NUM_THREADS")
        import main
    if opts.seeds < 1 or opts.episodes < 1 or opts.test_episodes < 0:
        raise UsageError("--seeds and --episodes must be at least 1, --test-episodes at least 0")
    if opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0:
        raise UsageError("--cpus-per-trial must be positive and --gpus-per-trial not negative")
    configs = parse_grid(opts.grid)
    for flag in [word for word in opts.main_flags if word.startswith("--")] + [f"--{f}" for f, _ in configs[0]]:
        if flag.split("=")[0] in OWN_FLAGS:
            raise UsageError(f"{flag} is set by the sweep for each trial (see --env, --seeds, --episodes, --output)")
    parser = main.build_parser()
    parser.error = refuse
    for flags in configs:
        args = parser.parse_args(trial_argv(opts, flags, 1))
        try:
            main.check_args(args)
        except main.UsageError as e:
            raise UsageError(e) from None
    return configs


def run_main(argv: list[str], folder: Path, cpus: float) -> Path:
    """Run main.py with `--output folder` in its own process (output appended to folder/main.out); returns the run
    folder it made. The process gets SIGTERM (main.py then saves and stops) if the trial's worker dies. With fewer
    than 2 CPUs tinygrad's HCQ2 is off (its host thread spin-waits on a core of its own), and the update's ranking
    uses at most the trial's CPUs, not every core of the machine."""
    import ctypes
    import signal
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob("*-run*"))
    env = {**os.environ, "HCQ2": "1" if cpus >= 2 else "0", CORES_ENV: str(max(1, int(cpus)))}
    die_with_parent = lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    with open(folder / "main.out", "a") as out:
        result = subprocess.run([sys.executable, str(PROJECT / "main.py"), *argv, "--output", str(folder)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    if result.returncode != 0:
        raise RuntimeError(f"main.py {' '.join(argv)} failed (exit {result.returncode}); see {folder / 'main.out'}")
    return (set(folder.glob("*-run*")) - before).pop()


def trial(config: dict, opts: argparse.Namespace) -> None:
    """One Tune trial: train one seed of one configuration, then test its final weights; report the run folders,
    the final evaluation, the test return and the Ray node."""
    import ray
    from ray import tune

    from util import read_metrics
    flags, seed = [tuple(f) for f in config["flags"]], config["seed"]
    folder = Path(opts.output) / "runs" / config_name(flags) / f"seed{seed}"
    argv = trial_argv(opts, flags, seed)
    train_run = run_main(argv, folder, opts.cpus_per_trial)
    test_run, test_return = None, float("nan")
    if opts.test_episodes:
        test_run = run_main([*argv, "--mode", "test", "--load-model-dir", str(train_run),
                             "--test-episode", str(opts.test_episodes)], folder, opts.cpus_per_trial)
        test_return = float(np.mean(read_metrics(test_run / "metrics.csv")["return"]))
    evals = read_metrics(train_run / "metrics.csv")["eval_return"]
    evals = evals[~np.isnan(evals)]
    node_id = ray.get_runtime_context().get_node_id()
    node_ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    tune.report({"final_eval": float(evals[-1]) if len(evals) else float("nan"), "test_return": test_return,
                 "train_run": str(train_run), "test_run": str(test_run or ""), "node_id": node_id,
                 "node_ip": node_ip, "hostname": os.uname().nodename})


def start_ray(opts: argparse.Namespace) -> None:
    import ray
    runtime_env = {"env_vars": {"PYTHONPATH": str(PROJECT)}}  # trials import util.py; workers start elsewhere
    if opts.address:
        ray.init(address=opts.address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # this machine only: the node listens on the loopback address
        ray.init(num_cpus=opts.num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                 _node_ip_address="127.0.0.1")


def run_trials(opts: argparse.Namespace, configs: list[list[tuple[str, str]]], resume: bool) -> list[dict]:
    """Run (or, resuming, finish) every trial with Ray Tune; returns each trial's reported results and config."""
    from ray import tune
    trainable = tune.with_resources(tune.with_parameters(trial, opts=opts),
                                    {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    experiment = Path(opts.output) / "tune"
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable, restart_errored=True)
    else:
        space = {"flags": tune.grid_search(configs), "seed": tune.grid_search(list(range(1, opts.seeds + 1)))}
        tuner = tune.Tuner(trainable, param_space=space,
                           run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent),
                                                     verbose=1))
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(grid)} trials failed, the first: {failed[0].error}")
    return [{**r.metrics, "config": config_name([tuple(f) for f in r.config["flags"]]), "seed": r.config["seed"]}
            for r in grid]


def spread(values: list[float | None]) -> dict:
    """Mean, standard deviation, min and max of the values given (None and NaN left out), and how many there were."""
    v = np.array([x for x in values if x is not None and not np.isnan(x)], float)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def first_reaching(metrics: dict[str, np.ndarray], target: float | None) -> int | None:
    """The first episode whose evaluation mean reached `target`, or None."""
    if target is None:
        return None
    hits = np.flatnonzero(metrics["eval_return"] >= target)
    return int(metrics["episode"][hits[0]]) if len(hits) else None


def summarise(opts: argparse.Namespace, configs: list[list[tuple[str, str]]], rows: list[dict]) -> dict:
    """summary.json's content and the band plot, from the trials' rows and their run folders."""
    from util import plot_seed_band, read_metrics
    summary = {"env": opts.env, "episodes": opts.episodes, "seeds": opts.seeds, "main_flags": opts.main_flags,
               "grid": opts.grid, "target": opts.target, "configs": {}}
    bands = []
    for name in map(config_name, configs):
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seed"])
        metrics = [read_metrics(Path(r["train_run"]) / "metrics.csv") for r in mine]
        for r, m in zip(mine, metrics):
            r["first_target"] = first_reaching(m, opts.target)
        summary["configs"][name] = {
            "final_eval": spread([r["final_eval"] for r in mine]),
            "test_return": spread([r["test_return"] for r in mine]),
            "first_target_episode": spread([r["first_target"] for r in mine]),
            "per_seed": {r["seed"]: {k: r[k] for k in ("final_eval", "test_return", "first_target", "train_run",
                                                       "test_run", "node_id")} for r in mine}}
        episodes = metrics[0]["episode"]
        evals = np.array([m["eval_return"] for m in metrics])
        evaluated = ~np.isnan(evals[0])
        bands.append((name, episodes, np.array([m["return"] for m in metrics]), episodes[evaluated],
                      evals[:, evaluated].mean(0)))
    by = "test_return" if opts.test_episodes else "final_eval"
    summary["best_by"] = f"mean {by}"
    summary["best"] = max(summary["configs"], key=lambda n: -np.inf if summary["configs"][n][by]["mean"] is None
                          else summary["configs"][n][by]["mean"])
    title = f"{' '.join([opts.env, *opts.main_flags])}: {opts.seeds} seeds"
    plot_seed_band(bands, reference_curve(opts.env), Path(opts.output) / "learning_curves.png", title)
    return summary


def reference_curve(env: str) -> list[tuple[int, int, float]]:
    """The reference's published bucket means (first episode, last episode, mean return), where there are some."""
    return {"Pendulum-v0": [(1, 100, -900.0), (101, 200, -278.0), (201, 300, -137.0), (800, 1000, -100.0)],
            "CartPole-v1": [(1, 400, 12.0), (548, 548, 500.0)]}.get(env, [])


def write_results(output: Path, rows: list[dict]) -> None:
    from util import write_atomically
    fields = ("config", "seed", "final_eval", "test_return", "first_target", "node_id", "node_ip", "hostname",
              "train_run", "test_run")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: (r["config"], r["seed"])))
    write_atomically(output / "results.csv", write)


def print_table(summary: dict) -> None:
    fmt = lambda s: "–" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f} [{s['min']:.0f}, {s['max']:.0f}]"
    print("\n| configuration | final evaluation | test return | first episode reaching target |\n|---|---|---|---|")
    for name, c in summary["configs"].items():
        print(f"| {name} | {fmt(c['final_eval'])} | {fmt(c['test_return'])} | {fmt(c['first_target_episode'])} |")
    print(f"\nbest configuration (by {summary['best_by']}): {summary['best']}")


def sweep(opts: argparse.Namespace) -> dict:
    """Check the arguments, run every trial through Ray Tune, write results.csv, summary.json and the plot;
    returns the summary with the trials' rows. Raises UsageError (nothing written) on bad input."""
    from util import write_atomically
    output = Path(opts.output).resolve()
    settings = output / SETTINGS
    if opts.resume:
        if not settings.is_file() or not (output / "tune").is_dir():
            raise UsageError(f"--resume: {output} holds no sweep to resume")
        saved = json.loads(settings.read_text())
        opts = argparse.Namespace(**{**saved, "address": opts.address, "num_cpus": opts.num_cpus, "resume": True})
    elif output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty; choose another --output (or --resume it)")
    opts.output = str(output)
    configs = check(opts)
    if not opts.resume:
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(settings, lambda tmp: tmp.write_text(json.dumps(vars(opts), indent=2)))
    start = time.time()
    start_ray(opts)
    rows = run_trials(opts, configs, opts.resume)
    summary = summarise(opts, configs, rows)
    summary["wall_seconds"] = time.time() - start
    write_atomically(output / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    write_results(output, rows)
    print_table(summary)
    print(f"wrote {output / 'results.csv'}, {output / 'summary.json'} and {output / 'learning_curves.png'}")
    return {**summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    try:
        sweep(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
