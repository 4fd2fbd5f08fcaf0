"""Test setup: 8 simulated CPU devices, forced before JAX starts and checked.

Every test runs on the CPU, also on machines with an accelerator: the equivalence suite is defined on
8 CPU devices. Tests that need another device count run it in a subprocess.
"""

import os
import re
import tempfile
from pathlib import Path

NUM_DEVICES = 8

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
# The MNIST-1D cache goes to a shared temporary folder, not the user's home.
os.environ.setdefault("BPJAX_CACHE", str(Path(tempfile.gettempdir()) / "bpjax-test-cache"))

import jax  # noqa: E402  (after XLA_FLAGS, on purpose)

# Raises if JAX's backend already started (then something imported before conftest used JAX).
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
assert len(jax.devices()) == NUM_DEVICES, f"expected {NUM_DEVICES} CPU devices, got {jax.devices()}"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT
