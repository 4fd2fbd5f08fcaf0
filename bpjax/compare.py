"""``bpjax compare``: train several configurations and compare how they converge, and at what cost.

Arguments are experiment files with ``get_config()`` (one run) or ``get_configs()`` (a study: a dict of
run name -> config, e.g. ``experiments/study_sync_async.py``). Every run gets the same ``--set``
overrides. The comparison writes into its workdir:
  comparison.md, comparison.csv   per run: strategy, final train loss, test loss and accuracy, the first
                                  logged step whose mean train loss reaches the target, and the bytes
                                  one device sent over the run (from the plan: wire bytes per step)
  loss_vs_step.png                train loss against step
  loss_vs_bytes.png               train loss against bytes communicated (per device)
  runs/NAME/                      each run's config.json, metrics.jsonl, summary.json
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import ml_collections as mlc
import numpy as np

from bpjax import config as cfg_lib
from bpjax.errors import UserError


def load_runs(paths: list[str], overrides: list[str]) -> dict[str, mlc.ConfigDict]:
    """Run name -> validated config, from experiment and study files (names must be unique)."""
    runs: dict[str, mlc.ConfigDict] = {}
    for path in paths:
        for name, c in cfg_lib.from_study(path).items():
            if name in runs:
                raise UserError(f"two runs are named {name!r}; give each run in a comparison its own name")
            c = cfg_lib.apply_overrides(cfg_lib.merge_into_default(c, source=f"{path}:{name}"), overrides)
            with c.unlocked():
                c.name = name
            cfg_lib.validate(c)
            runs[name] = c
    if not runs:
        raise UserError("nothing to compare; pass experiment or study files")
    return runs


def steps_to(target: float, steps: np.ndarray, losses: np.ndarray) -> int | None:
    """The first logged step whose loss is at or below ``target`` (None if never)."""
    hit = np.nonzero(losses <= target)[0]
    return int(steps[hit[0]]) if hit.size else None


def compare(paths: list[str], overrides: list[str], workdir: str | Path, target_loss: float) -> list[dict]:
    """Train every run, then write the table and the plots; returns the table rows."""
    from bpjax.plan import make_plan
    from bpjax.preflight import prepare
    from bpjax.train import run

    runs = load_runs(paths, overrides)
    setups = {name: prepare(c) for name, c in runs.items()}  # every check before the first run
    per_step = {name: (s.plan or make_plan(s)).totals["wire_bytes_per_step"] for name, s in setups.items()}
    workdir = Path(workdir)
    results = {name: run(c, workdir / "runs" / name, overwrite=True) for name, c in runs.items()}
    rows = []
    for name, r in results.items():
        steps, losses = r.series("train_loss_mean")
        rows.append(
            {
                "run": name,
                "strategy": r.summary["strategy"],
                "final_train_loss": r.summary["final_train_loss"],
                "eval_loss": r.summary["eval_loss"],
                "eval_accuracy": r.summary["eval_accuracy"],
                "steps_to_target": steps_to(target_loss, steps, losses),
                "bytes_per_step": per_step[name],
                "bytes_total": per_step[name] * r.summary["steps"],
            }
        )
    _write_table(rows, workdir, target_loss)
    _plot(results, per_step, workdir)
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def _write_table(rows: list[dict], workdir: Path, target: float) -> None:
    keys = list(rows[0])
    with open(workdir / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"steps_to_target: first logged step whose mean train loss is <= {target:g}; bytes: sent by one "
        "device (ring collectives, from bpjax plan)",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    (workdir / "comparison.md").write_text("\n".join(lines) + "\n")


def _plot(results: dict, per_step: dict, workdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, x_of in (("loss_vs_step", lambda s, n: s), ("loss_vs_bytes", lambda s, n: s * per_step[n])):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run_name, r in results.items():
            steps, losses = r.series("train_loss_mean")
            ax.semilogy(x_of(steps, run_name), losses, label=run_name)
        ax.set(
            xlabel="step" if name == "loss_vs_step" else "bytes sent per device",
            ylabel="train loss (mean since the previous log)",
            title=name.replace("_", " "),
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(workdir / f"{name}.png", dpi=110)
        plt.close(fig)
