"""DDPG machinery: networks and their targets, torch-style Adam, exploration noise, the compiled update, save/load.

The action selection (acting and the target action of the update) is left to a subclass, the
Wolpertinger agent; everything here is independent of how actions are chosen.
"""
from __future__ import annotations

from runtime import read, realized_zeros, rng_state, set_rng_state, write  # first: the runtime's settings

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit

from memory import ReplayMemory
from model import Actor, Critic, FlatParams
from util import load_tensors, read_tensors, save_tensors

NETWORKS = ("actor", "critic", "actor_target", "critic_target")
OPTIMISERS = ("actor_optim", "critic_optim")
CHECKPOINT = "checkpoint.safetensors"  # one file, so that it is always whole: written aside, renamed into place


# Values below this magnitude are set to zero wherever the update step stores state (parameters, Adam's moments,
# target networks). Weights of dead ReLU units and their Adam moments otherwise decay into subnormal floats
# (|x| < 1.2e-38), on which x86 cores take a slow path: on an Intel Xeon the Pendulum step grew 5x within ten
# episodes. Flushing inside the compiled graphs works on every device and CPU, costs one select fused into
# kernels that run anyway, and keeps a margin above the subnormal range, so products of flushed-size values
# with activations do not land there either. Next to weights of order 1e-2, a 1e-30 is nothing.
FLUSH_BELOW = 1e-30


def flush_tiny(x: Tensor, below: float) -> Tensor:
    """x with every value of magnitude under `below` set to zero (`below` = 0: x unchanged)."""
    return (x.abs() < below).where(0.0, x) if below > 0 else x


@dataclass
class DDPGConfig:
    """Hyper-parameters with the reference's defaults."""
    hidden1: int = 256
    hidden2: int = 128
    init_w: float = 3e-3
    c_lr: float = 1e-3
    p_lr: float = 1e-4
    weight_decay: float = 1e-4
    gamma: float = 0.99
    tau: float = 1e-3
    batch_size: int = 64
    ou_theta: float = 0.15
    ou_sigma: float = 0.2
    ou_mu: float = 0.0
    epsilon: float = 80000
    choice_pull: float = 0.0
    c_lr_end: float = 1.0  # the critic's learning rate is c_lr times this once the exploration noise has run out
    flush_below: float = FLUSH_BELOW


class Adam:
    """torch.optim.Adam for one flat parameter buffer: the L2 penalty is added to the gradient (not AdamW).
    The learning rate lives in a buffer, so that `set_lr` changes it under a compiled step."""

    def __init__(self, params: FlatParams, lr: float, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8, flush_below: float = FLUSH_BELOW):
        self.params, self.weight_decay, self.b1, self.b2, self.eps = params, weight_decay, b1, b2, eps
        self.flush_below = flush_below
        self.lr, self.lr_value = realized_zeros(1), None
        self.set_lr(lr)
        self.m = Tensor.zeros_like(params.flat).contiguous().realize()
        self.v = Tensor.zeros_like(params.flat).contiguous().realize()
        self.t = realized_zeros(1)

    def step(self, loss: Tensor, views: dict[str, Tensor]) -> list[Tensor]:
        """Schedule one step on `loss`, computed with `views` (from params.views()); returns what to realise."""
        p = self.params.flat
        grads = loss.gradient(*views.values())
        g = Tensor.cat(*[grad.contiguous().flatten() for grad in grads]) + self.weight_decay * p.detach()
        flush = lambda x: flush_tiny(x, self.flush_below)  # see FLUSH_BELOW
        self.t.assign(self.t + 1)
        self.m.assign(flush(self.b1 * self.m + (1 - self.b1) * g))
        self.v.assign(flush(self.b2 * self.v + (1 - self.b2) * g * g))
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        p.assign(flush(p.detach() - self.lr * m_hat / (v_hat.sqrt() + self.eps)))
        return [p, self.m, self.v, self.t]

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (copied into the buffer only when it changes)."""
        if lr != self.lr_value:
            write(self.lr, np.array([lr]))
            self.lr_value = lr

    def state(self) -> dict[str, np.ndarray]:
        """Both moments and the step count."""
        return {"m": read(self.m), "v": read(self.v), "t": read(self.t)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name in ("m", "v", "t"):
            write(getattr(self, name), state[name])


class OrnsteinUhlenbeck:
    """Ornstein-Uhlenbeck process (dt 0.01, x0 0) as in keras-rl, reset at the start of each episode."""

    def __init__(self, size: int, theta: float, sigma: float, mu: float, rng: np.random.Generator, dt: float = 1e-2):
        self.size, self.theta, self.sigma, self.mu, self.rng, self.dt = size, theta, sigma, mu, rng, dt
        self.reset()

    def reset(self) -> None:
        self.x = np.zeros(self.size)

    def sample(self) -> np.ndarray:
        self.x = self.x + self.theta * (self.mu - self.x) * self.dt + \
            self.sigma * np.sqrt(self.dt) * self.rng.standard_normal(self.size)
        return self.x


class DDPG:
    """Actor-critic with target networks; `update` runs one compiled step on a replay minibatch.

    A subclass provides `_target_actions(next_states, *target_inputs)` (the action a' in the target
    y = r + gamma * (1 - terminated) * Q'(s', a')) and `_prepare_target_inputs()`, which
    fills the extra graph inputs that the target action needs from the next-state buffer (`batch[3]`).
    """

    def __init__(self, state_dim: int, action_dim: int, cfg: DDPGConfig, rng: np.random.Generator):
        self.state_dim, self.action_dim, self.cfg, self.rng = state_dim, action_dim, cfg, rng
        dims = (state_dim, action_dim, cfg.hidden1, cfg.hidden2, cfg.init_w)
        self.actor, self.critic = Actor(*dims), Critic(*dims)
        self.actor_target, self.critic_target = self.actor.clone(), self.critic.clone()
        self.actor_optim = Adam(self.actor, cfg.p_lr, cfg.weight_decay, flush_below=cfg.flush_below)
        self.critic_optim = Adam(self.critic, cfg.c_lr, cfg.weight_decay, flush_below=cfg.flush_below)
        self.noise = OrnsteinUhlenbeck(action_dim, cfg.ou_theta, cfg.ou_sigma, cfg.ou_mu, rng)
        self.epsilon = 1.0
        b = cfg.batch_size
        self.batch = [realized_zeros(b, state_dim), realized_zeros(b, action_dim), realized_zeros(b),
                      realized_zeros(b, state_dim), realized_zeros(b)]
        self.target_inputs: list[Tensor] = []
        # the compiled graphs read the agent's own buffers, written in place, and take no arguments: TinyJit spends
        # about 55 us per tensor argument on every call checking it
        self._update = TinyJit(lambda: self._update_graph(*self.batch, *self.target_inputs))
        self._stats_sum, self._stats_count = np.zeros(3, np.float32), 0

    # --- exploration -----------------------------------------------------------------------------------------
    def exploration_scale(self) -> float:
        """This action selection's exploration scale: epsilon, decaying linearly from 1 to 0 over `cfg.epsilon`."""
        scale = max(self.epsilon, 0.0)
        self.epsilon -= 1.0 / self.cfg.epsilon
        return scale

    def reset_noise(self) -> None:
        self.noise.reset()

    # --- learning --------------------------------------------------------------------------------------------
    def _target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _prepare_target_inputs(self) -> None:
        raise NotImplementedError

    def _update_graph(self, states: Tensor, actions: Tensor, rewards: Tensor, next_states: Tensor,
                      terminated: Tensor, *target_inputs: Tensor) -> Tensor:
        cfg = self.cfg
        next_actions = self._target_actions(next_states, *target_inputs).detach()
        q_next = self.critic_target(next_states, next_actions)
        y = (rewards + cfg.gamma * (1 - terminated) * q_next).detach()
        critic_params = self.critic.views()
        q = self.critic(states, actions, critic_params)
        critic_loss, mean_q = ((q - y) ** 2).mean(), q.mean()
        # the pull needs a' as chosen before the critic's step (left lazy, it would be chosen anew after it)
        keep = [next_actions] if cfg.choice_pull > 0 else []
        Tensor.realize(critic_loss, mean_q, *keep, *self.critic_optim.step(critic_loss, critic_params))
        # the actor follows the critic just updated, as in the reference
        actor_params = self.actor.views()
        actor_loss = -self.critic(states, self.actor(states, actor_params)).mean()
        if cfg.choice_pull > 0:
            # The critic learns Q only at actions that were played; where those lie on a thin set (item embeddings
            # on a manifold), its slope at an off-set proto-action says little. This pulls the proto-action of
            # each next state towards the action that the k-NN search and the target critic chose for it.
            pull = ((self.actor(next_states, actor_params) - next_actions) ** 2).sum(1).mean()
            actor_loss = actor_loss + cfg.choice_pull * pull
        Tensor.realize(actor_loss, *self.actor_optim.step(actor_loss, actor_params))
        for target, online in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
            target.flat.assign(flush_tiny(cfg.tau * online.flat + (1 - cfg.tau) * target.flat, cfg.flush_below))
        return Tensor.stack(critic_loss, actor_loss, mean_q).realize(self.actor_target.flat, self.critic_target.flat)

    def update(self, memory: ReplayMemory) -> np.ndarray:
        """One DDPG update on a fresh minibatch; returns (critic loss, actor loss, mean Q of the batch before the
        update), also summed for `update_means`. Once the exploration noise has run out (epsilon spent), the
        critic steps at c_lr * c_lr_end: its remaining steps refine the ranking of the candidates rather than chase
        new data, and a smaller step leaves less noise in that ranking."""
        self.critic_optim.set_lr(self.cfg.c_lr * (self.cfg.c_lr_end if self.epsilon <= 0 else 1.0))
        sample = memory.sample(self.cfg.batch_size, self.rng)
        for buffer, array in zip(self.batch, sample):
            write(buffer, array)
        self._prepare_target_inputs()
        stats = read(self._update())
        self._stats_sum += stats
        self._stats_count += 1
        return stats

    def update_means(self) -> np.ndarray | None:
        """Mean (critic loss, actor loss, mean Q) over the updates since the last call; None if there were none."""
        means = self._stats_sum / self._stats_count if self._stats_count else None
        self._stats_sum, self._stats_count = np.zeros(3, np.float32), 0
        return means

    # --- checkpoints -----------------------------------------------------------------------------------------
    def networks(self) -> dict[str, FlatParams]:
        return {name: getattr(self, name) for name in NETWORKS}

    def training_buffers(self) -> dict[str, Tensor]:
        """Every buffer an update writes and keeps: the four networks, and both optimisers' moments and step counts."""
        buffers = {name: net.flat for name, net in self.networks().items()}
        for name in OPTIMISERS:
            buffers |= {f"{name}.{key}": getattr(getattr(self, name), key) for key in ("m", "v", "t")}
        return buffers

    def parameters_finite(self) -> bool:
        """Whether every network parameter is a finite number."""
        return all(np.isfinite(read(net.flat)).all() for net in self.networks().values())

    def network_arrays(self) -> dict[str, np.ndarray]:
        """Every network's parameters, named `<network>.<parameter>`."""
        return {f"{name}.{param}": array for name, net in self.networks().items()
                for param, array in net.state_dict().items()}

    def training_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything that the next update and action depend on: arrays by name, and JSON scalars.
        A new field is one more entry here and in `load_training_state`."""
        arrays = self.network_arrays()
        for name in OPTIMISERS:
            arrays |= {f"{name}.{key}": value for key, value in getattr(self, name).state().items()}
        arrays["noise.x"] = np.asarray(self.noise.x, np.float64)
        scalars = {"epsilon": self.epsilon, "rng": self.rng.bit_generator.state, "tinygrad_rng": rng_state()}
        return arrays, scalars

    def load_training_state(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        """Restore what `training_state` returned, into the existing buffers (compiled graphs keep them)."""
        self._load_networks(arrays)
        for name in OPTIMISERS:
            getattr(self, name).load_state({key: arrays[f"{name}.{key}"] for key in ("m", "v", "t")})
        self.noise.x = arrays["noise.x"].copy()
        self.epsilon = scalars["epsilon"]
        self.rng.bit_generator.state = scalars["rng"]
        set_rng_state(scalars["tinygrad_rng"])

    def _load_networks(self, arrays: dict[str, np.ndarray]) -> None:
        for name, net in self.networks().items():
            parts = [arrays[f"{name}.{param}"] for param in net.shapes]
            for part, (param, shape) in zip(parts, net.shapes.items()):
                if part.shape != shape:
                    raise ValueError(f"{name}.{param} has shape {part.shape}, expected {shape}")
            write(net.flat, np.concatenate([part.ravel() for part in parts]))

    def save(self, folder: Path, metadata: dict | None = None) -> None:
        """Write the four networks (no training state) as `folder`/checkpoint.safetensors, whole or not at all."""
        folder.mkdir(exist_ok=True)  # not its parents: a removed run folder is an error, not made anew
        save_tensors(folder / CHECKPOINT, self.network_arrays(), metadata)

    def load(self, folder: Path) -> None:
        """Load the networks of `folder`/checkpoint.safetensors, or of an older checkpoint's four files
        (actor, critic, actor_target, critic_target .safetensors), into the existing buffers, so compiled graphs
        see them. Older files without targets (weights from elsewhere) start the targets from the online nets.
        Raises ValueError naming the file when one is missing, unreadable or of the wrong shape.
        """
        folder = Path(folder)
        if (folder / CHECKPOINT).exists():
            names = [f"{name}.{param}" for name, net in self.networks().items() for param in net.shapes]
            try:
                self._load_networks(read_tensors(folder / CHECKPOINT, names)[0])
            except ValueError as e:
                raise ValueError(f"{folder / CHECKPOINT}: {e}") from None
            return
        for name in ("actor", "critic"):
            self._load_one(folder / f"{name}.safetensors", getattr(self, name))
        for name, online in (("actor_target", self.actor), ("critic_target", self.critic)):
            path = folder / f"{name}.safetensors"
            if path.exists():
                self._load_one(path, getattr(self, name))
            else:
                getattr(self, name).copy_from(online)

    @staticmethod
    def _load_one(path: Path, net: FlatParams) -> None:
        try:
            net.load_state_dict(load_tensors(path))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
