"""The feedback journal: decisions awaiting their reward and the feedback received, in one SQLite database.

Every write is committed before the call returns, so what a caller was told (a decision id, feedback
accepted) survives a killed process. A decision is pending until its feedback arrives or it expires (dropped,
or answered with a default reward); the feedback rows, numbered in the order they were received, are the
transitions the agent learns from, and a checkpoint records the last row its replay memory holds.

Tables: `decisions` (id, time, state, action id, action point, status) and `feedback` (seq, decision id, time,
reward, next state or NULL for the decision's own state, terminated); `journal` holds the journal's own id.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FILE = "journal.sqlite3"
PENDING, ANSWERED, DROPPED, DEFAULTED = 0, 1, 2, 3  # a decision's status
STATUS_WORDS = {ANSWERED: "already has its feedback", DROPPED: "expired without feedback (dropped)",
                DEFAULTED: "expired without feedback (given the default reward)"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id TEXT PRIMARY KEY, time REAL NOT NULL, state BLOB NOT NULL, action_id TEXT NOT NULL, point BLOB NOT NULL,
    status INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS pending_by_time ON decisions (status, time);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL REFERENCES decisions (id), time REAL NOT NULL,
    reward REAL NOT NULL, next_state BLOB, terminated INTEGER NOT NULL);
"""


class Answer(NamedTuple):
    """Feedback for one decision, checked by the caller: the reward, the next state (None: the decision's own
    state, for a one-step episode) and whether the episode ended there."""
    decision_id: str
    reward: float
    next_state: np.ndarray | None
    terminated: bool


class Transition(NamedTuple):
    """A feedback row joined with its decision: what the replay memory stores, and the row's number."""
    seq: int
    state: np.ndarray
    point: np.ndarray
    reward: float
    next_state: np.ndarray
    terminated: bool


def blob(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, np.float32).tobytes()


def unblob(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.float32).copy()


class Journal:
    """Decisions and their feedback in `folder`/journal.sqlite3 (the folder made if missing), or in memory only
    (folder None: nothing survives the process). `wait` (seconds; None: forever) is how long a decision waits for
    its feedback; an expired one is dropped, or with `default_reward` stored as a one-step episode of that
    reward."""

    def __init__(self, folder: str | Path | None, wait: float | None = None, default_reward: float | None = None):
        if folder is None:
            path = ":memory:"
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = str(Path(folder) / FILE)
        self.wait, self.default_reward = wait, default_reward
        # autocommit off: each method is one transaction, committed before it returns
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")  # a commit reaches the disk, not only the OS
        with self._transaction():
            for statement in filter(str.strip, SCHEMA.split(";")):
                self.db.execute(statement)
            row = self.db.execute("SELECT id FROM journal").fetchone()
            if row is None:
                row = (uuid.uuid4().hex,)
                self.db.execute("INSERT INTO journal VALUES (?)", row)
        self.id: str = row[0]

    def _transaction(self):
        """`with` block that commits on success and rolls back on an error."""
        return Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    # --- writing ---------------------------------------------------------------------------------------------
    def record(self, states: np.ndarray, action_ids: list, points: np.ndarray) -> list[str]:
        """Record decisions as pending; returns their new ids."""
        ids, now = [uuid.uuid4().hex for _ in states], time.time()
        rows = [(i, now, blob(s), json.dumps(np.asarray(a).tolist()), blob(p))
                for i, s, a, p in zip(ids, states, action_ids, points)]
        with self._transaction():
            self.db.executemany("INSERT INTO decisions (id, time, state, action_id, point) VALUES (?, ?, ?, ?, ?)",
                                rows)
        return ids

    def answer(self, answers: list[Answer]) -> list[Transition]:
        """Store feedback for pending decisions, all or none; returns the transitions, in order. ValueError naming
        a decision id that is unknown, no longer pending, or answered twice in `answers`."""
        with self._transaction():
            seen = set()
            for a in answers:
                self._check_pending(a.decision_id, seen)
            now, first = time.time(), self.last_seq()
            for a in answers:
                next_state = None if a.next_state is None else blob(a.next_state)
                self.db.execute("INSERT INTO feedback (decision_id, time, reward, next_state, terminated) "
                                "VALUES (?, ?, ?, ?, ?)", (a.decision_id, now, float(a.reward), next_state,
                                                           int(a.terminated)))
                self.db.execute("UPDATE decisions SET status = ? WHERE id = ?", (ANSWERED, a.decision_id))
            return self.transitions_after(first)

    def _check_pending(self, decision_id: Any, seen: set) -> None:
        if not isinstance(decision_id, str):
            raise ValueError(f"decision_id must be a string (got {decision_id!r})")
        row = self.db.execute("SELECT status FROM decisions WHERE id = ?", (decision_id,)).fetchone()
        if row is None:
            raise ValueError(f"decision_id {decision_id!r} is unknown")
        if row[0] != PENDING or decision_id in seen:
            raise ValueError(f"decision_id {decision_id!r} " + STATUS_WORDS.get(row[0], "is answered twice"))
        seen.add(decision_id)

    def expire(self) -> list[Transition]:
        """Close the decisions that have waited longer than `wait`: dropped, or answered with the default reward
        as one-step episodes (returned, in order)."""
        if self.wait is None:
            return []
        before = time.time() - self.wait
        with self._transaction():
            expired = [row[0] for row in self.db.execute(
                "SELECT id FROM decisions WHERE status = ? AND time < ? ORDER BY time", (PENDING, before))]
            answered = [] if self.default_reward is None else \
                self.answer([Answer(i, self.default_reward, None, True) for i in expired])
            status = DROPPED if self.default_reward is None else DEFAULTED
            self.db.executemany("UPDATE decisions SET status = ? WHERE id = ?", [(status, i) for i in expired])
        return answered

    # --- reading ---------------------------------------------------------------------------------------------
    def transitions_after(self, seq: int) -> list[Transition]:
        """The transitions of the feedback rows numbered above `seq`, in order."""
        rows = self.db.execute(
            "SELECT f.seq, d.state, d.point, f.reward, f.next_state, f.terminated FROM feedback f "
            "JOIN decisions d ON d.id = f.decision_id WHERE f.seq > ? ORDER BY f.seq", (seq,))
        transitions = []
        for number, state, point, reward, next_state, terminated in rows:
            state = unblob(state)
            transitions.append(Transition(number, state, unblob(point), reward,
                                          state if next_state is None else unblob(next_state), bool(terminated)))
        return transitions

    def last_seq(self) -> int:
        """The number of the last feedback row (0: none yet)."""
        return self.db.execute("SELECT coalesce(max(seq), 0) FROM feedback").fetchone()[0]

    def stats(self) -> dict[str, int]:
        """Counts: decisions made, feedback received, expired dropped, expired defaulted, pending."""
        counts = dict(self.db.execute("SELECT status, count(*) FROM decisions GROUP BY status").fetchall())
        return {"decisions": sum(counts.values()), "feedback": counts.get(ANSWERED, 0),
                "expired_dropped": counts.get(DROPPED, 0), "expired_defaulted": counts.get(DEFAULTED, 0),
                "pending": counts.get(PENDING, 0)}


class Transaction:
    """One SQLite transaction on a connection in autocommit mode: BEGIN IMMEDIATE, then COMMIT or ROLLBACK."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.depth = db, 0

    def __enter__(self) -> None:
        if not self.db.in_transaction:  # a nested block joins the outer one
            self.db.execute("BEGIN IMMEDIATE")
            self.depth = 1

    def __exit__(self, kind, value, traceback) -> None:
        if self.depth:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
