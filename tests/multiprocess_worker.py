"""One of two processes of ``test_multiprocess.py``: 4 virtual CPU devices each, 8 in all.

Usage: ``python multiprocess_worker.py PROCESS_ID PORT``. Prints ``OK <method>`` for every method
whose masks and weights on the 2-process mesh equal those of a single-process run.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import cobs_jax  # noqa: E402
from helpers import linen_setup  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
params, loss_fn, batch = linen_setup(n=48, dtype=jnp.float64, hidden=8)
batch = jax.tree.map(np.asarray, batch)  # host data, the same in every process
mesh = Mesh(np.array(jax.devices()), ("rows",))
for method, update in (("magnitude", None), ("woodfisher", "obs"), ("cbs", "cbs"), ("iht", "cbs")):
    kw = dict(sparsity=0.6, method=method, update=update, blocks="layer", damping=1e-2)
    res = cobs_jax.prune(params, loss_fn, batch, mesh=mesh, **kw)
    ref = cobs_jax.prune(params, loss_fn, batch, **kw)
    for a, b in zip(jax.tree.leaves(res.masks), jax.tree.leaves(ref.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    print("OK", method, flush=True)

# Leave together: without this, the process hosting the coordinator could tear its gRPC server
# down at exit while the other still had a request in flight (seen once as an abort in
# ~RealRequestMatcher after every check had passed).
from jax.experimental import multihost_utils  # noqa: E402

multihost_utils.sync_global_devices("cobs_jax multiprocess test done")
jax.distributed.shutdown()
