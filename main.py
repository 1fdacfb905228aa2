"""Command line over `wolpertinger.Wolpertinger`: train or test an agent on a gymnasium env, or plot finished runs.

    python main.py --env Pendulum-v0 --max-actions 200000
    python main.py --env CartPole-v1
    python main.py --mode test --load-model-dir output/CartPole-v1-run1
    python main.py --mode plot --load-model-dir output/CartPole-v1-run1 output/CartPole-v1-run2
"""
from __future__ import annotations

import signal


def _stop_before_setup(signum: int, frame) -> None:
    """SIGINT/SIGTERM before main() installs its own handlers, while the imports run (seconds on a busy machine):
    nothing is written yet, so leave quietly."""
    raise SystemExit(0)


if __name__ == "__main__":  # first of all, so that no stop during the imports ends in a traceback
    signal.signal(signal.SIGINT, _stop_before_setup)
    signal.signal(signal.SIGTERM, _stop_before_setup)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from wolpertinger import (ADDED, REFERENCE, RESUME_MAY_CHANGE, RUN_CONTROL, OptionError, Options, Range,  # noqa: E402
                          StopRequest, Stopped, TrainingFailed, Wolpertinger, parse_env_kwarg, saved_options)

TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    """The command line: `Options` (the reference's flag names and defaults, then those added) and run control."""
    p = argparse.ArgumentParser(description="Wolpertinger-DDPG in tinygrad: large discrete action sets.")
    groups = {name: p.add_argument_group(name) for name in (REFERENCE, ADDED, RUN_CONTROL)}
    for f in dataclasses.fields(Options):
        meta, flag = f.metadata, f.metadata["flag"] or "--" + f.name.replace("_", "-")
        group = groups[meta["group"]]
        if f.type == "bool":
            group.add_argument(flag, action="store_true", help=meta["help"])
        elif f.type == "dict":
            group.add_argument(flag, nargs="*", default=[], metavar="KEY=VALUE",
                               help=meta["help"] + " (each value read as an int, float, true/false, or else text)")
        else:
            group.add_argument(flag, type=TYPES[f.type], default=f.default, choices=meta["choices"] or None,
                               metavar="FILE.npy" if f.name == "action_embeddings" else None, help=meta["help"])
    reference, run = groups[REFERENCE], groups[RUN_CONTROL]
    reference.add_argument("--mode", default="train", choices=("train", "test", "plot"), help="train, test or plot runs")
    reference.add_argument("--max-episode", type=int, default=200000, help="episodes to train")
    reference.add_argument("--test-episode", type=int, default=1000, help="episodes in test mode")
    reference.add_argument("--load", action="store_true", help="continue training from --load-model-dir")
    reference.add_argument("--load-model-dir", nargs="*", default=[],
                           help="run folder(s) to load (several for --mode plot)")
    run.add_argument("--output", default="output", help="folder that holds the run folders")
    run.add_argument("--device", default=None, help="tinygrad device, e.g. CPU or CUDA (default: tinygrad's choice)")
    run.add_argument("--beam", type=int, default=0,
                     help="tinygrad BEAM width for the compiled steps (e.g. 2): faster updates after a one-off search")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def option(dest: str) -> str:
    """The command-line spelling of an argument, e.g. --save_per_epochs or --c-lr."""
    return next(a.option_strings[0] for a in build_parser()._actions if a.dest == dest)


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags that `argv` sets explicitly."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# Every numeric flag's valid values, checked by `validate` before anything else runs.
RANGES = {f.name: f.metadata["valid"] for f in dataclasses.fields(Options) if f.metadata["valid"] is not None} | \
    {"max_episode": Range(1), "test_episode": Range(1), "beam": Range(0)}


class UsageError(Exception):
    """Bad input: reported as one line and a non-zero exit."""


def validate(args: argparse.Namespace) -> None:
    """Raise UsageError naming the first numeric flag outside its range (a flag left unset, None, is fine)."""
    for name, valid in RANGES.items():
        value = getattr(args, name)
        if value is not None and not valid.holds(value):
            raise UsageError(f"{option(name)} must be {valid} (got {value})")


def options_of(args: argparse.Namespace, names=None) -> dict:
    """The `Options` among the arguments (those in `names`, or all), env_kwargs as a dict."""
    values = {name: getattr(args, name) for name in names or Options.names() if name in Options.names()}
    if "env_kwargs" in values:
        values["env_kwargs"] = {}
        for item in args.env_kwargs:
            try:
                key, value = parse_env_kwarg(item)
            except ValueError:
                key = None
            if key is None or key in values["env_kwargs"]:
                raise UsageError(f"--env-kwargs {item!r}: expected KEY=VALUE with each KEY a distinct name")
            values["env_kwargs"][key] = value
    return values


def load_folder(args: argparse.Namespace) -> Path:
    """The one --load-model-dir of test mode and --load, which must exist."""
    if len(args.load_model_dir) != 1:
        raise UsageError("--mode test and --load need exactly one --load-model-dir")
    folder = Path(args.load_model_dir[0])
    if not folder.is_dir():
        raise UsageError(f"--load-model-dir {folder}: no such folder")
    return folder


def changed_options(args: argparse.Namespace, given: set[str], folder: Path, resuming: bool) -> dict:
    """The options for loading `folder`: the flags given on this command line. One outside RESUME_MAY_CHANGE whose
    value differs from the run's is an error when resuming (the run must continue exactly), and a notice otherwise
    (the same weights, say, tested at another k). A run that records no settings takes every flag."""
    saved = saved_options(folder)
    if saved is None:
        print(f"notice: {folder} records no training settings: the flags of this command line describe the agent")
        return options_of(args)
    changed = options_of(args, given)
    for name, value in changed.items():
        theirs = getattr(saved, name)
        if name not in RESUME_MAY_CHANGE and value != theirs:
            if resuming:
                raise UsageError(f"--load continues a run with its own settings: {option(name)} is {theirs!r} "
                                 f"there, not {value!r} (start a new run to change it)")
            print(f"notice: {option(name)} {value!r} given; the run trained with "
                  f"{'its default' if theirs is None else repr(theirs)}")
    return changed


def build(args: argparse.Namespace, given: set[str] | None = None) -> Wolpertinger:
    """The agent of these arguments: loaded from --load-model-dir for --mode test and --load, else new."""
    run = dict(device=args.device, beam=args.beam)
    if args.mode == "test" or args.load:
        folder = load_folder(args)
        resuming = args.mode == "train"
        agent = Wolpertinger.load(folder, **run, **changed_options(args, given or set(), folder, resuming))
        if resuming and agent.resume is None:
            print(f"notice: {folder} holds weights only (an older checkpoint, or best/): Adam's moments, exploration, "
                  "random states, counters and replay memory start afresh")
        return agent
    options = options_of(args)
    return Wolpertinger(options.pop("env"), **run, **options)


def plot(args: argparse.Namespace) -> None:
    from util import plot_runs, read_metrics

    if not args.load_model_dir:
        raise UsageError("--mode plot needs one or more --load-model-dir run folders")
    runs = []
    for folder in map(Path, args.load_model_dir):
        if not (folder / "metrics.csv").is_file():
            raise UsageError(f"{folder} holds no metrics.csv")
        runs.append((folder.name, read_metrics(folder / "metrics.csv")))
    out = Path(args.output) / "comparison.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_runs(runs, out, f"{args.env}: " + ", ".join(name for name, _ in runs))
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    print(f"wrote {out}")


def in_flags(error: OptionError) -> str:
    """An option's error in the command line's words: its flag instead of its name."""
    return f"{option(error.name)} {error.problem}" if error.name in Options.names() else str(error)


def check_args(args: argparse.Namespace) -> None:
    """Every check of the parsed arguments that needs no env and builds nothing (the numeric ranges, --env-kwargs,
    the options' values and choices); UsageError naming the first bad flag. sweep.py runs it on each trial's flags."""
    validate(args)
    try:
        Options.checked(**options_of(args))
    except OptionError as e:
        raise UsageError(in_flags(e)) from None


def run(args: argparse.Namespace, given: set[str], stop: StopRequest | None) -> int:
    """Check, build and run the chosen mode; returns the exit status."""
    try:
        check_args(args)
        if args.mode == "plot":
            plot(args)
            return 0
        try:
            with stop.interruptible() if stop else contextlib.nullcontext():
                agent = build(args, given)
        except Stopped:
            print("stopped during set-up; nothing was trained, nothing written")
            return 0
        arguments = {**vars(args), **dataclasses.asdict(agent.options)}  # logged: the run's settings
        if stop is None:
            agent.test(args.test_episode, output=args.output, arguments=arguments,
                       title=f"{agent.env_id} test of {args.load_model_dir[0]}")
            return 0
        if agent.resume is not None and args.max_episode <= agent.resume.scalars["episode"]:
            raise UsageError(f"{agent.resume.parent} is already trained to Ep:{agent.resume.scalars['episode']}; "
                             "give a larger --max-episode")
        agent.learn(args.max_episode, output=args.output, stop=stop, arguments=arguments)
        return 0
    except OptionError as e:
        print(f"error: {in_flags(e)}", file=sys.stderr)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopRequest() if args.mode == "train" else None  # from the start: a signal during set-up stops too
    if stop is None and signal.getsignal(signal.SIGINT) is _stop_before_setup:  # testing, plotting: the usual way
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return run(args, given_flags(argv), stop)
    finally:
        if stop is not None:
            stop.restore()


if __name__ == "__main__":
    sys.exit(main())
