"""A gymnasium env with an action space the agent does not support, for the command-line tests."""
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


gym.register("MultiDiscreteToy-v0", entry_point=MultiDiscreteToy)


class NaNAfterToy(gym.Env):
    """Ten-step episodes of reward 1; from the 45th step on, the observation is NaN."""
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def __init__(self):
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t, self.steps = self.t + 1, self.steps + 1
        obs = np.full(2, np.nan if self.steps >= 45 else 0.5, np.float32)
        return obs, 1.0, self.t == 10, False, {}


gym.register("NaNAfterToy-v0", entry_point=NaNAfterToy)
