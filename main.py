"""Command line: train or test a Wolpertinger agent on a gymnasium env, or plot finished runs.

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
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

# numpy's OpenBLAS threads busy-wait for work and contend with tinygrad's runtime thread for the cores; the small
# products of the k-NN searches ran far slower threaded (64 x 16 times 16 x 1000: 49 ms against 0.07 ms on the
# 2-core machine while busy). Read once, when numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

if TYPE_CHECKING:  # heavy imports wait until the arguments are known good
    import gymnasium as gym

    from action_space import ActionSpace
    from wolp_agent import WolpertingerAgent

RENAMED_ENVS = {"Pendulum-v0": "Pendulum-v1"}  # gym ids that gymnasium has renamed

# Defaults that depend on the kind of action set (the action space's class name, or "embeddings" for a Discrete env
# acted in through its actions' embeddings), each measured where it differs from the fallback (README):
# - tau_update ("Learning results", 5 seeds): a small Discrete set (CartPole, episodes that end on failure) needs a
#   faster target network to propagate value; on a discretised Box (Pendulum) that destabilises learning, so the
#   reference's 0.001 stays there, and for MultiBinary and MultiDiscrete sets (not measured for them);
# - choice_pull ("The actor's pull"): on where the actions are a thin set inside the actor's box and it was measured
#   to help (item embeddings, the corners of MultiBinary), off elsewhere (the reference's actor loss), and off for
#   k = 1, where there is no choice to follow;
# - random_candidate ("Exploring among the k"): item embeddings explore by playing a random one of the k neighbours
#   as often as the noise scale allows, which feeds the critic the spread of candidates it must rank;
# - c_lr_end ("The critic's step after exploration"): item embeddings need the critic to rank 1000 candidates of
#   nearly equal value, which its noisy late steps blur; a tenth of the step once exploration has ended sharpens it.
KIND_DEFAULTS = {"Discrete": {"tau_update": 0.01},
                 "embeddings": {"tau_update": 0.01, "choice_pull": 1.0, "random_candidate": 1.0, "c_lr_end": 0.1},
                 "MultiBinary": {"choice_pull": 1.0}}
FALLBACK_DEFAULTS = {"tau_update": 0.001, "choice_pull": 0.0, "random_candidate": 0.3, "c_lr_end": 1.0}

# Actions of more than one dimension have their k candidates held in memory and scored, for each of a
# minibatch's states: the default k (k_ratio of the actions) stops here, which combinatorial sets
# (MultiBinary(20): 1,048,576 actions) would pass by far. Pendulum's 10% of 200,000 is exactly this.
DEFAULT_K_CAP = 20000

# tinygrad's HCQ2 runtime runs a compiled graph as one native call instead of one Python call per kernel
# (CartPole: 4.0 instead of 4.9 ms per step). tinygrad reads it once, when first imported; HCQ2=0 turns it off.
os.environ.setdefault("HCQ2", "1")
# No pool of compile worker processes: `timeout` and a terminal's job control signal the whole process group, and a
# worker killed by SIGTERM while waiting for work dies holding the pool's task-queue lock, so multiprocessing's exit
# handler (Pool._terminate_pool -> _help_stuff_finish) waits for that lock forever. Compiling in-process is no
# slower here (Pendulum, 2 episodes: 17-20 s with PARALLEL=0 against 24-29 s with PARALLEL=2 on 2 cores).
os.environ.setdefault("PARALLEL", "0")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with the reference's flag names and defaults."""
    p = argparse.ArgumentParser(description="Wolpertinger-DDPG in tinygrad: large discrete action sets.")
    p.add_argument("--env", default="Pendulum-v0", help="gymnasium env id (Pendulum-v0 means Pendulum-v1)")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keyword arguments for the env, e.g. n_items=1000000 world_seed=3 (each value read as an int, "
                        "float, true/false, or else text)")
    p.add_argument("--mode", default="train", choices=("train", "test", "plot"))
    p.add_argument("--max-actions", type=int, default=200000, help="grid size for a Box action space")
    p.add_argument("--max-episode", type=int, default=200000, help="episodes to train")
    p.add_argument("--max-episode-length", type=int, default=1440, help="truncate episodes after this many steps")
    p.add_argument("--test-episode", type=int, default=1000, help="episodes in test mode")
    p.add_argument("--load", action="store_true", help="continue training from --load-model-dir")
    p.add_argument("--load-model-dir", nargs="*", default=[], help="run folder(s) to load (several for --mode plot)")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--hidden1", type=int, default=256)
    p.add_argument("--hidden2", type=int, default=128)
    p.add_argument("--c-lr", type=float, default=1e-3, help="critic learning rate")
    p.add_argument("--c-lr-end", type=float, default=None,
                   help="factor on the critic learning rate once the exploration noise has run out (after --epsilon "
                        "steps; default: 0.1 for action embeddings, else 1, the reference's constant rate)")
    p.add_argument("--p-lr", type=float, default=1e-4, help="actor learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty added to the gradient (torch Adam)")
    p.add_argument("--warmup", type=int, default=128, help="random steps before the first update")
    p.add_argument("--bsize", type=int, default=64, help="minibatch size")
    p.add_argument("--rmsize", type=int, default=6000000, help="replay memory capacity")
    p.add_argument("--tau-update", type=float, default=None,
                   help="soft target update rate (default: 0.001, the reference's, for a Box action space; "
                        "0.01 for a Discrete one)")
    p.add_argument("--ou_theta", type=float, default=0.15)
    p.add_argument("--ou_sigma", type=float, default=0.2)
    p.add_argument("--ou_mu", type=float, default=0.0)
    p.add_argument("--init_w", type=float, default=0.003)
    p.add_argument("--epsilon", type=int, default=80000, help="steps over which the noise scale decays to 0")
    p.add_argument("--random-candidate", type=float, default=None,
                   help="probability, times the decaying noise scale, of playing a uniformly random one of the k "
                        "candidates instead of the critic's best (default: 1 for action embeddings, else 0.3; "
                        "0: the reference)")
    p.add_argument("--choice-pull", type=float, default=None,
                   help="weight of a loss pulling the actor's proto-action of each next state of a minibatch towards "
                        "the action chosen for it among its k neighbours (default: 1 for action embeddings and "
                        "MultiBinary with k > 1, else 0; 0 is the reference's actor loss alone)")
    p.add_argument("--seed", type=int, default=-1, help="<= 0: unseeded")
    p.add_argument("--save_per_epochs", type=int, default=15, help="save every N episodes")
    p.add_argument("--id", default="0", help="experiment id")
    p.add_argument("--k-ratio", type=float, default=0.1,
                   help="k = max(min(2, number of actions), int(k_ratio * number of actions)), at most "
                        f"{DEFAULT_K_CAP} for actions of more than one dimension; the reference used max(1, ...), "
                        "which leaves the critic no choice below 20 actions (--k 1 restores it there)")
    p.add_argument("--k", type=int, default=None, help="number of neighbours (overrides --k-ratio)")
    p.add_argument("--knn", default="auto", choices=("auto", "lattice", "exact", "ivf", "flann"),
                   help="grids: auto/lattice (exact search on the grid) or flann (the reference's FLANN kd-tree); "
                        "action embeddings: exact (brute force), ivf (inverted file, approximate), flann, or auto "
                        "(exact up to 20000 items, ivf above)")
    p.add_argument("--action-embeddings", default=None, metavar="FILE.npy",
                   help="N x d embeddings of a Discrete(N) env's actions (wins over the env's action_embeddings)")
    p.add_argument("--flann-checks", type=int, default=0,
                   help="--knn flann over embeddings: kd-tree leaves checked per query, FLANN's accuracy knob "
                        "(0: max(256, 10 k); at least k)")
    p.add_argument("--ivf-probes", type=int, default=32,
                   help="--knn ivf: nearest lists scanned per query (of about sqrt(N) lists)")
    p.add_argument("--scoring", default="factored", choices=("factored", "full"),
                   help="full: run the whole critic per candidate, as the reference did (same numbers, slower)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate without noise every N episodes (0: never)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    p.add_argument("--beam", type=int, default=0,
                   help="tinygrad BEAM search width for the compiled steps (e.g. 2): about 2x faster updates on a CPU "
                        "after a one-off search of minutes, cached for later runs; 0: off")
    p.add_argument("--device", default=None, help="tinygrad device, e.g. CPU or CUDA (default: tinygrad's choice)")
    p.add_argument("--output", default="output", help="folder that holds the run folders")
    p.add_argument("--no-save-memory", action="store_true",
                   help="leave the replay memory out of checkpoints (for huge memories): a run resumed from one "
                        "refills an empty memory and pauses updates until it holds --warmup transitions again")
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


# Flags that a resumed run may set anew; every other one comes from the checkpoint, so the run continues exactly.
RESUME_MAY_CHANGE = {"mode", "load", "load_model_dir", "output", "max_episode", "save_per_epochs", "test_episode",
                     "id", "beam", "device", "no_save_memory"}


def load_folder(args: argparse.Namespace) -> Path:
    """The one --load-model-dir of test mode and --load, which must exist."""
    if len(args.load_model_dir) != 1:
        raise UsageError("--mode test and --load need exactly one --load-model-dir")
    folder = Path(args.load_model_dir[0])
    if not folder.is_dir():
        raise UsageError(f"--load-model-dir {folder}: no such folder")
    return folder


def with_saved_settings(args: argparse.Namespace, given: set[str], saved: dict, resuming: bool) -> argparse.Namespace:
    """A run's saved settings, with the flags given on this command line. A given flag outside RESUME_MAY_CHANGE
    whose value differs from the run's is an error when resuming (the run must continue exactly), and a notice
    otherwise (the same weights, say, tested at another k)."""
    merged = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k in vars(args)}})
    for name in given:
        value, theirs = getattr(args, name), saved.get(name)
        if name not in RESUME_MAY_CHANGE and value != theirs:
            if resuming:
                raise UsageError(f"--load continues a run with its own settings: {option(name)} is {theirs!r} "
                                 f"there, not {value!r} (start a new run to change it)")
            print(f"notice: {option(name)} {value!r} given; the run trained with "
                  f"{'its default' if theirs is None else repr(theirs)}")
        setattr(merged, name, value)
    return merged


def read_checkpoint(path: Path, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """A checkpoint's arrays (all, or those named) and metadata; a damaged file is a UsageError naming it."""
    from util import read_tensors
    try:
        return read_tensors(path, names)
    except ValueError as e:
        raise UsageError(f"cannot load {path}: {e}") from None


def training_settings(folder: Path) -> dict | None:
    """The settings of the run whose weights `folder` holds: its checkpoint's, or for a best/ folder (weights
    only) its run's; None where neither records them (an older checkpoint, weights from elsewhere)."""
    from ddpg import CHECKPOINT

    for path in (folder / CHECKPOINT, folder.parent / CHECKPOINT if folder.name == "best" else None):
        if path is not None and path.is_file():
            saved = read_checkpoint(path, [])[1] or {}
            if "args" in saved:
                return saved["args"]
    return None


def trained_args(args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """The settings for weights loaded without their training state (--mode test, --load of best/ or of older
    weights): those the weights were trained with, so that the agent loaded is the agent trained, with the flags
    given on this command line."""
    folder = load_folder(args)
    saved = training_settings(folder)
    if saved is None:
        print(f"notice: {folder} records no training settings: the flags of this command line describe the agent")
        return args
    return with_saved_settings(args, given, saved, resuming=False)


class UsageError(Exception):
    """Bad input: reported as one line and a non-zero exit."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag: low <= x (low < x where low_open) and x <= high; None is unbounded."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        return above and (self.high is None or x <= self.high)

    def __str__(self) -> str:
        if self.low is None:
            return "a finite number"
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# Every numeric flag's valid values, checked by `validate` before anything else runs.
RANGES = {
    "max_actions": Range(1), "max_episode": Range(1), "max_episode_length": Range(1), "test_episode": Range(1),
    "gamma": Range(0, 1), "hidden1": Range(1), "hidden2": Range(1), "c_lr": Range(0, low_open=True),
    "c_lr_end": Range(0, low_open=True),
    "p_lr": Range(0, low_open=True), "weight_decay": Range(0), "warmup": Range(0), "bsize": Range(1),
    "rmsize": Range(1), "tau_update": Range(0, 1, low_open=True), "ou_theta": Range(0), "ou_sigma": Range(0),
    "ou_mu": Range(), "init_w": Range(0, low_open=True), "epsilon": Range(1), "random_candidate": Range(0, 1),
    "choice_pull": Range(0),
    "seed": Range(), "save_per_epochs": Range(1), "k_ratio": Range(0, 1), "k": Range(1),
    "eval_every": Range(0), "eval_episodes": Range(1), "beam": Range(0), "flann_checks": Range(0),
    "ivf_probes": Range(1),
}


def validate(args: argparse.Namespace) -> None:
    """Raise UsageError naming the first numeric flag outside its range (a flag left unset, None, is fine)."""
    for name, valid in RANGES.items():
        value = getattr(args, name)
        if value is not None and not valid.holds(value):
            raise UsageError(f"{option(name)} must be {valid} (got {value})")


class Stopped(BaseException):
    """A stop request inside `StopRequest.interruptible()` (a BaseException, so that no library swallows it)."""


class StopRequest:
    """SIGINT/SIGTERM: the first stops training with everything saved; within `interruptible()` at once (the
    caller then saves the state from before the episode in progress), elsewhere at the next check of `requested`.
    A second signal exits at once, keeping the last complete checkpoint. Ignored SIGINT (nohup) is taken too."""

    def __init__(self):
        self.requested, self._interruptible = False, False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable) -> None:
        # Stopped raised while a finaliser (__del__) ran is swallowed by Python and would print a traceback;
        # the stop then takes effect at the next check of `requested`, at the end of the episode
        if not isinstance(unraisable.exc_value, Stopped):
            self._previous_hook(unraisable)

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True
        # os.write, not print: the handler may run while the progress bar is in the middle of writing to stderr
        os.write(2, f"\n{signal.Signals(signum).name}: stopping and saving "
                    "(again to quit at once, keeping the last checkpoint)\n".encode())
        if self._interruptible:
            self._interruptible = False
            raise Stopped

    @contextlib.contextmanager
    def interruptible(self):
        """A block that a stop request ends at once by raising Stopped."""
        if self.requested:
            raise Stopped
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self._previous_hook


class Diverged(Exception):
    """A loss, a parameter or the env's output is NaN or infinite: training stops before saving anything."""


@dataclass
class Setup:
    """Everything a run needs: the env (and a separate one for evaluation), the action set and the agent."""
    env_id: str
    env: gym.Env
    eval_env: gym.Env
    space: ActionSpace
    agent: WolpertingerAgent
    k: int


def parse_value(text: str) -> int | float | bool | str:
    """An int, a float, true/false, or else the text itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_env_kwargs(items: list[str]) -> dict:
    """--env-kwargs KEY=VALUE strings as keyword arguments for gym.make."""
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier() or key in kwargs:
            raise UsageError(f"--env-kwargs {item!r}: expected KEY=VALUE with each KEY a distinct name")
        kwargs[key] = parse_value(text)
    return kwargs


def unflattenable(space: gym.Space) -> str | None:
    """The kind of the first part of an observation space that is not flattened to a vector, or None."""
    import gymnasium as gym
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces
        return next(filter(None, map(unflattenable, parts)), None)
    flat = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiBinary, gym.spaces.MultiDiscrete)
    return None if isinstance(space, flat) else type(space).__name__


def make_env(env_id: str, kwargs: dict | None = None) -> gym.Env:
    """gym.make with the built-in envs registered; an observation space other than a Box goes through gymnasium's
    flattening (Discrete as one-hot), so that the agent sees a flat float32 Box."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the built-in envs)
    kwargs = kwargs or {}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {env_id!r}: {e}") from None
    except (TypeError, ValueError) as e:  # a keyword the env does not take, or a value it refuses
        given = " with --env-kwargs " + " ".join(f"{k}={v!r}" for k, v in kwargs.items()) if kwargs else ""
        raise UsageError(f"cannot make env {env_id!r}{given}: {e}") from None
    space = env.observation_space
    if isinstance(space, gym.spaces.Box):
        return env
    if (kind := unflattenable(space)) is not None:
        holding = "" if kind == type(space).__name__ else f" holding a {kind}"
        raise UsageError(f"{env_id} observes a {type(space).__name__}{holding}; supported: Box, Discrete, MultiBinary, "
                         "MultiDiscrete, and Dict or Tuple of them")
    flat = gym.wrappers.FlattenObservation(env)
    # bounds cast here, not by gymnasium's Box, which warns when a float64 part loses precision
    box = gym.spaces.Box(flat.observation_space.low.astype(np.float32), flat.observation_space.high.astype(np.float32))
    return gym.wrappers.TransformObservation(flat, lambda obs: obs.astype(np.float32), box)


def load_action_embeddings(env: gym.Env, args: argparse.Namespace) -> np.ndarray | None:
    """The actions' embeddings: the --action-embeddings file, else the env's `action_embeddings`, else None."""
    if args.action_embeddings is None:
        return getattr(env.unwrapped, "action_embeddings", None)
    try:
        embeddings = np.load(args.action_embeddings, allow_pickle=False)
    except OSError as e:
        raise UsageError(f"--action-embeddings {args.action_embeddings}: {e.strerror or 'cannot read it'}") from None
    except ValueError:
        raise UsageError(f"--action-embeddings {args.action_embeddings}: not a .npy array file") from None
    if not isinstance(embeddings, np.ndarray):  # an .npz archive
        raise UsageError(f"--action-embeddings {args.action_embeddings}: not a single .npy array")
    return embeddings


def make_embedding_space(env_id: str, act: gym.Space, embeddings, args: argparse.Namespace) -> ActionSpace:
    """An EmbeddingActionSpace over a Discrete env's actions; says which search --knn auto picked."""
    import gymnasium as gym

    from action_space import EXACT_MAX_ITEMS, EmbeddingActionSpace
    if not isinstance(act, gym.spaces.Discrete):
        raise UsageError(f"{env_id}: action embeddings need a Discrete action space, not {type(act).__name__}")
    try:
        space = EmbeddingActionSpace(embeddings, int(act.start), args.knn, args.flann_checks, args.ivf_probes)
    except ValueError as e:
        raise UsageError(f"{env_id}: {e}") from None
    if space.n != act.n:
        raise UsageError(f"{env_id}: {space.n} action embeddings for {act.n} actions")
    if args.knn == "auto":
        print(f"--knn auto: {space.knn} search over {space.n} items (exact up to {EXACT_MAX_ITEMS} items)")
    return space


def make_action_space(env_id: str, act: gym.Space, args: argparse.Namespace) -> ActionSpace:
    """The agent's action set for an env's action space; raises UsageError for one it cannot take."""
    import gymnasium as gym

    from action_space import GridActionSpace
    try:
        if isinstance(act, gym.spaces.Box):
            return GridActionSpace.continuous(act.low, act.high, args.max_actions, knn=args.knn)
        if isinstance(act, gym.spaces.Discrete):
            return GridActionSpace.discrete(int(act.n), int(act.start), knn=args.knn)
        if isinstance(act, gym.spaces.MultiBinary):
            return GridActionSpace.multi_discrete(np.full(act.shape, 2), np.zeros(act.shape, act.dtype), knn=args.knn)
        if isinstance(act, gym.spaces.MultiDiscrete):
            return GridActionSpace.multi_discrete(act.nvec, act.start, knn=args.knn)
    except ValueError as e:  # unbounded box, too few actions for one grid point per axis, too many for FLANN
        raise UsageError(f"{env_id}: {e}") from None
    raise UsageError(f"{env_id} has a {type(act).__name__} action space; "
                     "supported: Box, Discrete, MultiBinary and MultiDiscrete")


def default_k(space: ActionSpace, k_ratio: float) -> int:
    """k_ratio of the actions, at least 2 where there are 2, at most DEFAULT_K_CAP for actions of more than one
    dimension (then saying so)."""
    k = max(min(2, space.n), int(k_ratio * space.n))
    if space.dim > 1 and k > DEFAULT_K_CAP:
        print(f"k = {DEFAULT_K_CAP}: the default k is capped there (k_ratio {k_ratio} of {space.n} actions would be "
              f"{k}); --k sets another")
        return DEFAULT_K_CAP
    return k


def build(args: argparse.Namespace) -> Setup:
    """Env, action set and agent from the arguments; raises UsageError on anything unusable."""
    from tinygrad import Device, Tensor
    from tinygrad.helpers import DEV

    from ddpg import DDPGConfig
    from util import usable_cores
    from wolp_agent import WolpertingerAgent

    if args.device:
        try:
            Device[args.device.upper()]
        except Exception as e:
            raise UsageError(f"tinygrad device {args.device!r} is not available ({type(e).__name__})") from None
        DEV.value = args.device.upper()  # tinygrad 0.14 reads the default device from DEV
    if args.beam:
        from tinygrad.helpers import BEAM
        BEAM.value = args.beam
    env_id = RENAMED_ENVS.get(args.env, args.env)
    if env_id != args.env:
        print(f"{args.env} is not in gymnasium; using {env_id} (same dynamics)")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    env = make_env(env_id, env_kwargs)
    embeddings = load_action_embeddings(env, args)
    space = make_action_space(env_id, env.action_space, args) if embeddings is None else \
        make_embedding_space(env_id, env.action_space, embeddings, args)
    k = args.k if args.k is not None else default_k(space, args.k_ratio)
    kind = "embeddings" if embeddings is not None else type(env.action_space).__name__
    defaults = {**FALLBACK_DEFAULTS, **KIND_DEFAULTS.get(kind, {})}
    if k == 1:
        defaults["choice_pull"] = 0.0  # a lone candidate: no choice to follow
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    seeded = args.seed > 0
    rng = np.random.default_rng(args.seed if seeded else None)
    Tensor.manual_seed(int(rng.integers(2 ** 31)))
    cfg = DDPGConfig(hidden1=args.hidden1, hidden2=args.hidden2, init_w=args.init_w, c_lr=args.c_lr,
                     p_lr=args.p_lr, weight_decay=args.weight_decay, gamma=args.gamma, tau=args.tau_update,
                     batch_size=args.bsize, ou_theta=args.ou_theta, ou_sigma=args.ou_sigma, ou_mu=args.ou_mu,
                     epsilon=args.epsilon, choice_pull=args.choice_pull, c_lr_end=args.c_lr_end)
    try:
        usable_cores()  # a bad $WOLPERTINGER_CORES fails here, in one line, not in the first search
        agent = WolpertingerAgent(int(np.prod(env.observation_space.shape)), space, k, cfg, rng, scoring=args.scoring,
                                  random_candidate=args.random_candidate)
    except ValueError as e:  # an impossible k or probability, or a bad $WOLPERTINGER_CORES
        raise UsageError(str(e)) from None
    if args.mode == "test" or args.load:
        try:
            agent.load(load_folder(args))
        except ValueError as e:
            raise UsageError(f"cannot load weights: {e}") from None
        if message := space.load_index(load_folder(args)):
            print(message)
    return Setup(env_id, env, make_env(env_id, env_kwargs), space, agent, k)


def run_episode(setup: Setup, env: gym.Env, explore: bool, max_steps: int, seed: int | None = None, memory=None,
                warmup: int = 0, step: int = 0) -> tuple[float, int]:
    """Play one episode; when `memory` is given, store transitions and update after `warmup` total steps.

    Returns the episode return and the total env step count after it.
    """
    agent, space = setup.agent, setup.space
    obs, _ = env.reset(seed=seed)
    agent.reset_noise()
    episode_return = 0.0
    for _ in range(max_steps):
        action = agent.random_action() if step < warmup else agent.select_action(obs, explore=explore)
        next_obs, reward, terminated, truncated, _ = env.step(space.to_env(action))
        if not (np.isfinite(next_obs).all() and np.isfinite(reward)):
            raise Diverged(f"the env returned a non-finite {'reward' if np.isfinite(next_obs).all() else 'observation'}")
        episode_return += float(reward)
        step += 1
        if memory is not None:
            # a cut at max_steps is a truncation too: only `terminated` ends the return
            memory.append(obs.ravel(), space.points(action), reward, np.ravel(next_obs), terminated)
            # from a fresh start the second test is the first; resumed without its memory, updates wait until
            # the memory holds `warmup` transitions again
            if step > warmup and len(memory) > min(warmup, memory.capacity - 1):
                losses = agent.update(memory)[:2]  # the critic's and the actor's
                if not np.isfinite(losses).all():
                    bad = int(np.isfinite(losses[0]))  # 0: the critic's, 1: the actor's
                    raise Diverged(f"the {('critic', 'actor')[bad]} loss is {losses[bad]}")
        obs = next_obs
        if terminated or truncated:
            break
    return episode_return, step


def evaluate(setup: Setup, episodes: int, max_steps: int) -> float:
    """Mean return of `episodes` noise-free episodes on the separate evaluation env."""
    return float(np.mean([run_episode(setup, setup.eval_env, False, max_steps)[0] for _ in range(episodes)]))


def progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="ep", dynamic_ncols=True, mininterval=1.0, disable=None)


def checkpoint(args: argparse.Namespace, setup: Setup, counters: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The whole training state but the replay memory's contents: the agent's, both envs' random states, the
    loop's counters and the run's settings."""
    arrays, scalars = setup.agent.training_state()
    scalars |= counters | {"format": 1, "args": vars(args), "memory": None,
                           "env_rng": setup.env.unwrapped.np_random.bit_generator.state,
                           "eval_env_rng": setup.eval_env.unwrapped.np_random.bit_generator.state}
    return arrays, scalars


def restore(setup: Setup, memory, arrays: dict[str, np.ndarray], scalars: dict) -> None:
    """Load a checkpoint made by `checkpoint` into the agent, memory and envs."""
    from memory import FIELDS

    setup.agent.load_training_state(arrays, scalars)
    if scalars["memory"] is not None:
        memory.load_state({name: arrays[f"memory.{name}"] for name in FIELDS}, scalars["memory"])
    setup.env.unwrapped.np_random.bit_generator.state = scalars["env_rng"]
    setup.eval_env.unwrapped.np_random.bit_generator.state = scalars["eval_env_rng"]


@dataclass
class Resume:
    """The run to continue: its folder and its checkpoint's arrays and scalars."""
    parent: Path
    arrays: dict[str, np.ndarray]
    scalars: dict


def train(args: argparse.Namespace, setup: Setup, run_dir: Path, stop: StopRequest, resume: Resume | None) -> int:
    """Train from scratch, or continue the run of `resume` (its log, metrics and best weights so far are copied
    into `run_dir`, which then continues them). Returns the exit status: 1 where training
    diverged or a file could not be written, with the last complete checkpoint kept."""
    from ddpg import CHECKPOINT
    from memory import ReplayMemory
    from util import RunLog, TensorBoardLog, plot_runs, read_tensors, save_tensors

    agent = setup.agent
    memory = ReplayMemory(args.rmsize, agent.state_dim, agent.action_dim)
    title = f"{setup.env_id}: {setup.space.n} actions, k = {setup.k}"
    seed = args.seed if args.seed > 0 else None
    if seed is not None:
        setup.eval_env.reset(seed=seed + 1)
    first, step, wall, best_eval, arguments = 0, 0, 0.0, -np.inf, vars(args)
    parent = None if resume is None else resume.parent
    if resume is not None:
        restore(setup, memory, resume.arrays, resume.scalars)
        saved = resume.scalars
        first, step, wall, best_eval = saved["episode"], saved["env_steps"], saved["wall_seconds"], saved["best_eval"]
        arguments = {name: value for name, value in vars(args).items() if saved["args"].get(name) != value}
        best = parent / "best" / CHECKPOINT
        if best.is_file() and read_tensors(best, [])[1]["episode"] <= first:  # not one the resumed run replays
            shutil.copytree(best.parent, run_dir / "best")
    log = RunLog(run_dir, "train", arguments, None if parent is None else (parent, first))
    board = TensorBoardLog(run_dir)
    start = time.time() - wall
    saved_before = None

    def state_now(before_episode: int) -> tuple[dict[str, np.ndarray], dict]:
        counters = dict(episode=before_episode, env_steps=step, wall_seconds=time.time() - start, best_eval=best_eval)
        return checkpoint(args, setup, counters)

    def save(before_episode: int, state: tuple[dict[str, np.ndarray], dict] | None = None) -> None:
        """Write the checkpoint of the state now, or of `state` (with the memory as it is now)."""
        nonlocal saved_before
        arrays, scalars = state or state_now(before_episode)
        if not args.no_save_memory:
            memory_arrays, scalars["memory"] = memory.state()
            arrays = arrays | {f"memory.{name}": array for name, array in memory_arrays.items()}
        save_tensors(run_dir / CHECKPOINT, arrays, scalars)
        saved_before = before_episode
        log.line(f"### Model Saved before Ep:{before_episode} ###")
        plot_runs([(run_dir.name, log.metrics())], run_dir / "reward_curve.png", title)

    def failed(message: str) -> int:
        bar.close()
        with contextlib.suppress(OSError):  # the log may be what could not be written
            log.close()
            board.close()
        kept = f"{run_dir / CHECKPOINT} (before Ep:{saved_before})" if saved_before is not None else \
            f"{parent / CHECKPOINT} (before Ep:{first})" if parent is not None else "none was written"
        best = "; best/ untouched" if (run_dir / "best").is_dir() else ""
        print(f"error: {message}; last complete checkpoint: {kept}{best}", file=sys.stderr)
        return 1

    bar = progress(args.max_episode)
    bar.update(first)
    episode = first
    try:
        for episode in range(first, args.max_episode):  # numbered from 0, as the reference's log does
            if stop.requested:
                bar.close()
                print(f"stopped before Ep:{episode}; saving")
                break
            # a stop during the episode or its evaluation saves the state from before it (a few ms to take), so the
            # process ends at once, whatever it was doing, and a resumed run replays the episode exactly
            before, mark = state_now(episode), memory.mark(args.max_episode_length)
            done = episode + 1
            try:
                with stop.interruptible():
                    ret, step = run_episode(setup, setup.env, True, args.max_episode_length,
                                            seed if episode == 0 else None, memory, args.warmup, step)
                    if not agent.parameters_finite():  # checked before anything is evaluated or saved
                        raise Diverged("a network parameter is not finite")
                    eval_ret = evaluate(setup, args.eval_episodes, args.max_episode_length) \
                        if args.eval_every > 0 and done % args.eval_every == 0 else None
            except Stopped:
                bar.close()
                print(f"stopped during Ep:{episode}; saving the state from before it")
                memory.rollback(mark)
                save(episode, before)
                break
            log.episode(episode, step, ret, time.time() - start, eval_ret)
            board.episode(done, step, ret, time.time() - start, eval_ret, agent.update_means(),
                          max(agent.epsilon, 0.0))
            if eval_ret is not None and eval_ret > best_eval:  # Q-learners can unlearn; keep the best weights
                best_eval = eval_ret
                agent.save(run_dir / "best", {"episode": done, "eval_return": eval_ret})
            bar.update(1)
            bar.set_postfix(steps=step, ret=f"{ret:.1f}", sps=f"{step / (time.time() - start):.0f}", refresh=False)
            if done % args.save_per_epochs == 0:
                save(done)
        else:
            episode = args.max_episode
        if saved_before != episode:  # else the last episode's save holds everything
            save(episode)
        log.close()
        board.close()
    except Diverged as e:
        return failed(f"training diverged in Ep:{episode}: {e}")
    except OSError as e:  # a full disk, a removed run folder
        return failed(f"cannot write to {run_dir}: {e.strerror or e}")
    bar.close()
    print(f"trained to Ep:{episode} ({step} env steps, {time.time() - start:.0f} s); "
          f"log, metrics, checkpoint and plot in {run_dir}")
    return 0


def test(args: argparse.Namespace, setup: Setup, run_dir: Path) -> None:
    from util import RunLog, plot_runs

    log = RunLog(run_dir, "test", vars(args))
    returns, start = [], time.time()
    seed = args.seed if args.seed > 0 else None
    bar = progress(args.test_episode)
    for episode in range(args.test_episode):
        ret, _ = run_episode(setup, setup.env, False, args.max_episode_length, seed if episode == 0 else None)
        returns.append(ret)
        log.episode(episode, 0, ret, time.time() - start)
        bar.update(1)
    bar.close()
    summary = f"test: {len(returns)} episodes, return mean {np.mean(returns):.2f} std {np.std(returns):.2f}"
    log.line(summary)
    log.close()
    plot_runs([(run_dir.name, log.metrics())], run_dir / "reward_curve.png",
              f"{setup.env_id} test of {args.load_model_dir[0]}")
    print(f"{summary}; log in {run_dir}")


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


def resume_from(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, Resume | None]:
    """For --load: the run to continue and its settings, or None where the folder holds weights only."""
    from ddpg import CHECKPOINT

    folder = load_folder(args)
    arrays, saved = {}, None
    if (folder / CHECKPOINT).is_file():
        arrays, saved = read_checkpoint(folder / CHECKPOINT)
    if saved is None or "args" not in saved:
        print(f"notice: {folder} holds weights only (an older checkpoint, or best/): Adam's moments, exploration, "
              "random states, counters and replay memory start afresh")
        return trained_args(args, given), None
    args = with_saved_settings(args, given, saved["args"], resuming=True)
    if args.max_episode <= saved["episode"]:
        raise UsageError(f"{folder} is already trained to Ep:{saved['episode']}; give a larger --max-episode")
    return args, Resume(folder, arrays, saved)


def run(args: argparse.Namespace, given: set[str], stop: StopRequest | None) -> int:
    """Validate, build and run the chosen mode; returns the exit status."""
    from util import new_run_dir

    try:
        validate(args)
        if args.mode == "plot":
            plot(args)
            return 0
        if args.mode == "test":
            args = trained_args(args, given)
        args, resume = resume_from(args, given) if args.mode == "train" and args.load else (args, None)
        try:
            with stop.interruptible() if stop else contextlib.nullcontext():
                setup = build(args)
        except Stopped:
            print("stopped during set-up; nothing was trained, nothing written")
            return 0
        try:
            run_dir = new_run_dir(Path(args.output), args.env)
        except OSError as e:
            raise UsageError(f"cannot create a run folder in {args.output}: {e.strerror or e}") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}" + ("" if resume is None else f", continuing {resume.parent}"))
    if args.mode == "train" and (message := setup.space.save_index(run_dir)):
        print(message)
    if stop is None:
        test(args, setup, run_dir)
        return 0
    return train(args, setup, run_dir, stop, resume)


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
