import subprocess
import sys

import jax
import pytest

from bpjax.devices import make_mesh, resolve_mesh_shape, use_cpu_devices
from bpjax.errors import UserError


def test_resolve_mesh_shape():
    assert resolve_mesh_shape({"data": -1}, 8) == {"data": 8}
    assert resolve_mesh_shape({"data": 2, "model": -1}, 8) == {"data": 2, "model": 4}
    assert resolve_mesh_shape({"data": 4}, 8) == {"data": 4}
    with pytest.raises(UserError, match=r"needs 16 devices but 8 are present; set parallel.cpu_devices=16"):
        resolve_mesh_shape({"data": 16}, 8)
    with pytest.raises(UserError, match="8 is not divisible by 3"):
        resolve_mesh_shape({"data": 3, "model": -1}, 8)


def test_make_mesh_uses_auto_axes():
    mesh = make_mesh({"data": 2, "model": -1})
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_cpu_devices_cannot_change_after_start():
    use_cpu_devices(8)  # what conftest forced: fine
    with pytest.raises(UserError, match="JAX already started with 8 CPU devices and cannot switch to 4"):
        use_cpu_devices(4)


def test_cpu_devices_in_a_fresh_process():
    code = "import bpjax, jax; bpjax.use_cpu_devices(3); print(len(jax.devices()))"
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
