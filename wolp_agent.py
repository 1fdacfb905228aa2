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

from runtime import (ranking_devices, read, realized_zeros, sleep_until_idle,  # first: the runtime's settings
                     tinygrad_dtype, write)

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes

from action_space import ROW_DTYPE, ActionSpace, GridActionSpace, PointMap
from ddpg import DDPG, DDPGConfig
from model import Critic

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


def candidate_values(critic: Critic, scoring: str, states: Tensor, candidates: Tensor) -> Tensor:
    """Q (B, K) of every candidate for its own state: states (B, S), candidates (B, K, A)."""
    return (critic.score if scoring == "factored" else critic.score_full)(states, candidates)


def best_candidate(critic: Critic, scoring: str, states: Tensor, candidates: Tensor) -> Tensor:
    """Position (B,) of the critic's best candidate for each state: states (B, S), candidates (B, K, A)."""
    if candidates.shape[1] == 1:  # a lone candidate needs no critic
        return Tensor.zeros(candidates.shape[0], dtype="int32", device=candidates.device)
    return candidate_values(critic, scoring, states, candidates).argmax(1)


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

    def values(self, states: Tensor, candidates: Tensor) -> Tensor:
        """Q (B, K) of every candidate for its own state."""
        if self.tables is not None and self.scoring == "factored":
            return self.critic.score_tabulated(states, candidates.cast(dtypes.int32), self.tables)
        return candidate_values(self.critic, self.scoring, states, self.points(candidates))

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


@dataclass
class ActingInputs:
    """The buffers that the acting graphs of one batch size read: states (B, S) and the noise added to their
    proto-actions (B, A)."""
    states: Tensor
    noise: Tensor


class Candidates:
    """How the agent reaches each proto-action's k candidates and the critic's choice among them: when acting (for a
    batch of states on the host) and in the update (the target action a' of each next state). One implementation
    per way of reaching them; the agent holds one.

    `best` and `ranked` are compiled per batch size, on the first two calls of a size."""
    target_inputs: list[Tensor]  # extra inputs of the update graph, filled by `prepare_target_inputs`

    def __init__(self, agent: WolpertingerAgent):
        self.agent, self.k = agent, agent.k
        self._inputs: dict[int, ActingInputs] = {}
        self._graphs: dict[tuple[str, int], TinyJit] = {}

    def inputs(self, states: np.ndarray, noise: np.ndarray) -> ActingInputs:
        """The acting buffers of this batch size, holding `states` and `noise`."""
        if (inputs := self._inputs.get(len(states))) is None:
            inputs = self._inputs[len(states)] = ActingInputs(realized_zeros(len(states), self.agent.state_dim),
                                                              realized_zeros(len(states), self.agent.space.dim))
        write(inputs.states, states)
        write(inputs.noise, noise)
        return inputs

    def graph(self, name: str, inputs: ActingInputs, build) -> TinyJit:
        """The compiled graph `name` for the batch size of `inputs` (`build(inputs)` makes its output)."""
        key = (name, inputs.states.shape[0])
        if (graph := self._graphs.get(key)) is None:
            graph = self._graphs[key] = TinyJit(lambda: build(inputs).contiguous().realize())
        return graph

    def proto(self, inputs: ActingInputs) -> Tensor:
        return (self.agent.actor(inputs.states) + inputs.noise).clip(-1, 1)

    def best(self, states: np.ndarray, noise: np.ndarray, random_rows: np.ndarray) -> list:
        """Action ids: for each state the critic's best of the k candidates of its proto-action plus `noise`, or,
        in `random_rows`, a uniformly random one of them (drawn from the agent's rng in row order)."""
        raise NotImplementedError

    def ranked(self, states: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The n best of each state's k noise-free candidates, best first: their action ids (one array per state)
        and critic values (B, n)."""
        raise NotImplementedError

    def target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        """Inside the update graph: the chosen a' (B, A) of each next state."""
        raise NotImplementedError

    def prepare_target_inputs(self) -> None:
        """Before the update graph runs: fill `target_inputs` from the next states in the update's batch."""


def top(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest of each row, largest first (ties: the earlier position first)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :n]


class WindowCandidates(Candidates):
    """A 1-d lattice (Pendulum, any Discrete env): the k grid points nearest to a proto-action form a window of
    indices computed inside the compiled graphs. Q(s, .) is piecewise linear in a 1-d action, so beyond
    2 * hidden2 + 2 candidates only the window's ends and the grid points beside the critic's kinks can hold the
    maximum; those are all that is scored."""

    @staticmethod
    def fits(space: ActionSpace) -> bool:
        # a window of float indices is exact up to 2**24 points
        return isinstance(space, GridActionSpace) and space.dim == 1 and space.knn == "lattice" and 1 < space.n < 2 ** 24

    def __init__(self, agent: WolpertingerAgent):
        super().__init__(agent)
        self.target_inputs = []

    def window(self, protos: Tensor) -> tuple[Tensor, Tensor]:
        """Float grid indices (B, 1) of the first and the last of the k grid points nearest to each proto-action."""
        n, k, step = self.agent.space.n, self.k, self.agent.space.step
        lo = ((protos[:, 0] + 1) / step - k / 2).ceil().clip(0, n - k).unsqueeze(1)
        return lo, lo + (k - 1)

    def window_best(self, states: Tensor, protos: Tensor) -> tuple[Tensor, Tensor]:
        """Float grid indices (B,) of the best of each window and of the window's first point."""
        critic, step, (lo, hi) = self.agent.critic, self.agent.space.step, self.window(protos)
        if self.k <= 2 * self.agent.cfg.hidden2 + 2:
            indices = lo + Tensor.arange(self.k).unsqueeze(0)
        else:
            kinks = ((critic.kinks(states) + 1) / step).clip(lo, hi).floor()
            indices = Tensor.cat(lo, hi, kinks, (kinks + 1).clip(lo, hi), dim=1)
        best = best_candidate(critic, self.agent.scoring, states, (indices * step - 1).unsqueeze(2))
        return indices.gather(1, best.unsqueeze(1))[:, 0], lo[:, 0]

    def best(self, states: np.ndarray, noise: np.ndarray, random_rows: np.ndarray) -> list:
        inputs = self.inputs(states, noise)
        act = self.graph("act", inputs, lambda i: Tensor.stack(*self.window_best(i.states, self.proto(i))))
        best, first = read(act())
        rng = self.agent.rng
        return [int(first[b] + rng.integers(self.k)) if random_rows[b] else int(best[b]) for b in range(len(states))]

    def ranked(self, states: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        def window_values(i: ActingInputs) -> Tensor:
            indices = self.window(self.proto(i))[0] + Tensor.arange(self.k).unsqueeze(0)
            q = candidate_values(self.agent.critic, self.agent.scoring, i.states,
                            (indices * self.agent.space.step - 1).unsqueeze(2))
            return Tensor.cat(indices, q, dim=1)
        inputs = self.inputs(states, np.zeros((len(states), 1)))
        indices, values = np.split(read(self.graph("rank", inputs, window_values)()), 2, axis=1)
        order = top(values, n)
        ids = np.take_along_axis(indices, order, 1).astype(np.int64)
        return list(ids), np.take_along_axis(values, order, 1)

    def target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        protos = self.agent.actor_target(next_states).clip(-1, 1)
        return self.window_best(next_states, protos)[0].unsqueeze(1) * self.agent.space.step - 1


class SearchCandidates(Candidates):
    """Any other action set (d > 1, item embeddings, --knn flann): the action set's search on the host (grid_knn.c
    for a grid) fills candidate buffers that the compiled graphs score. A grid's candidates travel as their integer
    coordinates and become points in the graphs; where its axes fall into a few groups of few combinations
    (MultiBinary: 8 axes, 256 combinations per group), the critic's action part is tabulated per group, the search
    writes each candidate as its row in each group's table, and each candidate adds one row per group instead of
    multiplying every action column. The update's ranking of its minibatch's candidates, its heaviest part, is split
    between the CPU's cores (see `ranking_devices`)."""

    def __init__(self, agent: WolpertingerAgent):
        super().__init__(agent)
        space, cfg, scoring = agent.space, agent.cfg, agent.scoring
        self.point_map = space.point_map()
        # tabulated scoring where a table lookup replaces 3 or more action columns: measured on the CPU, a
        # lookup costs about 2.5 columns' multiply-adds (MultiBinary(20): 3 lookups, 44 ms instead of 124)
        groups = self.point_map.groups if self.point_map is not None else ()
        self.groups, tables = (), None
        if scoring == "factored" and groups and 3 * len(groups) <= space.dim:
            # the candidate buffers hold each candidate's row in each group's table, as the search writes them
            self.groups, tables = groups, [group.points for group in groups]
            self.dtype, self.width = tinygrad_dtype(ROW_DTYPE), len(groups)
        elif self.point_map is None:  # they hold points
            self.dtype, self.width = dtypes.float32, space.dim
        else:  # they hold grid coordinates, mapped to points in the graphs
            self.dtype, self.width = tinygrad_dtype(self.point_map.dtype), space.dim
        self.ranker = CandidateRanker(agent.critic, scoring, self.point_map, tables)
        self._candidates: dict[int, Tensor] = {}
        self._target_proto = TinyJit(lambda: agent.actor_target(agent.batch[3]).clip(-1, 1).realize())
        self.target_inputs = [realized_zeros(cfg.batch_size, space.dim)]  # the a' chosen for each next state
        devices = ranking_devices()[:cfg.batch_size]
        self.ranking_parts = [self._ranking_part(rows, device, tables) for rows, device in
                              zip(np.array_split(np.arange(cfg.batch_size), len(devices)), devices)]

    def _ranking_part(self, rows: np.ndarray, device: str, tables: list[np.ndarray] | None) -> RankingPart:
        """The ranking of the candidates of the minibatch's `rows` on `device`: on the default device with the agent's
        own critic and ranker, reading the next states in the update's own buffer; elsewhere with replicas and a
        buffer of next states of its own."""
        agent, part_rows = self.agent, slice(int(rows[0]), int(rows[-1]) + 1)
        if device == Device.DEFAULT:
            critic, ranker, states = agent.critic, self.ranker, agent.batch[3][part_rows]
        else:
            critic = agent.critic.replica(device)
            ranker = CandidateRanker(critic, agent.scoring, self.point_map, tables)
            states = realized_zeros(len(rows), agent.state_dim, device=device)
        candidates = realized_zeros(len(rows), self.k, self.width, dtype=self.dtype, device=device)
        choose = TinyJit(lambda: ranker.best_points(states, candidates).realize())
        return RankingPart(part_rows, critic, states, candidates, choose)

    def candidate_input(self, found: np.ndarray) -> np.ndarray:
        """What a candidate buffer takes for the search's k nearest of each proto-action (B, k, width): the points
        of embedded items; for a grid, what the search wrote (grid coordinates, or rows of the tables)."""
        if self.point_map is None:
            return self.agent.space.points(found)
        return found.reshape(len(found), self.k, -1)

    def action_id(self, found_one: np.ndarray):
        """The action id of one of the search's candidates."""
        return self.agent.space.group_coordinates(found_one, self.groups) if self.groups else found_one

    def search(self, inputs: ActingInputs) -> tuple[np.ndarray, Tensor]:
        """The k nearest actions of each proto-action, as the search wrote them, and in the candidate buffer of
        this batch size."""
        found = self.agent.space.search(read(self.graph("proto", inputs, self.proto)()), self.k, self.groups)
        batch = len(found)
        if (candidates := self._candidates.get(batch)) is None:
            candidates = self._candidates[batch] = realized_zeros(batch, self.k, self.width, dtype=self.dtype)
        return found, candidates

    def best(self, states: np.ndarray, noise: np.ndarray, random_rows: np.ndarray) -> list:
        inputs = self.inputs(states, noise)
        found, candidates = self.search(inputs)
        rng = self.agent.rng
        if random_rows.all():  # nothing to score
            return [self.action_id(found[b, rng.integers(self.k)]) for b in range(len(found))]
        write(candidates, self.candidate_input(found))
        best = read(self.graph("best", inputs, lambda i: self.ranker.best(i.states, candidates))())
        return [self.action_id(found[b, rng.integers(self.k) if random_rows[b] else int(best[b])])
                for b in range(len(found))]

    def ranked(self, states: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        inputs = self.inputs(states, np.zeros((len(states), self.agent.space.dim)))
        found, candidates = self.search(inputs)
        write(candidates, self.candidate_input(found))
        values = read(self.graph("rank", inputs, lambda i: self.ranker.values(i.states, candidates))())
        order = top(values, n)
        ids = [np.stack([self.action_id(found[b, j]) for j in order[b]]) for b in range(len(found))]
        return ids, np.take_along_axis(values, order, 1)

    def target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        chosen, = target_inputs
        return chosen

    def prepare_target_inputs(self) -> None:
        """The k nearest actions of each next state's target proto-action, ranked by the online critic in parts of
        the minibatch, side by side; the chosen points fill the update's input."""
        agent, parts = self.agent, self.ranking_parts
        found = self.candidate_input(agent.space.search(read(self._target_proto()), self.k, self.groups))
        if len(parts) > 1:  # the replicas' next states and online critic weights
            next_states, weights = read(agent.batch[3]), read(agent.critic.flat)
        for part in parts:
            write(part.candidates, found[part.rows])
            if part.critic is not agent.critic:
                write(part.states, next_states[part.rows])
                write(part.critic.flat, weights)
        queued = [part.choose() for part in parts]  # queued on their devices at once, run side by side
        if len(parts) > 1:
            sleep_until_idle([part.states.device for part in parts])
        write(self.target_inputs[0], np.concatenate([read(chosen) for chosen in queued]))


class WolpertingerAgent(DDPG):
    """DDPG whose actor proposes a proto-action, whose action is the critic's best of the proto-action's k nearest
    actions (`candidates`: a `WindowCandidates` or a `SearchCandidates`), in acting and in the update's target."""

    def __init__(self, state_dim: int, space: ActionSpace, k: int, cfg: DDPGConfig, rng: np.random.Generator,
                 scoring: str = "factored", random_candidate: float = 0.0):
        if not 1 <= k <= space.n:
            raise ValueError(f"k = {k} must lie between 1 and the number of actions, {space.n}")
        if not 0.0 <= random_candidate <= 1.0:
            raise ValueError(f"the random-candidate probability must lie in [0, 1] (got {random_candidate})")
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        kind = WindowCandidates if WindowCandidates.fits(space) else SearchCandidates
        if kind is SearchCandidates:  # before any network is built
            check_candidate_memory(k, space.dim, cfg)
        super().__init__(state_dim, space.dim, cfg, rng)
        self.space, self.k, self.scoring, self.random_candidate = space, k, scoring, random_candidate
        self.candidates = kind(self)
        self.target_inputs = self.candidates.target_inputs

    def _target_actions(self, next_states: Tensor, *target_inputs: Tensor) -> Tensor:
        return self.candidates.target_actions(next_states, *target_inputs)

    def _prepare_target_inputs(self) -> None:
        self.candidates.prepare_target_inputs()

    # --- acting ----------------------------------------------------------------------------------------------
    def random_action(self):
        """Warm-up: a uniform random proto-action snapped to its nearest action; returns the action id."""
        return self.space.nearest(self.rng.uniform(-1, 1, (1, self.space.dim)))[0]

    def select_action(self, state: np.ndarray, explore: bool = True):
        """Id of the action to play for one state (see `select_actions`)."""
        return self.select_actions(np.asarray(state).reshape(1, -1), explore)[0]

    def select_actions(self, states: np.ndarray, explore: bool = True) -> list:
        """Ids of the actions to play for a batch of states (B, S): the critic's best of the k neighbours of
        actor(s) + decaying OU noise, one search and one critic pass for the batch.

        Exploring, each state's noise is the OU process's next sample and its scale the next decayed epsilon, in
        row order, as for B states acted on one after the other; a uniformly random one of the k neighbours is
        played instead with probability `random_candidate` times that scale: with k = n (all actions, e.g.
        CartPole's two) the proto-action's noise cannot change the critic's choice, so this is the only
        exploration.
        """
        noise, random_rows = np.zeros((len(states), self.space.dim)), np.zeros(len(states), bool)
        for b in range(len(states) if explore else 0):
            scale = self.exploration_scale()
            noise[b] = scale * self.noise.sample()
            p_random = self.random_candidate * scale
            random_rows[b] = p_random > 0 and self.rng.random() < p_random
        return self.candidates.best(states, noise, random_rows)

    def ranked_actions(self, states: np.ndarray, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The n best of each state's k noise-free candidates by the online critic, best first: their action ids
        (one array per state) and values (B, n)."""
        if not 1 <= n <= self.k:
            raise ValueError(f"n = {n} must lie between 1 and k = {self.k}")
        return self.candidates.ranked(states, n)
