"""prune_layerwise on toy transformer-like blocks (nnx and linen) against pruning by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax
from cobs_jax._layer.capture import _layer_input

F64 = dict(use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64)
NAMES = ("attn/q_proj", "attn/v_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj")


class Attn(nnx.Module):
    def __init__(self, d, rngs):
        self.q_proj = nnx.Linear(d, d, rngs=rngs, **F64)
        self.v_proj = nnx.Linear(d, d, rngs=rngs, **F64)
        self.o_proj = nnx.Linear(d, d, rngs=rngs, **F64)


class MLP(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.up_proj = nnx.Linear(d, hidden, rngs=rngs, **F64)
        self.down_proj = nnx.Linear(hidden, d, rngs=rngs, **F64)


class Block(nnx.Module):
    """x -> x + o(v(h) * sigmoid(q(h))), h = x * scale -> x + down(relu(up(x)))."""

    def __init__(self, d, hidden, rngs):
        self.attn = Attn(d, rngs)
        self.mlp = MLP(d, hidden, rngs)

    def __call__(self, x, scale):
        h = x * scale
        a = self.attn.v_proj(h) * jax.nn.sigmoid(self.attn.q_proj(h))
        x = x + self.attn.o_proj(a)
        return x + self.mlp.down_proj(jax.nn.relu(self.mlp.up_proj(x)))


class LinenBlock(nn.Module):
    d: int
    hidden: int

    @nn.compact
    def __call__(self, x, scale):
        dense = lambda n, name: nn.Dense(n, use_bias=False, param_dtype=jnp.float64, name=name)
        h = x * scale
        a = dense(self.d, "v_proj")(h) * jax.nn.sigmoid(dense(self.d, "q_proj")(h))
        x = x + dense(self.d, "o_proj")(a)
        return x + dense(self.d, "down_proj")(jax.nn.relu(dense(self.hidden, "up_proj")(x)))


def _hand(kernels_per_block, x, scale, names, true_sequential=False, **opts):
    """The sequential method written out: capture from the dense block, prune, run the pruned block.
    ``true_sequential``: q/v, then o, then up, then down, each captured with the ones before pruned."""
    out = []
    groups = [names[:2], names[2:3], names[3:4], names[4:]] if true_sequential else [names]
    for k in kernels_per_block:
        fwd = lambda k, x: _fwd(k, x, scale, names)
        new = {}
        for group in groups:
            _, acts = fwd({**k, **new}, x)
            for n in group:
                a = acts[n].reshape(-1, acts[n].shape[-1])
                new[n] = np.asarray(cobs_jax.prune_layer(k[n], a.T @ a, **opts)[0])
        out.append(new)
        x, _ = fwd(new, x)
    return out, x


def _fwd(k, x, scale, names):
    q, v, o, up, down = (k[n] for n in names)
    h = x * scale
    a = (h @ v) * jax.nn.sigmoid(h @ q)
    x1 = x + a @ o
    m = np.maximum(x1 @ up, 0)
    acts = dict(zip(names, (h, h, a, x1, m)))
    return np.asarray(x1 + m @ down), {n: np.asarray(v) for n, v in acts.items()}


def _data(n=12, t=5, d=8):
    return np.random.default_rng(0).normal(size=(n, t, d))


@pytest.mark.parametrize("opts", [dict(sparsity=0.5), dict(pattern="2:4", update="exact"),
                                  dict(sparsity=0.6, method="wanda", update="exact"),
                                  dict(sparsity=0.5, method=cobs_jax.layer.CBS(window=4)), dict(pattern="2:4", method=cobs_jax.layer.CBS(start=cobs_jax.layer.Wanda())),
                                  dict(sparsity=0.5, true_sequential=True),
                                  dict(sparsity=0.6, method="wanda", update="exact", true_sequential=True)])
def test_nnx_driver_equals_pruning_by_hand(opts):
    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = _data()
    before = [nnx.to_pure_dict(nnx.state(b)) for b in blocks]
    scale = jnp.asarray(1.5)
    res = cobs_jax.prune_layerwise(blocks, x, args=(scale,), chunk_size=5, **opts)
    kernels = [{n: np.asarray(b.__getattribute__(n.split("/")[0]).__getattribute__(n.split("/")[1]).kernel[...])
                for n in NAMES} for b in blocks]
    ref, ref_out = _hand(kernels, x, 1.5, NAMES, **opts)
    for i, blk in enumerate(res.blocks):
        for n in NAMES:
            a, b = n.split("/")
            got = np.asarray(getattr(getattr(blk, a), b).kernel[...])
            np.testing.assert_allclose(got, ref[i][n], rtol=1e-9, atol=1e-12)
            np.testing.assert_array_equal(np.asarray(res.layer_masks[i][n]), ref[i][n] != 0)
    np.testing.assert_allclose(np.asarray(res.outputs), ref_out, rtol=1e-9, atol=1e-12)
    # the user's blocks are untouched
    for b, pure in zip(blocks, before):
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(b)), pure)
    assert len(res.layers) == 10 and all(np.isfinite(l.error) for l in res.layers)
    assert set(res.timings) == {"capture", "prune", "forward", "total"}


@pytest.mark.parametrize("true_sequential", [False, True])
def test_linen_driver_equals_pruning_by_hand(true_sequential):
    mod = LinenBlock(8, 16)
    x = _data()
    blocks = [(mod, mod.init(jax.random.key(i), x[:1], 1.0)) for i in range(2)]
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.5,), chunk_size=4, true_sequential=true_sequential)
    short = [n.split("/")[1] for n in NAMES]
    kernels = [{s: np.asarray(v["params"][s]["kernel"]) for s in short} for _, v in blocks]
    ref, ref_out = _hand(kernels, x, 1.5, short, true_sequential=true_sequential, sparsity=0.5)
    for i, (_, variables) in enumerate(res.blocks):
        for s in short:
            np.testing.assert_allclose(np.asarray(variables["params"][s]["kernel"]), ref[i][s], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.outputs), ref_out, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_asymmetric_equals_least_squares_on_the_dense_outputs(true_sequential):
    """asymmetric=True: every layer's mask is the magnitude mask of lstsq(X̃, X W̄) and every output
    unit's kept weights are lstsq(X̃_K, X w̄), X̃ / X the layer's inputs in the pruned / dense model
    (with ``true_sequential``, X̃ from the block with the layers before it pruned)."""
    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = _data(n=16)
    s = 0.5
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=s, method="magnitude", update="exact", asymmetric=True,
                                   rel_damping=1e-12, args=(1.5,), chunk_size=5, true_sequential=true_sequential)
    kernels = [{n: np.asarray(getattr(getattr(b, n.split("/")[0]), n.split("/")[1]).kernel[...]) for n in NAMES}
               for b in blocks]
    x_pruned = x_dense = x
    for i, k in enumerate(kernels):
        acts_p, acts_d = _fwd(k, x_pruned, 1.5, NAMES)[1], _fwd(k, x_dense, 1.5, NAMES)[1]
        new = {}
        for n in NAMES:
            if true_sequential:  # the inputs the block with the layers before n pruned gives n
                acts_p = _fwd({**k, **new}, x_pruned, 1.5, NAMES)[1]
            xp, xd = (a[n].reshape(-1, a[n].shape[-1]) for a in (acts_p, acts_d))
            target = xd @ k[n]  # the dense model's outputs of this layer
            fit = np.linalg.lstsq(xp, target, rcond=None)[0]
            order = np.argsort(np.abs(fit), axis=None)
            keep = np.ones(fit.size, bool)
            keep[order[: round(s * fit.size)]] = False
            keep = keep.reshape(fit.shape)
            np.testing.assert_array_equal(np.asarray(res.layer_masks[i][n]), keep, err_msg=f"block {i} {n}")
            w = np.zeros_like(fit)
            for c in range(fit.shape[1]):
                w[keep[:, c], c] = np.linalg.lstsq(xp[:, keep[:, c]], target[:, c], rcond=None)[0]
            a, b = n.split("/")
            got = np.asarray(getattr(getattr(res.blocks[i], a), b).kernel[...])
            np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-8, err_msg=f"block {i} {n}")
            new[n] = w
        x_pruned, x_dense = _fwd(new, x_pruned, 1.5, NAMES)[0], _fwd(k, x_dense, 1.5, NAMES)[0]
    np.testing.assert_allclose(np.asarray(res.outputs), x_pruned, rtol=1e-6, atol=1e-8)
    # the second block's pruned inputs differ from its dense ones, so the objective did change
    sym = cobs_jax.prune_layerwise(blocks, x, sparsity=s, method="magnitude", update="exact", rel_damping=1e-12,
                                   args=(1.5,), chunk_size=5)
    assert not np.allclose(sym.blocks[1].mlp.up_proj.kernel[...], res.blocks[1].mlp.up_proj.kernel[...])
    with pytest.raises(ValueError, match="asymmetric"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=s, args=(1.5,), asymmetric="yes")


def test_true_sequential_groups_layers_by_input_and_skips_excluded_groups():
    from cobs_jax._layer.capture import BlockAdapter, block_layers

    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = _data()
    specs, _ = block_layers(BlockAdapter(blocks[0]), x[:1], (1.5,), {})
    assert [(s.name, s.group) for s in specs] == [
        ("attn/v_proj", 0), ("attn/q_proj", 0), ("attn/o_proj", 1), ("mlp/up_proj", 2), ("mlp/down_proj", 3)]
    # only the last layer pruned: nothing before it changes, so both protocols agree (with
    # asymmetric, the first group, all excluded, still yields the dense outputs)
    kw = dict(sparsity=0.5, args=(1.5,), exclude=["attn", "up_proj"], asymmetric=True)
    seq = cobs_jax.prune_layerwise(blocks, x, true_sequential=True, **kw)
    one = cobs_jax.prune_layerwise(blocks, x, **kw)
    assert [sorted(m) for m in seq.layer_masks] == [["mlp/down_proj"]] * 2
    for a, b in zip(seq.blocks, one.blocks):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12),
                     nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b)))
    with pytest.raises(ValueError, match="true_sequential"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.5,), true_sequential=1)


@pytest.mark.parametrize("method", ["sparsegpt", "cbs"])
def test_asymmetric_first_block_equals_symmetric_with_damping(method):
    """Where the pruned and dense inputs agree (the first block) the damped asymmetric objective
    is the usual one: same masks and weights for any damping (a ridge towards 0 would differ)."""
    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = _data(n=16)
    a = cobs_jax.prune_layerwise(blocks[:1], x, sparsity=0.5, method=method, rel_damping=0.1, asymmetric=True, args=(1.5,))
    b = cobs_jax.prune_layerwise(blocks[:1], x, sparsity=0.5, method=method, rel_damping=0.1, args=(1.5,))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12),
                 nnx.to_pure_dict(nnx.state(a.blocks[0])), nnx.to_pure_dict(nnx.state(b.blocks[0])))
    np.testing.assert_allclose(a.outputs, b.outputs, rtol=1e-9, atol=1e-12)


def test_exclude_deterministic_and_sparsity():
    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = _data()
    a = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), exclude="down_proj")
    b = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), exclude=["down_proj"])
    assert all("mlp/down_proj" not in m for m in a.layer_masks)
    np.testing.assert_array_equal(a.blocks[1].mlp.down_proj.kernel[...], blocks[1].mlp.down_proj.kernel[...])
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a.blocks[1])),
                 nnx.to_pure_dict(nnx.state(b.blocks[1])))
    assert a.sparsity == pytest.approx(0.5)


def test_conv_patches_match_the_convolution():
    rng = np.random.default_rng(0)
    cases = [("SAME", 1, 1), ("VALID", 2, 1), (((1, 0), (2, 1)), 1, 2), (1, 2, 1), ((2, (0, 1)), 1, 1),
             ("CIRCULAR", 1, 2), ("REFLECT", 2, 1)]
    for padding, strides, dil in cases:
        for conv in (nnx.Conv(3, 4, (3, 2), strides=strides, padding=padding, kernel_dilation=dil, use_bias=False,
                              rngs=nnx.Rngs(0), param_dtype=jnp.float64, dtype=jnp.float64),
                     nn.Conv(4, (3, 2), strides=strides, padding=padding, kernel_dilation=dil, use_bias=False,
                             param_dtype=jnp.float64, dtype=jnp.float64)):
            x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)))
            if isinstance(conv, nn.Conv):
                variables = conv.init(jax.random.key(0), x)
                kernel, y = variables["params"]["kernel"], conv.apply(variables, x)
            else:
                kernel, y = conv.kernel[...], conv(x)
            p = _layer_input(conv, x)
            np.testing.assert_allclose(p @ kernel.reshape(-1, 4), y, rtol=1e-10, atol=1e-12, err_msg=str(padding))
    causal = nnx.Conv(3, 4, (3,), padding="CAUSAL", kernel_dilation=2, use_bias=False, rngs=nnx.Rngs(0),
                      param_dtype=jnp.float64, dtype=jnp.float64)
    x = jnp.asarray(rng.normal(size=(2, 9, 3)))
    np.testing.assert_allclose(_layer_input(causal, x) @ causal.kernel[...].reshape(-1, 4), causal(x), rtol=1e-10,
                               atol=1e-12)
    grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'dw'.*grouped"):
        _layer_input(grouped, jnp.ones((1, 5, 5, 4)), "dw")


class ConvBlock(nnx.Module):
    def __init__(self, rngs):
        kw = dict(use_bias=False, param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
        self.c1 = nnx.Conv(4, 8, (3, 3), **kw)
        self.c2 = nnx.Conv(8, 4, (1, 1), **kw)

    def __call__(self, x):
        return x + self.c2(jax.nn.relu(self.c1(x)))


def test_conv_block_exact_update_lowers_error():
    x = np.random.default_rng(1).normal(size=(6, 5, 5, 4))
    blocks = [ConvBlock(nnx.Rngs(0))]
    plain = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, method="magnitude")
    exact = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, method="magnitude", update="exact")
    for p, e in zip(plain.layers, exact.layers):
        assert e.error <= p.error + 1e-12 and p.sparsity == pytest.approx(0.5)
    np.testing.assert_array_equal(plain.layer_masks[0]["c1"], exact.layer_masks[0]["c1"])


class LinenConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool, mode: str = "relu"):
        y = nn.Conv(4, (3, 3), padding=1, use_bias=False, param_dtype=jnp.float64, name="conv")(x)
        y = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64, name="bn")(y)
        return x + (jax.nn.relu(y) if mode == "relu" else y)


def test_python_flags_reach_the_block_as_values():
    """`train=False` (a BatchNorm's switch) and string flags are passed as Python values, not traced."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 5, 5, 4)))
    module = LinenConvBN()
    variables = module.init(jax.random.key(0), x, train=False)
    variables = {**variables, "batch_stats": {"bn": {"mean": jnp.full(4, 0.3), "var": jnp.full(4, 2.0)}}}
    for mode in ("relu", "linear"):
        res = cobs_jax.prune_layerwise([(module, variables)], x, sparsity=0.5, kwargs={"train": False, "mode": mode},
                                       chunk_size=3)
        pruned = res.blocks[0][1]
        assert float(jnp.mean(pruned["params"]["conv"]["kernel"] == 0)) == pytest.approx(0.5)
        np.testing.assert_allclose(res.outputs, module.apply(pruned, x, train=False, mode=mode), rtol=1e-12)


def test_asymmetric_conv_blocks_fit_the_dense_outputs():
    """Two conv blocks, asymmetric: the second block's c1 is lstsq on the patches of its pruned and
    dense inputs (c1 sees the block input directly)."""
    x = np.random.default_rng(3).normal(size=(6, 6, 6, 4))
    blocks = [ConvBlock(nnx.Rngs(i)) for i in range(2)]
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, method="magnitude", update="exact", asymmetric=True,
                                   rel_damping=1e-12, chunk_size=4)
    c1 = blocks[1].c1
    xp = _layer_input(c1, jnp.asarray(res.blocks[0](jnp.asarray(x)))).reshape(-1, 36)
    xd = _layer_input(c1, jnp.asarray(blocks[0](jnp.asarray(x)))).reshape(-1, 36)
    target = xd @ c1.kernel[...].reshape(36, -1)
    keep = np.asarray(res.layer_masks[1]["c1"]).reshape(36, -1)
    got = np.asarray(res.blocks[1].c1.kernel[...]).reshape(36, -1)
    for c in range(keep.shape[1]):
        want = np.linalg.lstsq(xp[:, keep[:, c]], target[:, c], rcond=None)[0]
        np.testing.assert_allclose(got[keep[:, c], c], want, rtol=1e-6, atol=1e-8)


class DepthwiseBlock(nnx.Module):
    def __init__(self, rngs):
        self.dw = nnx.Conv(4, 4, (3, 3), feature_group_count=4, use_bias=False, rngs=rngs)
        self.pw = nnx.Conv(4, 4, (1, 1), use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + self.pw(jax.nn.relu(self.dw(x)))


def test_grouped_conv_is_refused_by_name_unless_excluded():
    x = np.random.default_rng(4).normal(size=(4, 5, 5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="block 0, layer 'dw'.*exclude"):
        cobs_jax.prune_layerwise([DepthwiseBlock(nnx.Rngs(0))], x, sparsity=0.5, method="magnitude")
    with pytest.raises(ValueError, match="block 0, layer 'dw'.*exclude"):
        cobs_jax.owl_sparsities([DepthwiseBlock(nnx.Rngs(0))], x, 0.5)
    res = cobs_jax.prune_layerwise([DepthwiseBlock(nnx.Rngs(0))], x, sparsity=0.5, method="magnitude", exclude="dw")
    assert list(res.layer_masks[0]) == ["pw"] and res.sparsity == pytest.approx(0.5)


def test_bad_input():
    blocks = [Block(8, 16, nnx.Rngs(0))]
    x = _data()
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`inputs`"):
        cobs_jax.prune_layerwise(blocks, bad, sparsity=0.5, args=(1.0,))
    with pytest.raises(ValueError, match="activations contain NaN"):  # NaN made inside the block
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(jnp.nan,))
    with pytest.raises(ValueError, match="nnx.Module or a linen"):
        cobs_jax.prune_layerwise([lambda x: x], x, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=1.5, args=(1.0,))
    with pytest.raises(ValueError, match="chunk_size"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), chunk_size=0)
    with pytest.raises(ValueError, match="mesh"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), mesh="rows")
    with pytest.raises(ValueError, match="multiple of 4"):
        cobs_jax.prune_layerwise([Block(6, 16, nnx.Rngs(0))], x[..., :6], pattern="2:4", args=(1.0,))


def test_compiled_once_per_layer_shape_not_per_layer():
    from cobs_jax._layer import capture as _capture, hessian as _hessian, layer as _layer, masks as _layer_masks, sparsegpt as _sparsegpt

    fns = [_sparsegpt.sparsegpt, _capture._run_block, _hessian._damped_factor, _layer._error_and_finite]
    blocks = [Block(8, 24, nnx.Rngs(i)) for i in range(3)]  # shapes no other test uses
    x = _data(n=6)
    for opts in (dict(sparsity=0.5), dict(sparsity=0.5, method="wanda")):
        cobs_jax.prune_layerwise(blocks[:1], x, args=(1.0,), chunk_size=3, **opts)
        sizes = [f._cache_size() for f in fns + [_layer_masks.choose]]
        cobs_jax.prune_layerwise(blocks, x, args=(1.0,), chunk_size=3, **opts)
        assert [f._cache_size() for f in fns + [_layer_masks.choose]] == sizes
