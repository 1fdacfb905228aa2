import numpy as np

from memory import ReplayMemory


def fill(memory: ReplayMemory, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        memory.append([i, 0, 0], [i / 10], float(i), [i + 1, 0, 0], terminated=False)


def test_wraps_around_at_capacity():
    memory = ReplayMemory(5, 3, 1)
    fill(memory, 7)
    assert len(memory) == 5
    # 5 and 6 overwrote 0 and 1; the rest stays in place
    assert memory.rewards.tolist() == [5, 6, 2, 3, 4]
    np.testing.assert_array_equal(memory.next_states[:, 0], memory.states[:, 0] + 1)
    fill(memory, 3, start=7)
    assert memory.rewards.tolist() == [5, 6, 7, 8, 9]


def test_every_transition_is_sampled_including_episode_starts():
    memory = ReplayMemory(100, 3, 1)
    for episode in range(3):  # three episodes of 4 steps: the first of each must be reachable
        for t in range(4):
            memory.append([episode, t, 0], [0.0], 10.0 * episode + t, [episode, t + 1, 0], terminated=(t == 3))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        seen.update(memory.sample(8, rng)[2].tolist())
    assert seen == {10.0 * e + t for e in range(3) for t in range(4)}


def test_terminated_and_truncated_are_stored_differently():
    memory = ReplayMemory(10, 3, 1)
    memory.append([0, 0, 0], [0.0], 1.0, [1, 1, 1], terminated=True)   # a real end of the return
    memory.append([1, 1, 1], [0.0], 1.0, [2, 2, 2], terminated=False)  # a time-limit cut: bootstraps
    assert memory.terminated[:2].tolist() == [1.0, 0.0]
    # the true next observation is kept at a truncation, so the target can bootstrap from it
    assert memory.next_states[1].tolist() == [2, 2, 2]


def test_large_capacity_is_preallocated_float32():
    memory = ReplayMemory(6_000_000, 3, 1)
    assert all(a.dtype == np.float32 for a in (memory.states, memory.actions, memory.rewards,
                                                 memory.next_states, memory.terminated))
    assert memory.states.shape == (6_000_000, 3)
