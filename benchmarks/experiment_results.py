"""The results table of docs/experiments.md, measured: every experiment file trained as its docstring says.

Run (each experiment in a fresh process, as ``bpjax run experiments/NAME.py`` runs it):

    python benchmarks/experiment_results.py            # prints the table; about 5 minutes on 2 cores
    python benchmarks/experiment_results.py --write    # and replaces it in docs/experiments.md
    python benchmarks/experiment_results.py --only mnist1d_dp,digits_dp

The table records, per experiment, the steps trained, the test accuracy and loss (deterministic: the
same on every machine with the same JAX version, up to float rounding across CPUs) and the training
time and samples/s (``summary.json``: compilation and evaluation excluded; they depend on the machine
and on what else runs on it). Its stamp line names the command, the date, the machine (CPU cores and
the load average when the script started) and the JAX version, so the numbers cannot drift unnoticed:
``tests/test_docs.py`` checks that every experiment file has a row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "experiments.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def experiments() -> list[Path]:
    """The experiment files (``get_config``), not the studies (``get_configs``, for bpjax compare)."""
    return sorted(p for p in (ROOT / "experiments").glob("*.py") if "def get_configs" not in p.read_text())


def measure(path: Path, folder: Path) -> dict:
    workdir = folder / path.stem
    cmd = [sys.executable, "-m", "bpjax", "run", str(path), "--workdir", str(workdir)]
    cmd += ["--set", "train.progress=off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{path.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads((workdir / "summary.json").read_text())


def table(results: dict[str, dict], stamp: str) -> str:
    lines = [
        stamp,
        "",
        "| experiment | strategy | steps | test accuracy | test loss | training time (s) | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        acc = "-" if s["eval_accuracy"] is None else f"{s['eval_accuracy']:.3f}"
        train_s = s["steps"] * s["batch_size"] / s["samples_per_second"]
        lines.append(
            f"| `{name}` | `{s['strategy']}` | {s['steps']} | {acc} | {s['eval_loss']:.4f} | "
            f"{train_s:.1f} | {s['samples_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace the table in docs/experiments.md")
    p.add_argument("--only", help="comma-separated experiment names (default: all)")
    args = p.parse_args()
    if args.write and args.only:
        p.error("--write measures every experiment (no --only), so that the stamp covers each row")
    paths = experiments()
    if args.only:
        wanted = set(args.only.split(","))
        paths = [q for q in paths if q.stem in wanted]
    load = os.getloadavg()[0]
    import jax

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            start = time.perf_counter()
            results[path.stem] = measure(path, Path(tmp))
            print(f"{path.stem}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    stamp = (
        f"Measured by `python benchmarks/experiment_results.py --write` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (load average {load:.1f} at "
        f"the start: times are slower when the machine is shared), jax {jax.__version__}, "
        f"{results and next(iter(results.values()))['backend']} backend."
    )
    text = table(results, stamp)
    print(text)
    if args.write:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN)
        _, tail = rest.split(END)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
