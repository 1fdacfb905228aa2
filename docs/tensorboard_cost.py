"""Cost of main.py's TensorBoard logging against the cost of a training step, measured in one process:

    python docs/tensorboard_cost.py [--env CartPole-v1] [--updates 3000] [--steps 1000] [--episodes 2000]

Times, after --updates training updates: env steps of the training loop (Wolpertinger.play_episode, update included), the
per-update summing of (critic loss, actor loss, mean Q), and TensorBoardLog.episode with the real writer; the
logging's share of a step is (episode logging / mean episode length + summing) / step time.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from main import build, parse_args  # noqa: E402  (first: it sets the runtime's settings before numpy loads)

import numpy as np  # noqa: E402
from util import TensorBoardLog  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--env", default="CartPole-v1")
p.add_argument("--updates", type=int, default=3000)
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--episodes", type=int, default=2000, help="TensorBoardLog.episode calls timed")
opts = p.parse_args()
setup = build(parse_args(["--env", opts.env, "--seed", "1", "--warmup", "128"]))
agent = setup.agent
setup.learn_setup()
while setup.env_steps < opts.updates + 128:
    setup.play_episode()
start, first, lengths = time.perf_counter(), setup.env_steps, []
while setup.env_steps < first + opts.steps:
    before = setup.env_steps
    setup.play_episode()
    lengths.append(setup.env_steps - before)
ms_step = 1e3 * (time.perf_counter() - start) / (setup.env_steps - first)
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
