"""Cost of main.py's TensorBoard logging against the cost of a training step, measured in one process:

    python docs/tensorboard_cost.py [--env CartPole-v1] [--updates 3000] [--steps 1000] [--episodes 2000]

Times, after --updates training updates: env steps of the training loop (main.run_episode, update included), the
per-update summing of (critic loss, actor loss, mean Q), and TensorBoardLog.episode with the real writer; the
logging's share of a step is (episode logging / mean episode length + summing) / step time.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from main import build, parse_args, run_episode  # noqa: E402
from memory import ReplayMemory  # noqa: E402
from util import TensorBoardLog  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--env", default="CartPole-v1")
p.add_argument("--updates", type=int, default=3000)
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--episodes", type=int, default=2000, help="TensorBoardLog.episode calls timed")
opts = p.parse_args()
setup = build(parse_args(["--env", opts.env, "--seed", "1", "--warmup", "128"]))
agent = setup.agent
memory = ReplayMemory(100000, agent.state_dim, agent.action_dim)
step, episodes = 0, 0
while step < opts.updates + 128:
    _, step = run_episode(setup, setup.env, True, 1440, None, memory, 128, step)
start, first, lengths = time.perf_counter(), step, []
while step < first + opts.steps:
    before = step
    _, step = run_episode(setup, setup.env, True, 1440, None, memory, 128, step)
    lengths.append(step - before)
ms_step = 1e3 * (time.perf_counter() - start) / (step - first)
stats = np.ones(3, np.float32)
start = time.perf_counter()
for _ in range(100000):
    agent._stats_sum += stats
    agent._stats_count += 1
us_sum = 1e6 * (time.perf_counter() - start) / 100000
with tempfile.TemporaryDirectory() as folder:
    board = TensorBoardLog(Path(folder))
    start = time.perf_counter()
    for e in range(1, opts.episodes + 1):
        board.episode(e, 20 * e, 1.0, 0.01 * e, 2.0 if e % 10 == 0 else None, agent.update_means(), 0.5)
    board.close()
    us_episode = 1e6 * (time.perf_counter() - start) / opts.episodes
share = (us_episode / np.mean(lengths) + us_sum) / (1e3 * ms_step)
print(f"{opts.env}: {ms_step:.2f} ms per step (after {opts.updates} updates, mean episode {np.mean(lengths):.0f} "
      f"steps); summing per update {us_sum:.2f} us; logging per episode {us_episode:.0f} us; "
      f"logging share of a step {100 * share:.3f}%")
