"""Runs tests/sharded_cases.py in its own process with 8 virtual CPU devices.

JAX fixes the device count at start-up, so the multi-device checks cannot share this process.
"""

import os
import pathlib
import subprocess
import sys


def test_sharded_cases_on_8_virtual_devices():
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider",
         str(here / "sharded_cases.py")],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
