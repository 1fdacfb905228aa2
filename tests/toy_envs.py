"""Small gymnasium envs for the command-line tests and the speed benchmark.

TupleToy has an action space the agent does not support. ContextToy observes a random context and rewards an
action by how well it matches a hidden function of that context, with a MultiBinary (n bits) or a d-dimensional
Box action space: enough to train on, and cheap to step.
"""
import gymnasium as gym
import numpy as np


class TupleToy(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(3)))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


class ContextToy(gym.Env):
    """Reward: the fraction of bits equal to sign(W obs) (MultiBinary), or -mean((action - tanh(W obs))^2) (Box)."""

    def __init__(self, kind: str = "binary", size: int = 8, context: int = 4):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (context,), np.float32)
        self.action_space = gym.spaces.MultiBinary(size) if kind == "binary" else \
            gym.spaces.Box(-1.0, 1.0, (size,), np.float32)
        self.weights = np.random.default_rng(0).normal(size=(size, context))

    def _observe(self) -> np.ndarray:
        self.obs = self.np_random.uniform(-1, 1, self.observation_space.shape).astype(np.float32)
        return self.obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observe(), {}

    def step(self, action):
        assert self.action_space.contains(action), f"{action!r} is not an action of {self.action_space}"
        logits = self.weights @ self.obs
        if isinstance(self.action_space, gym.spaces.MultiBinary):
            reward = float(np.mean(np.asarray(action) == (logits > 0)))
        else:
            reward = -float(np.mean((np.asarray(action) - np.tanh(logits)) ** 2))
        return self._observe(), reward, False, False, {}


gym.register("TupleToy-v0", entry_point=TupleToy)
for _kind, _size in (("binary", 6), ("binary", 20), ("binary", 40), ("box", 3)):
    gym.register(f"ContextToy-{_kind}{_size}-v0", entry_point=ContextToy, kwargs={"kind": _kind, "size": _size},
                 max_episode_steps=50)
