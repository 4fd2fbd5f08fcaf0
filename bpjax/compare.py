"""``bpjax compare``: train several configurations and compare how they converge, and at what cost.

Arguments are experiment files with ``get_config()`` (one run) or ``get_configs()`` (a study: a dict of
run name -> config, e.g. ``experiments/study_sync_async.py``). Every run gets the same ``--set``
overrides; ``--seeds 0,1,2`` trains each over several seeds (``seed``; the data split stays fixed,
see ``seeds.split``) and reports mean ± std. The comparison writes into its workdir:
  comparison.md, comparison.csv   per run: strategy, final train loss, test loss and accuracy, the first
                                  logged step whose mean train loss reaches the target and the training
                                  time it took, the total training time, samples/s, and the bytes one
                                  device sent (from the plan: wire bytes per step)
  loss_vs_step.png                train loss against step
  loss_vs_bytes.png               train loss against bytes communicated (per device)
  loss_vs_time.png                train loss against training time (``train_seconds``)
  runs/NAME/ (runs/NAME/seed_S/)  each run's config.json, metrics.jsonl, summary.json, tensorboard/

The target loss defaults to the loss every run reaches: the highest of the runs' best mean train
losses. A second comparison into the same folder is refused unless ``overwrite``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import ml_collections as mlc
import numpy as np

from bpjax import config as cfg_lib
from bpjax.errors import UserError

OUTPUTS = ("comparison.md", "comparison.csv", "loss_vs_step.png", "loss_vs_bytes.png", "loss_vs_time.png")


def load_runs(paths: list[str], overrides: list[str]) -> dict[str, mlc.ConfigDict]:
    """Run name -> validated config, from experiment and study files (names must be unique)."""
    runs: dict[str, mlc.ConfigDict] = {}
    for path in paths:
        for name, c in cfg_lib.from_study(path).items():
            if name in runs:
                raise UserError(f"two runs are named {name!r}; give each run in a comparison its own name")
            c = cfg_lib.apply_overrides(cfg_lib.merge_into_default(c, source=f"{path}:{name}"), overrides)
            cfg_lib.resolve_data_paths(c, cfg_lib.find_experiment(path))
            with c.unlocked():
                c.name = name
            cfg_lib.validate(c)
            runs[name] = c
    if not runs:
        raise UserError("nothing to compare; pass experiment or study files")
    return runs


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` (or ``0-3``, a range with its end) -> distinct seeds, each in [0, 2**31 - 1]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part.lstrip("-"):
                lo, hi = part.split("-", 1)
                seeds += list(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(
            f"--seeds {text!r}: give whole numbers separated by commas, e.g. --seeds 0,1,2"
        ) from None
    if not seeds:
        raise UserError(f"--seeds {text!r} names no seed; e.g. --seeds 0,1,2")
    bad = [s for s in seeds if not 0 <= s <= cfg_lib.MAX_SEED]
    if bad:
        raise UserError(f"--seeds: seed {bad[0]} is outside [0, {cfg_lib.MAX_SEED}]")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} names a seed twice; each seed once")
    return seeds


def check_workdir(workdir: Path, overwrite: bool) -> None:
    """A comparison's folder: refused if it holds an earlier comparison, unless ``overwrite``."""
    from bpjax import workdir as workdir_lib

    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a folder")
    taken = [f for f in (*OUTPUTS, "runs") if (workdir / f).exists()]
    if taken and not overwrite:
        raise UserError(
            f"{workdir} already holds a comparison ({taken[0]}); choose another --workdir or pass --overwrite "
            "to replace it"
        )
    workdir_lib.check(workdir, overwrite=True, resume=False)  # a folder, writable, not in use


def steps_to(target: float, steps: np.ndarray, losses: np.ndarray) -> int | None:
    """The first logged step whose loss is at or below ``target`` (None if never)."""
    hit = np.nonzero(losses <= target)[0]
    return int(steps[hit[0]]) if hit.size else None


def _at(target: float, xs: np.ndarray, losses: np.ndarray) -> float | None:
    hit = np.nonzero(losses <= target)[0]
    return float(xs[hit[0]]) if hit.size else None


def compare(
    paths: list[str],
    overrides: list[str],
    workdir: str | Path,
    target_loss: float | None = None,
    *,
    seeds: list[int] | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Train every run (over every seed), then write the table and the plots; returns the table rows
    (with ``seeds``: means, and ``KEY_std`` for the spread over seeds)."""
    from bpjax.plan import make_plan
    from bpjax.preflight import prepare
    from bpjax.train import run

    runs = load_runs(paths, overrides)
    workdir = Path(workdir)
    check_workdir(workdir, overwrite)
    setups = {name: prepare(c) for name, c in runs.items()}  # every check before the first run
    per_step = {name: (s.plan or make_plan(s)).totals["wire_bytes_per_step"] for name, s in setups.items()}
    results: dict[str, list] = {}
    for name, c in runs.items():
        results[name] = []
        for seed in seeds or [None]:
            if seed is None:
                config, folder = c, workdir / "runs" / name
            else:
                config = cfg_lib.apply_overrides(c, [f"seed={seed}", f"name={name}-seed{seed}"])
                folder = workdir / "runs" / name / f"seed_{seed}"
            results[name].append(run(config, folder, overwrite=True))
    curves = {name: _curves(rs) for name, rs in results.items()}
    if target_loss is None:  # the loss every run (and seed) reaches: the worst of their best losses
        target_loss = max(
            float(np.nanmin(r.series("train_loss_mean")[1])) for rs in results.values() for r in rs
        )
        chosen = "the highest of the runs' best mean train losses: every run reaches it"
    else:
        chosen = "--target-loss"
    rows = []
    for name, rs in results.items():
        one = []
        for r in rs:
            steps, losses = r.series("train_loss_mean")
            _, seconds = r.series("train_seconds")
            n = min(len(steps), len(seconds))
            one.append(
                {
                    "final_train_loss": r.summary["final_train_loss"],
                    "eval_loss": r.summary["eval_loss"],
                    "eval_accuracy": r.summary["eval_accuracy"],
                    "steps_to_target": steps_to(target_loss, steps, losses),
                    "seconds_to_target": _at(target_loss, seconds[:n], losses[:n]),
                    "train_seconds": float(seconds[-1]) if len(seconds) else None,
                    "samples_per_second": r.summary["samples_per_second"],
                }
            )
        row = {"run": name, "strategy": rs[0].summary["strategy"]}
        if seeds:
            row["seeds"] = len(seeds)
        for key in one[0]:
            values = [o[key] for o in one]
            if seeds:
                reached = [v for v in values if v is not None]
                row[key] = float(np.mean(reached)) if len(reached) == len(values) else None
                row[f"{key}_std"] = float(np.std(reached)) if len(reached) == len(values) else None
            else:
                row[key] = values[0]
        row["bytes_per_step"] = per_step[name]
        row["bytes_total"] = per_step[name] * rs[0].summary["steps"]
        rows.append(row)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_table(rows, workdir, target_loss, chosen, seeds)
    _plot(curves, per_step, workdir, target_loss, seeds)
    return rows


def _curves(results: list) -> dict[str, np.ndarray]:
    """One run's curves over its seeds: step, mean and spread of the loss, mean training time."""
    steps, _ = results[0].series("train_loss_mean")
    losses, seconds = [], []
    for r in results:
        s, loss = r.series("train_loss_mean")
        _, t = r.series("train_seconds")
        n = min(len(s), len(steps), len(t))
        losses.append(loss[:n])
        seconds.append(t[:n])
        steps = steps[:n]
    n = min(len(x) for x in losses)
    losses = np.stack([x[:n] for x in losses])
    seconds = np.stack([x[:n] for x in seconds])
    return {
        "step": steps[:n],
        "loss": losses.mean(axis=0),
        "lo": losses.min(axis=0),
        "hi": losses.max(axis=0),
        "seconds": seconds.mean(axis=0),
    }


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def human_bytes(n: float) -> str:
    """``12_500_000`` -> ``"12.5 MB"`` (decimal units, as network rates are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


HEADS = {
    "final_train_loss": "final train loss",
    "eval_loss": "test loss",
    "eval_accuracy": "test accuracy",
    "steps_to_target": "steps to target",
    "seconds_to_target": "time to target (s)",
    "train_seconds": "training time (s)",
    "samples_per_second": "samples/s",
    "bytes_per_step": "bytes/step",
    "bytes_total": "bytes total",
}


def _write_table(rows: list[dict], workdir: Path, target: float, chosen: str, seeds) -> None:
    keys = list(rows[0])
    with open(workdir / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    shown = [k for k in keys if not k.endswith("_std")]

    def cell(r, k):
        if k.startswith("bytes"):
            return human_bytes(r[k])
        if seeds and r.get(f"{k}_std") is not None and r[k] is not None:
            return f"{_fmt(r[k])} ± {_fmt(r[f'{k}_std'])}"
        return _fmt(r[k])

    lines = [
        f"target loss {target:.4g} ({chosen}); steps and time to target: the first logged row whose mean "
        "train loss is at or below it; time: training time (compilation and evaluation excluded); bytes: "
        "sent by one device (ring collectives, from bpjax plan)"
        + (
            f"; mean ± std over seeds {', '.join(map(str, seeds))} ('-': not every seed reached it)"
            if seeds
            else ""
        ),
        "",
        "| " + " | ".join(HEADS.get(k, k) for k in shown) + " |",
        "|" + "---|" * len(shown),
    ]
    lines += ["| " + " | ".join(cell(r, k) for k in shown) + " |" for r in rows]
    (workdir / "comparison.md").write_text("\n".join(lines) + "\n")


def _plot(curves: dict, per_step: dict, workdir: Path, target: float, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    axes = {
        "loss_vs_step": ("step", lambda c, n: c["step"]),
        "loss_vs_bytes": ("bytes sent per device", lambda c, n: c["step"] * per_step[n]),
        "loss_vs_time": ("training time (s)", lambda c, n: c["seconds"]),
    }
    for name, (xlabel, x_of) in axes.items():
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        for run_name, c in curves.items():
            x = x_of(c, run_name)
            (line,) = ax.semilogy(x, c["loss"], label=run_name)
            if seeds and len(seeds) > 1:
                ax.fill_between(x, c["lo"], c["hi"], color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:.3g}")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # not 2.4x10^0 on a short log axis
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        if name == "loss_vs_bytes":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        spread = f" (mean; band: min-max over {len(seeds)} seeds)" if seeds and len(seeds) > 1 else ""
        ax.set(
            xlabel=xlabel,
            ylabel="train loss (mean since the previous log)",
            title=name.replace("_", " ") + spread,
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(workdir / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
