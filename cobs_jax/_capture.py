"""Capture the inputs of a Flax block's linear/conv layers and turn them into layer Hessians.

A *block* is one unit of the sequential layer-wise method (a transformer layer): an
``nnx.Module``, or a linen ``(module, variables)`` pair, called as ``block(x, *args, **kwargs)``.
Its parameters travel as a pure nested dict (``nnx.to_pure_dict`` / the linen variables), so one
jitted program (keyed by the block's static structure) serves every block of the same shape.

Inputs are captured with what Flax provides, without changing the user's model:

* linen: ``flax.linen.intercept_methods`` sees every ``nn.Dense`` / ``nn.Conv`` call;
* nnx: inside the traced function the block is rebuilt by ``nnx.merge`` (a fresh copy), and each
  target ``nnx.Linear`` / ``nnx.Conv`` of that copy is given a recording subclass of its own class
  whose ``__call__`` records the input and then runs the original method. The user's modules are
  never touched.

Only ``XᵀX`` leaves the traced function (the activations do not), so memory is one calibration
chunk's activations plus the block's Hessians. A conv layer's input is turned into
``kh * kw * c_in`` patches in the kernel's ``(kh, kw, c_in)`` order.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

from ._hessian import cross_gram, gram

__all__ = ["BlockAdapter", "run_block"]


def _patches(x, kernel_shape, strides, padding, dilation):
    """(…, kh * kw * c_in) patches of NHWC-like ``x`` in the kernel's (kh, kw, c_in) order.

    ``padding`` is any of Flax's forms: ``"SAME"``/``"VALID"``, ``"CIRCULAR"``/``"REFLECT"``/
    ``"CAUSAL"`` (applied to ``x`` first, as ``nn.Conv`` does), an int, or per-dimension ints or
    ``(low, high)`` pairs.
    """
    spatial = kernel_shape[:-2]
    cin = x.shape[-1]
    nd = len(spatial)
    dilation = dilation or (1,) * nd
    batch = x.shape[: x.ndim - nd - 1]
    x = x.reshape((-1,) + x.shape[len(batch):])
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        if padding == "CAUSAL":
            if nd != 1:
                raise ValueError("'CAUSAL' padding is only defined for 1-d convolutions")
            pads = [(dilation[0] * (spatial[0] - 1), 0)]
        else:
            dilated = [(k - 1) * d + 1 for k, d in zip(spatial, dilation)]
            pads = [((k - 1) // 2, k // 2) for k in dilated]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}[padding]
        x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)], mode=mode)
        padding = "VALID"
    pad = padding if isinstance(padding, str) else canonicalize_padding(padding, nd)
    lhs_spec = (0, nd + 1) + tuple(range(1, nd + 1))
    dn = jax.lax.ConvDimensionNumbers(lhs_spec, (nd + 1, nd) + tuple(range(nd)), lhs_spec)
    p = jax.lax.conv_general_dilated_patches(
        x, spatial, strides or (1,) * nd, pad, rhs_dilation=dilation, dimension_numbers=dn
    )  # features ordered (c_in, *spatial)
    p = p.reshape(p.shape[:-1] + (cin, -1))
    p = jnp.swapaxes(p, -1, -2)
    return p.reshape(p.shape[:-2] + (-1,))


def _tuple(v, nd):
    if v is None:
        return None
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _kernel_size(module) -> tuple:
    k = module.kernel_size
    return (k,) if isinstance(k, int) else tuple(k)  # an int is a 1-d kernel, as in Flax


def _no_hessian(module) -> bool:
    """A grouped or input-dilated conv: its outputs do not share one layer Hessian."""
    if not isinstance(module, (nnx.Conv, nn.Conv)):
        return False
    dil = _tuple(module.input_dilation, len(_kernel_size(module))) or ()
    return module.feature_group_count != 1 or any(d != 1 for d in dil)


def _layer_input(module, x, name: str = ""):
    """The (…, d_in) rows whose Gram matrix is the layer's Hessian."""
    if isinstance(module, (nnx.Conv, nn.Conv)):
        ks = _kernel_size(module)
        nd = len(ks)
        if _no_hessian(module):
            raise ValueError(
                f"conv layer {name!r}: grouped (feature_group_count={module.feature_group_count}) or "
                f"input-dilated (input_dilation={module.input_dilation}) convolutions have no single "
                "layer Hessian; leave it dense with `exclude`"
            )
        shape = ks + (x.shape[-1], 1)
        return _patches(x, shape, _tuple(module.strides, nd), module.padding, _tuple(module.kernel_dilation, nd))
    return x


def _first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


class BlockAdapter:
    """One block as a pure function of its parameters and inputs, with get/set of its kernels.

    ``params`` is an ``nnx.State`` (nnx) or the linen variables dict; neither is ever mutated:
    :meth:`with_kernels` returns a new one.
    """

    static: tuple[str, Any]

    def __init__(self, block: Any):
        if isinstance(block, nnx.Module):
            self.kind = "nnx"
            graphdef, self.params = nnx.split(block)
            self.static = ("nnx", graphdef)
        elif isinstance(block, tuple) and len(block) == 2 and isinstance(block[0], nn.Module):
            self.kind = "linen"
            self.params = block[1]
            self.static = ("linen", block[0])
        else:
            raise ValueError(
                "every block must be an nnx.Module or a linen (module, variables) pair, got "
                f"{type(block).__name__}"
            )

    def _path(self, name: str) -> tuple:
        path = tuple(name.split("/"))
        return (path if self.kind == "nnx" else ("params",) + path) + ("kernel",)

    def _pure(self):
        if self.kind == "nnx":
            return nnx.to_pure_dict(self.params)
        return jax.tree.map(lambda a: a, flax.core.unfreeze(self.params))  # a fresh nested dict

    def kernel(self, name: str) -> jax.Array:
        d = self._pure()
        for k in self._path(name):
            d = d[k]
        return d

    def with_kernels(self, kernels: dict) -> Any:
        """New params with ``{layer name: kernel}`` replaced."""
        pure = self._pure()
        for name, value in kernels.items():
            *head, last = self._path(name)
            d = pure
            for k in head:
                d = d[k]
            d[last] = value
        if self.kind == "nnx":
            state = jax.tree.map(lambda a: a, self.params)
            nnx.replace_by_pure_dict(state, pure)
            return state
        return pure

    def rebuild(self, params) -> Any:
        """The block with ``params``: a new nnx module, or a linen ``(module, variables)`` pair."""
        if self.kind == "nnx":
            return nnx.merge(self.static[1], params)
        return self.static[1], params


def run_block(params, x, args, kwargs, *, static, capture: bool, reference=None, ref_params=None, layers=None,
              ref_outputs: bool = True):
    """The block's outputs, or with ``capture`` only ``{layer name: XᵀX}`` of its Dense/Linear/Conv
    layers: the outputs are not returned then, so XLA drops what only they need (the last
    layer's product and the residual after it; for a transformer block, the MLP's down
    projection: a quarter of the block's flops). ``layers`` (a frozenset of names) limits the
    capture to those layers, and XLA drops the rest of the block after the last of them.

    With ``capture`` and ``reference`` (the dense model's inputs of this block, the same examples
    as ``x``), the block also runs on ``reference`` and each layer gets ``(X̃ᵀX̃, X̃ᵀX)``: X̃ its
    inputs from ``x``, X those from ``reference`` (asymmetric calibration); the result is then
    ``(grams, the block's outputs on reference)`` (``None`` in place of the outputs without
    ``ref_outputs``). ``ref_params`` (default ``params``) are the block's parameters for the run
    on ``reference``: the dense ones when ``params`` are partly pruned.

    ``bool`` and ``str`` leaves of ``args`` / ``kwargs`` (``train=False``, ``mode="eval"``) are
    passed to the block as Python values (static: one compilation per value); the other leaves
    are traced.
    """
    traced, tree, flags = _split_flags(args, kwargs)
    ref_params = params if ref_params is None else ref_params
    return _run_block(params, x, reference, ref_params, traced, static=static, capture=capture, tree=tree, flags=flags,
                      layers=layers, ref_outputs=ref_outputs)


def _split_flags(args, kwargs):
    """The leaves of ``(args, kwargs)`` to trace (``None`` for the flags), their tree, and the
    ``bool`` / ``str`` leaves with their positions (passed as Python values)."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    flags = tuple((i, v) for i, v in enumerate(leaves) if isinstance(v, (bool, str)))
    return [None if isinstance(v, (bool, str)) else v for v in leaves], tree, flags


def _calls(params, inputs, traced, *, static, capture: bool, tree, flags):
    """Run the block on ``inputs``: ``(outputs, {layer name: [(module, input), ...]})``, the layers
    in the order they are first called (recorded only with ``capture``)."""
    leaves = list(traced)
    for i, v in flags:
        leaves[i] = v
    args, kwargs = jax.tree.unflatten(tree, leaves)
    kind, obj = static
    calls: dict[str, list] = {}

    def record(name, module, inp):
        calls.setdefault(name, []).append((module, inp))

    if kind == "nnx":
        block = nnx.merge(obj, params)
        if capture:
            for path, mod in nnx.iter_modules(block):
                if isinstance(mod, (nnx.Linear, nnx.Conv)) and path:
                    _record_calls(mod, "/".join(str(p) for p in path), record)
        return _first(block(inputs, *args, **kwargs)), calls

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if capture and context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
            record("/".join(mod.path), mod, a[0])
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        return _first(obj.apply(params, inputs, *args, **kwargs)), calls


def layer_groups(params, x, args, kwargs, *, static) -> list[list[str]]:
    """The block's Dense/Linear/Conv layers grouped by the input they read, in call order (for a
    Llama block: q/k/v, o, gate/up, down): the stages of a true-sequential pass. Traced
    abstractly on one example (no computation)."""
    traced, tree, flags = _split_flags(args, kwargs)
    groups: dict[int, list[str]] = {}

    def trace(params, x, traced):
        _, calls = _calls(params, x, traced, static=static, capture=True, tree=tree, flags=flags)
        for name, seen in calls.items():  # the inputs stay referenced in `calls`: their ids are unique
            groups.setdefault(id(seen[0][1]), []).append(name)
        return 0

    jax.eval_shape(trace, params, x[:1], traced)
    return list(groups.values())


@partial(jax.jit, static_argnames=("static", "capture", "tree", "flags", "layers", "ref_outputs"))
def _run_block(params, x, reference, ref_params, traced, *, static, capture: bool, tree, flags, layers, ref_outputs):
    run = partial(_calls, traced=traced, static=static, capture=capture, tree=tree, flags=flags)
    y, calls = run(params, x)
    if not capture:
        return y
    y_ref, ref_calls = (None, {}) if reference is None else run(ref_params, reference)
    rows: dict[tuple, jax.Array] = {}  # Dense/Linear layers fed the same input (q/k/v) share one XᵀX
    grams: dict[str, Any] = {}
    for name, seen in calls.items():
        if layers is not None and name not in layers:
            continue
        if _no_hessian(seen[0][0]):
            grams[name] = None  # refused by the driver unless the layer is excluded
            continue
        for j, (module, inp) in enumerate(seen):
            conv = isinstance(module, (nnx.Conv, nn.Conv))
            a = _layer_input(module, inp, name) if conv else inp
            key = ("gram", id(inp)) if not conv else ("gram", name, j)
            if key not in rows:  # the inputs stay referenced in `calls`, so their ids stay unique
                rows[key] = gram(a)
            g: Any = rows[key]
            if reference is not None:
                ref_module, ref_inp = ref_calls[name][j]
                b = _layer_input(ref_module, ref_inp, name) if conv else ref_inp
                ckey = ("cross", id(inp), id(ref_inp)) if not conv else ("cross", name, j)
                if ckey not in rows:
                    rows[ckey] = cross_gram(a, b)
                g = (g, rows[ckey])
            grams[name] = jax.tree.map(jnp.add, grams[name], g) if name in grams else g
    return grams if reference is None else (grams, y_ref if ref_outputs else None)


def _record_calls(mod, name, record):
    """Give this (traced, fresh) module a subclass of its class whose call records its input."""
    base = type(mod)

    def __call__(self, x, *a, **kw):
        record(name, self, x)
        return base.__call__(self, x, *a, **kw)

    object.__setattr__(mod, "__class__", type(f"Capturing{base.__name__}", (base,), {"__call__": __call__}))
