"""Run folders, the reference-format log, the metrics CSV, reward-curve plots and checkpoint files, and the number
of cores this process may use.

Every file that is rewritten (checkpoints, plots) goes to a temporary name first and is renamed into
place, so an interrupted write never leaves a half-written file; logs are appended line by line.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

METRICS_FIELDS = ("episode", "env_steps", "return", "wall_seconds", "eval_return")
CORES_ENV = "WOLPERTINGER_CORES"  # at most this many cores for the search and the ranking (sweep.py: a trial's CPUs)


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity, where the OS reports one), at most $WOLPERTINGER_CORES."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = os.environ.get(CORES_ENV, "").strip()
    if limit and not limit.isdigit():
        raise ValueError(f"${CORES_ENV} must be a whole number of cores, not {limit!r}")
    return max(1, min(cores, int(limit or cores)))


def env_folder_name(env_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", env_id)


def new_run_dir(output_root: Path, env_id: str) -> Path:
    """Create and return output_root/<env>-run<N>, N one more than the highest existing run; never reuses one."""
    output_root.mkdir(parents=True, exist_ok=True)
    prefix = f"{env_folder_name(env_id)}-run"
    taken = [int(m.group(1)) for p in output_root.iterdir() if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", p.name))]
    n = max(taken, default=0) + 1
    while True:
        try:
            (run_dir := output_root / f"{prefix}{n}").mkdir()
            return run_dir
        except FileExistsError:  # another run took this number meanwhile
            n += 1


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename the temporary file onto `path`: `path` holds the old or the new
    contents, whole, whenever the process dies."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "uint32": "U32"}
NUMPY_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in SAFETENSORS_DTYPES.items()}


def save_tensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write arrays (float32, float64, int64 or uint32) as one safetensors file, atomically and flushed to disk;
    `metadata` (JSON) goes into the header. Plain numpy: tinygrad's safe_save runs a CPU kernel, which fails on a
    GPU machine without a C compiler for the CPU."""
    header, start = {}, 0
    if metadata is not None:
        header["__metadata__"] = {"json": json.dumps(metadata)}
    for name, array in arrays.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [start, start + array.nbytes]}
        start += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for array in arrays.values():
                f.write(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
            f.flush()
            os.fsync(f.fileno())  # a crash of the machine, not only of the process, keeps the file whole
    write_atomically(path, write)


def read_tensors(path: Path, names: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """Arrays (all, or those named) and the JSON metadata of a safetensors file, read with numpy.
    Raises ValueError when the file is missing, truncated or not safetensors."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
            if not isinstance(header, dict):
                raise ValueError("truncated header")
            meta = header.pop("__metadata__", None)
            arrays = {}
            for name in header if names is None else names:
                entry = header[name]
                lo, hi = entry["data_offsets"]
                if 8 + n + hi > size:
                    raise ValueError("truncated data")
                f.seek(8 + n + lo)
                arrays[name] = np.fromfile(f, NUMPY_DTYPES[entry["dtype"]], (hi - lo) // NUMPY_DTYPES[
                    entry["dtype"]].itemsize).reshape(entry["shape"])
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:  # a damaged file fails in many ways
        raise ValueError(f"not a readable checkpoint file ({type(e).__name__})") from None
    return arrays, None if meta is None else json.loads(meta["json"])


def load_tensors(path: Path) -> dict:
    """Tensors of a safetensors file, realised on the default device; ValueError if missing or unreadable."""
    from tinygrad import Device
    from tinygrad.nn.state import safe_load
    if not path.is_file():
        raise ValueError("file not found")
    try:
        return {name: t.to(Device.DEFAULT).realize() for name, t in safe_load(path).items()}
    except Exception as e:  # a corrupt file fails in many ways inside the parser
        raise ValueError(f"not a readable safetensors file ({type(e).__name__})") from None


class _FileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk) raise, as any other file's do, instead of being printed."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise


class RunLog:
    """RS_train_log / RS_test_log exactly as the reference wrote them (Python logging, `%(asctime)s : %(message)s`,
    episodes numbered from 0, returns with 4 decimals), plus the metrics CSV beside it, whose `episode` column
    counts episodes (1 for the episode logged as Ep:0)."""

    def __init__(self, run_dir: Path, mode: str, arguments: dict, parent: tuple[Path, int] | None = None):
        """A new log and CSV of `arguments`; with `parent` = (run folder, episode), they continue that run's log
        and metrics up to its checkpoint before that episode instead, copied, and log `arguments` after a
        `### Resumed from ... ###` line."""
        self.log_path, self.csv_path = run_dir / f"RS_{mode}_log", run_dir / "metrics.csv"
        if parent is not None:
            _copy_history(parent[0], run_dir, f"RS_{mode}_log", parent[1])
        self._logger = logging.getLogger(f"runlog.{run_dir.resolve()}.{mode}")
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False  # the file only; the console shows a progress bar
        self._handler = _FileHandler(self.log_path, mode="a")
        self._handler.setFormatter(logging.Formatter("%(asctime)s : %(message)s"))
        self._logger.addHandler(self._handler)
        if parent is not None:
            self.line(f"### Resumed from {parent[0]} before Ep:{parent[1]} ###")
        for name, value in arguments.items():
            self.line(f"{name}: {value}")
        self._csv_file = open(self.csv_path, "a", newline="", buffering=1)
        self._csv = csv.writer(self._csv_file)
        if parent is None:
            self._csv.writerow(METRICS_FIELDS)
        # the CSV's rows as numbers, so that plotting never rereads the file
        self._rows: list[tuple[float, ...]] = list(zip(*read_metrics(self.csv_path).values())) if parent else []

    def line(self, text: str) -> None:
        self._logger.info(text)

    def episode(self, episode: int, env_steps: int, ret: float, wall_seconds: float, eval_return: float | None = None):
        """Log episode `episode` (numbered from 0) and its evaluation, if any."""
        self.line(f"Ep:{episode} | R:{ret:.4f}")
        if eval_return is not None:
            self.line(f"Eval after Ep:{episode} | mean R:{eval_return:.4f}")
        self._csv.writerow([episode + 1, env_steps, f"{ret:.4f}", f"{wall_seconds:.2f}",
                            "" if eval_return is None else f"{eval_return:.4f}"])
        self._rows.append((episode + 1, env_steps, ret, wall_seconds, np.nan if eval_return is None else eval_return))

    def metrics(self) -> dict[str, np.ndarray]:
        """The metrics written so far, as `read_metrics` would return them."""
        columns = np.array(self._rows, float).reshape(-1, len(METRICS_FIELDS)).T
        return dict(zip(METRICS_FIELDS, columns))

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._handler.close()
        self._csv_file.close()


EPISODE_LINE = re.compile(r".* : (?:Eval after )?Ep:(\d+) \|.*|.* : ### Model Saved before Ep:(\d+) ###")


def _copy_history(parent: Path, run_dir: Path, log_name: str, episode: int) -> None:
    """Copy a run's log and metrics up to its save before `episode` (dropping what came after that save)."""
    kept = []
    for line in (parent / log_name).read_text().splitlines(keepends=True):
        m = EPISODE_LINE.fullmatch(line.rstrip("\n"))
        if m and (int(m.group(1)) >= episode if m.group(1) else int(m.group(2)) > episode):
            break
        kept.append(line)
    (run_dir / log_name).write_text("".join(kept))
    with open(parent / "metrics.csv", newline="") as f:
        rows = [row for row in csv.reader(f)]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [row for row in rows[1:] if int(row[0]) <= episode])


class TensorBoardLog:
    """TensorBoard scalars of a training run in its folder (tensorboardX), one point per episode."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(str(run_dir), flush_secs=10)
        self._last = (0, 0.0)  # env steps and wall seconds at the end of the previous episode

    def episode(self, episode: int, env_steps: int, ret: float, wall_seconds: float, eval_return: float | None,
                update_means: np.ndarray | None, exploration: float) -> None:
        """`episode` counted from 1, as in metrics.csv; update_means: mean (critic loss, actor loss, mean Q) over
        the episode's updates, None before any."""
        scalars = {"train/return": ret, "train/exploration_scale": exploration}
        if eval_return is not None:
            scalars["eval/mean_return"] = eval_return
        if update_means is not None:
            scalars.update(zip(("loss/critic", "loss/actor", "train/mean_q"), map(float, update_means)))
        if wall_seconds > self._last[1]:  # evaluation time included, as in metrics.csv
            scalars["time/env_steps_per_second"] = (env_steps - self._last[0]) / (wall_seconds - self._last[1])
        self._last = (env_steps, wall_seconds)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, episode)

    def close(self) -> None:
        self._writer.close()


def read_metrics(csv_path: Path) -> dict[str, np.ndarray]:
    """Columns of a metrics CSV as float arrays (missing evaluation entries are NaN)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: np.array([float(r[name]) if r.get(name) else np.nan for r in rows]) for name in METRICS_FIELDS}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (sums[idx] - sums[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (9, 5)):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt.subplots(ncols=ncols, figsize=figsize)


def _save_figure(fig, ax, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    ax.set(xlabel="episode", ylabel="return", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_runs(runs: Iterable[tuple[str, dict[str, np.ndarray]]], path: Path, title: str, window: int = 20,
              max_points: int = 2000) -> None:
    """Reward curves of one or more runs on one figure: episode returns, their moving average, evaluations.

    A long run is drawn with at most `max_points` points per line (the returns as a min-max band per
    bin), so a plot costs the same after 200000 episodes as after 2000."""
    runs = list(runs)
    fig, ax = new_figure()
    for i, (label, m) in enumerate(runs):
        color = f"C{i}"
        prefix = f"{label}: " if len(runs) > 1 else ""
        stride = max(1, -(-len(m["episode"]) // max_points))
        episodes = m["episode"][::stride]
        if len(runs) == 1 and stride == 1:
            ax.plot(episodes, m["return"], color=color, alpha=0.3, lw=0.8, label="episode return")
        elif len(runs) == 1:
            bins = np.arange(0, len(m["return"]), stride)
            ax.fill_between(episodes, np.minimum.reduceat(m["return"], bins), np.maximum.reduceat(m["return"], bins),
                            color=color, alpha=0.3, lw=0, label=f"episode returns (min-max per {stride} episodes)")
        smooth = max(window, stride)
        ax.plot(episodes, moving_average(m["return"], smooth)[::stride], color=color, lw=2,
                label=f"{prefix}moving average ({smooth} episodes)")
        evaluated = np.flatnonzero(~np.isnan(m["eval_return"]))
        evaluated = evaluated[::-(-len(evaluated) // (max_points // 8))] if len(evaluated) else evaluated  # markers
        if len(evaluated):
            ax.plot(m["episode"][evaluated], m["eval_return"][evaluated], "o--", color=color, ms=4, lw=1,
                    mfc="white", label=f"{prefix}evaluation (no noise)")
    _save_figure(fig, ax, title, path)


def plot_seed_band(bands: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                   reference: list[tuple[int, int, float]], path: Path, title: str, window: int = 10) -> None:
    """Per configuration (label, episodes, returns of shape (seeds, episodes), evaluated episodes, mean evaluations):
    the mean training return across seeds (moving average) with its min-max band and the mean evaluation, all on
    one figure; and reference bucket means drawn as horizontal segments (first episode, last episode, mean)."""
    fig, ax = new_figure()
    for i, (label, episodes, returns, eval_episodes, eval_means) in enumerate(bands):
        smooth = np.array([moving_average(r, window) for r in returns])  # (seeds, episodes)
        prefix, color = (f"{label}: " if len(bands) > 1 else ""), f"C{i if i < 3 else i + 1}"  # C3: the reference
        ax.fill_between(episodes, smooth.min(0), smooth.max(0), color=color, alpha=0.2,
                        label=f"{prefix}min-max over seeds")
        ax.plot(episodes, smooth.mean(0), color=color, lw=2, label=f"{prefix}mean training return ({window}-episode average)")
        if len(eval_episodes):
            ax.plot(eval_episodes, eval_means, "o--", color=color if len(bands) > 1 else "C2", ms=4, lw=1,
                    mfc="white", label=f"{prefix}mean evaluation (no noise)")
    last = max(episodes[-1] for _, episodes, *_ in bands)
    shown = [(first, min(last, end), value) for first, end, value in reference if first <= last]
    for i, (first, end, value) in enumerate(shown):
        ax.plot([first, end], [value, value], "-" if end > first else "*", color="C3", lw=2.5, ms=12,
                label="reference (published log)" if i == 0 else None)
    _save_figure(fig, ax, title, path)
