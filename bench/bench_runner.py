"""Headless runs of N trivial cells: ``nbrunbook run`` vs ``jupyter execute`` vs papermill.

    python bench/bench_runner.py [--cells 200] [--repeat 3]

Every tool runs the same notebook end to end as a command (process start,
kernel start, N cells, output written), alternating order, ``--repeat`` rounds;
medians are reported. Each command is also timed on a 1-cell notebook so the
per-cell cost (``(T_N - T_1) / (N - 1)``) can be compared without the fixed
start-up costs. The nbrunbook first run uses a fresh instance each round, on the
store server with a fresh store file; "resume" re-runs a finished instance
(every cell skipped and replayed). Targets (DESIGN.md §10): ≤ 1.4 x nbclient
and ≤ 0.6 x papermill. Ratios are given as the ratio of the medians and as
the median of the per-round ratios (the tools of one round run back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat


def notebook(path: Path, cells: int) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i in range(cells):
        # A call makes the cell a guarded step (a bare constant assignment would be `always`).
        c = nbformat.v4.new_code_cell(f"n{i} = len([{i}])")
        c["id"] = f"c{i}"
        nb.cells.append(c)
    nbformat.write(nb, str(path))


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    results: dict[str, dict[int, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nbrb-runner-") as tmp:
        d = Path(tmp)
        for n in (1, args.cells):
            notebook(d / f"nb{n}.ipynb", n)
        for r in range(args.repeat):
            # Alternate the order; "resume" always follows the "nbrunbook" first run it resumes.
            tools = (
                ["nbclient", "papermill", "nbrunbook", "resume"]
                if r % 2 == 0
                else ["nbrunbook", "resume", "papermill", "nbclient"]
            )
            for tool in tools:
                for n in (1, args.cells):
                    nb = str(d / f"nb{n}.ipynb")
                    store = str(d / f"store-{r}-{n}.duckdb")
                    instance = f"bench-{r}-{n}"
                    if tool == "nbclient":
                        cmd = [py, "-m", "jupyter", "execute", nb, "--output", str(d / f"out-x-{n}.ipynb")]
                    elif tool == "papermill":
                        cmd = [py, "-m", "papermill", nb, str(d / f"out-p-{n}.ipynb"), "--no-progress-bar"]
                    else:
                        # "resume" re-runs the instance the "nbrunbook" step finished in this round.
                        cmd = [
                            py,
                            "-m",
                            "nbrunbook.engine.cli",
                            "run",
                            nb,
                            "-i",
                            instance,
                            "--store",
                            store,
                            "--no-progress",
                            "-o",
                            str(d / f"out-r-{n}.ipynb"),
                        ]
                    results.setdefault(tool, {}).setdefault(n, []).append(timed(cmd, d))
            subprocess.run(
                [py, "-m", "nbrunbook.engine.cli", "server", "stop", "--store", str(d / f"store-{r}-1.duckdb")],
                capture_output=True,
            )
            subprocess.run(
                [
                    py,
                    "-m",
                    "nbrunbook.engine.cli",
                    "server",
                    "stop",
                    "--store",
                    str(d / f"store-{r}-{args.cells}.duckdb"),
                ],
                capture_output=True,
            )
    med = {t: {n: statistics.median(v) for n, v in per.items()} for t, per in results.items()}

    # Each round runs every tool back to back: the ratio within a round compares runs made under the
    # same machine conditions (this machine's speed drifts by tens of % between rounds).
    def round_ratio(tool: str, base: str) -> float:
        pairs = zip(results[tool][args.cells], results[base][args.cells], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 2)

    paired = {
        "nbrunbook/nbclient": round_ratio("nbrunbook", "nbclient"),
        "nbrunbook/papermill": round_ratio("nbrunbook", "papermill"),
        "resume/first_run": round_ratio("resume", "nbrunbook"),
    }
    per_cell = {t: (m[args.cells] - m[1]) / (args.cells - 1) for t, m in med.items()}
    total = {t: m[args.cells] for t, m in med.items()}
    print(
        json.dumps(
            {
                "cells": args.cells,
                "rounds": args.repeat,
                "end_to_end_s": {t: round(v, 2) for t, v in total.items()},
                "per_cell_ms": {t: round(v * 1e3, 2) for t, v in per_cell.items()},
                "ratios_end_to_end": {
                    "nbrunbook/nbclient": round(total["nbrunbook"] / total["nbclient"], 2),
                    "nbrunbook/papermill": round(total["nbrunbook"] / total["papermill"], 2),
                    "resume/first_run": round(total["resume"] / total["nbrunbook"], 2),
                },
                "ratios_end_to_end_median_of_rounds": paired,
                "end_to_end_s_all_rounds": {t: [round(x, 2) for x in per[args.cells]] for t, per in results.items()},
                "ratios_per_cell": {
                    "nbrunbook/nbclient": round(per_cell["nbrunbook"] / per_cell["nbclient"], 2),
                    "nbrunbook/papermill": round(per_cell["nbrunbook"] / per_cell["papermill"], 2),
                    "resume/first_run": round(per_cell["resume"] / per_cell["nbrunbook"], 2),
                },
                "load_average": os.getloadavg()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
