"""Devices and meshes.

The number of CPU devices is fixed when JAX's backend starts (the first array op, not ``import jax``).
`use_cpu_devices` sets it before that moment and refuses, with the fix, once it is too late. Meshes are
built from ``{axis: size}`` dicts where one size may be -1, "all remaining devices" (as in MaxText).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax

from bpjax.errors import UserError


def use_cpu_devices(n: int) -> None:
    """Simulate ``n`` CPU devices. Call before any JAX computation; a no-op if JAX already has ``n``.

    On a machine with an accelerator this only changes the CPU platform, which strategies do not use.
    """
    if n < 1:
        raise UserError(f"cpu_devices={n} must be >= 1")
    try:
        # JAX refuses this option once its backends exist; that refusal is how we detect "too late"
        # without reaching into JAX's private modules.
        jax.config.update("jax_num_cpu_devices", n)
        return
    except RuntimeError:
        pass
    if jax.default_backend() != "cpu":
        return
    have = len(jax.devices("cpu"))
    if have != n:
        raise UserError(
            f"JAX already started with {have} CPU devices and cannot switch to {n} in this process; "
            f"call bpjax.use_cpu_devices({n}) before any JAX work, or run in a fresh process (bpjax run)"
        )


def mesh_axes(mesh_cfg: Mapping[str, int], axes: Sequence[str], strategy: str) -> dict[str, int]:
    """The sizes a strategy lays out over, from ``parallel.mesh``.

    Axes the strategy does not use are ignored when their size is 1 or -1 (so ``--set
    parallel.strategy=tensor`` works on a data-parallel experiment) and an error when larger. One
    missing axis takes the remaining devices unless another axis already does.
    """
    for axis, size in mesh_cfg.items():
        if axis not in axes and size not in (1, -1):
            raise UserError(
                f"{strategy} lays out over mesh axes {tuple(axes)}; remove parallel.mesh.{axis}={size} "
                f"or set it to 1"
            )
    sizes = {a: mesh_cfg[a] for a in axes if a in mesh_cfg}
    missing = [a for a in axes if a not in sizes]
    if len(missing) == 1 and -1 not in sizes.values():
        sizes[missing[0]] = -1
    elif missing:
        example = " ".join(f"--set parallel.mesh.{a}=2" for a in missing)
        raise UserError(f"{strategy} needs the size of mesh axes {missing}; e.g. {example}")
    return {a: sizes[a] for a in axes}


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replace a -1 size by what the other axes leave of ``num_devices``; check the product fits."""
    axes = dict(axes)
    fixed = math.prod(s for s in axes.values() if s != -1)
    free = [a for a, s in axes.items() if s == -1]
    if len(free) > 1:
        raise UserError("parallel.mesh may use -1 for one axis only; give the other sizes explicitly")
    if free:
        if num_devices % fixed:
            raise UserError(
                f"parallel.mesh {axes} cannot fill {num_devices} devices: {num_devices} is not divisible "
                f"by {fixed}; choose sizes whose product divides {num_devices}"
            )
        axes[free[0]] = num_devices // fixed
    need = math.prod(axes.values())
    if need > num_devices:
        hint = (
            f"set parallel.cpu_devices={need} to simulate them"
            if jax.default_backend() == "cpu"
            else "use a smaller mesh"
        )
        raise UserError(f"parallel.mesh {axes} needs {need} devices but {num_devices} are present; {hint}")
    return axes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over the first ``prod(sizes)`` devices, with Auto axes so the compiler may partition."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(axes, len(devices))
    n = math.prod(shape.values())
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto, devices=devices[:n])
