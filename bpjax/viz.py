"""Pictures for the notebooks: where each layer lives, a strategy's schedule, loss curves.

Everything a notebook draws comes from here, so that notebooks hold no logic. Nothing here knows a
strategy: where each block lives is the strategy's declared placement, and a schedule its declared
timeline. matplotlib is imported lazily (it is in the ``notebooks`` extra, not a core dependency).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from bpjax import strategies
from bpjax.models.mlp import layer_name

if TYPE_CHECKING:
    from bpjax.preflight import Setup


def kernel_blocks(setup: Setup) -> dict[str, list[tuple[tuple[int, ...], tuple[int, int], tuple[int, int]]]]:
    """Which devices hold which block of each layer's kernel, from the strategy's declared placement.

    Returns ``{layer: [(device positions, (row0, row1), (col0, col1)), ...]}``, one entry per distinct
    block; positions index ``setup.strategy.devices``. Nothing is allocated (``jax.eval_shape``).
    """
    strategy, problem = setup.strategy, setup.problem
    params = strategies.placement(problem, strategy, setup.config.parallel)
    position = {d: k for k, d in enumerate(strategy.devices)}
    out = {}
    for i in range(len(problem.model.widths)):
        kernel = params[layer_name(i)]["kernel"]
        blocks: dict[tuple, list[int]] = defaultdict(list)
        for device, index in kernel.sharding.devices_indices_map(kernel.shape).items():
            rows, cols = (s.indices(n)[:2] for s, n in zip(index, kernel.shape, strict=True))
            blocks[(rows, cols)].append(position[device])
        out[layer_name(i)] = [(tuple(sorted(d)), r, c) for (r, c), d in sorted(blocks.items())]
    return out


def plot_layouts(setups: dict[str, Setup], figsize_per_cell=(2.0, 1.6)):
    """A grid: one row per strategy, one column per layer; each kernel ``W[in, out]`` drawn with its
    blocks coloured by the device that holds them (a block on several devices is labelled with them)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(setups)
    n_layers = max(len(s.problem.model.widths) for s in setups.values())
    fig, axes = plt.subplots(
        len(names),
        n_layers,
        figsize=(figsize_per_cell[0] * n_layers, figsize_per_cell[1] * len(names)),
        squeeze=False,
    )
    cmap = plt.get_cmap("tab10")
    for r, name in enumerate(names):
        setup = setups[name]
        for c, (layer, blocks) in enumerate(kernel_blocks(setup).items()):
            ax = axes[r][c]
            rows = max(b[1][1] for b in blocks)
            cols = max(b[2][1] for b in blocks)
            for devices, (r0, r1), (c0, c1) in blocks:
                color = cmap(devices[0] % 10) if len(devices) < setup.strategy.num_devices else "0.8"
                ax.add_patch(
                    Rectangle((c0, rows - r1), c1 - c0, r1 - r0, facecolor=color, edgecolor="k", lw=0.5)
                )
                label = (
                    f"d{devices[0]}"
                    if len(devices) == 1
                    else "all"
                    if len(devices) == setup.strategy.num_devices
                    else ",".join(f"d{d}" for d in devices)
                )
                ax.text((c0 + c1) / 2, rows - (r0 + r1) / 2, label, ha="center", va="center", fontsize=7)
            ax.set(xlim=(0, cols), ylim=(0, rows), xticks=[], yticks=[])
            ax.set_title(f"{layer} W[{rows}, {cols}]", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
        for c in range(len(kernel_blocks(setup)), n_layers):
            axes[r][c].axis("off")
    fig.suptitle("which device holds which block of each kernel (grey: every device)", fontsize=10)
    fig.tight_layout()
    return fig


def timeline(setup: Setup) -> np.ndarray | None:
    """``[devices, ticks]``: what each device runs at each tick of the strategy's schedule (-1: idle),
    or None for strategies without one (every device works on every step)."""
    d = strategies.get(setup.strategy.name)
    return None if d.timeline is None else d.timeline(setup.config.parallel, setup.strategy.num_devices)


def plot_timeline(setup: Setup, ax=None):
    """The strategy's schedule: which microbatch each device runs at each tick (blank: idle)."""
    import matplotlib.pyplot as plt

    grid = timeline(setup)
    if grid is None:
        raise ValueError(f"{setup.strategy.name} follows no schedule of ticks; nothing to draw")
    rows = grid.shape[0]
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * grid.shape[1] + 1.5, 0.5 * rows + 1))
    cmap = plt.get_cmap("tab10")
    for s in range(rows):
        for t, m in enumerate(grid[s]):
            if m >= 0:
                ax.add_patch(plt.Rectangle((t, s), 1, 1, facecolor=cmap(m % 10), edgecolor="k"))
                ax.text(t + 0.5, s + 0.5, f"m{m}", ha="center", va="center", fontsize=8)
    ax.set(
        xlim=(0, grid.shape[1]),
        ylim=(rows, 0),
        xlabel="tick",
        ylabel="device",
        yticks=np.arange(rows) + 0.5,
        yticklabels=[str(s) for s in range(rows)],
    )
    ax.set_title(
        f"{setup.strategy.name}: {rows} devices, {grid.shape[1]} ticks, idle {np.mean(grid < 0):.2f} of them",
        fontsize=9,
    )
    return ax


def plot_losses(results: dict, key: str = "train_loss", reference: str = "single"):
    """Loss curves of several runs on one axes, and their difference from ``reference`` (log scale)."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
    ref_steps, ref = results[reference].series(key)
    styles = ["-", "--", ":", "-.", (0, (3, 1, 1, 1)), (0, (5, 2))]
    for k, (name, result) in enumerate(results.items()):
        steps, values = result.series(key)
        ax.semilogy(steps, values, linestyle=styles[k % len(styles)], lw=2, label=name)
        if name != reference:
            ax_diff.semilogy(
                steps,
                np.maximum(np.abs(values - ref), 1e-10),
                linestyle=styles[k % len(styles)],
                lw=2,
                label=name,
            )
    ax.set(xlabel="step", ylabel=key, title="loss curves")
    ax_diff.set(
        xlabel="step",
        ylabel=f"|{key} - {key}({reference})|",
        title=f"difference from {reference} (exact zeros drawn at 1e-10)",
    )
    ax.legend()
    ax_diff.legend()
    fig.tight_layout()
    return fig
