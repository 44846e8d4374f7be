"""Layer Hessians H = XᵀX of a linear layer's input activations, accumulated in a stream.

For a linear map y = x W (x: the layer input, W: (d_in, d_out)), the reconstruction error of a
changed kernel on calibration inputs X is ``tr((W - W̄)ᵀ XᵀX (W - W̄))``: one d_in x d_in matrix
``H = XᵀX`` serves every output unit. Layer-wise pruning (SparseGPT, Wanda, the exact re-solve)
needs only H, never the activations themselves, so calibration is streamed: add each batch of
activations to a running H and drop the batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["layer_hessian", "accumulate_dtype", "gram"]


def accumulate_dtype() -> jnp.dtype:
    """float64 when ``jax_enable_x64`` is on, else float32 (the dtype H is accumulated in)."""
    return jnp.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


_GRAM_BLOCK = 256  # column block of the symmetric product


def gram(x: jax.Array) -> jax.Array:
    """``XᵀX`` of ``x`` (..., d) with every leading axis a sample, in :func:`accumulate_dtype`.

    H is symmetric, so for d > 256 only the blocks on and above the diagonal of a grid of
    256-column blocks are multiplied (about (b + 1) / 2b of the flops for b blocks, 0.58x at
    d = 1536) and the rest mirrored; XLA has no symmetric rank-k product of its own.
    """
    x = x.reshape(-1, x.shape[-1]).astype(accumulate_dtype())
    d = x.shape[1]
    nb = -(-d // _GRAM_BLOCK)
    if nb < 2:
        return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    edges = [round(i * d / nb) for i in range(nb + 1)]
    cols = [x[:, edges[i] : edges[i + 1]] for i in range(nb)]
    upper = {(i, j): jnp.matmul(cols[i].T, cols[j], precision=jax.lax.Precision.HIGHEST)
             for i in range(nb) for j in range(i, nb)}
    return jnp.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(nb)] for i in range(nb)])


def cross_gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """``XᵀY`` of two sets of the same layer's inputs, ``(..., d)`` each with matching sample axes
    (the pruned model's and the dense model's, for asymmetric calibration), in
    :func:`accumulate_dtype`."""
    dt = accumulate_dtype()
    x = x.reshape(-1, x.shape[-1]).astype(dt)
    return jnp.matmul(x.T, y.reshape(-1, y.shape[-1]).astype(dt), precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _add(h: jax.Array, x: jax.Array) -> jax.Array:
    return h + gram(x).astype(h.dtype)


def layer_hessian(x: ArrayLike, into: Optional[ArrayLike] = None) -> jax.Array:
    """``XᵀX`` of activations ``x`` of shape ``(..., d_in)`` (all leading axes are samples).

    Args:
      x: a batch of a layer's input activations; every leading axis counts as examples
        (``(batch, seq, d_in)`` for a transformer's linear layer, ``(tokens, d_in)``, or
        ``(..., kh * kw * c_in)`` patches for a convolution).
      into: a running sum ``H`` of earlier batches (``(d_in, d_in)``): the result is
        ``into + XᵀX``, so calibration can be streamed batch by batch without keeping the
        activations. Its dtype is kept.

    Returns:
      The ``(d_in, d_in)`` sum ``XᵀX``, accumulated in float32 (float64 when x64 is on) whatever
      the activations' dtype. Any positive scale of H (sum, mean) gives the same pruning result.

    Raises:
      ValueError: if ``x`` has fewer than 2 dimensions or contains NaN/Inf, or ``into`` has the
        wrong shape.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"`x` must have shape (..., d_in) with at least one sample axis, got {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("`x` (the activations) contains NaN or Inf")
    d = x.shape[-1]
    if into is None:
        h = jnp.zeros((d, d), accumulate_dtype())
    else:
        h = jnp.asarray(into)
        if h.shape != (d, d):
            raise ValueError(f"`into` must have shape {(d, d)} for activations with d_in={d}, got {h.shape}")
    return _add(h, x)
