"""Every kernel kind a Flax block holds is captured and pruned: Dense/Linear, DenseGeneral/
LinearGeneral, Einsum (linen and nnx), multi-head attention, a user's registered module, and
scanned (stacked) layers; nothing is silently left dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax
from cobs_jax._layer.kernels import einsum_rows

P64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)


class LinenKinds(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (b, t, 8)
        x = x + nn.Dense(8, name="dense", **P64)(x)
        h = nn.DenseGeneral((2, 4), axis=-1, name="general_in", **P64)(x)  # (b, t, 2, 4)
        x = x + nn.DenseGeneral(8, axis=(-2, -1), name="general_out", **P64)(jnp.tanh(h))
        e = nn.Einsum((3, 8, 2), "btd,hdk->bthk", name="einsum", **P64)(x)  # (b, t, 3, 2)
        x = x + jnp.tanh(e).reshape(x.shape[:2] + (6,)) @ jnp.ones((6, 8)) * 0.1
        return x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="mha", **P64)(x)


class NnxKinds(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(8, 8, rngs=rngs, **P64)
        self.general_in = nnx.LinearGeneral(8, (2, 4), rngs=rngs, **P64)
        self.general_out = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs, **P64)
        self.einsum = nnx.Einsum("btd,hdk->bthk", (3, 8, 2), rngs=rngs, **P64)
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs, **P64)

    def __call__(self, x):
        x = x + self.dense(x)
        x = x + self.general_out(jnp.tanh(self.general_in(x)))
        x = x + jnp.tanh(self.einsum(x)).reshape(x.shape[:2] + (6,)) @ jnp.ones((6, 8)) * 0.1
        return x + self.mha(x)


LINEN_NAMES = {"dense", "general_in", "general_out", "einsum", "mha/query", "mha/key", "mha/value", "mha/out"}


def _x(n=6, t=5, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, t, d))


def _blocks(kind):
    if kind == "linen":
        m = LinenKinds()
        return [(m, m.init(jax.random.key(i), _x(1))) for i in range(2)]
    return [NnxKinds(nnx.Rngs(i)) for i in range(2)]


def _kernel(block, name):
    return cobs_jax._layer.capture.BlockAdapter(block).kernel(name)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_every_kernel_kind_is_pruned_to_the_exact_count(kind):
    blocks = _blocks(kind)
    res = cobs_jax.prune_layerwise(blocks, _x(), sparsity=0.5, method="magnitude", chunk_size=3)
    for i, masks in enumerate(res.layer_masks):
        assert set(masks) == LINEN_NAMES, masks.keys()
        for name, mask in masks.items():
            k = np.asarray(_kernel(res.blocks[i], name))
            assert k.shape == mask.shape == _kernel(blocks[i], name).shape
            assert int(np.sum(k == 0)) == round(0.5 * k.size), (i, name)
            np.testing.assert_array_equal(k != 0, np.asarray(mask))
    assert res.sparsity == pytest.approx(0.5)
    assert res.excluded == ()


def _flat(kernel, in_axes):
    out = [a for a in range(kernel.ndim) if a not in in_axes]
    k = np.transpose(kernel, tuple(in_axes) + tuple(out))
    return k.reshape(int(np.prod([kernel.shape[a] for a in in_axes])), -1)


class _One(nn.Module):
    """One einsum (or, with ``general``, the equivalent DenseGeneral) kernel; the block returns its
    input (the kernel is the only layer)."""

    eq: str
    shape: tuple
    general: tuple = ()

    @nn.compact
    def __call__(self, x):
        if self.general:  # "btnh,nhd->btd" as DenseGeneral over the last two axes (given in any order)
            nn.DenseGeneral(self.shape[-1], axis=self.general, use_bias=False, name="k", param_dtype=jnp.float64)(x)
        else:
            nn.Einsum(self.shape, self.eq, name="k", param_dtype=jnp.float64)(x)
        return x


@pytest.mark.parametrize("eq,shape,in_axes,xshape,general", [
    ("btnh,nhd->btd", (2, 3, 4), (0, 1), (7, 5, 2, 3), ()),        # contraction first (attention output)
    ("btnh,nhd->btd", (2, 3, 4), (0, 1), (7, 5, 2, 3), (-2, -1)),  # the same as nn.DenseGeneral
    ("btnh,nhd->btd", (2, 3, 4), (0, 1), (7, 5, 2, 3), (-1, 2)),   # its axes given out of order
    ("btd,ndh->btnh", (2, 6, 3), (1,), (7, 5, 6), ()),             # contraction in the middle (query)
    ("bsd,ckdh->cbskh", (2, 1, 6, 3), (2,), (7, 5, 6), ()),        # gemma's kv_einsum layout
    ("btd,dn->bn", (6, 4), (0,), (7, 5, 6), ()),                   # an input axis summed by the einsum
])
def test_exact_update_on_einsum_kernels_equals_lstsq_on_flattened_inputs(eq, shape, in_axes, xshape, general):
    x = np.random.default_rng(1).normal(size=xshape)
    m = _One(eq, shape, general)
    v = m.init(jax.random.key(0), x[:1])
    res = cobs_jax.prune_layerwise([(m, v)], x, sparsity=0.5, method="magnitude", update="exact", rel_damping=1e-12,
                                   chunk_size=7)
    rows, axes, _ = einsum_rows(eq, jnp.asarray(x), len(shape), "k")
    assert axes == in_axes
    xs = eq.split(",")[0]
    con = [c for c in eq.split(",")[1].split("->")[0] if c in xs]
    moved = np.moveaxis(x, [xs.index(c) for c in con], range(x.ndim - len(con), x.ndim))
    if "t" in xs and "t" not in eq.split("->")[1]:  # summed over t by the einsum
        moved = moved.sum(axis=1)
    X = moved.reshape(-1, int(np.prod([x.shape[xs.index(c)] for c in con])))
    np.testing.assert_allclose(np.asarray(rows), X, rtol=1e-12)
    w0 = _flat(np.asarray(v["params"]["k"]["kernel"]), in_axes)
    keep = _flat(np.asarray(res.layer_masks[0]["k"]), in_axes)
    order = np.argsort(np.abs(w0), axis=None, kind="stable")
    want = np.ones(w0.size, bool)
    want[order[: round(0.5 * w0.size)]] = False
    np.testing.assert_array_equal(keep, want.reshape(w0.shape))
    got = _flat(np.asarray(res.blocks[0][1]["params"]["k"]["kernel"]), in_axes)
    for j in range(w0.shape[1]):
        s = keep[:, j]
        ref = np.zeros(w0.shape[0])
        ref[s] = np.linalg.lstsq(X[:, s], X @ w0[:, j], rcond=None)[0]
        np.testing.assert_allclose(got[:, j], ref, rtol=1e-6, atol=1e-9)


class GemmaEinsum(nn.Module):
    """gemma's ``_layers.Einsum``: a parameter named by ``weight_name``, called as ``(eqn, x)``."""

    shape: tuple
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.param(self.weight_name, nn.initializers.normal(1.0), self.shape,
                                             jnp.float64))


class GemmaLike(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (b, t, 6)
        k, v = GemmaEinsum((2, 1, 6, 4), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        gating = GemmaEinsum((2, 5, 6), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        g = gating("...F,NHF->...NH", x)
        return x + (k * v).sum(-1) + g.sum((-1, -2))[..., None]


def test_a_registered_module_is_pruned_per_output_unit_like_its_flattened_matrix():
    cobs_jax.register_kernel(GemmaEinsum, lambda m, eqn, x: (eqn, x), param=lambda m: m.weight_name)
    x = np.random.default_rng(2).normal(size=(4, 5, 6))
    m = GemmaLike()
    v = m.init(jax.random.key(0), x[:1])
    res = cobs_jax.prune_layerwise([(m, v)], x, sparsity=0.5, method="wanda", chunk_size=4)
    assert set(res.layer_masks[0]) == {"kv_einsum/w", "gating_einsum"}
    h = np.einsum("btd,bte->de", x, x)
    for name, in_axes in (("kv_einsum/w", (2,)), ("gating_einsum", (2,))):
        w = np.asarray(v["params"][name.split("/")[0]][name.split("/")[1]] if "/" in name else v["params"][name])
        flat, fmask, *_ = cobs_jax.prune_layer(_flat(w, in_axes), h, sparsity=0.5, method="wanda")
        np.testing.assert_array_equal(_flat(np.asarray(res.layer_masks[0][name]), in_axes), np.asarray(fmask))


class Hidden(nn.Module):
    """A kernel used through jnp.dot in a module no one registered."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.normal(), (x.shape[-1], x.shape[-1]), jnp.float64)


class WithHidden(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Hidden(name="hidden")(nn.Dense(x.shape[-1], name="dense", param_dtype=jnp.float64)(x))


def test_nothing_is_silently_left_dense():
    x = _x()
    m = WithHidden()
    blocks = [(m, m.init(jax.random.key(0), x[:1]))]
    with pytest.raises(ValueError, match=r"block 0: parameter 'hidden/w' .*register_kernel.*exclude='hidden/w'"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5)
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, exclude="hidden")
    assert list(res.layer_masks[0]) == ["dense"] and res.excluded == ()
    with pytest.raises(ValueError, match="'nope' matches no layer"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, exclude=["hidden", "nope"])
    # linen MHA and nnx attention kernels are pruned, not skipped: the sparsity is of every kernel
    res = cobs_jax.prune_layerwise(_blocks("nnx")[:1], _x(), sparsity=0.5, exclude="mha/out")
    assert res.excluded == ("mha/out",) and "mha/query" in res.layer_masks[0]


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 12, rngs=rngs, **P64)
        self.down = nnx.LinearGeneral(12, 8, rngs=rngs, **P64)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="down", **P64)(jax.nn.gelu(nn.Dense(12, name="up", **P64)(x))), None


@pytest.mark.parametrize("method", ["sparsegpt", "cbs"])
def test_a_scanned_nnx_stack_equals_its_unstacked_layers(method):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Layer(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))
    x = _x(n=8)
    res = cobs_jax.prune_layerwise(cobs_jax.Stacked(stack), x, sparsity=0.5, method=method, chunk_size=4)
    layers = cobs_jax.Stacked(stack).unstack()
    ref = cobs_jax.prune_layerwise(layers, x, sparsity=0.5, method=method, chunk_size=4)
    assert isinstance(res.blocks, cobs_jax.Stacked) and len(res.layer_masks) == 3
    got = res.blocks.layers
    for i, b in enumerate(ref.blocks):
        np.testing.assert_array_equal(np.asarray(got.up.kernel[...][i]), np.asarray(b.up.kernel[...]))
        np.testing.assert_array_equal(np.asarray(got.down.kernel[...][i]), np.asarray(b.down.kernel[...]))
    np.testing.assert_array_equal(np.asarray(res.outputs), np.asarray(ref.outputs))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(layer, h):
        return layer(h)

    np.testing.assert_allclose(np.asarray(run(got, jnp.asarray(x))), np.asarray(res.outputs), rtol=1e-10)
    assert float(jnp.mean(stack.up.kernel[...] == 0)) == 0.0  # the input stack is untouched


@pytest.mark.parametrize("axis", [0, 1])
def test_a_linen_scan_stack_equals_its_unstacked_layers(axis):
    scanned = nn.scan(LinenLayer, variable_axes={"params": axis}, split_rngs={"params": True}, length=3)()
    x = _x(n=4)
    stacked = scanned.init(jax.random.key(0), jnp.asarray(x[:1]), None)
    st = cobs_jax.Stacked((LinenLayer(), stacked), axis=axis)
    res = cobs_jax.prune_layerwise(st, x, sparsity=0.5, args=(None,), chunk_size=2)
    ref = cobs_jax.prune_layerwise(st.unstack(), x, sparsity=0.5, args=(None,), chunk_size=2)
    params = res.blocks.layers[1]["params"]
    for i, (_, v) in enumerate(ref.blocks):
        for n in ("up", "down"):
            np.testing.assert_array_equal(np.take(np.asarray(params[n]["kernel"]), i, axis=axis),
                                          np.asarray(v["params"][n]["kernel"]))
    if axis == 0:  # the restacked variables run in the scanned module
        out = scanned.apply(res.blocks.layers[1], jnp.asarray(x), None)[0]
        np.testing.assert_allclose(np.asarray(out), np.asarray(res.outputs), rtol=1e-10)
