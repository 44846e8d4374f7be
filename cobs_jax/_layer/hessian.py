"""Layer Hessians H = XᵀX of a linear layer's input activations, accumulated in a stream.

For a linear map y = x W (x: the layer input, W: (d_in, d_out)), the reconstruction error of a
changed kernel on calibration inputs X is ``tr((W - W̄)ᵀ XᵀX (W - W̄))``: one d_in x d_in matrix
``H = XᵀX`` serves every output unit. Layer-wise pruning (SparseGPT, Wanda, the exact re-solve)
needs only H, never the activations themselves, so calibration is streamed: add each batch of
activations to a running H and drop the batch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["layer_hessian", "accumulate_dtype", "gram", "Factors", "factor_hessian", "reconstruction_error"]

REDAMP_FACTOR, REDAMP_TRIES = 10.0, 4


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


class Factors(NamedTuple):
    """A layer Hessian prepared for pruning (one per distinct H; q/k/v or gate/up share one).

    Attributes:
      h: the damped H (dead inputs given ``H_jj = 1``, then ``damping * mean(diag H)`` added).
      u: the upper Cholesky factor of ``h⁻¹`` (``h⁻¹ = uᵀu``), SparseGPT's ``Hinv``.
      dead: bool (d_in,), inputs that never fire (``H_jj = 0``); their weights are zeroed.
      damping: the relative damping used.
    """

    h: jax.Array
    u: jax.Array
    dead: jax.Array
    damping: float


@jax.jit
def _damped_factor(h, damping):
    """Dead inputs (H_jj = 0) get H_jj = 1, then H + damping * mean(diag H) * I; U with H⁻¹ = UᵀU.

    With J the order-reversing permutation and ``J H J = L Lᵀ`` (one Cholesky),
    ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive diagonal:
    it *is* the upper Cholesky factor of ``H⁻¹``, for one factorisation and one triangular
    inverse (about half the flops of inverting H and factoring the inverse).
    """
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damping * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    low = jnp.linalg.cholesky(h[::-1, ::-1])
    u = jax.scipy.linalg.solve_triangular(low, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)[::-1, ::-1]
    ok = jnp.all(jnp.isfinite(low)) & jnp.all(jnp.isfinite(u))
    return h, u, dead, ok


def factor_hessian(h: jax.Array, damping: float, name: str) -> Factors:
    """The :class:`Factors` of ``h``, with the re-damping rule.

    Re-damping rule: if a factorisation fails (H not positive definite to working precision
    even after damping), the relative damping is multiplied by 10 and the factorisation retried,
    up to 4 times in all (0.01 -> 0.1 -> 1 -> 10); after that a ValueError names the layer.
    """
    used = float(damping)
    for _ in range(REDAMP_TRIES):
        hd, u, dead, ok = _damped_factor(h, jnp.asarray(used, h.dtype))
        if bool(ok):
            return Factors(hd, u, dead, used)
        used *= REDAMP_FACTOR
    raise ValueError(
        f"{name}: Cholesky factorisation of the damped Hessian failed even with relative damping "
        f"{used / REDAMP_FACTOR:g} (H is not positive semi-definite: check the activations)"
    )


@jax.jit
def reconstruction_error(w0: jax.Array, w: jax.Array, h: jax.Array) -> jax.Array:
    """``tr(ΔW H ΔWᵀ) / tr(W̄ H W̄ᵀ)`` for rows-layout kernels (rows, d_in)."""
    dw = w - w0
    return jnp.sum((dw @ h) * dw) / jnp.sum((w0 @ h) * w0)
