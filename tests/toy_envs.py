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
    """n_items items with d-dimensional embeddings (seeded by `world_seed`): standard normal, or with `clusters` > 0
    a mixture of that many clusters (centres uniform in [-1, 1]^d, spread 0.2 per dimension), as learnt item
    embeddings have structure. The observation is a target point (the embedding of a random item plus noise), and
    choosing an item pays minus its embedding's distance to the target. Episodes last `length` steps."""

    def __init__(self, n_items: int = 300, d: int = 3, length: int = 20, world_seed: int = 0, clusters: int = 0):
        rng = np.random.default_rng(world_seed)
        self.action_space = gym.spaces.Discrete(n_items)
        if clusters:
            centres = rng.uniform(-1, 1, (clusters, d)).astype(np.float32)
            noise = rng.standard_normal((n_items, d), np.float32)
            self.action_embeddings = centres[rng.integers(0, clusters, n_items)] + 0.2 * noise
        else:
            self.action_embeddings = rng.standard_normal((n_items, d), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (d,), np.float32)
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._new_target(), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        reward = -float(np.linalg.norm(self.action_embeddings[action] - self.target))
        self.t += 1
        return self._new_target(), reward, False, self.t >= self.length, {}

    def _new_target(self) -> np.ndarray:
        item = self.action_embeddings[self.np_random.integers(len(self.action_embeddings))]
        self.target = (item + 0.1 * self.np_random.normal(size=item.shape)).astype(np.float32)
        return self.target.copy()


gym.register("MultiDiscreteToy-v0", entry_point=MultiDiscreteToy)
gym.register("EmbeddedItemsToy-v0", entry_point=EmbeddedItemsToy)
gym.register("EmbeddedItems1M-v0", entry_point=EmbeddedItemsToy,
             kwargs=dict(n_items=1_000_000, d=16, length=200, clusters=1000))
