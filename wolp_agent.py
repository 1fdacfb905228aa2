"""The Wolpertinger agent: the actor's proto-action, its k nearest actions, the critic's best of those k.

Two ways to reach the k candidates, both exact and both scoring every candidate with its own state:
- 1-d lattice (Pendulum, any Discrete env): the k nearest grid points form a window of indices
  computed inside the compiled graph. Q(s, .) is piecewise linear in a 1-d action, so beyond
  2 * hidden2 + 2 candidates only the window's ends and the grid points beside the critic's kinks
  can hold the maximum; those are all that is scored.
- otherwise (d > 1, or --knn flann): the action set's search on the host (grid_knn.c for a grid) fills a
  candidate buffer that the compiled graphs score. A grid's candidates travel as their integer coordinates
  and become points in the graphs; where its axes fall into a few groups of few combinations (MultiBinary:
  8 axes, 256 combinations per group), the critic's action part is tabulated per group, the search writes
  each candidate as its row in each group's table, and each candidate adds one row per group instead of
  multiplying every action column. On the CPU one C kernel scores a state's candidates and keeps the best
  (`Critic.best_of`, `Critic.best_of_tabulated`). The update's ranking of its minibatch's candidates, its
  heaviest part, is split between the CPU's cores (see `ranking_devices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.dtype import DType, _from_np_dtype
from tinygrad.helpers import getenv

from action_space import ROW_DTYPE, ActionSpace, GridActionSpace, PointMap
from ddpg import DDPG, DDPGConfig, read, realized_zeros, sleep_until_idle, write
from model import Critic
from util import usable_cores

SCORINGS = ("factored", "full")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), None where unknown."""
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_candidate_memory(k: int, action_dim: int, cfg: DDPGConfig) -> None:
    """Refuse a k whose candidates for a minibatch would not fit in memory: per candidate of each state, its
    point and its coordinates (at most 16 bytes per action dimension), the critic's hidden pre-activations and
    the search's working space (its listed points)."""
    need = (cfg.batch_size + 1) * k * (16 * action_dim + 4 * cfg.hidden2 + 64)
    available = available_memory()
    if available is not None and need > available / 2:
        raise ValueError(f"k = {k} needs about {need / 2 ** 30:.1f} GiB for the candidates of a minibatch, more "
                         f"than half the {available / 2 ** 30:.1f} GiB of memory available; choose a smaller --k")


def ranking_devices() -> list[str]:
    """The devices between which the update splits the ranking of its minibatch's candidates. Under tinygrad's HCQ2
    runtime (main.py turns it on) each CPU device runs its kernels in a worker thread of its own, so graphs queued on
    CPU devices of their own run side by side: one device per core this process may use, at most $WOLPERTINGER_CORES.
    Without HCQ2, or on another backend, the one default device."""
    if Device.DEFAULT != "CPU" or not getenv("HCQ2"):
        return [Device.DEFAULT]
    return ["CPU"] + [f"CPU:{i}" for i in range(1, usable_cores())]


def best_candidate(critic: Critic, scoring: str, states: Tensor, candidates: Tensor) -> Tensor:
    """Position (B,) of the critic's best candidate for each state: states (B, S), candidates (B, K, A)."""
    if candidates.shape[1] == 1:  # a lone candidate needs no critic
        return Tensor.zeros(candidates.shape[0], dtype="int32", device=candidates.device)
    return (critic.score if scoring == "factored" else critic.score_full)(states, candidates).argmax(1)


class CandidateRanker:
    """The online critic's choice among the candidates in a buffer, on one device: the critic (the agent's own, or a
    replica on another device) and what turns the buffer's entries into points there. The buffer holds points
    (embedded items), grid coordinates, or each candidate's rows in the critic's group tables (`tables`: the groups'
    points; see `Critic.score_tabulated`)."""

    def __init__(self, critic: Critic, scoring: str, point_map: PointMap | None, tables: list[np.ndarray] | None):
        self.critic, self.scoring, self.point_map, device = critic, scoring, point_map, critic.flat.device
        self.tables = None if tables is None else [Tensor(points, device=device).realize() for points in tables]
        if point_map is not None and tables is None:
            self.point_scale = Tensor(point_map.scale, device=device).realize()
            self.point_offset = Tensor(point_map.offset, device=device).realize()

    def best(self, states: Tensor, candidates: Tensor) -> Tensor:
        """Position (B,) of the best candidate of each state."""
        if candidates.shape[1] == 1 or self.scoring != "factored":
            return best_candidate(self.critic, self.scoring, states, self.points(candidates))
        if self.tables is None:
            return self.critic.best_of(states, self.points(candidates))
        return self.critic.best_of_tabulated(states, candidates, self.tables)

    def best_points(self, states: Tensor, candidates: Tensor) -> Tensor:
        """The point (B, A) of the best candidate of each state."""
        best = self.best(states, candidates).reshape(-1, 1, 1).expand(-1, 1, candidates.shape[2])
        return self.points(candidates.gather(1, best)[:, 0])

    def points(self, candidates: Tensor) -> Tensor:
        """The points (..., A) of candidates: as written, looked up in the tables from their rows, or mapped from
        grid coordinates (once, into their own buffer: mapped inside the scoring kernel they would be converted
        once per hidden unit)."""
        if self.tables is not None:
            rows = candidates.cast(dtypes.int32)
            return Tensor.cat(*[table[rows[..., g]] for g, table in enumerate(self.tables)], dim=-1).contiguous()
        if self.point_map is None:
            return candidates
        return (candidates.cast(dtypes.float32) * self.point_scale + self.point_offset).contiguous()


@dataclass
class RankingPart:
    """Rows `rows` of the minibatch, whose next states' candidates `choose` ranks on the device of `states`."""
    rows: slice
    critic: Critic
    states: Tensor
    candidates: Tensor
    choose: TinyJit


class WolpertingerAgent(DDPG):
    def __init__(self, state_dim: int, space: ActionSpace, k: int, cfg: DDPGConfig, rng: np.random.Generator,
                 scoring: str = "factored", random_candidate: float = 0.0):
        if not 1 <= k <= space.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {space.n}")
        if not 0.0 <= random_candidate <= 1.0:
            raise ValueError(f"the random-candidate probability must lie in [0, 1] (got {random_candidate})")
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        # a window of float indices is exact up to 2**24 points
        in_graph_window = isinstance(space, GridActionSpace) and space.dim == 1 and space.knn == "lattice" \
            and 1 < space.n < 2 ** 24
        if not in_graph_window:  # before any network is built
            check_candidate_memory(k, space.dim, cfg)
        super().__init__(state_dim, space.dim, cfg, rng)
        self.space, self.k, self.scoring, self.random_candidate = space, k, scoring, random_candidate
        self.in_graph_window, self.point_map = in_graph_window, space.point_map()
        self.state_in, self.noise_in = realized_zeros(1, state_dim), realized_zeros(1, space.dim)
        if self.in_graph_window:
            self.target_inputs = []
            self._act = TinyJit(lambda: self._act_window_graph(self.state_in, self.noise_in))
        else:
            # tabulated scoring where a table lookup replaces 3 or more action columns: measured on the CPU, a
            # lookup costs about 2.5 columns' multiply-adds (MultiBinary(20): 3 lookups, 44 ms instead of 124)
            groups = self.point_map.groups if self.point_map is not None else ()
            self.groups, tables = (), None
            if scoring == "factored" and groups and 3 * len(groups) <= space.dim:
                # the candidate buffers hold each candidate's row in each group's table, as the search writes them
                self.groups, tables = groups, [group.points for group in groups]
                dtype, width = _from_np_dtype(ROW_DTYPE), len(groups)
            elif self.point_map is None:  # they hold points
                dtype, width = dtypes.float32, space.dim
            else:  # they hold grid coordinates, mapped to points in the graphs
                dtype, width = _from_np_dtype(self.point_map.dtype), space.dim
            self.ranker = CandidateRanker(self.critic, scoring, self.point_map, tables)
            self.act_candidates = realized_zeros(1, k, width, dtype=dtype)
            self._proto = TinyJit(lambda: self._proto_graph(self.state_in, self.noise_in))
            self._target_proto = TinyJit(lambda: self._target_proto_graph(self.batch[3]))
            self._best = TinyJit(lambda: self.ranker.best(self.state_in, self.act_candidates).realize())
            self.target_inputs = [realized_zeros(cfg.batch_size, space.dim)]  # the a' chosen for each next state
            devices = ranking_devices()[:cfg.batch_size]
            self.ranking_parts = [self._ranking_part(rows, device, tables, dtype, width) for rows, device in
                                  zip(np.array_split(np.arange(cfg.batch_size), len(devices)), devices)]

    def _ranking_part(self, rows: np.ndarray, device: str, tables: list[np.ndarray] | None, dtype: DType,
                      width: int) -> RankingPart:
        """The ranking of the candidates of the minibatch's `rows` on `device`: on the default device with the agent's
        own critic and ranker, reading the next states in the update's own buffer; elsewhere with replicas and a
        buffer of next states of its own."""
        part_rows = slice(int(rows[0]), int(rows[-1]) + 1)
        if device == Device.DEFAULT:
            critic, ranker, states = self.critic, self.ranker, self.batch[3][part_rows]
        else:
            critic = self.critic.replica(device)
            ranker = CandidateRanker(critic, self.scoring, self.point_map, tables)
            states = realized_zeros(len(rows), self.state_dim, device=device)
        candidates = realized_zeros(len(rows), self.k, width, dtype=dtype, device=device)
        choose = TinyJit(lambda: ranker.best_points(states, candidates).realize())
        return RankingPart(part_rows, critic, states, candidates, choose)

    # --- compiled graphs -------------------------------------------------------------------------------------
    def _window_best(self, states: Tensor, protos: Tensor) -> tuple[Tensor, Tensor]:
        """Float grid indices (B,) of the best of the k grid points nearest to each 1-d proto-action, and of
        the first of those k (the window is [first, first + k - 1])."""
        n, k, step = self.space.n, self.k, self.space.step
        lo = ((protos[:, 0] + 1) / step - k / 2).ceil().clip(0, n - k).unsqueeze(1)    # window [lo, lo + k - 1]
        hi = lo + (k - 1)
        if k <= 2 * self.cfg.hidden2 + 2:
            indices = lo + Tensor.arange(k).unsqueeze(0)
        else:
            kinks = ((self.critic.kinks(states) + 1) / step).clip(lo, hi).floor()
            indices = Tensor.cat(lo, hi, kinks, (kinks + 1).clip(lo, hi), dim=1)
        best = best_candidate(self.critic, self.scoring, states, (indices * step - 1).unsqueeze(2))
        return indices.gather(1, best.unsqueeze(1))[:, 0], lo[:, 0]

    def _proto_of(self, state: Tensor, noise: Tensor) -> Tensor:
        return (self.actor(state) + noise).clip(-1, 1)

    def _act_window_graph(self, state: Tensor, noise: Tensor) -> Tensor:
        return Tensor.cat(*self._window_best(state, self._proto_of(state, noise))).realize()

    def _proto_graph(self, state: Tensor, noise: Tensor) -> Tensor:
        return self._proto_of(state, noise).realize()

    def _target_proto_graph(self, next_states: Tensor) -> Tensor:
        return self.actor_target(next_states).clip(-1, 1).realize()

    def _candidate_input(self, found: np.ndarray) -> np.ndarray:
        """What a candidate buffer takes for the search's k nearest of each proto-action (B, k, width): the points
        of embedded items; for a grid, what the search wrote (grid coordinates, or rows of the tables)."""
        if self.point_map is None:
            return self.space.points(found)
        return found.reshape(len(found), self.k, -1)

    def _action_id(self, found_one: np.ndarray):
        """The action id of one of the search's candidates."""
        return self.space.group_coordinates(found_one, self.groups) if self.groups else found_one

    def _target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        if self.in_graph_window:
            protos = self.actor_target(next_states).clip(-1, 1)
            return self._window_best(next_states, protos)[0].unsqueeze(1) * self.space.step - 1
        chosen, = target_inputs
        return chosen

    def _prepare_target_inputs(self) -> None:
        """For the host's search: the k nearest actions of each next state's target proto-action, ranked by the
        online critic in parts of the minibatch, side by side; the chosen points fill the update's input."""
        if self.in_graph_window:
            return
        found = self._candidate_input(self.space.search(read(self._target_proto()), self.k, self.groups))
        parts = self.ranking_parts
        if len(parts) > 1:  # the replicas' next states and online critic weights
            next_states, weights = read(self.batch[3]), read(self.critic.flat)
        for part in parts:
            write(part.candidates, found[part.rows])
            if part.critic is not self.critic:
                write(part.states, next_states[part.rows])
                write(part.critic.flat, weights)
        queued = [part.choose() for part in parts]  # queued on their devices at once, run side by side
        if len(parts) > 1:
            sleep_until_idle([part.states.device for part in parts])
        write(self.target_inputs[0], np.concatenate([read(chosen) for chosen in queued]))

    # --- acting ----------------------------------------------------------------------------------------------
    def random_action(self):
        """Warm-up: a uniform random proto-action snapped to its nearest action; returns the action id."""
        return self.space.nearest(self.rng.uniform(-1, 1, (1, self.space.dim)))[0]

    def select_action(self, state: np.ndarray, explore: bool = True):
        """Id of the action to play: the critic's best of the k neighbours of actor(s) + decaying OU noise.

        Exploring, a uniformly random one of the k neighbours is played instead with probability
        `random_candidate` times the noise's decaying scale: with k = n (all actions, e.g. CartPole's
        two) the proto-action's noise cannot change the critic's choice, so this is the only exploration.
        """
        scale = self.exploration_scale() if explore else 0.0
        write(self.state_in, state)
        write(self.noise_in, scale * self.noise.sample() if explore else np.zeros(self.space.dim))
        p_random = self.random_candidate * scale
        pick_random = p_random > 0 and self.rng.random() < p_random
        if self.in_graph_window:
            best, first = read(self._act())
            return int(first + self.rng.integers(self.k) if pick_random else best)
        neighbours = self.space.search(read(self._proto()), self.k, self.groups)
        if pick_random:
            return self._action_id(neighbours[0, self.rng.integers(self.k)])
        write(self.act_candidates, self._candidate_input(neighbours))
        return self._action_id(neighbours[0, int(read(self._best())[0])])
