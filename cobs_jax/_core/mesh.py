"""Running on a device mesh: the row axis, placing arrays, and ``shard_map`` wrappers.

Both halves shard by rows over a mesh's first axis: the Fisher half the N rows of G, the layer
half the calibration examples and the output units of per-row work.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .layout import PyTree

__all__ = ["row_axis", "place", "check_rows_divisible", "on_mesh", "rows_sharded"]


def row_axis(mesh: Mesh) -> str:
    """The mesh axis that shards the rows of G: the mesh's first axis."""
    return mesh.axis_names[0]


def place(tree: PyTree, mesh: Optional[Mesh], spec: P = P()) -> PyTree:
    """Put every array of ``tree`` on ``mesh`` with partition ``spec`` (no-op without a mesh).

    On several hosts every process passes the same full arrays and contributes the shards of its
    own devices (``jax.make_array_from_callback``); arrays already placed so are kept.
    """
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, spec)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def check_rows_divisible(num_rows: int, mesh: Optional[Mesh]) -> None:
    """Raise ``ValueError`` unless the N rows of G split evenly over the mesh's row axis."""
    if mesh is not None and num_rows % mesh.shape[row_axis(mesh)]:
        p = mesh.shape[row_axis(mesh)]
        raise ValueError(
            f"with `mesh`, the number of gradient rows N={num_rows} must be a multiple of the {p} "
            f"devices on mesh axis {row_axis(mesh)!r} (e.g. N={num_rows - num_rows % p or p})"
        )


def on_mesh(body, mesh, sharded: int = 1):
    """``body`` as is, or under ``shard_map`` with its argument ``sharded`` (G) split by rows."""
    if mesh is None:
        return body

    def run(*args):
        specs = tuple(P(row_axis(mesh)) if i == sharded else P() for i in range(len(args)))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(*args)

    return run


def rows_sharded(fn, mesh: Optional[Mesh], replicated: int, sharded: int):
    """``fn`` jitted; with ``mesh``, under ``shard_map``: its first ``replicated`` arguments whole
    on every device, the next ``sharded`` ones (and the outputs) split by rows over the first axis."""
    if mesh is None:
        return jax.jit(fn)
    ax = mesh.axis_names[0]
    specs = (P(),) * replicated + (P(ax),) * sharded
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(ax), check_vma=False))
