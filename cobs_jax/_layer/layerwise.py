"""Layer-wise pruning of a Flax model, block after block, as SparseGPT and Wanda do it.

For block i (a transformer layer) with calibration inputs X_i (the outputs of the already
pruned blocks 0..i-1):

1. one forward pass of the dense block over X_i (in chunks of ``chunk_size`` examples) captures
   the input of every Dense/Linear/Conv layer and sums its ``XᵀX`` (nothing else is kept);
2. every selected kernel is pruned by :func:`cobs_jax.prune_layer` from its Hessian;
3. a second forward pass of the *pruned* block gives X_{i+1}.

With ``true_sequential`` steps 1-2 run once per group of layers reading one input (q/k/v, o,
gate/up, down), each capture after the groups before it are pruned.

Memory is one block's Hessians plus the calibration hidden states, whatever the depth. The
model's embeddings and head are outside the blocks and stay dense, as in the papers.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._core.budget import check_sparsity, parse_pattern
from .._core.deprecation import reject_unknown, take_renamed
from .._core.exclude import Exclude, Excluder
from .._core.keys import as_key
from .._core.progress import progress as show
from .base import LayerPruner, LayerUpdate
from .capture import BlockAdapter, LayerSpec, block_layers, run_block
from .hessian import Factors, accumulate_dtype, factor_hessian
from .kernels import as_rows, from_rows
from .layer import LayerResult, check_finite, check_rel_damping, solve_layer, uses_factors
from .registry import as_pruner, as_update, from_flat_options
from .stacked import Stacked

__all__ = ["prune_layerwise", "LayerwiseResult"]


class LayerRecord(NamedTuple):
    """One pruned layer of :func:`prune_layerwise`: its block index, name (its kernel's path in the
    block, e.g. ``"mlp/up_proj"``), kernel shape, relative reconstruction error, sparsity, the
    relative damping used, seconds, and the method's own ``stats`` (``CBS``: ``{"swaps": n}``)."""

    block: int
    layer: str
    shape: tuple[int, ...]
    error: float
    sparsity: float
    rel_damping: float
    seconds: float
    stats: dict[str, Any]


class LayerwiseResult(NamedTuple):
    """What :func:`prune_layerwise` returns.

    Attributes:
      blocks: the pruned blocks, of the kind given (new nnx modules, or linen
        ``(module, variables)`` pairs, or a :class:`cobs_jax.Stacked`); the inputs are untouched.
      masks: per block, keep-masks (True = kept) shaped like the block's parameters (nnx:
        ``nnx.state(block, nnx.Param)``; linen: ``variables["params"]``), True on everything not
        pruned: :func:`cobs_jax.keep_sparsity`, :func:`cobs_jax.sparsity_of`,
        :func:`cobs_jax.save` and :func:`cobs_jax.to_sparse` take them with the block's
        parameters. A list, or for a :class:`cobs_jax.Stacked` one tree shaped like the stack's.
      layer_masks: the same masks by layer name, per block: ``layer_masks[i]["mlp/up_proj"]`` is
        the kernel's keep-mask in the kernel's layout.
      outputs: the pruned model's hidden states after the last block, on the calibration inputs.
      layers: one :class:`LayerRecord` per pruned layer, in order.
      sparsity: the fraction of zeros in the pruned kernels the result holds.
      timings: seconds spent capturing (dense forward + Hessians), pruning, in the pruned forward,
        and in total.
      excluded: the kernel layers left dense by ``exclude``.
      stats: the method's own extras summed over layers (``CBS``: ``{"swaps": n}``).
    """

    blocks: Any
    masks: Any
    layer_masks: list[dict[str, jax.Array]]
    outputs: jax.Array
    layers: tuple[LayerRecord, ...]
    sparsity: float
    timings: dict[str, float]
    excluded: tuple[str, ...]
    stats: dict[str, Any]

    @property
    def info(self) -> dict:
        """Deprecated: version 0.1's dict of ``layers`` (as dicts), ``sparsity``, ``excluded``, ``timings``."""
        warnings.warn("`LayerwiseResult.info` is deprecated: use its fields (.layers, .sparsity, .timings, "
                      ".excluded, .stats)", DeprecationWarning, stacklevel=2)
        layers = [dict(block=r.block, layer=r.layer, shape=r.shape, error=r.error, damping=r.rel_damping,
                       sparsity=r.sparsity, seconds=r.seconds, swaps=r.stats.get("swaps")) for r in self.layers]
        return dict(layers=layers, sparsity=self.sparsity, excluded=list(self.excluded), timings=dict(self.timings))


def _per_block_sparsity(sparsity, n_blocks: int) -> list:
    """``sparsity`` as one entry per block (float, ``{layer: float}`` or None), validated."""
    if sparsity is None:
        return [None] * n_blocks
    if isinstance(sparsity, (int, float)):
        return [check_sparsity(sparsity)] * n_blocks
    if not isinstance(sparsity, Sequence) or len(sparsity) != n_blocks:
        raise ValueError(f"`sparsity` must be a float or one entry per block ({n_blocks}), got {sparsity!r:.80}")
    out: list = []
    for i, entry in enumerate(sparsity):
        if isinstance(entry, Mapping):
            out.append({k: check_sparsity(v, f"sparsity[{i}][{k!r}]") for k, v in entry.items()})
        else:
            out.append(check_sparsity(entry, f"sparsity[{i}]"))
    return out


def _layer_sparsity(entry, name: str):
    return entry[name] if isinstance(entry, dict) else entry


def check_calibration(inputs, args, kwargs, chunk_size) -> tuple[jax.Array, dict]:
    """The checks every calibration pass shares (``prune_layerwise``, ``owl_sparsities``):
    ``(inputs as an array, kwargs as a dict)``, or a ValueError naming the bad argument."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"`kwargs` must be a dict of keyword arguments for every block call, got {kwargs!r}")
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"`args` must be a tuple of positional arguments for every block call, got {args!r}")
    x = jnp.asarray(inputs)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`inputs` must have a leading example axis with at least one example, got {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("`inputs` contain NaN or Inf")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    return x, dict(kwargs or {})


def plan_blocks(adapters: list, x: jax.Array, args, kwargs, skip: Excluder, per_block=None) -> list:
    """Every block's kernel layers (:class:`LayerSpec`, all of them) and those to prune, found by
    tracing the blocks in turn on one abstract example, after every check that needs no data:
    each ``ndim >= 2`` parameter is a captured kernel, a captured layer's ``bias``, or excluded, no excluded-or-not pattern is
    unused, the kernels to prune are floating and have a layer Hessian, and per-layer sparsity
    dicts name exactly the layers pruned."""
    x1: Any = jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
    plans, seen_names = [], []
    for i, ad in enumerate(adapters):
        try:
            specs, x1 = block_layers(ad, x1, args, kwargs)
        except Exception as e:  # the user's block (or a wrong input width) fails: say which block
            raise ValueError(f"block {i}: calling it on inputs of shape {(None,) + tuple(x1.shape[1:])} raised "
                             f"{type(e).__name__}: {e}") from e
        x1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x1)
        weights = ad.weights()
        names = [s.name for s in specs]
        seen_names += names + list(weights)
        if not specs:
            raise ValueError(f"block {i} has no kernel layers to prune (Dense/Linear, DenseGeneral/LinearGeneral, "
                             "Einsum, Conv, or a module registered with `cobs_jax.register_kernel`)")
        todo = []
        for spec in specs:
            if skip(spec.name):
                continue
            where = f"block {i}, layer {spec.name!r}"
            if spec.error:
                raise ValueError(f"{where}: {spec.error}; leave it dense with `exclude`")
            kernel = weights.get(spec.name)
            if kernel is not None and not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
                raise ValueError(f"{where}: its kernel is {jnp.result_type(kernel)}, not floating; leave it dense "
                                 "with `exclude`")
            todo.append(spec)
        owners = {s.path[:-1] for s in specs}
        for name, w in weights.items():
            bias = name.endswith("/bias") and tuple(name.split("/")[:-1]) in owners  # a captured layer's bias
            if name not in names and not bias and not skip(name):
                raise ValueError(
                    f"block {i}: parameter {name!r} {jnp.shape(w)} is not the kernel of a layer cobs_jax captures "
                    "(Dense/Linear, DenseGeneral/LinearGeneral, Einsum, Conv, attention projections) or it is never "
                    "called; register its module with `cobs_jax.register_kernel` or leave it dense with "
                    f"`exclude={name!r}`")
        entry = per_block[i] if per_block is not None else None
        if isinstance(entry, dict):
            want = {s.name for s in todo}
            if set(entry) != want:
                raise ValueError(f"`sparsity[{i}]` must name exactly block {i}'s pruned layers {sorted(want)}; "
                                 f"unknown {sorted(set(entry) - want)}, missing {sorted(want - set(entry))}")
        plans.append((specs, todo))
    skip.check_used(seen_names)
    return plans


def forward_chunks(adapter, params, x, args, kwargs, chunk_size, sharding, capture, reference=None, layers=None,
             ref_outputs=True):
    """Outputs over all examples (chunked), or with ``capture`` the summed Hessians of ``layers``
    (all by default; with ``reference``, the dense model's inputs: ``(XᵀX, X̃ᵀX)`` pairs and the
    dense block's outputs on ``reference`` if ``ref_outputs``; see :func:`run_block`)."""
    outs, grams, ref_outs = [], {}, []
    for s in range(0, x.shape[0], chunk_size):
        chunk = x[s : s + chunk_size]
        ref = None if reference is None else reference[s : s + chunk_size]
        if sharding is not None:
            chunk = jax.device_put(chunk, sharding)
            ref = None if ref is None else jax.device_put(ref, sharding)
        out = run_block(params, chunk, args, kwargs, static=adapter.static, capture=capture, reference=ref,
                        ref_params=adapter.params, layers=layers, ref_outputs=ref_outputs)
        if not capture:
            outs.append(out)
            continue
        if reference is not None:
            out, y_ref = out
            ref_outs.append(y_ref)
        for k, v in out.items():
            grams[k] = jax.tree.map(jnp.add, grams[k], v) if k in grams else v
    result = grams if capture else jnp.concatenate(outs, axis=0)
    if reference is not None and capture:
        result = (result, jnp.concatenate(ref_outs, axis=0) if ref_outputs else None)
    return jax.block_until_ready(result)


@jax.jit
def _dense_fit(w, h, cross, u):
    """``W̄ + H̃_λ⁻¹ (X̃ᵀX - X̃ᵀX̃) W̄`` (``H̃_λ⁻¹ = uᵀu``, the damped inverse) for a ``(d_in, d_out)``
    kernel: the minimiser of the asymmetric objective plus the damping term ``λ‖W - W̄‖²``, the
    same damping as the usual objective's."""
    w = w.astype(u.dtype)
    return w + u.T @ (u @ ((cross - h) @ w))


def _prune_captured(kernel, gram, spec: LayerSpec, where: str, shared: list, *, asymmetric: bool,
                    pruner: LayerPruner, update: Optional[LayerUpdate], rel_damping: float, sparsity,
                    pattern: Optional[str], mesh: Optional[Mesh]) -> LayerResult:
    """Prune one captured layer: ``gram`` is its ``XᵀX`` (or ``(X̃ᵀX̃, X̃ᵀX)`` when ``asymmetric``).
    ``shared`` holds the ``(H, factors)`` of this block so far: layers reading one input (q/k/v,
    gate/up) factor their H once."""
    h, cross = gram if asymmetric else (gram, None)
    h = h.astype(accumulate_dtype())
    if not bool(jnp.all(jnp.isfinite(h))) or (cross is not None and not bool(jnp.all(jnp.isfinite(cross)))):
        raise ValueError(f"{where}: its captured activations contain NaN or Inf")
    check_finite(kernel, f"{where}: the kernel")
    factors = None
    if uses_factors(pruner, update) or asymmetric:
        factors = next((f for h2, f in shared if h2.shape == h.shape and bool(jnp.array_equal(h2, h))), None)
        if factors is None:
            factors = factor_hessian(h, rel_damping, where)
            shared.append((h, factors))
    target = kernel
    if cross is not None and factors is not None:
        rows, layout = as_rows(kernel, spec.in_axes)
        target = from_rows(_dense_fit(rows.T, h, cross, factors.u).T, layout)
    result = solve_layer(target, h, pruner, update, sparsity=sparsity, pattern=pattern, rel_damping=rel_damping,
                         in_axes=spec.in_axes, name=where, factors=factors, mesh=mesh)
    return result._replace(kernel=result.kernel.astype(kernel.dtype))


def prune_layerwise(
    blocks: Union[Sequence[Any], Stacked],
    inputs: jax.typing.ArrayLike,
    *,
    sparsity: Union[None, float, Sequence[Union[float, Mapping[str, float]]]] = None,
    pattern: Optional[str] = None,
    method: Union[str, LayerPruner] = "sparsegpt",
    update: Union[None, str, LayerUpdate] = None,
    rel_damping: float = 0.01,
    asymmetric: bool = False,
    true_sequential: bool = False,
    exclude: Exclude = None,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    chunk_size: int = 8,
    mesh: Optional[Mesh] = None,
    progress: bool = False,
    key: Any = None,
    **deprecated: Any,
) -> LayerwiseResult:
    """Prune every kernel of a stack of Flax blocks from calibration data.

    Every kernel module a block calls is captured: ``nn.Dense`` / ``nnx.Linear``,
    ``nn.DenseGeneral`` / ``nnx.LinearGeneral``, ``nn.Einsum`` / ``nnx.Einsum`` (so the four
    projections of Flax's multi-head attention), conv layers, and any module registered with
    :func:`cobs_jax.register_kernel` (e.g. the ``gemma`` library's ``Einsum``). A kernel's layer
    objective is on its flattened contraction axes. A layer is named by its kernel's path in the
    block (``"mlp/up_proj"``, ``"attn/q_einsum/w"``; a trailing ``kernel`` is dropped). Nothing is
    left dense silently: before any data pass every block is traced once, and a parameter with
    ``ndim >= 2`` that is neither a captured kernel (nor its layer's bias) nor excluded raises a
    ValueError naming it.

    Args:
      blocks: the model's blocks in order (transformer layers): ``nnx.Module`` s, or linen
        ``(module, variables)`` pairs; each is called as ``block(x, *args, **kwargs)`` and returns
        the next hidden states (or a tuple whose first entry they are). Or a
        :class:`cobs_jax.Stacked`: layers held as one module with parameters stacked on a layer
        axis (``nnx.scan`` / ``nnx.vmap``, linen ``nn.scan``, MaxText), pruned layer by layer
        and returned restacked (the same result as pruning the unstacked layers).
      inputs: calibration inputs of the first block, ``(n, ...)`` with the examples first (for an
        LLM: the token embeddings of n calibration sequences, ``(n, seq, d)``).
      sparsity: as in :func:`cobs_jax.prune_layer`, for every pruned layer; or one entry per
        block: a float for all its layers, or ``{layer name: sparsity}`` for each of its pruned
        layers (a non-uniform budget, e.g. from :func:`cobs_jax.owl_sparsities`).
      pattern: as in :func:`cobs_jax.prune_layer`.
      method: the layer pruner (:class:`cobs_jax.layer.SparseGPT`, ``Wanda``, ``Magnitude``,
        ``CBS``, with its options) or its name, as in :func:`cobs_jax.prune_layer`.
      update: as in :func:`cobs_jax.prune_layer` (``cobs_jax.layer.Exact()`` or ``"exact"``).
      rel_damping: as in :func:`cobs_jax.prune_layer`: relative to ``mean(diag H)``.
      asymmetric: keep the *dense model's* layer outputs (asymmetric calibration, as GPTAQ, Li et
        al., ICML 2025, does for quantization): each layer minimises ``||X W̄ - X̃ W||²`` with X̃
        its inputs in the model pruned so far and X those in the dense model, instead of
        SparseGPT's ``||X̃ W̄ - X̃ W||²``, so the layers also undo the error of the layers before
        them. With the damping term ``λ‖W - W̄‖²`` of the usual objective (``λ`` as below), this
        is exactly the usual objective ``(W - W')ᵀ(H̃ + λI)(W - W')`` for the kernel
        ``W' = W̄ + (H̃ + λI)⁻¹ X̃ᵀ(X - X̃) W̄`` (the unpruned fit to the dense outputs; ``W' = W̄``
        where the inputs agree, as in the first block), ``H̃ = X̃ᵀX̃``: every method prunes ``W'``.
        Each capture pass then also runs the block on the dense hidden states (kept beside the
        pruned ones), about twice its cost. The reported ``error`` is then relative to ``W'``.
        On a transformer pass ``true_sequential=True`` with it: captured in one pass per block,
        ``o_proj`` / ``down_proj`` are fitted to inputs the pruned block never feeds them, and
        SmolLM2-135M at 70 % got far worse (perplexity 1146.6 vs 239.7; with both, 137.7).
      true_sequential: capture each layer's inputs from the block with the layers before it
        already pruned (GPTQ's ``--true-sequential``): the layers are grouped by the input they
        read, in call order (a Llama block: q/k/v, then o, then gate/up, then down; found by
        tracing the block), and each group is captured and pruned in turn. Off (SparseGPT's
        protocol), every layer of a block is captured in one pass of the block as it came in, so
        ``o_proj`` is fitted to the inputs the *unpruned* attention would give it. Costs one
        capture pass per group (XLA stops each pass at its group's layers).
      exclude: layers (or other ``ndim >= 2`` parameters) left dense: a regex (or list of them)
        searched in the layer's name (``"mlp/down_proj"``), or ``callable(name) -> bool``. A
        pattern that matches nothing in any block raises. Embeddings and the LM head are not in
        ``blocks`` and so are never pruned.
      args: extra positional arguments of every block call (positions, RoPE tables, masks); they
        are not split into chunks.
      kwargs: extra keyword arguments of every block call.
      chunk_size: examples per forward chunk (bounds the activation memory of a pass).
      mesh: optional ``jax.sharding.Mesh``: each chunk's examples are sharded over its first axis
        (``chunk_size`` must be a multiple of that axis's size) and the Hessians are summed across
        devices by XLA's all-reduce; the output units of ``method="cbs"`` and ``update="exact"``
        are split over the same axis; the result equals the single-device one.
      progress: a tqdm bar over blocks (plain lines without tqdm).
      key: accepted for API uniformity; the methods are deterministic.
      **deprecated: version 0.1's ``damping`` (now ``rel_damping``), ``batch_size`` (now
        ``chunk_size``), ``block_size``, ``granularity``, ``start``, ``window`` and ``max_swaps``
        (now options of the method object) still work, with a DeprecationWarning.

    Returns:
      A :class:`LayerwiseResult`.

    Raises:
      ValueError: for bad arguments (see :func:`cobs_jax.prune_layer`; a bad ``sparsity`` before
        any data pass), NaN/Inf in the inputs or in a layer's captured activations (named), a
        block without kernel layers, a parameter that is not a captured kernel (named), a kernel
        without a single layer Hessian (grouped conv, batched einsum) or not floating, an
        ``exclude`` pattern that matches nothing, a per-layer sparsity dict whose keys are not
        the block's pruned layers, or a block whose call fails (its index and error named).
    """
    options = dict(deprecated)
    method = from_flat_options(method, options, "prune_layerwise")
    rel_damping = check_rel_damping(take_renamed(options, "damping", "rel_damping", rel_damping, "prune_layerwise"))
    chunk_size = take_renamed(options, "batch_size", "chunk_size", chunk_size, "prune_layerwise")
    reject_unknown(options, "prune_layerwise")
    pruner, upd = as_pruner(method), as_update(update)
    as_key(key)  # validated for uniformity; the methods are deterministic
    for flag, value in (("asymmetric", asymmetric), ("true_sequential", true_sequential)):
        if not isinstance(value, bool):
            raise ValueError(f"`{flag}` must be a bool, got {value!r}")
    x, kwargs = check_calibration(inputs, args, kwargs, chunk_size)
    sharding = None
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        axis = mesh.axis_names[0]
        if chunk_size % mesh.shape[axis] or x.shape[0] % chunk_size:
            raise ValueError(
                f"with `mesh`, `chunk_size` ({chunk_size}) must be a multiple of the mesh axis "
                f"{axis!r} ({mesh.shape[axis]}) and divide the number of examples ({x.shape[0]})"
            )
        sharding = NamedSharding(mesh, PartitionSpec(axis))
    stack = blocks if isinstance(blocks, Stacked) else None
    block_list = blocks.unstack() if isinstance(blocks, Stacked) else list(blocks)
    if not block_list:
        raise ValueError("`blocks` is empty: give the model's blocks in order")
    adapters = [BlockAdapter(b, f"blocks[{i}]") for i, b in enumerate(block_list)]
    per_block = _per_block_sparsity(sparsity, len(adapters))
    if parse_pattern(pattern) is None and any(e is None for e in per_block):
        raise ValueError("`sparsity` is required (or give `pattern='N:M'`)")
    skip = Excluder(exclude)
    plans = plan_blocks(adapters, x, args, kwargs, skip, per_block)

    t_capture = t_forward = 0.0
    t_start = time.perf_counter()
    new_blocks, masks, layer_masks, layers = [], [], [], []
    zeros = total = 0
    x_dense = x  # with `asymmetric`, the dense model's hidden states
    for i, adapter in show(enumerate(adapters), progress, len(adapters), f"prune_layerwise ({type(pruner).__name__})"):
        specs, todo = plans[i]
        by_name = {s.name: s for s in todo}
        if true_sequential:  # one capture per group of layers reading one input, after the groups before it are pruned
            groups = [frozenset(s.name for s in todo if s.group == g) for g in sorted({s.group for s in specs})]
            stages: list = groups[:1] + [g for g in groups[1:] if g]  # the first also gives the dense outputs
        else:
            stages = [frozenset(by_name)]  # every layer captured from the dense block in one pass
        kernels, block_masks = {}, {}
        shared: list[tuple[jax.Array, Factors]] = []  # q/k/v (gate/up) see one input: factor its H once
        params = adapter.params
        for j, stage in enumerate(stages):
            t0 = time.perf_counter()
            grams = forward_chunks(adapter, params, x, args, kwargs, chunk_size, sharding, capture=True,
                             reference=x_dense if asymmetric else None, layers=stage, ref_outputs=j == 0)
            if asymmetric:
                grams, dense_out = grams
                if j == 0:
                    x_dense_next = dense_out
            t_capture += time.perf_counter() - t0
            for name in (n for n in grams if n in by_name):
                where = f"block {i}, layer {name!r}"
                t1 = time.perf_counter()
                r = _prune_captured(adapter.kernel(name), grams[name], by_name[name], where, shared,
                                    asymmetric=asymmetric, pruner=pruner, update=upd, rel_damping=rel_damping,
                                    sparsity=_layer_sparsity(per_block[i], name), pattern=pattern, mesh=mesh)
                kernels[name], block_masks[name] = r.kernel, r.mask
                layers.append(LayerRecord(i, name, tuple(r.kernel.shape), r.error, r.sparsity, r.rel_damping,
                                          time.perf_counter() - t1, r.stats))
            params = adapter.with_kernels(kernels)
        if asymmetric:
            x_dense = x_dense_next  # the dense model's outputs of this block
        t2 = time.perf_counter()
        x = forward_chunks(adapter, params, x, args, kwargs, chunk_size, sharding, capture=False)
        t_forward += time.perf_counter() - t2
        for k in kernels.values():  # the sparsity of the kernels the result holds
            zeros += int(jnp.sum(k == 0))
            total += int(k.size)
        new_blocks.append(adapter.rebuild(params))
        masks.append(adapter.param_masks(block_masks))
        layer_masks.append(block_masks)
    elapsed = time.perf_counter() - t_start
    t_prune = elapsed - t_capture - t_forward
    excluded = tuple(sorted({s.name for specs, _ in plans for s in specs} - {s.name for _, todo in plans for s in todo}))
    stats: dict[str, Any] = {}
    for rec in layers:
        for name, value in rec.stats.items():
            stats[name] = stats.get(name, 0) + value
    timings = dict(capture=t_capture, prune=t_prune, forward=t_forward, total=elapsed)
    if stack is not None:
        return LayerwiseResult(stack.restack(new_blocks), stack.restack_masks(masks), layer_masks, x, tuple(layers),
                               zeros / total if total else 0.0, timings, excluded, stats)
    return LayerwiseResult(new_blocks, masks, layer_masks, x, tuple(layers), zeros / total if total else 0.0, timings, excluded,
                           stats)
