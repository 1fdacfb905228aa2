"""Command line: train or test a Wolpertinger agent on a gymnasium env, or plot finished runs.

    python main.py --env Pendulum-v0 --max-actions 200000
    python main.py --env CartPole-v1
    python main.py --mode test --load-model-dir output/CartPole-v1-run1
    python main.py --mode plot --load-model-dir output/CartPole-v1-run1 output/CartPole-v1-run2
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # heavy imports wait until the arguments are known good
    import gymnasium as gym

    from action_space import ActionSpace
    from wolp_agent import WolpertingerAgent

RENAMED_ENVS = {"Pendulum-v0": "Pendulum-v1"}  # gym ids that gymnasium has renamed

# The soft target update rate depends on the env's action space, chosen by 5-seed measurements (README,
# "Learning results"): a small Discrete set (CartPole, episodes that end on failure) needs a faster target network
# to propagate value; on a discretised Box (Pendulum) it destabilises learning, so the reference's value stays.
DEFAULT_TAU = {"Box": 0.001, "Discrete": 0.01}

# tinygrad's HCQ2 runtime runs a compiled graph as one native call instead of one Python call per kernel
# (CartPole: 4.0 instead of 4.9 ms per step). tinygrad reads it once, when first imported; HCQ2=0 turns it off.
os.environ.setdefault("HCQ2", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--random-candidate", type=float, default=0.3,
                   help="probability, times the decaying noise scale, of playing a uniformly random one of the k "
                        "candidates instead of the critic's best (0: the reference)")
    p.add_argument("--seed", type=int, default=-1, help="<= 0: unseeded")
    p.add_argument("--save_per_epochs", type=int, default=15, help="save every N episodes")
    p.add_argument("--id", default="0", help="experiment id")
    p.add_argument("--k-ratio", type=float, default=0.1,
                   help="k = max(min(2, number of actions), int(k_ratio * number of actions)); the reference used "
                        "max(1, ...), which leaves the critic no choice below 20 actions (--k 1 restores it there)")
    p.add_argument("--k", type=int, default=None, help="number of neighbours (overrides --k-ratio)")
    p.add_argument("--knn", default="auto", choices=("auto", "lattice", "flann"),
                   help="auto/lattice: exact search on the grid; flann: the reference's FLANN kd-tree")
    p.add_argument("--scoring", default="factored", choices=("factored", "full"),
                   help="full: run the whole critic per candidate, as the reference did (same numbers, slower)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate without noise every N episodes (0: never)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    p.add_argument("--beam", type=int, default=0,
                   help="tinygrad BEAM search width for the compiled steps (e.g. 2): about 2x faster updates on a CPU "
                        "after a one-off search of minutes, cached for later runs; 0: off")
    p.add_argument("--device", default=None, help="tinygrad device, e.g. CPU or CUDA (default: tinygrad's choice)")
    p.add_argument("--output", default="output", help="folder that holds the run folders")
    return p.parse_args(argv)


class UsageError(Exception):
    """Bad input: reported as one line and a non-zero exit."""


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


def make_action_space(env_id: str, act: gym.Space, args: argparse.Namespace) -> ActionSpace:
    """The agent's action set for an env's action space; raises UsageError for one it cannot take."""
    import gymnasium as gym

    from action_space import GridActionSpace
    try:
        if isinstance(act, gym.spaces.Box):
            if args.max_actions < 1:
                raise UsageError(f"--max-actions must be at least 1 (got {args.max_actions})")
            return GridActionSpace.continuous(act.low, act.high, args.max_actions, knn=args.knn)
        if isinstance(act, gym.spaces.Discrete):
            return GridActionSpace.discrete(int(act.n), int(act.start), knn=args.knn)
    except ValueError as e:  # unbounded box, or too few actions for one grid point per axis
        raise UsageError(f"{env_id}: {e}") from None
    raise UsageError(f"{env_id} has a {type(act).__name__} action space; supported: Box and Discrete")


def build(args: argparse.Namespace) -> Setup:
    """Env, action set and agent from the arguments; raises UsageError on anything unusable."""
    from tinygrad import Device, Tensor

    from ddpg import DDPGConfig
    from wolp_agent import WolpertingerAgent

    if args.device:
        try:
            Device[args.device.upper()]
        except Exception as e:
            raise UsageError(f"tinygrad device {args.device!r} is not available ({type(e).__name__})") from None
        Device.DEFAULT = args.device.upper()
    if args.beam < 0:
        raise UsageError(f"--beam must be 0 (off) or a positive search width (got {args.beam})")
    if args.beam:
        from tinygrad.helpers import BEAM
        BEAM.value = args.beam
    env_id = RENAMED_ENVS.get(args.env, args.env)
    if env_id != args.env:
        print(f"{args.env} is not in gymnasium; using {env_id} (same dynamics)")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    env = make_env(env_id, env_kwargs)
    if args.tau_update is None:
        args.tau_update = DEFAULT_TAU.get(type(env.action_space).__name__)
    space = make_action_space(env_id, env.action_space, args)
    k = args.k if args.k is not None else max(min(2, space.n), int(args.k_ratio * space.n))
    for flag in ("bsize", "rmsize", "max_episode_length", "hidden1", "hidden2", "epsilon"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")

    seeded = args.seed > 0
    rng = np.random.default_rng(args.seed if seeded else None)
    Tensor.manual_seed(int(rng.integers(2 ** 31)))
    cfg = DDPGConfig(hidden1=args.hidden1, hidden2=args.hidden2, init_w=args.init_w, c_lr=args.c_lr,
                     p_lr=args.p_lr, weight_decay=args.weight_decay, gamma=args.gamma, tau=args.tau_update,
                     batch_size=args.bsize, ou_theta=args.ou_theta, ou_sigma=args.ou_sigma, ou_mu=args.ou_mu,
                     epsilon=args.epsilon)
    try:
        agent = WolpertingerAgent(int(np.prod(env.observation_space.shape)), space, k, cfg, rng, scoring=args.scoring,
                                  random_candidate=args.random_candidate)
    except ValueError as e:  # an impossible k or probability
        raise UsageError(str(e)) from None
    if args.mode == "test" or args.load:
        if len(args.load_model_dir) != 1:
            raise UsageError("--mode test and --load need exactly one --load-model-dir")
        folder = Path(args.load_model_dir[0])
        if not folder.is_dir():
            raise UsageError(f"--load-model-dir {folder}: no such folder")
        try:
            agent.load(folder)
        except ValueError as e:
            raise UsageError(f"cannot load weights: {e}") from None
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
        episode_return += float(reward)
        step += 1
        if memory is not None:
            # a cut at max_steps is a truncation too: only `terminated` ends the return
            memory.append(obs.ravel(), space.points(action), reward, np.ravel(next_obs), terminated)
            if step > warmup:
                agent.update(memory)
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


def train(args: argparse.Namespace, setup: Setup, run_dir: Path) -> None:
    from memory import ReplayMemory
    from util import RunLog, TensorBoardLog, plot_runs

    agent = setup.agent
    memory = ReplayMemory(args.rmsize, agent.state_dim, agent.action_dim)
    log, board = RunLog(run_dir, "train", vars(args)), TensorBoardLog(run_dir)
    title = f"{setup.env_id}: {setup.space.n} actions, k = {setup.k}"
    seed = args.seed if args.seed > 0 else None
    if seed is not None:
        setup.eval_env.reset(seed=seed + 1)

    def save(before_episode: int) -> None:
        agent.save(run_dir)
        log.line(f"### Model Saved before Ep:{before_episode} ###")
        plot_runs([(run_dir.name, log.metrics())], run_dir / "reward_curve.png", title)

    # Ctrl-C, and a plain `kill`, end training with everything saved (also where SIGINT was ignored, e.g. under nohup)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    start, step, episode, interrupted, best_eval = time.time(), 0, 0, False, -np.inf
    bar = progress(args.max_episode)
    try:
        for episode in range(1, args.max_episode + 1):
            ret, step = run_episode(setup, setup.env, True, args.max_episode_length, seed if episode == 1 else None,
                                    memory, args.warmup, step)
            eval_ret = evaluate(setup, args.eval_episodes, args.max_episode_length) \
                if args.eval_every > 0 and episode % args.eval_every == 0 else None
            log.episode(episode, step, ret, time.time() - start, eval_ret)
            board.episode(episode, step, ret, time.time() - start, eval_ret, agent.update_means(),
                          max(agent.epsilon, 0.0))
            if eval_ret is not None and eval_ret > best_eval:  # Q-learners can unlearn; keep the best weights
                best_eval = eval_ret
                agent.save(run_dir / "best")
            bar.update(1)
            bar.set_postfix(steps=step, ret=f"{ret:.1f}", sps=f"{step / (time.time() - start):.0f}", refresh=False)
            if episode % args.save_per_epochs == 0:
                save(episode + 1)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted during episode {episode}; saving")
        episode, interrupted = episode - 1, True  # the interrupted episode was not logged
    bar.close()
    if interrupted or episode % args.save_per_epochs != 0:  # else the last episode's save holds everything
        save(episode + 1)
    log.close()
    board.close()
    print(f"trained {episode} episodes, {step} env steps in {time.time() - start:.0f} s; "
          f"log, metrics, weights and plot in {run_dir}")


def test(args: argparse.Namespace, setup: Setup, run_dir: Path) -> None:
    from util import RunLog, plot_runs

    log = RunLog(run_dir, "test", vars(args))
    returns, start = [], time.time()
    seed = args.seed if args.seed > 0 else None
    bar = progress(args.test_episode)
    for episode in range(1, args.test_episode + 1):
        ret, _ = run_episode(setup, setup.env, False, args.max_episode_length, seed if episode == 1 else None)
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


def main(argv: list[str] | None = None) -> int:
    from util import new_run_dir

    args = parse_args(argv)
    try:
        if args.mode == "plot":
            plot(args)
            return 0
        setup = build(args)
        try:
            run_dir = new_run_dir(Path(args.output), args.env)
        except OSError as e:
            raise UsageError(f"cannot create a run folder in {args.output}: {e.strerror or e}") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    (train if args.mode == "train" else test)(args, setup, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
