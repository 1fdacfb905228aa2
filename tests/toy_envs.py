"""Small gymnasium envs for the command-line tests: an action space the agent does not support, and a Discrete
env whose actions carry embeddings."""
import gymnasium as gym
import numpy as np


class MultiDiscreteToy(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 3])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


class EmbeddedItemsToy(gym.Env):
    """n_items items with d-dimensional embeddings (seeded by `world_seed`); the observation is a target point, and
    choosing an item pays minus its embedding's distance to the target. Episodes last `length` steps."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def __init__(self, n_items: int = 300, d: int = 3, length: int = 20, world_seed: int = 0):
        rng = np.random.default_rng(world_seed)
        self.action_space = gym.spaces.Discrete(n_items)
        self.action_embeddings = rng.normal(size=(n_items, d)).astype(np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (d,), np.float32)
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.target = self.np_random.normal(size=self.action_embeddings.shape[1]).astype(np.float32)
        return self.target.copy(), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        reward = -float(np.linalg.norm(self.action_embeddings[action] - self.target))
        self.t += 1
        self.target = self.np_random.normal(size=self.action_embeddings.shape[1]).astype(np.float32)
        return self.target.copy(), reward, False, self.t >= self.length, {}


gym.register("MultiDiscreteToy-v0", entry_point=MultiDiscreteToy)
gym.register("EmbeddedItemsToy-v0", entry_point=EmbeddedItemsToy)
