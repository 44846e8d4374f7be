"""Two processes (4 virtual CPU devices each) joined by ``jax.distributed``: the multi-host path.

CPU collectives across processes use gloo. Each process passes the same host batch and params;
``prune(..., mesh=...)`` must give the single-process masks and weights for every method.
"""

import os
import pathlib
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one():
    here = pathlib.Path(__file__).parent
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(here))
    procs = [
        subprocess.Popen([sys.executable, str(here / "multiprocess_worker.py"), str(i), port], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        for method in ("magnitude", "woodfisher", "cbs", "iht"):
            assert f"OK {method}" in out, out[-4000:]
