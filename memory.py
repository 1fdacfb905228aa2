"""Replay memory: a ring buffer of real transitions (s, a, r, s', terminated) in preallocated float32 arrays."""
from __future__ import annotations

import numpy as np


FIELDS = ("states", "actions", "rewards", "next_states", "terminated")


class ReplayMemory:
    """Fixed-capacity ring buffer; once full, each new transition overwrites the oldest.

    Only `terminated` is stored as the end of a return: a time-limit truncation keeps
    terminated = 0, so the target bootstraps through it. Every stored transition can be sampled.
    The arrays are allocated lazily by the OS, so resident memory grows with use, not capacity.
    """

    def __init__(self, capacity: int, state_dim: int, action_dim: int):
        if capacity < 1:
            raise ValueError("replay memory capacity must be at least 1")
        self.capacity, self.size, self.next = capacity, 0, 0
        self.states = np.zeros((capacity, state_dim), np.float32)
        self.actions = np.zeros((capacity, action_dim), np.float32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_states = np.zeros((capacity, state_dim), np.float32)
        self.terminated = np.zeros(capacity, np.float32)

    def __len__(self) -> int:
        return self.size

    def append(self, state, action, reward: float, next_state, terminated: bool) -> None:
        i = self.next
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.terminated[i] = next_state, float(terminated)
        self.next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """A uniform minibatch (with replacement): states, actions, rewards, next_states, terminated."""
        idx = rng.integers(0, self.size, batch_size)
        return self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.terminated[idx]

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The filled part of each array, and the fill level and write position."""
        return {name: getattr(self, name)[:self.size] for name in FIELDS}, {"size": self.size, "next": self.next}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Restore what `state` returned into a memory of the same capacity."""
        size = scalars["size"]
        if size > self.capacity:
            raise ValueError(f"the saved replay memory holds {size} transitions, more than the capacity {self.capacity}")
        for name in FIELDS:
            getattr(self, name)[:size] = arrays[name]
        self.size, self.next = size, scalars["next"]

    def mark(self, max_appends: int) -> tuple:
        """What `rollback` needs to undo up to `max_appends` appends: the fill level, the write position and
        the rows that those appends may overwrite."""
        rows = (self.next + np.arange(min(max_appends, self.capacity))) % self.capacity
        return self.size, self.next, rows, [getattr(self, name)[rows] for name in FIELDS]

    def rollback(self, mark: tuple) -> None:
        """Return to the state of `mark` (taken before at most its `max_appends` appends)."""
        self.size, self.next, rows, saved = mark
        for name, values in zip(FIELDS, saved):
            getattr(self, name)[rows] = values
