"""The public class: a Wolpertinger agent built from a gymnasium env (an instance or an id) and options, that
learns, saves, loads, acts and ranks.

    from wolpertinger import Wolpertinger
    agent = Wolpertinger("CartPole-v1", seed=1)
    agent.learn(episodes=300)                       # writes output/CartPole-v1-run<N>/
    agent = Wolpertinger.load("output/CartPole-v1-run1")
    action = agent.act(obs)                         # the env action, noise-free
    best = agent.rank(obs, n=5)                     # the 5 best of the k candidates, with their critic values

The options carry the command line's names and defaults (`Options`); main.py is a command line over this class.
"""
from __future__ import annotations

import runtime  # first: the runtime's process-wide settings, before numpy and tinygrad load

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np

from action_space import ActionSpace, action_set
from ddpg import CHECKPOINT, DDPGConfig
from feedback import Answer, Journal, Transition
from memory import FIELDS, ReplayMemory
from util import RunLog, TensorBoardLog, new_run_dir, plot_runs, read_tensors, save_tensors, usable_cores
from wolp_agent import WolpertingerAgent

RENAMED_ENVS = {"Pendulum-v0": "Pendulum-v1"}  # gym ids that gymnasium has renamed

# Actions of more than one dimension have their k candidates held in memory and scored, for each of a
# minibatch's states: the default k (k_ratio of the actions) stops here, which combinatorial sets
# (MultiBinary(20): 1,048,576 actions) would pass by far. Pendulum's 10% of 200,000 is exactly this.
DEFAULT_K_CAP = 20000

# Defaults that depend on the kind of action set (the action space's class name, or "embeddings" for a Discrete env
# acted in through its actions' embeddings), each measured where it differs from the fallback (docs/learning.md):
# - tau_update: a small Discrete set (CartPole, episodes that end on failure) needs a faster target network to
#   propagate value; on a discretised Box (Pendulum) that destabilises learning, so the reference's 0.001 stays
#   there, and for MultiBinary and MultiDiscrete sets (not measured for them);
# - choice_pull: on where the actions are a thin set inside the actor's box and it was measured to help (item
#   embeddings, the corners of MultiBinary), off elsewhere (the reference's actor loss), and off for k = 1, where
#   there is no choice to follow;
# - random_candidate: item embeddings explore by playing a random one of the k neighbours as often as the noise
#   scale allows, which feeds the critic the spread of candidates it must rank;
# - c_lr_end: item embeddings need the critic to rank 1000 candidates of nearly equal value, which its noisy late
#   steps blur; a tenth of the step once exploration has ended sharpens it.
KIND_DEFAULTS = {"Discrete": {"tau_update": 0.01},
                 "embeddings": {"tau_update": 0.01, "choice_pull": 1.0, "random_candidate": 1.0, "c_lr_end": 0.1},
                 "MultiBinary": {"choice_pull": 1.0}}
FALLBACK_DEFAULTS = {"tau_update": 0.001, "choice_pull": 0.0, "random_candidate": 0.3, "c_lr_end": 1.0}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: low <= x (low < x where low_open) and x <= high; None is unbounded."""
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


REFERENCE, ADDED, RUN_CONTROL = "the reference's flags", "added flags", "run control"  # main.py -h's groups


def option(default: Any, help: str, flag: str = "", valid: Range | None = None, choices: tuple = (),
           group: str = REFERENCE) -> Any:
    """A field of `Options`: its default, a one-line help, the command line's spelling (default: --name with
    dashes), its valid values, and its group in `main.py -h`."""
    return field(default=default, metadata=dict(help=help, flag=flag, valid=valid, choices=choices, group=group))


@dataclass
class Options:
    """Every option of an agent and its training, with the command line's names and defaults; saved with each
    checkpoint. None where the default depends on the action set (`KIND_DEFAULTS`, `default_k`)."""
    env: str = option("Pendulum-v0", "gymnasium env id, or module:Env-v0 (Pendulum-v0 means Pendulum-v1)")
    env_kwargs: dict = option(None, "keyword arguments for the env, e.g. n_items=1000000 world_seed=3", group=ADDED)
    max_actions: int = option(200000, "grid size for a Box action space", valid=Range(1))
    max_episode_length: int = option(1440, "truncate episodes after this many steps", valid=Range(1))
    gamma: float = option(0.99, "discount", valid=Range(0, 1))
    hidden1: int = option(256, "first hidden layer's width, both nets", valid=Range(1))
    hidden2: int = option(128, "second hidden layer's width, both nets", valid=Range(1))
    c_lr: float = option(1e-3, "critic learning rate", valid=Range(0, low_open=True))
    p_lr: float = option(1e-4, "actor learning rate", valid=Range(0, low_open=True))
    weight_decay: float = option(1e-4, "L2 penalty added to the gradient (torch Adam)", valid=Range(0))
    warmup: int = option(128, "random steps before the first update", valid=Range(0))
    bsize: int = option(64, "minibatch size", valid=Range(1))
    rmsize: int = option(6000000, "replay memory capacity", valid=Range(1))
    tau_update: float = option(None, "soft target update rate (default: 0.01 for Discrete and embeddings, else "
                                     "0.001)", valid=Range(0, 1, low_open=True))
    ou_theta: float = option(0.15, "Ornstein-Uhlenbeck noise: mean reversion", flag="--ou_theta", valid=Range(0))
    ou_sigma: float = option(0.2, "Ornstein-Uhlenbeck noise: scale", flag="--ou_sigma", valid=Range(0))
    ou_mu: float = option(0.0, "Ornstein-Uhlenbeck noise: mean", flag="--ou_mu", valid=Range())
    init_w: float = option(0.003, "uniform init range of both nets' last layer", flag="--init_w",
                           valid=Range(0, low_open=True))
    epsilon: int = option(80000, "action selections over which the noise scale decays to 0", valid=Range(1))
    seed: int = option(-1, "random seed; <= 0: unseeded", valid=Range())
    save_per_epochs: int = option(15, "save every N episodes (see save_seconds)", flag="--save_per_epochs",
                                  valid=Range(1))
    id: str = option("0", "experiment id")
    k_ratio: float = option(0.1, f"k = max(min(2, actions), int(k_ratio * actions)), at most {DEFAULT_K_CAP} for "
                                 "actions of more than one dimension", valid=Range(0, 1), group=ADDED)
    k: int = option(None, "number of neighbours (overrides k_ratio)", valid=Range(1), group=ADDED)
    knn: str = option("auto", "k-NN search: grids auto/lattice (exact) or flann; embeddings exact, ivf, flann or "
                              "auto (exact up to 20000 items)", choices=("auto", "lattice", "exact", "ivf", "flann"),
                      group=ADDED)
    action_embeddings: str = option(None, "FILE.npy: N x d embeddings of a Discrete(N) env's actions (wins over the "
                                          "env's action_embeddings)", group=ADDED)
    flann_checks: int = option(0, "knn flann over embeddings: leaves checked per query (0: max(256, 10 k))",
                               valid=Range(0), group=ADDED)
    ivf_probes: int = option(32, "knn ivf: nearest lists scanned per query", valid=Range(1), group=ADDED)
    scoring: str = option("factored", "full: the whole critic per candidate, as the reference (same numbers, slower)",
                          choices=("factored", "full"), group=ADDED)
    c_lr_end: float = option(None, "factor on c_lr once the noise has run out (default: 0.1 for embeddings, else 1)",
                             valid=Range(0, low_open=True), group=ADDED)
    random_candidate: float = option(None, "probability, times the noise scale, of playing a random one of the k "
                                           "(default: 1 for embeddings, else 0.3)", valid=Range(0, 1), group=ADDED)
    choice_pull: float = option(None, "weight pulling the actor towards the chosen a' (default: 1 for embeddings "
                                      "and MultiBinary, else 0)", valid=Range(0), group=ADDED)
    eval_every: int = option(10, "evaluate without noise every N episodes (0: never)", valid=Range(0), group=ADDED)
    eval_episodes: int = option(5, "episodes per evaluation", valid=Range(1), group=ADDED)
    save_seconds: float = option(30.0, "save and plot at most this often (0: every save_per_epochs episodes, as the "
                                       "reference)", valid=Range(0), group=RUN_CONTROL)
    no_save_memory: bool = option(False, "leave the replay memory out of checkpoints (for huge memories)",
                                  group=RUN_CONTROL)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def checked(cls, **values) -> Options:
        """Options from keyword values; OptionError for an unknown name (naming the closest valid one) or a value
        outside its range."""
        for name in values:
            if name not in cls.names():
                close = difflib.get_close_matches(name, cls.names(), n=1)
                raise OptionError(name, "is not an option" + (f"; did you mean {close[0]}?" if close else ""))
        options = cls(**values)
        for f in dataclasses.fields(cls):
            value, valid = getattr(options, f.name), f.metadata["valid"]
            if value is None:
                continue
            if valid is not None and not valid.holds(value):
                raise OptionError(f.name, f"must be {valid} (got {value})")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise OptionError(f.name, f"must be one of {', '.join(f.metadata['choices'])} (got {value!r})")
        return options

    @classmethod
    def from_saved(cls, saved: dict) -> Options:
        """The options a checkpoint records: its `options`, or an older checkpoint's command-line `args`."""
        values = saved.get("options") or saved["args"]
        values = {name: value for name, value in values.items() if name in cls.names()}
        if isinstance(values.get("env_kwargs"), list):  # the command line's KEY=VALUE strings
            values["env_kwargs"] = dict(map(parse_env_kwarg, values["env_kwargs"]))
        return cls(**values)


# Options that a resumed run may set anew; every other one comes from the checkpoint, so the run continues exactly.
RESUME_MAY_CHANGE = {"save_per_epochs", "save_seconds", "id", "no_save_memory"}


class OptionError(ValueError):
    """An option's bad value: `name` and what is wrong with it (the command line names its flag instead)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


class Diverged(Exception):
    """A loss, a parameter or the env's output is NaN or infinite: training stops before saving anything."""


class TrainingFailed(Exception):
    """Training stopped on divergence or a file it could not write; the message says which checkpoint is kept."""


def parse_value(text: str) -> int | float | bool | str:
    """An int, a float, true/false, or else the text itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_env_kwarg(item: str) -> tuple[str, Any]:
    """A KEY=VALUE string as a keyword and its value; ValueError when it is not one."""
    key, sep, text = item.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"env_kwargs {item!r}: expected KEY=VALUE with KEY a name")
    return key, parse_value(text)


def check_reward(reward: Any, name: str) -> None:
    """ValueError naming `name` where `reward` is not a finite real number."""
    if isinstance(reward, bool) or not isinstance(reward, (int, float, np.integer, np.floating)) or \
            not math.isfinite(reward):
        raise ValueError(f"{name} must be a finite number (got {reward!r})")


def unflattenable(space: gym.Space) -> str | None:
    """The kind of the first part of an observation space that is not flattened to a vector, or None."""
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces
        return next(filter(None, map(unflattenable, parts)), None)
    flat = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiBinary, gym.spaces.MultiDiscrete)
    return None if isinstance(space, flat) else type(space).__name__


def flat_observations(env: gym.Env, name: str) -> gym.Env:
    """`env` as the agent sees it: an observation space other than a Box goes through gymnasium's flattening
    (Discrete as one-hot) to a flat float32 Box. ValueError for one that does not flatten."""
    space = env.observation_space
    if isinstance(space, gym.spaces.Box):
        return env
    if (kind := unflattenable(space)) is not None:
        holding = "" if kind == type(space).__name__ else f" holding a {kind}"
        raise ValueError(f"{name} observes a {type(space).__name__}{holding}; supported: Box, Discrete, MultiBinary, "
                         "MultiDiscrete, and Dict or Tuple of them")
    flat = gym.wrappers.FlattenObservation(env)
    # bounds cast here, not by gymnasium's Box, which warns when a float64 part loses precision
    box = gym.spaces.Box(flat.observation_space.low.astype(np.float32), flat.observation_space.high.astype(np.float32))
    return gym.wrappers.TransformObservation(flat, lambda obs: obs.astype(np.float32), box)


def make_env(env_id: str, kwargs: dict | None = None) -> gym.Env:
    """An env as the agent sees it (`gym_make`, `flat_observations`)."""
    return flat_observations(gym_make(env_id, kwargs), env_id)


def gym_make(env_id: str, kwargs: dict | None = None) -> gym.Env:
    """gym.make with the built-in envs registered; ValueError naming the env when it cannot be made."""
    import envs  # noqa: F401  (registers the built-in envs)
    kwargs = kwargs or {}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise ValueError(f"cannot make env {env_id!r}: {e}") from None
    except (TypeError, ValueError) as e:  # a keyword the env does not take, or a value it refuses
        given = " with env_kwargs " + " ".join(f"{k}={v!r}" for k, v in kwargs.items()) if kwargs else ""
        raise ValueError(f"cannot make env {env_id!r}{given}: {e}") from None
    return env


def read_embeddings(path: str) -> np.ndarray:
    """A .npy file's one array; ValueError naming the file when it is not one."""
    try:
        embeddings = np.load(path, allow_pickle=False)
    except OSError as e:
        raise OptionError("action_embeddings", f"{path}: {e.strerror or 'cannot read it'}") from None
    except ValueError:
        raise OptionError("action_embeddings", f"{path}: not a .npy array file") from None
    if not isinstance(embeddings, np.ndarray):  # an .npz archive
        raise OptionError("action_embeddings", f"{path}: not a single .npy array")
    return embeddings


def default_k(space: ActionSpace, k_ratio: float) -> int:
    """k_ratio of the actions, at least 2 where there are 2, at most DEFAULT_K_CAP for actions of more than one
    dimension (then saying so)."""
    k = max(min(2, space.n), int(k_ratio * space.n))
    if space.dim > 1 and k > DEFAULT_K_CAP:
        print(f"k = {DEFAULT_K_CAP}: the default k is capped there (k_ratio {k_ratio} of {space.n} actions would be "
              f"{k}); k sets another")
        return DEFAULT_K_CAP
    return k


def with_kind_defaults(options: Options, kind: str, k: int) -> Options:
    """`options` with every option left to the action set's kind (None) set to that kind's default."""
    defaults = {**FALLBACK_DEFAULTS, **KIND_DEFAULTS.get(kind, {})}
    if k == 1:
        defaults["choice_pull"] = 0.0  # a lone candidate: no choice to follow
    return dataclasses.replace(options, **{name: value for name, value in defaults.items()
                                           if getattr(options, name) is None})


def saved_options(folder: Path) -> Options | None:
    """The options of the run whose weights `folder` holds: its checkpoint's, or for a best/ folder (weights
    only) its run's; None where neither records them (an older checkpoint, weights from elsewhere)."""
    for path in (folder / CHECKPOINT, folder.parent / CHECKPOINT if folder.name == "best" else None):
        if path is not None and path.is_file():
            saved = read_tensors(path, [])[1] or {}
            if "options" in saved or "args" in saved:
                return Options.from_saved(saved)
    return None


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


@dataclass
class Resume:
    """The run to continue: its folder and its checkpoint's arrays and scalars."""
    parent: Path
    arrays: dict[str, np.ndarray]
    scalars: dict


class Decision(NamedTuple):
    """An action chosen by `Wolpertinger.decide`, and the id that its feedback quotes."""
    id: str
    action: Any         # the env action


class Ranked(NamedTuple):
    """One of the candidates ranked by `Wolpertinger.rank`."""
    action_id: Any      # the action set's id: an int, or grid coordinates
    action: Any         # the env action
    value: float        # the critic's Q(s, a)


def progress(total: int, unit: str = "ep"):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=1.0, disable=None)


class Wolpertinger:
    """A Wolpertinger agent on one env: the action set, the networks, the replay memory and the run's counters.

    `env` is a gymnasium Env instance (registered or not, wrapped or not) or an env id (with `env_kwargs`);
    `options` are `Options`' names (the command line's, with underscores), `action_embeddings` an N x d array or a
    .npy file's path. A bad option raises OptionError (a ValueError) naming it; an env or action space the agent
    cannot take raises ValueError. `device` and `beam` choose tinygrad's device and BEAM width for this process.
    """

    def __init__(self, env: gym.Env | str = "Pendulum-v0", *, eval_env: gym.Env | None = None,
                 action_embeddings: np.ndarray | str | None = None, device: str | None = None, beam: int = 0,
                 **options):
        from tinygrad import Tensor

        embeddings = None if isinstance(action_embeddings, (str, os.PathLike, type(None))) else action_embeddings
        if embeddings is None and action_embeddings is not None:
            options["action_embeddings"] = str(action_embeddings)
        if isinstance(env, str):
            options["env"] = env
        else:
            options["env"] = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        options = Options.checked(**options)
        runtime.use_device(device, beam)
        self.env_id = RENAMED_ENVS.get(options.env, options.env)
        if isinstance(env, str) and self.env_id != options.env:
            print(f"{options.env} is not in gymnasium; using {self.env_id} (same dynamics)")
        raw = gym_make(self.env_id, options.env_kwargs) if isinstance(env, str) else env
        self.observation_space = raw.observation_space  # what `act` and `rank` take: the env's own observations
        self.env = flat_observations(raw, self.env_id)
        if embeddings is None:
            embeddings = read_embeddings(options.action_embeddings) if options.action_embeddings is not None else \
                getattr(self.env.unwrapped, "action_embeddings", None)
        self.embeddings = embeddings
        try:
            self.space = action_set(self.env.action_space, embeddings, options.max_actions, options.knn,
                                    options.flann_checks, options.ivf_probes)
        except ValueError as e:  # unbounded box, too few actions for one grid point per axis, too many for FLANN
            raise ValueError(f"{self.env_id}: {e}") from None
        if embeddings is not None and options.knn == "auto":
            print(f"knn auto: {self.space.knn} search over {self.space.n} items")
        self.k = options.k if options.k is not None else default_k(self.space, options.k_ratio)
        kind = "embeddings" if embeddings is not None else type(self.env.action_space).__name__
        self.options = options = with_kind_defaults(options, kind, self.k)

        rng = np.random.default_rng(options.seed if options.seed > 0 else None)
        Tensor.manual_seed(int(rng.integers(2 ** 31)))
        cfg = DDPGConfig(hidden1=options.hidden1, hidden2=options.hidden2, init_w=options.init_w, c_lr=options.c_lr,
                         p_lr=options.p_lr, weight_decay=options.weight_decay, gamma=options.gamma,
                         tau=options.tau_update, batch_size=options.bsize, ou_theta=options.ou_theta,
                         ou_sigma=options.ou_sigma, ou_mu=options.ou_mu, epsilon=options.epsilon,
                         choice_pull=options.choice_pull, c_lr_end=options.c_lr_end)
        usable_cores()  # a bad $WOLPERTINGER_CORES fails here, in one line, not in the first search
        self.agent = WolpertingerAgent(int(np.prod(self.env.observation_space.shape)), self.space, self.k, cfg, rng,
                                       scoring=options.scoring, random_candidate=options.random_candidate)
        self.eval_env = make_env(self.env_id, options.env_kwargs) if isinstance(env, str) else \
            flat_observations(eval_env if eval_env is not None else copy.deepcopy(env), self.env_id)
        self.memory: ReplayMemory | None = None
        self.episode, self.env_steps, self.wall_seconds, self.best_eval = 0, 0, 0.0, -np.inf
        self.resume: Resume | None = None  # a loaded run's training state, taken up by the next `learn`
        self.journal: Journal | None = None  # decisions awaiting feedback, and the feedback received
        # the last feedback row the replay memory holds: {"journal": its id, "seq": its number}, or None
        self.journal_position: dict | None = None

    # --- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | Path, env: gym.Env | None = None, **options) -> Wolpertinger:
        """The agent saved in a run folder (or its best/ folder), with its action set (a saved k-NN index reused)
        and its env (made from the saved id and env_kwargs, or `env`, whose spaces must be the saved run's).
        `options` change saved ones (another k, say); learning from a loaded run continues it exactly when none
        but `RESUME_MAY_CHANGE` is changed. ValueError for a folder that holds no run."""
        folder = Path(run_dir)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder")
        resume = None
        if (folder / CHECKPOINT).is_file():
            arrays, scalars = read_checkpoint(folder / CHECKPOINT)
            if scalars is not None and ("options" in scalars or "args" in scalars):
                resume = Resume(folder, arrays, scalars)
        elif not (folder / "actor.safetensors").is_file():
            raise ValueError(f"{folder} holds no trained agent ({CHECKPOINT} not found)")
        saved = saved_options(folder)
        values = {**({} if saved is None else dataclasses.asdict(saved)), **options}
        made = values.pop("env", "Pendulum-v0")
        embeddings = folder / "action_embeddings.npy"  # handed over as an array when the run was made
        if embeddings.is_file() and values.get("action_embeddings") is None:
            values["action_embeddings"] = np.load(embeddings)
        agent = cls(env if env is not None else made, **values)
        if resume is not None and "spaces" in resume.scalars and resume.scalars["spaces"] != agent._spaces():
            raise ValueError(f"the env's spaces {agent._spaces()} differ from the saved run's {resume.scalars['spaces']}")
        try:
            agent.agent.load(folder)
        except ValueError as e:
            raise ValueError(f"cannot load weights: {e}") from None
        if message := agent.space.load_index(folder):
            print(message)
        agent.resume = resume
        return agent

    def _spaces(self) -> dict:
        """The observation and action spaces as the agent sees them, to compare a loaded run's with."""
        return {"observation": list(self.env.observation_space.shape), "action": str(self.env.action_space)}

    # --- acting ----------------------------------------------------------------------------------------------
    def _states(self, obs) -> tuple[np.ndarray, bool]:
        """Observations as the (B, S) float32 states the nets take, and whether `obs` was a batch: for a Box, an
        array of its shape or a batch of them; for other spaces (Dict, Tuple, Discrete...) one of the env's own
        observations or a list of them. ValueError for a wrong shape or dtype, or a value that is not finite."""
        space = self.observation_space
        if isinstance(space, gym.spaces.Box):
            obs = np.asarray(obs)
            batch = obs.ndim == len(space.shape) + 1
            if obs.shape[batch:] != space.shape or obs.size == 0:
                raise ValueError(f"an observation has shape {obs.shape[batch:]}; the env's is {space.shape}")
            if obs.dtype.kind not in "fiub":
                raise ValueError(f"observations must be numbers, not {obs.dtype}")
            states = obs.reshape(-1, int(np.prod(space.shape))).astype(np.float32)
        else:
            batch = isinstance(obs, list)
            try:
                states = np.stack([gym.spaces.flatten(space, o) for o in (obs if batch else [obs])]).astype(np.float32)
            except (AssertionError, KeyError, TypeError, ValueError, IndexError) as e:
                raise ValueError(f"an observation does not fit the env's {space} ({type(e).__name__})") from None
        if not np.isfinite(states).all():
            raise ValueError("an observation is not finite (NaN or infinite)")
        return states, batch

    def act(self, obs, explore: bool = False):
        """The env action for an observation, the critic's best of the k candidates; for a batch of observations
        a list of actions (one search and one critic pass). `explore` adds the training noise."""
        states, batch = self._states(obs)
        actions = [self.space.to_env(action_id) for action_id in self.agent.select_actions(states, explore)]
        return actions if batch else actions[0]

    def rank(self, obs, n: int = 10) -> list[Ranked] | list[list[Ranked]]:
        """The n best of the k candidates of an observation's noise-free proto-action, best first, each with its
        action id, env action and critic value; for a batch of observations one list per observation."""
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.k:
            raise ValueError(f"n must be a whole number from 1 to k = {self.k} (got {n!r})")
        states, batch = self._states(obs)
        ids, values = self.agent.ranked_actions(states, int(n))
        ranked = [[Ranked(i.tolist() if np.ndim(i) else int(i), self.space.to_env(i), float(v))
                   for i, v in zip(row_ids, row_values)] for row_ids, row_values in zip(ids, values)]
        return ranked if batch else ranked[0]

    # --- learning from feedback ------------------------------------------------------------------------------
    def open_journal(self, folder: str | Path | None = None, *, feedback_wait: float | None = None,
                     default_reward: float | None = None) -> None:
        """Keep decisions and feedback in an SQLite journal in `folder` (made if missing), committed before
        `decide` and `feedback` return; None keeps them in memory only. Feedback that the replay memory does not
        hold yet (received after the checkpoint this agent was loaded from) is stored into it now, and decisions
        still pending take late feedback. A decision left without feedback for `feedback_wait` seconds (None:
        forever) expires: dropped, or with `default_reward` stored as a one-step episode of that reward."""
        if feedback_wait is not None and not Range(0, low_open=True).holds(feedback_wait):
            raise ValueError(f"feedback_wait must be a number of seconds above 0 or None (got {feedback_wait!r})")
        if default_reward is not None:
            check_reward(default_reward, "default_reward")
        try:
            journal = Journal(folder, feedback_wait, default_reward)
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"cannot open a journal in {folder}: {e}") from None
        if self.journal is not None:
            self.journal.close()
        self.learn_setup()
        self.journal, position = journal, self.journal_position
        self._remember(journal.transitions_after(position["seq"] if position and position["journal"] == journal.id
                                                 else 0))
        self._remember(journal.expire())

    def _journal(self) -> Journal:
        """The open journal; an in-memory one if none was opened."""
        if self.journal is None:
            self.open_journal()
        return self.journal

    def _remember(self, transitions: list[Transition]) -> None:
        """Store journal transitions in the replay memory, in order, and note the last one's row."""
        for t in transitions:
            self.memory.append(t.state, t.point, t.reward, t.next_state, t.terminated)
            self.journal_position = {"journal": self.journal.id, "seq": t.seq}

    def decide(self, obs, explore: bool = True) -> Decision | list[Decision]:
        """Choose the action for an observation, to be answered by `feedback`; for a batch of observations one
        `Decision(id, action)` each. `explore` adds the training noise, whose scale decays with each decision
        made (as with each env step in `learn`). The decisions are in the journal before this returns."""
        states, batch = self._states(obs)
        journal = self._journal()
        self._remember(journal.expire())
        action_ids = self.agent.select_actions(states, explore)
        ids = journal.record(states, action_ids, self.space.points(np.asarray(action_ids)))
        decisions = [Decision(i, self.space.to_env(a)) for i, a in zip(ids, action_ids)]
        return decisions if batch else decisions[0]

    def feedback(self, decision_id: str, reward: float, next_obs=None, terminated: bool = False) -> None:
        """Store the transition of a pending decision: its state, its action, `reward`, `next_obs` and
        `terminated`, whenever it arrives. `next_obs` may be left out only where `terminated` (a one-step episode:
        the next state is the state). ValueError, changing nothing, for a decision id that is unknown or already
        answered or expired, a reward that is not a finite number, or a bad `next_obs`."""
        self.feedback_many([{"decision_id": decision_id, "reward": reward, "next_obs": next_obs,
                             "terminated": terminated}])

    def feedback_many(self, items: Iterable[Mapping]) -> None:
        """`feedback` for many decisions at once, each a dict of its arguments; all are stored or, on a
        ValueError for any one, none."""
        answers = [self._answer(**item) for item in items]
        journal = self._journal()
        self._remember(journal.expire())
        self._remember(journal.answer(answers))

    def _answer(self, decision_id: str, reward: float, next_obs=None, terminated: bool = False) -> Answer:
        """Checked feedback for the journal."""
        check_reward(reward, f"reward for decision_id {decision_id!r}")
        if next_obs is None:
            if not terminated:
                raise ValueError(f"next_obs for decision_id {decision_id!r} is missing; it may be left out only "
                                 "where terminated")
            return Answer(decision_id, float(reward), None, True)
        try:
            states, batch = self._states(next_obs)
        except ValueError as e:
            raise ValueError(f"next_obs for decision_id {decision_id!r}: {e}") from None
        if batch:
            raise ValueError(f"next_obs for decision_id {decision_id!r} must be one observation, not a batch")
        return Answer(decision_id, float(reward), states[0], bool(terminated))

    def feedback_stats(self) -> dict[str, int]:
        """Counts of the journal: decisions made, feedback received, expired_dropped, expired_defaulted, pending."""
        journal = self._journal()
        self._remember(journal.expire())
        return journal.stats()

    def update(self, n: int = 1) -> dict[str, float]:
        """Run n DDPG updates on the replay memory; returns their mean critic_loss, actor_loss and mean_q.
        ValueError where the memory holds fewer transitions than bsize or warmup; Diverged for a loss that is not
        finite."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a whole number of updates, at least 1 (got {n!r})")
        self.learn_setup()
        needs = {"bsize": self.options.bsize, "warmup": self.options.warmup}
        name = max(needs, key=needs.get)
        if len(self.memory) < needs[name]:
            raise ValueError(f"the replay memory holds {len(self.memory)} transitions; updates need at least "
                             f"{name} = {needs[name]}")
        losses = np.mean([self.agent.update(self.memory) for _ in range(n)], axis=0)
        if not np.isfinite(losses).all():
            raise Diverged(f"a loss is not finite: critic {losses[0]}, actor {losses[1]}")
        return dict(zip(("critic_loss", "actor_loss", "mean_q"), map(float, losses)))

    # --- episodes --------------------------------------------------------------------------------------------
    def play_episode(self, seed: int | None = None, max_steps: int | None = None) -> float:
        """Play one training episode (at most max_steps, or max_episode_length, steps) with exploration, storing
        its transitions and updating after the warm-up; returns its return."""
        return self._episode(self.env, True, seed, learn=True, max_steps=max_steps)

    def _episode(self, env: gym.Env, explore: bool, seed: int | None = None, learn: bool = False,
                 max_steps: int | None = None) -> float:
        """Play one episode (at most max_steps, or max_episode_length, steps); learning, store its transitions
        and update after the warm-up. Returns the episode's return."""
        agent, space, options = self.agent, self.space, self.options
        obs, _ = env.reset(seed=seed)
        agent.reset_noise()
        episode_return = 0.0
        for _ in range(max_steps or options.max_episode_length):
            warming_up = learn and self.env_steps < options.warmup
            action = agent.random_action() if warming_up else agent.select_action(obs, explore=explore)
            next_obs, reward, terminated, truncated, _ = env.step(space.to_env(action))
            if not (np.isfinite(next_obs).all() and np.isfinite(reward)):
                raise Diverged(f"the env returned a non-finite "
                               f"{'reward' if np.isfinite(next_obs).all() else 'observation'}")
            episode_return += float(reward)
            if learn:
                self.env_steps += 1
                self._store(obs, action, reward, next_obs, terminated)
            obs = next_obs
            if terminated or truncated:
                break
        return episode_return

    def _store(self, obs, action, reward: float, next_obs, terminated: bool) -> None:
        """Store a transition and, past the warm-up, run one update."""
        memory, warmup = self.memory, self.options.warmup
        # a cut at max_episode_length is a truncation too: only `terminated` ends the return
        memory.append(np.ravel(obs), self.space.points(action), reward, np.ravel(next_obs), terminated)
        # from a fresh start the second test is the first; resumed without its memory, updates wait until the
        # memory holds `warmup` transitions again
        if self.env_steps > warmup and len(memory) > min(warmup, memory.capacity - 1):
            losses = self.agent.update(memory)[:2]  # the critic's and the actor's
            if not np.isfinite(losses).all():
                bad = int(np.isfinite(losses[0]))  # 0: the critic's, 1: the actor's
                raise Diverged(f"the {('critic', 'actor')[bad]} loss is {losses[bad]}")

    def evaluate(self, episodes: int | None = None) -> float:
        """Mean return of noise-free episodes (`eval_episodes` by default) on the separate evaluation env."""
        episodes = episodes or self.options.eval_episodes
        return float(np.mean([self._episode(self.eval_env, False) for _ in range(episodes)]))

    # --- checkpoints -----------------------------------------------------------------------------------------
    def _training_state(self, before_episode: int, wall_seconds: float) -> tuple[dict[str, np.ndarray], dict]:
        """The whole training state but the replay memory's contents: the agent's, both envs' random states, the
        loop's counters and the options."""
        arrays, scalars = self.agent.training_state()
        scalars |= {"episode": before_episode, "env_steps": self.env_steps, "wall_seconds": wall_seconds,
                    "best_eval": self.best_eval, "format": 2, "options": dataclasses.asdict(self.options),
                    "spaces": self._spaces(), "memory": None,
                    "env_rng": self.env.unwrapped.np_random.bit_generator.state,
                    "eval_env_rng": self.eval_env.unwrapped.np_random.bit_generator.state}
        return arrays, scalars

    def _write_checkpoint(self, folder: Path, state: tuple[dict[str, np.ndarray], dict]) -> None:
        """Write a training state, with the replay memory as it is now (unless no_save_memory), whole or not at all."""
        arrays, scalars = state
        if self.memory is not None and not self.options.no_save_memory:
            memory_arrays, scalars["memory"] = self.memory.state()
            scalars["journal_position"] = self.journal_position  # so that a restart replays only the rows after
            arrays = arrays | {f"memory.{name}": array for name, array in memory_arrays.items()}
        save_tensors(folder / CHECKPOINT, arrays, scalars)

    def save(self, run_dir: str | Path) -> None:
        """Write the agent (networks, training state, replay memory unless no_save_memory, options) and its k-NN
        index into a folder, made if missing; `load` reads it back and `learn` continues it exactly."""
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.learn_setup()
        self._write_checkpoint(folder, self._training_state(self.episode, self.wall_seconds))
        self._save_embeddings(folder)
        if message := self.space.save_index(folder):
            print(message)

    def _save_embeddings(self, folder: Path) -> None:
        """Embeddings handed over as an array go into the run folder, for `load`."""
        if self.embeddings is not None and self.options.action_embeddings is None and \
                getattr(self.env.unwrapped, "action_embeddings", None) is not self.embeddings:
            np.save(folder / "action_embeddings.npy", self.embeddings)

    def learn_setup(self) -> None:
        """Make the replay memory, and restore a loaded run's whole training state (once)."""
        if self.memory is None:
            self.memory = ReplayMemory(self.options.rmsize, self.agent.state_dim, self.agent.action_dim)
        if self.resume is None:
            return
        scalars, arrays = self.resume.scalars, self.resume.arrays
        self.agent.load_training_state(arrays, scalars)
        if scalars["memory"] is not None:
            self.memory.load_state({name: arrays[f"memory.{name}"] for name in FIELDS}, scalars["memory"])
            self.journal_position = scalars.get("journal_position")
        self.env.unwrapped.np_random.bit_generator.state = scalars["env_rng"]
        self.eval_env.unwrapped.np_random.bit_generator.state = scalars["eval_env_rng"]
        self.episode, self.env_steps = scalars["episode"], scalars["env_steps"]
        self.wall_seconds, self.best_eval = scalars["wall_seconds"], scalars["best_eval"]
        self.resume = None

    # --- training --------------------------------------------------------------------------------------------
    def learn(self, episodes: int, steps: int | None = None, run_dir: str | Path | None = None,
              output: str | Path = "output", callback: Callable[[dict], bool | None] | None = None,
              stop: StopRequest | None = None, arguments: dict | None = None) -> Path:
        """Train until `episodes` episodes in all (and, given `steps`, no further once that many env steps are
        reached), writing the run folder: `run_dir`, or a new output/<env>-run<N>. A loaded run continues exactly,
        its log, metrics and best weights so far copied into the new folder. Writes the reference's log, metrics.csv,
        the checkpoint (every save_per_epochs episodes, at most every save_seconds, and at the end), the reward
        plot, TensorBoard scalars, best/ (the best evaluation's weights) and the k-NN index.

        `callback(info)` runs after each episode with episode, env_steps, return, eval_return (None between
        evaluations) and wall_seconds; it returning False stops training, saved. SIGINT/SIGTERM stop it the same way
        (`stop`: a StopRequest already installed). Returns the run folder; raises TrainingFailed on divergence or a
        file it could not write, keeping the last complete checkpoint."""
        if self.resume is not None and episodes <= self.resume.scalars["episode"]:
            raise ValueError(f"{self.resume.parent} is already trained to Ep:{self.resume.scalars['episode']}; "
                             "give more episodes")
        run_dir = self._new_run_dir(run_dir, output)
        own_stop = stop is None
        stop = stop or StopRequest()
        try:
            return self._learn(episodes, steps, run_dir, callback, stop, arguments)
        finally:
            if own_stop:
                stop.restore()

    def _new_run_dir(self, run_dir: str | Path | None, output: str | Path) -> Path:
        """The run folder to write: `run_dir` (made; one that holds files is refused, never overwritten) or a new
        numbered one in `output`."""
        try:
            if run_dir is None:
                folder = new_run_dir(Path(output), self.options.env)
            else:
                folder = Path(run_dir)
                folder.mkdir(parents=True, exist_ok=True)
                if any(folder.iterdir()):
                    raise ValueError(f"{folder} already holds files; give an empty or new folder")
        except OSError as e:
            raise ValueError(f"cannot create a run folder in {run_dir or output}: {e.strerror or e}") from None
        return folder

    def _learn(self, episodes: int, steps: int | None, run_dir: Path, callback, stop: StopRequest,
               arguments: dict | None) -> Path:
        parent = self.resume.parent if self.resume is not None else None
        print(f"run folder: {run_dir}" + ("" if parent is None else f", continuing {parent}"))
        if message := self.space.save_index(run_dir):
            print(message)
        self._save_embeddings(run_dir)
        options, agent = self.options, self.agent
        seed = options.seed if options.seed > 0 else None
        if seed is not None and parent is None and self.memory is None:
            self.eval_env.reset(seed=seed + 1)
        logged = arguments if arguments is not None else {**dataclasses.asdict(options), "max_episode": episodes}
        if parent is not None:
            saved = Options.from_saved(self.resume.scalars)
            logged = {name: value for name, value in logged.items() if getattr(saved, name, None) != value}
        self.learn_setup()
        first = self.episode
        if parent is not None:
            best = parent / "best" / CHECKPOINT
            if best.is_file() and read_tensors(best, [])[1]["episode"] <= first:  # not one the resumed run replays
                shutil.copytree(best.parent, run_dir / "best")
        log = RunLog(run_dir, "train", logged, None if parent is None else (parent, first))
        board = TensorBoardLog(run_dir)
        start = time.time() - self.wall_seconds
        title = f"{self.env_id}: {self.space.n} actions, k = {self.k}"
        saved_before, last_save = None, time.time()

        def save(before_episode: int, state: tuple[dict[str, np.ndarray], dict] | None = None) -> None:
            """Write the checkpoint of the state now, or of `state` (with the memory as it is now)."""
            nonlocal saved_before, last_save
            self._write_checkpoint(run_dir, state or self._training_state(before_episode, time.time() - start))
            saved_before, last_save = before_episode, time.time()
            log.line(f"### Model Saved before Ep:{before_episode} ###")
            plot_runs([(run_dir.name, log.metrics())], run_dir / "reward_curve.png", title)

        def failed(message: str) -> TrainingFailed:
            bar.close()
            with contextlib.suppress(OSError):  # the log may be what could not be written
                log.close()
                board.close()
            kept = f"{run_dir / CHECKPOINT} (before Ep:{saved_before})" if saved_before is not None else \
                f"{parent / CHECKPOINT} (before Ep:{first})" if parent is not None else "none was written"
            best = "; best/ untouched" if (run_dir / "best").is_dir() else ""
            return TrainingFailed(f"{message}; last complete checkpoint: {kept}{best}")

        bar = progress(episodes)
        bar.update(first)
        episode = first
        try:
            for episode in range(first, episodes):  # numbered from 0, as the reference's log does
                if stop.requested or (steps is not None and self.env_steps >= steps):
                    bar.close()
                    if stop.requested:
                        print(f"stopped before Ep:{episode}; saving")
                    break
                # a stop during the episode or its evaluation saves the state from before it (a few ms to take), so
                # the process ends at once, whatever it was doing, and a resumed run replays the episode exactly
                before, mark = self._training_state(episode, time.time() - start), \
                    self.memory.mark(options.max_episode_length)
                done = episode + 1
                try:
                    with stop.interruptible():
                        ret = self.play_episode(seed if episode == 0 else None)
                        if not agent.parameters_finite():  # checked before anything is evaluated or saved
                            raise Diverged("a network parameter is not finite")
                        eval_ret = self.evaluate() if options.eval_every > 0 and done % options.eval_every == 0 \
                            else None
                except Stopped:
                    bar.close()
                    print(f"stopped during Ep:{episode}; saving the state from before it")
                    self.memory.rollback(mark)
                    self._set_counters(before)
                    save(episode, before)
                    break
                self.episode, wall = done, time.time() - start
                log.episode(episode, self.env_steps, ret, wall, eval_ret)
                board.episode(done, self.env_steps, ret, wall, eval_ret, agent.update_means(),
                              max(agent.epsilon, 0.0))
                if eval_ret is not None and eval_ret > self.best_eval:  # Q-learners can unlearn; keep the best
                    self.best_eval = eval_ret
                    agent.save(run_dir / "best", {"episode": done, "eval_return": eval_ret})
                bar.update(1)
                bar.set_postfix(steps=self.env_steps, ret=f"{ret:.1f}", sps=f"{self.env_steps / wall:.0f}",
                                refresh=False)
                if done % options.save_per_epochs == 0 and time.time() - last_save >= options.save_seconds:
                    save(done)
                if callback is not None and callback({"episode": done, "env_steps": self.env_steps, "return": ret,
                                                      "eval_return": eval_ret, "wall_seconds": wall}) is False:
                    episode = done
                    break
            else:
                episode = episodes
            self.wall_seconds = time.time() - start
            if saved_before != episode:  # else the last episode's save holds everything
                save(episode)
            log.close()
            board.close()
        except Diverged as e:
            raise failed(f"training diverged in Ep:{episode}: {e}") from None
        except OSError as e:  # a full disk, a removed run folder
            raise failed(f"cannot write to {run_dir}: {e.strerror or e}") from None
        bar.close()
        print(f"trained to Ep:{episode} ({self.env_steps} env steps, {time.time() - start:.0f} s); "
              f"log, metrics, checkpoint and plot in {run_dir}")
        return run_dir

    def _set_counters(self, state: tuple[dict[str, np.ndarray], dict]) -> None:
        """The loop's counters as a training state recorded them."""
        scalars = state[1]
        self.episode, self.env_steps, self.best_eval = scalars["episode"], scalars["env_steps"], scalars["best_eval"]

    def test(self, episodes: int, run_dir: str | Path | None = None, output: str | Path = "output",
             arguments: dict | None = None, title: str = "") -> list[float]:
        """Play noise-free episodes (the first seeded with the seed option), logged in a run folder as the
        reference's test mode did (RS_test_log, metrics.csv, the reward plot); returns their returns."""
        run_dir = self._new_run_dir(run_dir, output)
        print(f"run folder: {run_dir}")
        log = RunLog(run_dir, "test", arguments if arguments is not None else dataclasses.asdict(self.options))
        returns, start = [], time.time()
        seed = self.options.seed if self.options.seed > 0 else None
        bar = progress(episodes)
        for episode in range(episodes):
            returns.append(self._episode(self.env, False, seed if episode == 0 else None))
            log.episode(episode, 0, returns[-1], time.time() - start)
            bar.update(1)
        bar.close()
        summary = f"test: {len(returns)} episodes, return mean {np.mean(returns):.2f} std {np.std(returns):.2f}"
        log.line(summary)
        log.close()
        plot_runs([(run_dir.name, log.metrics())], run_dir / "reward_curve.png", title or f"{self.env_id} test")
        print(f"{summary}; log in {run_dir}")
        return returns


def read_checkpoint(path: Path, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """A checkpoint's arrays (all, or those named) and metadata; a damaged file is a ValueError naming it."""
    try:
        return read_tensors(path, names)
    except ValueError as e:
        raise ValueError(f"cannot load {path}: {e}") from None
