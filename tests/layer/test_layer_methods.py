"""The layer half's design: methods as objects, the registry, typed results, params-shaped masks,
and version 0.1's names still working with a DeprecationWarning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cobs_jax
from cobs_jax.layer import CBS, Exact, LayerPruner, LayerSelection, Magnitude, SparseGPT, Wanda
from test_layerwise import Block, LinenBlock


def _layer(seed=0, n=64, d=16, out=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
    return rng.normal(size=(d, out)), x.T @ x


def test_names_are_shorthands_for_default_objects():
    w, h = _layer()
    for name, obj in [("magnitude", Magnitude()), ("wanda", Wanda()), ("sparsegpt", SparseGPT()), ("cbs", CBS())]:
        a = cobs_jax.prune_layer(w, h, sparsity=0.5, method=name)
        b = cobs_jax.prune_layer(w, h, sparsity=0.5, method=obj)
        assert isinstance(a, cobs_jax.LayerResult)
        np.testing.assert_array_equal(a.kernel, b.kernel)
        np.testing.assert_array_equal(a.mask, b.mask)
    a = cobs_jax.prune_layer(w, h, sparsity=0.5, method="wanda", update="exact")
    b = cobs_jax.prune_layer(w, h, sparsity=0.5, method=Wanda(), update=Exact())
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert cobs_jax.layer.LAYER_METHODS["sparsegpt"] is SparseGPT


def test_objects_are_frozen_hashable_values():
    assert SparseGPT(block_size=64) == SparseGPT(block_size=64) != SparseGPT()
    assert len({CBS(), CBS(start="sparsegpt"), CBS(start=SparseGPT())}) == 1  # a name becomes its object
    with pytest.raises(dataclasses.FrozenInstanceError):
        SparseGPT().block_size = 4  # type: ignore[misc]
    assert CBS(start="wanda").start == Wanda()


def test_a_new_method_plugs_in_and_registers():
    """The design page's example: a pruner in a few lines, used by name through the driver."""

    @dataclasses.dataclass(frozen=True)
    class Diagonal(LayerPruner):
        """OBS saliency with the diagonal of H only: w² H_jj, kept weights as they are."""

        def prune(self, problem):
            score = problem.w**2 * jnp.diagonal(problem.h)[None, :]
            keep = ~cobs_jax.smallest_k(score.reshape(-1), round(problem.sparsity * score.size)).reshape(score.shape)
            return LayerSelection(jnp.where(keep, problem.w, 0.0), keep, {})

    w, h = _layer(1)
    res = cobs_jax.prune_layer(w, h, sparsity=0.25, method=Diagonal())
    score = (w.T**2 * np.diag(h)[None, :]).T
    assert res.sparsity == pytest.approx(0.25)
    np.testing.assert_array_equal(res.mask, score > np.sort(score.ravel())[round(0.25 * w.size) - 1])
    cobs_jax.layer.register_layer_method("diagonal", Diagonal)
    try:
        by_name = cobs_jax.prune_layer(w, h, sparsity=0.25, method="diagonal", update="exact")
        assert by_name.error < res.error  # the exact update helps a method without one
    finally:
        del cobs_jax.layer.LAYER_METHODS["diagonal"]
    with pytest.raises(ValueError, match="LayerPruner subclass"):
        cobs_jax.layer.register_layer_method("bad", object)


def test_deprecated_flat_options_warn_and_mean_the_object():
    w, h = _layer(2)
    new = cobs_jax.prune_layer(w, h, sparsity=0.5, method=CBS(start=Wanda(granularity="layer"), window=4),
                               rel_damping=0.05)
    with pytest.warns(DeprecationWarning) as record:
        old = cobs_jax.prune_layer(w, h, sparsity=0.5, method="cbs", start="wanda", granularity="layer",
                                   window=4, damping=0.05)
    messages = " ".join(str(r.message) for r in record)
    assert "options live on the method object" in messages and "say `rel_damping=`" in messages
    np.testing.assert_array_equal(old.kernel, new.kernel)
    with pytest.warns(DeprecationWarning, match="return_info"):
        k, m, info = cobs_jax.prune_layer(w, h, sparsity=0.5, method="cbs", return_info=True)
    assert isinstance(info, cobs_jax.LayerInfo) and info.swaps is not None
    with pytest.raises(TypeError, match="unexpected keyword"):
        cobs_jax.prune_layer(w, h, sparsity=0.5, blocksize=8)


def test_layerwise_masks_are_params_shaped_and_plug_into_the_rest(tmp_path):
    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = np.random.default_rng(0).normal(size=(12, 5, 8))
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), chunk_size=6)
    for blk, masks, by_name in zip(res.blocks, res.masks, res.layer_masks):
        params = nnx.state(blk, nnx.Param)
        assert jax.tree.structure(masks) == jax.tree.structure(params)
        pruned = sum(int(np.sum(~np.asarray(m))) for m in by_name.values())
        assert cobs_jax.sparsity_of(masks) == pytest.approx(pruned / sum(p.size for p in jax.tree.leaves(params)))
        np.testing.assert_array_equal(masks["mlp"]["up_proj"]["kernel"][...], by_name["mlp/up_proj"])
        opt = optax.chain(optax.sgd(0.1), cobs_jax.keep_sparsity(masks))
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = opt.update(grads, opt.init(params), params)
        new = optax.apply_updates(params, updates)
        assert all(np.all(np.asarray(a)[~np.asarray(m)] == 0) for a, m in zip(jax.tree.leaves(new), jax.tree.leaves(masks)))
        cobs_jax.save(str(tmp_path / "b.safetensors"), params, masks)
        sparse = cobs_jax.to_sparse(params, masks, min_sparsity=0.4)
        assert sum(isinstance(leaf, jax.experimental.sparse.BCOO)
                   for leaf in jax.tree.leaves(sparse, is_leaf=lambda l: isinstance(l, jax.experimental.sparse.BCOO))) == 5
    assert res.sparsity == pytest.approx(0.5) and len(res.layers) == 10
    assert isinstance(res.layers[0], cobs_jax.LayerRecord) and set(res.timings) == {"capture", "prune", "forward", "total"}
    with pytest.warns(DeprecationWarning, match="info"):
        assert res.info["sparsity"] == res.sparsity


def test_linen_and_stacked_masks_follow_their_params():
    m = LinenBlock(8, 16)
    x = np.random.default_rng(1).normal(size=(8, 5, 8))
    v = m.init(jax.random.key(0), x[:1], 1.0)
    res = cobs_jax.prune_layerwise([(m, v)], x, sparsity=0.5, args=(1.0,), method="wanda")
    assert jax.tree.structure(res.masks[0]) == jax.tree.structure(v["params"])
    np.testing.assert_array_equal(res.masks[0]["up_proj"]["kernel"], res.layer_masks[0]["up_proj"])
    pruned = res.blocks[0][1]["params"]
    np.testing.assert_array_equal(cobs_jax.apply_masks(pruned, res.masks[0])["up_proj"]["kernel"],
                                  pruned["up_proj"]["kernel"])

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 12, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return x + self.up(x) @ jnp.ones((12, 8)) / 12

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Layer(nnx.Rngs(key))

    stack = cobs_jax.Stacked(make(jax.random.split(jax.random.key(0), 3)))
    res = cobs_jax.prune_layerwise(stack, x, sparsity=0.5)
    stacked_params = nnx.state(res.blocks.layers, nnx.Param)
    assert jax.tree.structure(res.masks) == jax.tree.structure(stacked_params)
    assert res.masks["up"]["kernel"][...].shape == (3, 8, 12)
    np.testing.assert_array_equal(res.masks["up"]["kernel"][...][1], res.layer_masks[1]["up"])


def test_deprecated_driver_names():
    blocks = [Block(8, 16, nnx.Rngs(0))]
    x = np.random.default_rng(0).normal(size=(6, 5, 8))
    new = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), chunk_size=3, rel_damping=0.05,
                                   method=SparseGPT(block_size=4))
    with pytest.warns(DeprecationWarning):
        old = cobs_jax.prune_layerwise(blocks, x, sparsity=0.5, args=(1.0,), batch_size=3, damping=0.05,
                                       block_size=4)
    for a, b in zip(jax.tree.leaves(nnx.state(new.blocks[0])), jax.tree.leaves(nnx.state(old.blocks[0]))):
        np.testing.assert_array_equal(a, b)


def test_one_tie_rule_for_every_top_k():
    """-0.0 and +0.0 tie, and ties go to the earlier position, in both halves' selections."""
    from cobs_jax._layer.masks import prune_smallest

    s = jnp.array([0.0, -0.0, 1.0, -0.0, 0.0, 2.0])
    want = np.array([True, True, False, False, False, False])
    np.testing.assert_array_equal(cobs_jax.smallest_k(s, 2), want)
    np.testing.assert_array_equal(prune_smallest(s, 2), want)
    w = jnp.array([[0.0, -0.0, 1.0, -0.0], [0.0, 2.0, 3.0, 4.0]]).T
    res = cobs_jax.prune_layer(w, jnp.eye(4), sparsity=0.375, method="magnitude")
    # rows layout (one row per output unit): |w| of unit 0 is [0, 0, 1, 0], all three zeros pruned
    np.testing.assert_array_equal(~np.asarray(res.mask), np.array([[True, True, False, True], [False] * 4]).T)
