"""Side by side, in one process: the exact grid k-NN of an earlier commit against this one's.

    python bench_knn.py                    # against 112d814 (the box search), at about 200,000 actions
    python bench_knn.py --commit abc1234 --dims 3 --ks 2000
    python bench_knn.py --commit abc1234 --dims --multibinary 20 40 --ks 10485   # MultiBinary(20) and (40)

Times one minibatch of 64 queries (`GridActionSpace.search`), the median of --repeats calls (one call
where the earlier search takes seconds).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from action_space import GridActionSpace


def earlier_module(commit: str):
    """action_space.py as it was at `commit`, imported under another name (beside that commit's grid_knn.c, which
    it compiles, where it had one)."""
    def show(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "show", f"{commit}:{name}"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    folder = Path(tempfile.mkdtemp())
    if (c_source := show("grid_knn.c")).returncode == 0:
        (folder / "grid_knn.c").write_text(c_source.stdout)
    python_source = show("action_space.py")
    python_source.check_returncode()
    path = folder / "earlier_action_space.py"
    path.write_text(python_source.stdout)
    spec = importlib.util.spec_from_file_location("earlier_action_space", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(search, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        search()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default="112d814")
    p.add_argument("--actions", type=int, default=200000)
    p.add_argument("--dims", type=int, nargs="*", default=[2, 3, 4, 6], help="Box grids of these dimensions")
    p.add_argument("--multibinary", type=int, nargs="*", default=[], help="MultiBinary spaces of these sizes")
    p.add_argument("--ks", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args()
    earlier, rng = earlier_module(opts.commit).GridActionSpace, np.random.default_rng(0)
    spaces = [(f"Box d = {d}", lambda cls, d=d: cls.continuous(-np.ones(d), np.ones(d), opts.actions)) for d in opts.dims]
    spaces += [(f"MultiBinary({n})", lambda cls, n=n: cls.multi_discrete(np.full(n, 2), np.zeros(n, np.int8)))
               for n in opts.multibinary]
    print(f"| space | actions | k | {opts.commit} ms | this ms | speed-up |\n|---|---|---|---|---|---|")
    for name, make in spaces:
        before, now = make(earlier), make(GridActionSpace)
        for k in opts.ks:
            protos = rng.uniform(-1, 1, (64, now.dim))
            now.search(protos, k)  # untimed: the first call pays for starting the search's threads
            ms_now = median_ms(lambda: now.search(protos, k), opts.repeats)
            first = median_ms(lambda: before.search(protos, k), 1)
            ms_before = first if first > 1000 else median_ms(lambda: before.search(protos, k), opts.repeats)
            print(f"| {name} | {now.n} | {k} | {ms_before:.1f} | {ms_now:.1f} | {ms_before / ms_now:.1f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
