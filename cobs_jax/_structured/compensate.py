"""The group objective of structured pruning and its exact compensation.

A consumer layer (rows layout ``W``: one row per output unit, ``d`` input columns) loses a set P
of input columns, the union of whole *groups* (a head's ``head_dim`` columns of the output
projection, one MLP channel of the down projection, a conv input channel's ``kh * kw`` columns).
Its kept columns K are re-solved to keep the outputs on the calibration data:

    W'_K = W H_{:,K} (H_KK)⁻¹,    E(P) = tr((W' − W) H (W' − W)ᵀ) = tr(W_P (G_PP)⁻¹ W_Pᵀ),  G = H⁻¹,

with H the damped ``XᵀX`` (structured.md §1.1: group OBS and least squares are the same thing,
and the result depends only on P). With an intercept the bias is re-solved too, which replaces
H by the centred scatter ``C = H − N μ μᵀ`` and moves ``W μ − W'_K μ_K`` into the bias
(structured.md §1.2; FLAP's bias compensation is the special case ``W'_K = W_K``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Calibration", "check_groups", "damped", "compensate", "group_error", "head_groups"]


class Calibration(NamedTuple):
    """What the capture gives for a consumer layer: ``H = Σ x xᵀ`` over the ``num_inputs`` calibration
    inputs and, for the intercept, their sum ``Σ x`` (``None`` without)."""

    h: jax.Array
    total: Optional[jax.Array] = None
    num_inputs: int = 0


def check_groups(groups, d: int, name: str = "layer") -> np.ndarray:
    """``groups`` as an ``(n_groups, size)`` int array of input columns, validated: every column
    in ``[0, d)``, no column in two groups, at least two groups."""
    g = np.asarray(groups)
    if g.ndim != 2 or g.shape[1] < 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name}: `groups` must be an (n_groups, size) int array of input columns, got "
                         f"{g.dtype}{g.shape}")
    if g.shape[0] < 2:
        raise ValueError(f"{name}: `groups` must hold at least two groups, got {g.shape[0]}")
    if g.min() < 0 or g.max() >= d:
        raise ValueError(f"{name}: `groups` name input columns outside [0, {d}): {g.min()}..{g.max()}")
    if len(np.unique(g)) != g.size:
        raise ValueError(f"{name}: `groups` overlap: an input column belongs to two groups")
    return g.astype(np.int32)


def damped(cal: Calibration, rel_damping: float, intercept: bool) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(H_λ, μ)``: the (centred, with ``intercept``) scatter with dead inputs given a unit
    diagonal and ``rel_damping * mean(diag)`` added, and the mean input (or ``None``)."""
    h = cal.h
    mu = None
    if intercept:
        if cal.total is None or cal.num_inputs < 2:
            raise ValueError("an intercept needs the inputs' sum and a count of at least 2 (`Calibration.total`)")
        mu = cal.total / cal.num_inputs
        h = h - cal.num_inputs * jnp.outer(mu, mu)
    diag = jnp.diagonal(h)
    h = h + jnp.diag((diag <= 0).astype(h.dtype))
    return h + rel_damping * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype), mu


@jax.jit
def compensate(w: jax.Array, h: jax.Array, removed: jax.Array, mu: Optional[jax.Array] = None):
    """``(W', bias_delta)``: the kept columns of ``w`` (rows, d) re-solved on the damped ``h`` for
    the removed columns ``removed`` (bool (d,)); removed columns exactly 0. ``bias_delta`` is
    ``W μ − W' μ`` with an intercept (``mu`` given), else zeros. Solved in the full size with the
    removed rows/columns of ``h`` replaced by the identity (static shapes: one program per layer)."""
    keep = ~removed
    hk = jnp.where(keep[:, None] & keep[None, :], h, jnp.eye(h.shape[0], dtype=h.dtype))
    rhs = jnp.where(keep[:, None], h, 0.0) @ w.T  # (H_{K,:} W̄ᵀ), zero on P
    c, low = jax.scipy.linalg.cho_factor(hk, lower=True)
    new = jnp.where(keep[None, :], jax.scipy.linalg.cho_solve((c, low), rhs).T, 0.0)
    delta = jnp.zeros(w.shape[0], w.dtype) if mu is None else w @ mu - new @ mu
    return new, delta


@jax.jit
def group_error(w: jax.Array, new: jax.Array, h: jax.Array) -> jax.Array:
    """``tr((W' − W) H (W' − W)ᵀ)``."""
    dw = new - w
    return jnp.sum((dw @ h) * dw)


def head_groups(num_heads: int, head_dim: int, *, num_kv_heads: Optional[int] = None, unit: str = "head") -> np.ndarray:
    """Groups of an attention output projection's input columns, laid out head-major
    (column ``h * head_dim + i``, as Flax's ``(num_heads, head_dim, d)`` / Llama's
    ``o_proj`` kernels flatten).

    Args:
      num_heads: query heads.
      head_dim: columns per head.
      num_kv_heads: key/value heads (grouped-query attention); default ``num_heads``.
      unit: ``"head"``: one group per query head (``head_dim`` columns); ``"kv"``: one group
        per KV head with its ``num_heads // num_kv_heads`` query heads, removed together with
        its k/v rows (structured.md §2.2).

    Returns:
      An ``(n_groups, size)`` int array for :func:`prune_groups`.
    """
    for what, v in (("num_heads", num_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{what}` must be a positive int, got {v!r}")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(kv, bool) or not isinstance(kv, (int, np.integer)) or kv < 1 or num_heads % kv:
        raise ValueError(f"`num_kv_heads` must divide `num_heads` ({num_heads}), got {num_kv_heads!r}")
    if unit not in ("head", "kv"):
        raise ValueError(f"`unit` must be 'head' or 'kv', got {unit!r}")
    size = head_dim if unit == "head" else head_dim * (num_heads // kv)
    return np.arange(num_heads * head_dim, dtype=np.int32).reshape(-1, size)
