import os
import subprocess
import sys

import jax
import pytest

from bpjax import config as cfg_lib
from bpjax.devices import (
    describe,
    fit_mesh,
    forced_cpu_devices,
    make_mesh,
    resolve_mesh_shape,
    use_accelerators,
    use_cpu_devices,
    without_forced_cpu_devices,
)
from bpjax.errors import UserError


def test_resolve_mesh_shape(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS")
    assert resolve_mesh_shape({"data": -1}, 8) == {"data": 8}
    assert resolve_mesh_shape({"data": 2, "model": -1}, 8) == {"data": 2, "model": 4}
    assert resolve_mesh_shape({"data": 4}, 8) == {"data": 4}
    with pytest.raises(UserError, match=r"needs 16 devices but 8 are present; set parallel.cpu_devices=16"):
        resolve_mesh_shape({"data": 16}, 8)
    with pytest.raises(UserError, match="8 is not divisible by 3"):
        resolve_mesh_shape({"data": 3, "model": -1}, 8)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.raises(UserError, match=r"set --xla_force_host_platform_device_count=16 in XLA_FLAGS"):
        resolve_mesh_shape({"data": 16}, 8)


def test_make_mesh_uses_auto_axes():
    mesh = make_mesh({"data": 2, "model": -1})
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_cpu_devices_cannot_change_after_start(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS")  # conftest's flag would win over the 4 asked for (tested below)
    use_cpu_devices(8)  # what conftest forced: fine
    with pytest.raises(UserError, match="JAX already started with 8 CPU devices and cannot switch to 4"):
        use_cpu_devices(4)


def test_cpu_devices_in_a_fresh_process():
    code = "import bpjax, jax; bpjax.use_cpu_devices(3); print(len(jax.devices()))"
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


FLAG = "--xla_force_host_platform_device_count"


def test_the_device_count_flag_is_read_and_stripped():
    assert forced_cpu_devices("") is None
    assert forced_cpu_devices(f"--xla_cpu_foo=1 {FLAG}=8") == 8
    assert forced_cpu_devices(f"{FLAG}=8 {FLAG}=6") == 6  # the last one counts, as in XLA
    for bad in ("abc", "0", "-3", "", "100000"):
        with pytest.raises(UserError, match=f"XLA_FLAGS has {FLAG}={bad}; give a whole number in"):
            forced_cpu_devices(f"{FLAG}={bad}")
    assert without_forced_cpu_devices(f"--a=1 {FLAG}=8 --b {FLAG}=2") == "--a=1 --b"
    assert without_forced_cpu_devices(f"{FLAG}=8") == ""


def test_an_agreeing_flag_says_nothing(monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=8")
    assert use_cpu_devices(8) == 8
    assert capsys.readouterr().err == ""


def test_an_explicit_device_flag_wins_in_a_fresh_process(root, tmp_path):
    """``XLA_FLAGS=...=6 bpjax run EXP`` where EXP asks for 8 devices: 6 devices, one warning line
    naming both, and a mesh that needs 8 then fails with the usual one-line error."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{FLAG}=6"}
    code = "import bpjax, jax; print(bpjax.use_cpu_devices(8), len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "6"]
    assert out.stderr.startswith("warning: ") and out.stderr.count("\n") == 1, out.stderr
    assert f"XLA_FLAGS sets {FLAG}=6, which wins over the 8 CPU devices asked for" in out.stderr
    cmd = [sys.executable, "-m", "bpjax", "run", str(root / "experiments/mnist1d_dp.py")]
    cmd += ["--set", "parallel.mesh.data=8", "--workdir", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    warning, error = out.stderr.splitlines()
    assert (
        warning.startswith("warning: XLA_FLAGS sets") and "=6" in warning and "the 8 CPU devices" in warning
    )
    assert error.startswith("error: parallel.mesh {'data': 8} needs 8 devices but 6 are present"), error
    assert f"set {FLAG}=8 in XLA_FLAGS" in error
    assert not (tmp_path / "run").exists()


def test_a_simulated_mesh_fits_the_accelerators_present():
    assert fit_mesh({"data": 8}, 8) == {"data": 8}
    assert fit_mesh({"data": 8}, 1) == {"data": 1}
    assert fit_mesh({"data": 8}, 4) == {"data": 4}
    assert fit_mesh({"stage": 3}, 8) == {"stage": 3}  # fits: 3 of the 8
    assert fit_mesh({"stage": 3}, 2) == {"stage": 1}
    assert fit_mesh({"data": 2, "model": 4}, 2) == {"data": 2, "model": 1}
    assert fit_mesh({"data": 2, "model": 4}, 4) == {"data": 2, "model": 2}
    assert fit_mesh({"data": 3, "model": -1}, 4) == {"data": 1, "model": -1}
    assert fit_mesh({"data": -1}, 1) == {"data": -1}


def test_cpu_devices_give_way_to_accelerators(monkeypatch):
    c = cfg_lib.default()
    c.parallel.cpu_devices, c.parallel.mesh = 8, {"data": 2, "model": 4}
    assert use_accelerators(c) is None  # on the CPU the simulated devices are used as asked
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [jax.local_devices()[0]] * 2)
    note = use_accelerators(c)
    assert dict(c.parallel.mesh) == {"data": 2, "model": 1}
    assert note == (
        "parallel.cpu_devices=8 simulates CPU devices; on 2 gpu device(s) parallel.mesh "
        "{'data': 2, 'model': 4} becomes {'data': 2, 'model': 1}"
    )
    c.parallel.cpu_devices = 0  # a config written for the accelerators themselves is left alone
    c.parallel.mesh = {"data": 4}
    assert use_accelerators(c) is None and dict(c.parallel.mesh) == {"data": 4}


def test_describe_names_backend_and_devices():
    assert describe(jax.devices()[:2]) == f"cpu backend (jax {jax.__version__}): 2 of 8 devices (cpu x2)"
