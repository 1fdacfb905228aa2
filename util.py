"""Run folders, the reference-format log, the metrics CSV, reward-curve plots and checkpoint files.

Every file that is rewritten (checkpoints, plots) goes to a temporary name first and is renamed into
place, so an interrupted write never leaves a half-written file; logs are appended line by line.
"""
from __future__ import annotations

import csv
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

METRICS_FIELDS = ("episode", "env_steps", "return", "wall_seconds", "eval_return")


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
    """Call write(tmp_path), then rename the temporary file onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as a float32 safetensors file, atomically. Plain numpy: tinygrad's safe_save runs a CPU
    kernel, which fails on a GPU machine without a C compiler for the CPU."""
    header, start = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [start, start + 4 * array.size]}
        start += 4 * array.size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for array in arrays.values():
                f.write(np.ascontiguousarray(array, "<f4").tobytes())
    write_atomically(path, write)


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


class RunLog:
    """RS_train_log / RS_test_log in the reference's format, plus the metrics CSV beside it."""

    def __init__(self, run_dir: Path, mode: str, arguments: dict):
        self.log_path, self.csv_path = run_dir / f"RS_{mode}_log", run_dir / "metrics.csv"
        self._log = open(self.log_path, "w", buffering=1)
        for name, value in arguments.items():
            self._log.write(f"{name}: {value}\n")
        self._csv_file = open(self.csv_path, "w", newline="", buffering=1)
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(METRICS_FIELDS)
        self._rows: list[tuple[float, ...]] = []  # the CSV's rows as numbers, so plotting never rereads the file

    def line(self, text: str) -> None:
        self._log.write(text + "\n")

    def episode(self, episode: int, env_steps: int, ret: float, wall_seconds: float, eval_return: float | None = None):
        self.line(f"Ep:{episode} | R:{ret:.2f}")
        if eval_return is not None:
            self.line(f"Eval after Ep:{episode} | mean R:{eval_return:.2f}")
        self._csv.writerow([episode, env_steps, f"{ret:.4f}", f"{wall_seconds:.2f}",
                            "" if eval_return is None else f"{eval_return:.4f}"])
        self._rows.append((episode, env_steps, ret, wall_seconds, np.nan if eval_return is None else eval_return))

    def metrics(self) -> dict[str, np.ndarray]:
        """The metrics written so far, as `read_metrics` would return them."""
        columns = np.array(self._rows, float).reshape(-1, len(METRICS_FIELDS)).T
        return dict(zip(METRICS_FIELDS, columns))

    def close(self) -> None:
        self._log.close()
        self._csv_file.close()


class TensorBoardLog:
    """TensorBoard scalars of a training run in its folder (tensorboardX), one point per episode."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(str(run_dir), flush_secs=10)
        self._last = (0, 0.0)  # env steps and wall seconds at the end of the previous episode

    def episode(self, episode: int, env_steps: int, ret: float, wall_seconds: float, eval_return: float | None,
                update_means: np.ndarray | None, exploration: float) -> None:
        """update_means: mean (critic loss, actor loss, mean Q) over the episode's updates, None before any."""
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


def new_figure():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(9, 5))


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
        stride = -(-len(m["episode"]) // max_points)
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
