"""Which Flax modules hold a prunable kernel, and how a call of one reads as ``x @ W``.

Every linear map is read as an einsum ``"<x axes>,<kernel axes>-><output axes>"`` with the kernel
the second operand. The layer objective lives on the kernel's *contraction* axes (those shared by
``x`` and the kernel and absent from the output), flattened in the kernel's axis order: the layer's
inputs are ``x`` with those axes moved last and flattened, one row per position of every other
axis of ``x``, and its Hessian is their ``XᵀX``.

Built in: ``nn.Dense`` / ``nnx.Linear``, ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` (so the four
projections of ``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``), ``nn.Einsum`` /
``nnx.Einsum`` (conv layers are read by the capture code). A user's own kernel module is added in
one line with :func:`register_kernel`.
"""

from __future__ import annotations

import math
import string
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["register_kernel", "KernelCall", "kernel_call", "is_registered", "einsum_rows", "as_rows", "from_rows"]


class KernelCall(NamedTuple):
    """One call of a kernel module: its kernel's parameter name, the input and the einsum that
    the call computes (``"<x>,<kernel>-><out>"``, ``...`` allowed on ``x`` and the output)."""

    param: str
    x: jax.Array
    equation: str


Reader = Callable[..., tuple[str, jax.Array]]
_REGISTRY: dict[type, tuple[Reader, Union[str, Callable[[Any], str]]]] = {}


def register_kernel(module_type: type, read: Reader, *, param: Union[str, Callable[[Any], str]] = "kernel") -> None:
    """Make layer-wise pruning capture and prune the kernels of ``module_type`` (linen or nnx).

    Args:
      module_type: the module class (subclasses included).
      read: ``read(module, *args, **kwargs) -> (equation, x)`` for a call ``module(*args,
        **kwargs)``: the einsum the call computes with the kernel as the *second* operand and the
        input ``x`` it contracts (``"BTD,NDH->BTNH"``; ``...`` allowed on the input and output).
      param: the kernel's parameter (attribute) name in the module, or ``callable(module) ->
        name``.

    Example: Google's ``gemma`` library, whose projections are ``Einsum`` modules holding a
    parameter named by ``weight_name`` and called as ``einsum(eqn, x)``::

        cobs_jax.register_kernel(Einsum, lambda m, eqn, x, **kw: (eqn, x), param=lambda m: m.weight_name)
    """
    if not isinstance(module_type, type):
        raise ValueError(f"`module_type` must be a class, got {module_type!r}")
    if not callable(read):
        raise ValueError(f"`read` must be callable(module, *args, **kwargs) -> (equation, x), got {read!r}")
    if not (isinstance(param, str) or callable(param)):
        raise ValueError(f"`param` must be a str or callable(module) -> str, got {param!r}")
    _REGISTRY[module_type] = (read, param)


def _letters(n: int) -> str:
    return string.ascii_letters[:n]


def _dense(m, x, *a, **kw):
    xs = _letters(x.ndim)
    return f"{xs},{xs[-1]}Z->{xs[:-1]}Z", x


def _general(axis, n_out: int, batch, x, name: str):
    if batch:
        raise ValueError(f"{name}: a general linear layer with batch axes ({batch}) holds one kernel per batch "
                         "index and has no single layer Hessian; leave it dense with `exclude`")
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    axis = tuple(sorted(a % x.ndim for a in axis))  # Flax contracts the kernel's axes with the sorted ones
    xs = _letters(x.ndim)
    feats = string.ascii_uppercase[:n_out]
    out = "".join(c for i, c in enumerate(xs) if i not in axis) + feats
    return f"{xs},{''.join(xs[a] for a in axis)}{feats}->{out}"


def _dense_general(m, x, *a, **kw):
    feats = (m.features,) if isinstance(m.features, int) else tuple(m.features)
    batch = (m.batch_dims,) if isinstance(m.batch_dims, int) else tuple(m.batch_dims)
    return _general(m.axis, len(feats), batch, x, type(m).__name__), x


def _linear_general(m, x, *a, **kw):
    return _general(m.axis, len(m.out_features), tuple(m.batch_axis), x, type(m).__name__), x


def _einsum(m, x, einsum_str=None, *a, **kw):
    return einsum_str or m.einsum_str, x


for _t, _r in ((nn.Dense, _dense), (nnx.Linear, _dense), (nn.DenseGeneral, _dense_general),
               (nnx.LinearGeneral, _linear_general), (nn.Einsum, _einsum), (nnx.Einsum, _einsum)):
    register_kernel(_t, _r)


def is_registered(module) -> bool:
    """Whether ``module``'s class (or a base class) is registered."""
    return any(cls in _REGISTRY for cls in type(module).__mro__)


def kernel_call(module, args: tuple, kwargs: dict) -> Optional[KernelCall]:
    """The :class:`KernelCall` of ``module(*args, **kwargs)``, or None for a module that holds no
    registered kernel (the most derived registered class wins)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            read, param = _REGISTRY[cls]
            eq, x = read(module, *args, **kwargs)
            return KernelCall(param if isinstance(param, str) else param(module), x, eq)
    return None


def einsum_rows(equation: str, x: jax.Array, kernel_ndim: int, name: str) -> tuple[jax.Array, tuple[int, ...], str]:
    """``(rows, in_axes, key)`` of a kernel call ``einsum(equation, x, kernel)``.

    ``rows`` is ``(n, prod C)``: ``x`` with the contraction axes C moved last in the kernel's
    order and flattened (axes of ``x`` that neither the kernel nor the output has are summed, as
    the einsum sums them); ``in_axes`` are C's positions in the kernel; ``key`` names the
    transformation (calls with the same ``x`` and key share one ``XᵀX``).
    """
    eq = equation.replace(" ", "")
    if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
        raise ValueError(f"{name}: einsum {equation!r} must read '<input>,<kernel>-><output>'")
    lhs, out = eq.split("->")
    xs, ks = lhs.split(",")
    if "." in ks:
        raise ValueError(f"{name}: einsum {equation!r}: '...' is supported on the input, not on the kernel")
    if "..." in xs:
        free = [c for c in string.ascii_letters if c not in eq][: x.ndim - (len(xs) - 3)]
        xs, out = xs.replace("...", "".join(free)), out.replace("...", "".join(free))
    if len(xs) != x.ndim or len(ks) != kernel_ndim:
        raise ValueError(f"{name}: einsum {equation!r} does not fit an input of shape {x.shape} and a "
                         f"{kernel_ndim}-d kernel")
    if len(set(xs)) != len(xs) or len(set(ks)) != len(ks):
        raise ValueError(f"{name}: einsum {equation!r} repeats an axis of an operand (a trace or diagonal)")
    shared = [c for c in ks if c in xs and c in out]
    if shared:
        raise ValueError(f"{name}: einsum {equation!r}: kernel axes {shared} are batch axes (in the input and the "
                         "output), so each of their indices has its own layer Hessian; leave it dense with `exclude`")
    in_axes = tuple(i for i, c in enumerate(ks) if c in xs)
    if not in_axes or len(in_axes) == kernel_ndim:
        raise ValueError(f"{name}: einsum {equation!r} must contract some but not all kernel axes with the input")
    con = "".join(ks[i] for i in in_axes)
    rest = "".join(c for c in xs if c not in ks and c in out)
    spec = f"{xs}->{rest}{con}"
    canon = dict(zip(xs, string.ascii_letters))
    key = "".join(canon.get(c, c) for c in spec)
    rows = x if rest + con == xs else jnp.einsum(spec, x)
    return rows.reshape(-1, math.prod(x.shape[xs.index(c)] for c in con)), in_axes, key


def as_rows(kernel: jax.Array, in_axes: Sequence[int]) -> tuple[jax.Array, tuple]:
    """(rows = output units, d_in) view of a kernel whose contraction axes are ``in_axes``."""
    out_axes = [a for a in range(kernel.ndim) if a not in in_axes]
    perm = tuple(in_axes) + tuple(out_axes)
    moved = jnp.transpose(kernel, perm)
    d_in = math.prod(kernel.shape[a] for a in in_axes)
    return moved.reshape(d_in, -1).T, (perm, moved.shape)


def from_rows(rows: jax.Array, layout: tuple) -> jax.Array:
    perm, moved_shape = layout
    return jnp.transpose(rows.T.reshape(moved_shape), tuple(int(a) for a in np.argsort(perm)))
