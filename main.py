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


def make_env(env_id: str) -> gym.Env:
    import gymnasium as gym
    try:
        return gym.make(env_id)
    except gym.error.Error as e:
        raise UsageError(f"cannot make env {env_id!r}: {e}") from None


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
    import gymnasium as gym
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
    env = make_env(env_id)
    if not isinstance(env.observation_space, gym.spaces.Box):
        raise UsageError(f"{env_id} has a {type(env.observation_space).__name__} observation space; "
                         "supported: Box observations")
    if args.tau_update is None:
        args.tau_update = DEFAULT_TAU.get(type(env.action_space).__name__)
    embeddings = load_action_embeddings(env, args)
    space = make_action_space(env_id, env.action_space, args) if embeddings is None else \
        make_embedding_space(env_id, env.action_space, embeddings, args)
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
        if message := space.load_index(folder):
            print(message)
    return Setup(env_id, env, make_env(env_id), space, agent, k)


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
    from util import RunLog, plot_runs, read_metrics

    agent = setup.agent
    memory = ReplayMemory(args.rmsize, agent.state_dim, agent.action_dim)
    log = RunLog(run_dir, "train", vars(args))
    title = f"{setup.env_id}: {setup.space.n} actions, k = {setup.k}"
    seed = args.seed if args.seed > 0 else None
    if seed is not None:
        setup.eval_env.reset(seed=seed + 1)

    def save(before_episode: int) -> None:
        agent.save(run_dir)
        log.line(f"### Model Saved before Ep:{before_episode} ###")
        plot_runs([(run_dir.name, read_metrics(log.csv_path))], run_dir / "reward_curve.png", title)

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
    print(f"trained {episode} episodes, {step} env steps in {time.time() - start:.0f} s; "
          f"log, metrics, weights and plot in {run_dir}")


def test(args: argparse.Namespace, setup: Setup, run_dir: Path) -> None:
    from util import RunLog, plot_runs, read_metrics

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
    plot_runs([(run_dir.name, read_metrics(log.csv_path))], run_dir / "reward_curve.png",
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
    if args.mode == "train" and (message := setup.space.save_index(run_dir)):
        print(message)
    (train if args.mode == "train" else test)(args, setup, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
