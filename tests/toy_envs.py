"""Small gymnasium envs for the tests and the speed benchmark.

TupleToy has an action space the agent does not support; ObservationToy observes any observation space by
name; NaNAfterToy starts returning NaN observations; EmbeddedItemsToy is a Discrete env whose actions carry
embeddings. ContextToy observes a random context and rewards an
action by how well it matches a hidden function of that context, with a MultiBinary (n bits) or a
d-dimensional Box action space: enough to train on, and cheap to step.
"""
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TupleToy(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(3)))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


OBSERVATIONS = {
    "discrete": lambda: spaces.Discrete(4, start=1),
    "multibinary": lambda: spaces.MultiBinary(3),
    "multidiscrete": lambda: spaces.MultiDiscrete([2, 3]),
    "dict": lambda: spaces.Dict(item=spaces.Discrete(5), clicks=spaces.MultiBinary(3), slate=spaces.Tuple(
        (spaces.MultiDiscrete([2, 3]), spaces.Box(-1.0, 1.0, (2, 2), np.float64)))),
    "text": lambda: spaces.Text(8),
    "graph": lambda: spaces.Graph(spaces.Box(0.0, 1.0, (2,)), spaces.Discrete(2)),
    "sequence": lambda: spaces.Sequence(spaces.Discrete(3)),
    "dict_with_text": lambda: spaces.Dict(item=spaces.Discrete(2), query=spaces.Text(4)),
}


class ObservationToy(gym.Env):
    """Observes random samples of the observation space named by `observation`; reward 1 for action 1; 3 steps."""
    action_space = spaces.Discrete(2)

    def __init__(self, observation: str = "dict"):
        if observation not in OBSERVATIONS:
            raise ValueError(f"observation must be one of {', '.join(OBSERVATIONS)}")
        self.observation_space = OBSERVATIONS[observation]()
        self.last, self.t = None, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2 ** 31)))
        self.t, self.last = 0, self.observation_space.sample()
        return self.last, {}

    def step(self, action):
        self.t, self.last = self.t + 1, self.observation_space.sample()
        return self.last, float(action == 1), self.t >= 3, False, {}


gym.register("ObservationToy-v0", entry_point=ObservationToy)


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


gym.register("EmbeddedItemsToy-v0", entry_point=EmbeddedItemsToy)
gym.register("EmbeddedItems1M-v0", entry_point=EmbeddedItemsToy,
             kwargs=dict(n_items=1_000_000, d=16, length=200, clusters=1000))
