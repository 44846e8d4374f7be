"""Capture the inputs of a Flax block's linear/conv layers and turn them into layer Hessians.

A *block* is one unit of the sequential layer-wise method (a transformer layer): an
``nnx.Module``, or a linen ``(module, variables)`` pair, called as ``block(x, *args, **kwargs)``.
Its parameters travel as a pure nested dict (``nnx.to_pure_dict`` / the linen variables), so one
jitted program (keyed by the block's static structure) serves every block of the same shape.

Inputs are captured with what Flax provides, without changing the user's model:

* linen: ``flax.linen.intercept_methods`` sees every call of a kernel module;
* nnx: inside the traced function the block is rebuilt by ``nnx.merge`` (a fresh copy), and each
  kernel module of that copy is given a recording subclass of its own class whose ``__call__``
  records the input and then runs the original method. The user's modules are never touched.

A kernel module is a conv layer or any class registered in ``cobs_jax._kernels`` (Dense,
DenseGeneral, Einsum, the attention projections, and the user's own through
:func:`cobs_jax.register_kernel`); its call is read as an einsum and its layer inputs are the
input's contraction axes, flattened. A layer is named by its kernel's path in the block
(``"mlp/up_proj"``, ``"attn/q_einsum/w"``; a trailing ``kernel`` is dropped).

Only ``XᵀX`` leaves the traced function (the activations do not), so memory is one calibration
chunk's activations plus the block's Hessians. A conv layer's input is turned into
``kh * kw * c_in`` patches in the kernel's ``(kh, kw, c_in)`` order.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Hashable, Mapping, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

from .hessian import accumulate_dtype, cross_gram, gram
from .kernels import einsum_rows, is_registered, kernel_call

__all__ = ["BlockAdapter", "LayerSpec", "block_layers", "run_block"]


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


def layer_name(path: tuple) -> str:
    """A layer's name: its kernel's path in the block, without a trailing ``kernel``."""
    path = tuple(str(p) for p in path)
    return "/".join(path[:-1] if len(path) > 1 and path[-1] == "kernel" else path)


class LayerSpec(NamedTuple):
    """A kernel a block's call uses, found by tracing it (:func:`block_layers`).

    Attributes:
      name: the layer's name (its kernel's path in the block, a trailing ``kernel`` dropped).
      path: the kernel's path in the block's pure params (linen: under ``"params"``).
      in_axes: the kernel's contraction (input) axes.
      group: layers with one group index read the same inputs (q/k/v; gate/up); groups are
        numbered in call order.
      error: why the layer cannot be pruned layer-wise (a grouped conv, a batched kernel), or None.
    """

    name: str
    path: tuple
    in_axes: tuple
    group: int
    error: Optional[str] = None


class _Call(NamedTuple):
    path: tuple
    rows: Any  # (n, d_in) layer inputs, or None with `error`
    in_axes: tuple
    key: Hashable
    error: Optional[str]
    source: Any = None  # the input array whose id is in `key` (kept alive so that the id stays unique)


class BlockAdapter:
    """One block as a pure function of its parameters and inputs, with get/set of its kernels.

    ``params`` is an ``nnx.State`` (nnx) or the linen variables dict; neither is ever mutated:
    :meth:`with_kernels` returns a new one.
    """

    static: tuple[str, Any]
    params: Any

    def __init__(self, block: Any, where: str = "block"):
        if isinstance(block, nnx.Module):
            self.kind = "nnx"
            graphdef, self.params = nnx.split(block)
            self.static = ("nnx", graphdef)
        elif isinstance(block, tuple) and len(block) == 2 and isinstance(block[0], nn.Module):
            self.kind = "linen"
            if not isinstance(block[1], Mapping) or "params" not in block[1]:
                raise ValueError(f"{where}: a linen block is a (module, variables) pair whose variables hold a "
                                 f"'params' collection, got variables {_describe(block[1])}")
            self.params = block[1]
            self.static = ("linen", block[0])
        else:
            raise ValueError(
                f"{where}: every block must be an nnx.Module or a linen (module, variables) pair, got "
                f"{type(block).__name__}"
            )

    def pure(self) -> dict:
        """The params as a fresh nested dict (nnx: ``nnx.to_pure_dict``; linen: the variables)."""
        if self.kind == "nnx":
            return nnx.to_pure_dict(self.params)
        return jax.tree.map(lambda a: a, flax.core.unfreeze(self.params))  # a fresh nested dict

    def _path(self, name: str, pure: dict) -> tuple:
        """The path of layer ``name``'s kernel in ``pure`` (the name plus ``kernel`` if that is
        where the kernel sits)."""
        path = tuple(name.split("/")) if self.kind == "nnx" else ("params",) + tuple(name.split("/"))
        d = pure
        for k in path:
            d = d[k]
        return path + ("kernel",) if isinstance(d, Mapping) else path

    def kernel(self, name: str) -> jax.Array:
        pure = self.pure()
        d: Any = pure
        for k in self._path(name, pure):
            d = d[k]
        return d

    def weights(self) -> dict[str, jax.Array]:
        """``{name: leaf}`` of the block's parameters with ``ndim >= 2`` (nnx: ``nnx.Param``
        variables; linen: the ``params`` collection), named like layers."""
        if self.kind == "nnx":
            flat = [(p, v[...]) for p, v in nnx.to_flat_state(self.params) if isinstance(v, nnx.Param)]
        else:
            flat = [(p[1:], v) for p, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(self.params)).items()
                    if p[0] == "params"]
        return {layer_name(p): v for p, v in flat if jnp.ndim(v) >= 2}

    def _put(self, pure: dict, values: Mapping[str, Any]) -> dict:
        """``pure`` (a nested dict, changed in place and returned) with ``{layer name: value}`` at
        each layer's kernel."""
        for name, value in values.items():
            d, key = self.layer_dict(pure, name)
            d[key] = value
        return pure

    def layer_dict(self, pure: dict, name: str) -> tuple[dict, str]:
        """The dict of ``pure`` that holds layer ``name``'s kernel (and its ``bias``, if any),
        and the kernel's key in it."""
        *head, key = self._path(name, pure)
        d = pure
        for k in head:
            d = d[k]
        return d, key

    def with_kernels(self, kernels: dict) -> Any:
        """New params with ``{layer name: kernel}`` replaced."""
        return self.from_pure(self._put(self.pure(), kernels))

    def from_pure(self, pure: dict) -> Any:
        """New params from a nested dict shaped like :meth:`pure`'s."""
        if self.kind == "nnx":
            state = jax.tree.map(lambda a: a, self.params)
            nnx.replace_by_pure_dict(state, pure)
            return state
        return pure

    def param_masks(self, masks: Mapping[str, jax.Array]) -> Any:
        """Keep-masks shaped like the block's parameters (nnx: ``nnx.state(block, nnx.Param)``;
        linen: ``variables["params"]``): ``masks[layer]`` at each layer's kernel, True elsewhere."""
        ones = lambda tree: jax.tree.map(lambda a: jnp.ones(jnp.shape(a), bool), tree)  # noqa: E731
        if self.kind == "nnx":
            tree = ones(nnx.filter_state(self.params, nnx.Param))
            pure = nnx.to_pure_dict(tree)
        else:
            pure = {"params": ones(flax.core.unfreeze(self.params["params"]))}
        pure = self._put(pure, masks)
        if self.kind == "nnx":
            nnx.replace_by_pure_dict(tree, pure)
            return tree
        return pure["params"]

    def rebuild(self, params) -> Any:
        """The block with ``params``: a new nnx module, or a linen ``(module, variables)`` pair."""
        if self.kind == "nnx":
            return nnx.merge(self.static[1], params)
        return self.static[1], params


def _describe(v) -> str:
    return f"with keys {sorted(v)}" if isinstance(v, Mapping) else f"of type {type(v).__name__}"


def run_block(params, x, args, kwargs, *, static, capture: bool, reference=None, ref_params=None, layers=None,
              ref_outputs: bool = True):
    """The block's outputs, or with ``capture`` only ``{layer name: XᵀX}`` of its kernel layers
    (``None`` for a layer without a layer Hessian, see :class:`LayerSpec`): the outputs are not
    returned then, so XLA drops what only they need (the last layer's product and the residual
    after it; for a transformer block, the MLP's down projection: a quarter of the block's
    flops). ``layers`` (a frozenset of names) limits the capture to those layers, and XLA drops
    the rest of the block after the last of them.

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


def _read(module, path: tuple, kernel, a: tuple, kw: dict, j: int) -> _Call:
    """How call ``j`` of kernel module ``module`` (kernel at ``path``) reads its inputs."""
    name = layer_name(path)
    where = f"layer {name!r}"
    if isinstance(module, (nnx.Conv, nn.Conv)):
        if _no_hessian(module):
            return _Call(path, None, (), ("conv", name, j),
                         f"a grouped (feature_group_count={module.feature_group_count}) or input-dilated "
                         f"(input_dilation={module.input_dilation}) convolution has no single layer Hessian")
        return _Call(path, _layer_input(module, a[0], name), tuple(range(kernel.ndim - 1)), ("conv", name, j), None)
    call = kernel_call(module, a, kw)
    assert call is not None
    try:
        rows, in_axes, key = einsum_rows(call.equation, call.x, kernel.ndim, where)
    except ValueError as e:
        return _Call(path, None, (), ("bad", name, j), str(e).removeprefix(where + ": "))
    return _Call(path, rows, in_axes, (id(call.x), key), None, call.x)


def _is_kernel_module(mod) -> bool:
    return isinstance(mod, (nnx.Conv, nn.Conv)) or is_registered(mod)


def _calls(params, inputs, traced, *, static, capture: bool, tree, flags):
    """Run the block on ``inputs``: ``(outputs, {layer name: [_Call, ...]})``, the layers in the
    order they are first called (recorded only with ``capture``)."""
    leaves = list(traced)
    for i, v in flags:
        leaves[i] = v
    args, kwargs = jax.tree.unflatten(tree, leaves)
    kind, obj = static
    calls: dict[str, list] = {}

    def record(path, module, kernel, a, kw):
        seen = calls.setdefault(layer_name(path), [])
        seen.append(_read(module, path, kernel, a, kw, len(seen)))

    if kind == "nnx":
        block = nnx.merge(obj, params)
        if capture:
            for path, mod in nnx.iter_modules(block):
                if path and _is_kernel_module(mod):
                    _record_calls(mod, tuple(str(p) for p in path), record)
        return _first(block(inputs, *args, **kwargs)), calls

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if capture and context.method_name == "__call__" and _is_kernel_module(mod):
            param = "kernel" if isinstance(mod, (nn.Conv, nnx.Conv)) else kernel_call(mod, a, kw).param
            path = tuple(mod.scope.path) + (param,)
            d = params["params"]
            for k in path:
                if not isinstance(d, Mapping) or k not in d:
                    raise ValueError(f"layer {layer_name(path)!r}: its kernel {param!r} is not in the block's "
                                     "'params' at that path")
                d = d[k]
            record(path, mod, d, a, kw)
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        return _first(obj.apply(params, inputs, *args, **kwargs)), calls


_LAYERS: dict = {}


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(v), jnp.result_type(v)) if v is not None else None for v in leaves)


def block_layers(adapter: BlockAdapter, x, args, kwargs) -> tuple[list[LayerSpec], Any]:
    """The kernel layers a block's call uses, in call order, and the abstract outputs, traced
    abstractly on ``x`` (one example, or its ``jax.ShapeDtypeStruct``; no computation; cached per
    block structure and input shape)."""
    traced, tree, flags = _split_flags(args, kwargs)
    key = (adapter.static, tree, flags, _signature(adapter.params), _signature(x), _signature(traced))
    if key not in _LAYERS:
        specs: list[LayerSpec] = []

        def trace(params, x, traced):
            y, calls = _calls(params, x, traced, static=adapter.static, capture=True, tree=tree, flags=flags)
            groups: dict = {}
            for name, seen in calls.items():
                c = seen[0]
                err = next((s.error for s in seen if s.error), None)
                if err is None and any(s.in_axes != c.in_axes for s in seen):
                    err = "it is called with different contractions"
                specs.append(LayerSpec(name, c.path, c.in_axes, groups.setdefault(c.key, len(groups)), err))
            return y

        out = jax.eval_shape(trace, adapter.params, x, traced)
        if len(_LAYERS) > 256:
            _LAYERS.clear()
        _LAYERS[key] = (specs, out)
    return _LAYERS[key]


@partial(jax.jit, static_argnames=("static", "capture", "tree", "flags", "layers", "ref_outputs"))
def _run_block(params, x, reference, ref_params, traced, *, static, capture: bool, tree, flags, layers, ref_outputs):
    run = partial(_calls, traced=traced, static=static, capture=capture, tree=tree, flags=flags)
    y, calls = run(params, x)
    if not capture:
        return y
    y_ref, ref_calls = (None, {}) if reference is None else run(ref_params, reference)
    rows: dict[tuple, jax.Array] = {}  # layers fed the same inputs (q/k/v) share one XᵀX
    grams: dict[str, Any] = {}
    for name, seen in calls.items():
        if layers is not None and name not in layers:
            continue
        if any(c.error for c in seen):
            grams[name] = None  # refused by the driver unless the layer is excluded
            continue
        for j, c in enumerate(seen):
            if ("gram", c.key) not in rows:
                rows["gram", c.key] = gram(c.rows)
            g: Any = rows["gram", c.key]
            if reference is not None:
                r = ref_calls[name][j]
                if ("cross", c.key, r.key) not in rows:
                    rows["cross", c.key, r.key] = cross_gram(c.rows, r.rows)
                g = (g, rows["cross", c.key, r.key])
            grams[name] = jax.tree.map(jnp.add, grams[name], g) if name in grams else g
    return grams if reference is None else (grams, y_ref if ref_outputs else None)


def input_stats(adapter: BlockAdapter, x, args, kwargs, layers: frozenset, chunk_size: int) -> dict:
    """``{layer name: (XᵀX, Σ x, n)}`` of the inputs of ``layers`` over all examples of ``x``
    (chunked; what structured pruning's intercept needs besides the Hessian). Raises for a
    layer the block does not call or one without a layer Hessian."""
    traced, tree, flags = _split_flags(args, kwargs)
    total: dict = {}
    for s in range(0, x.shape[0], chunk_size):
        out = _input_stats(adapter.params, x[s : s + chunk_size], traced, static=adapter.static, tree=tree,
                           flags=flags, layers=layers)
        total = out if not total else jax.tree.map(jnp.add, total, out)
    return {k: (h, t, int(n)) for k, (h, t, n) in jax.block_until_ready(total).items()}


@partial(jax.jit, static_argnames=("static", "tree", "flags", "layers"))
def _input_stats(params, x, traced, *, static, tree, flags, layers):
    _, calls = _calls(params, x, traced, static=static, capture=True, tree=tree, flags=flags)
    out = {}
    for name in sorted(layers):
        if name not in calls:
            raise ValueError(f"layer {name!r} is not called by the block (it calls {sorted(calls)})")
        c = calls[name][0]
        if c.error:
            raise ValueError(f"layer {name!r}: {c.error}")
        rows = c.rows.reshape(-1, c.rows.shape[-1]).astype(accumulate_dtype())
        out[name] = (gram(rows), jnp.sum(rows, axis=0), jnp.int32(rows.shape[0]))
    return out


def _record_calls(mod, path: tuple, record):
    """Give this (traced, fresh) module a subclass of its class whose call records its input."""
    base = type(mod)
    conv = isinstance(mod, nnx.Conv)

    def __call__(self, *a, **kw):
        param = "kernel" if conv else kernel_call(self, a, kw).param
        record(path + (param,), self, getattr(self, param)[...], a, kw)
        return base.__call__(self, *a, **kw)

    object.__setattr__(mod, "__class__", type(f"Capturing{base.__name__}", (base,), {"__call__": __call__}))
