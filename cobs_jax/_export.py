"""Saving pruned models with their masks, and exporting pruned kernels to sparse formats.

* :func:`save` / :func:`load`: params and masks in one safetensors file (flat, framework-neutral:
  the same file opens in PyTorch or numpy), keyed by each leaf's ``jax.tree_util.keystr`` path.
* :func:`to_sparse`: every pruned 2-D kernel as a ``jax.experimental.sparse.BCOO`` (only the
  kept entries are stored), usable as ``x @ kernel`` in jitted code.
* :func:`pack_nm` / :func:`unpack_nm`: an N:M kernel as its kept values and their positions in
  each group of M inputs (``uint8``): N/M of the values plus one byte per value.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jax.typing import ArrayLike

from ._core.budget import parse_pattern
from ._core.layout import PyTree, same_structure

__all__ = ["save", "load", "to_sparse", "NMPacked", "pack_nm", "unpack_nm"]

_PARAMS, _MASKS = "params", "masks"


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError as e:  # an optional dependency: the core install stays jax/flax/optax/chex
        raise ImportError("cobs_jax.save/load need the `safetensors` package: pip install safetensors") from e
    return st


def _flat(tree: PyTree, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for kp, v in jax.tree_util.tree_leaves_with_path(tree):
        name = f"{prefix}{jax.tree_util.keystr(kp)}"
        if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
            raise ValueError(f"leaf {name!r} is a PRNG key array, which cannot be saved: save "
                             "`nnx.state(model, nnx.Param)` (or drop the RNG state) instead")
        try:
            a = np.asarray(v)
        except Exception as e:
            raise ValueError(f"leaf {name!r} ({type(v).__name__}) is not an array and cannot be saved") from e
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"leaf {name!r} ({type(v).__name__}, dtype {a.dtype}) is not a numeric array and "
                             "cannot be saved")
        out[name] = a
    return out


def _check_masks(params: PyTree, masks: PyTree) -> list:
    """The mask leaves, one per param leaf, checked: same structure, same shapes, bool."""
    if not same_structure(jax.tree.structure(params), jax.tree.structure(masks)):
        raise ValueError("`masks` must have the structure of `params`")
    out = []
    for (kp, w), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(masks)):
        if np.shape(m) != np.shape(w):
            raise ValueError(f"mask of {jax.tree_util.keystr(kp)} has shape {np.shape(m)}, the leaf {np.shape(w)}")
        if np.asarray(m).dtype != np.bool_:
            raise ValueError(f"mask of {jax.tree_util.keystr(kp)} must be bool (True = kept), got {np.asarray(m).dtype}")
        out.append(m)
    return out


def save(path: str, params: PyTree, masks: Optional[PyTree] = None) -> None:
    """Write ``params`` (and ``masks``) to the safetensors file ``path``.

    Every array leaf is stored under ``"params" + keystr(path)`` (``"masks" + ...`` for the masks)
    with its dtype (masks as bool). Restore with :func:`load` given trees of the same structure.

    The file is written to a temporary file beside ``path`` and renamed over it, so an
    interrupted save never leaves a truncated file.

    Raises:
      ValueError: if ``masks`` does not have the structure, shapes and bool dtype of ``params``,
        or a leaf is not a numeric array (a string, a PRNG key: the leaf is named).
    """
    st = _safetensors()
    if masks is not None:
        _check_masks(params, masks)
    tensors = _flat(params, _PARAMS)
    if masks is not None:
        tensors.update(_flat(masks, _MASKS))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cobs_jax_save_", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, like: PyTree, masks_like: Optional[PyTree] = None) -> Union[PyTree, tuple[PyTree, PyTree]]:
    """Read params (and masks) written by :func:`save` into trees shaped like ``like``.

    Args:
      path: the safetensors file.
      like: a params tree of the saved structure (e.g. the model's freshly initialised params, or
        ``jax.eval_shape`` of its initialiser); only its structure, shapes and dtypes are used.
      masks_like: pass a tree (e.g. ``like`` itself) to also read the masks.

    Returns:
      The params, or ``(params, masks)`` with ``masks_like``.

    Raises:
      ValueError: if the file is not a readable safetensors file, or a leaf of ``like`` is missing
        from it or has another shape or dtype (the path and the leaf are named).
    """
    st = _safetensors()
    try:
        stored = st.load_file(path)
    except (OSError, FileNotFoundError):
        raise
    except Exception as e:  # safetensors' own errors for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e

    def read(tree, prefix, as_mask):
        def one(kp, ref):
            name = f"{prefix}{jax.tree_util.keystr(kp)}"
            if name not in stored:
                raise ValueError(f"{path}: no tensor {name!r} (was it saved from a tree of this structure?)")
            v = stored[name]
            want = (tuple(np.shape(ref)), np.dtype(bool) if as_mask else np.dtype(getattr(ref, "dtype", None) or jnp.asarray(ref).dtype))
            if (v.shape, v.dtype) != want:
                raise ValueError(f"{path}: {name!r} is {v.dtype}{v.shape}, expected {want[1]}{want[0]}")
            return jnp.asarray(v)

        return jax.tree_util.tree_map_with_path(one, tree)

    params = read(like, _PARAMS, False)
    return params if masks_like is None else (params, read(masks_like, _MASKS, True))


def to_sparse(params: PyTree, masks: Optional[PyTree] = None, *, min_sparsity: float = 0.0) -> PyTree:
    """``params`` with every pruned 2-D kernel as a BCOO sparse matrix (``jax.experimental.sparse``).

    A leaf becomes sparse if it is 2-D, floating, and its fraction of zeros (or of ``False`` in
    ``masks`` where given) is above ``min_sparsity``; only those entries are stored (indices
    int32 plus values). Other leaves are returned as they are. ``x @ leaf`` works in jitted code;
    ``leaf.todense()`` gives the kernel back.

    Whether this saves time depends on the backend and the sparsity: see the export benchmark
    (``benchmarks/sparse_inference.py``).

    Raises:
      ValueError: if ``masks`` does not match ``params`` leaf by leaf in structure, shape and bool
        dtype (a mask that only broadcasts is refused), or ``min_sparsity`` is not in [0, 1].
    """
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"`min_sparsity` must be a number in [0, 1], got {min_sparsity!r}")
    mask_leaves = [None] * len(jax.tree.leaves(params)) if masks is None else _check_masks(params, masks)

    def convert(w, m):
        w = jnp.asarray(w)
        if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
            return w
        keep = (w != 0) if m is None else jnp.asarray(m, bool)
        if 1.0 - float(jnp.mean(keep)) <= min_sparsity:
            return w
        nse = int(jnp.sum(keep))
        return sparse.BCOO.fromdense(jnp.where(keep, w, 0.0), nse=nse)

    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [convert(w, m) for w, m in zip(leaves, mask_leaves)])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMPacked:
    """An N:M-sparse kernel ``(d_in, d_out)`` kept as its values and their in-group positions.

    A pytree (``m`` is static), so it can be passed to jitted functions.

    Attributes:
      values: ``(d_in // M, N, d_out)``: the N kept values of every group of M inputs.
      index: ``(d_in // M, N, d_out)`` ``uint8``: their positions 0..M-1 inside the group.
      m: the group size M.
    """

    values: jax.Array
    index: jax.Array
    m: int = dataclasses.field(metadata=dict(static=True))


def pack_nm(kernel: ArrayLike, pattern: str) -> NMPacked:
    """Pack a ``(d_in, d_out)`` kernel with the ``pattern`` ``"N:M"`` along its input axis.

    Raises:
      ValueError: if the kernel is not 2-D, ``d_in`` is not a multiple of M, or some group holds
        more than N nonzeros (the kernel does not have the pattern).
    """
    nm = parse_pattern(pattern)
    if nm is None:
        raise ValueError(f"`pattern` must be 'N:M', got {pattern!r}")
    n, m = nm
    w = jnp.asarray(kernel)
    if w.ndim != 2 or w.shape[0] % m:
        raise ValueError(f"`kernel` must be (d_in, d_out) with d_in a multiple of {m}, got {w.shape}")
    g = w.reshape(w.shape[0] // m, m, w.shape[1])
    nonzero = g != 0
    if int(jnp.max(jnp.sum(nonzero, axis=1))) > n:
        raise ValueError(f"`kernel` has groups of {m} inputs with more than {n} nonzeros: it is not {pattern}")
    # nonzeros first (stable, in position order), then the first N positions of each group
    order = jnp.argsort(~nonzero, axis=1, stable=True)[:, :n, :]
    values = jnp.take_along_axis(g, order, axis=1)
    return NMPacked(values, order.astype(jnp.uint8), m)


def unpack_nm(packed: NMPacked) -> jax.Array:
    """The dense ``(d_in, d_out)`` kernel of :func:`pack_nm` (jit-compatible).

    Raises:
      ValueError: if ``values`` and ``index`` differ in shape, or (on concrete arrays) a position
        is not in ``0..M-1``.
    """
    if packed.values.shape != packed.index.shape or packed.values.ndim != 3:
        raise ValueError(f"`values` {packed.values.shape} and `index` {packed.index.shape} must be one (groups, N, "
                         "d_out) shape")
    if not isinstance(packed.index, jax.core.Tracer) and int(jnp.max(packed.index)) >= packed.m:
        raise ValueError(f"`index` holds positions up to {int(jnp.max(packed.index))}, outside 0..{packed.m - 1}")
    groups, n, d_out = packed.values.shape
    onehot = packed.index.astype(jnp.int32)[:, :, None, :] == jnp.arange(packed.m)[None, None, :, None]
    dense = jnp.sum(jnp.where(onehot, packed.values[:, :, None, :], 0.0), axis=1)  # (groups, m, d_out)
    return dense.reshape(groups * packed.m, d_out).astype(packed.values.dtype)

