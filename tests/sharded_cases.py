"""Multi-device checks, run by ``test_sharding.py`` in a subprocess with 8 virtual CPU devices.

Not collected by the main run (the device count is fixed when JAX starts); run it alone with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharded_cases.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import cobs_jax
from cobs_jax._fisher import prune as _prune
from helpers import linen_setup

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

N = 48
CASES = [
    ("magnitude", "cbs", "layer"),
    ("woodfisher", "obs", "model"),
    ("iht", "cbs", 10),  # chunked blocks: equal-size chunks share one lax.map
    (cobs_jax.CBS(num_trials=4, objective="update_aware"), "cbs", "layer"),
]


def mesh(p):
    return Mesh(np.array(jax.devices()[:p]), ("rows",))


@pytest.fixture(scope="module")
def setup():
    return linen_setup(n=N, dtype=jnp.float64, hidden=8)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a.masks), jax.tree.leaves(b.masks)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    if a.loss is not None:
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-9)
    for name in ("objective", "quadratic_loss"):
        if name in a.stats:
            np.testing.assert_allclose(a.stats[name], b.stats[name], rtol=1e-9)


@pytest.mark.parametrize("method,update,blocks", CASES)
def test_same_masks_and_updates_on_1_and_8_devices(setup, method, update, blocks):
    params, loss_fn, batch = setup
    kw = dict(sparsity=0.6, method=method, update=update, fisher_blocks=blocks, abs_damping=1e-2)
    ref = cobs_jax.prune(params, loss_fn, batch, **kw)
    if isinstance(method, cobs_jax.CBS) or method == "cbs":
        assert np.sum(ref.stats["ls_swaps"]) > 0  # the swap search did something to compare
    for p in (1, 8):  # the mesh path on one device, and rows split over eight
        assert_same(ref, cobs_jax.prune(params, loss_fn, batch, mesh=mesh(p), **kw))


def test_grads_are_sharded_by_rows(setup):
    params, loss_fn, batch = setup
    layout = cobs_jax.make_layout(params)
    g = cobs_jax.per_example_grads(params, loss_fn, batch, layout, mesh=mesh(8), chunk_size=4)
    assert g.sharding.spec == jax.sharding.PartitionSpec("rows")
    shards = sorted(g.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8 and all(s.data.shape == (N // 8, layout.size) for s in shards)
    assert len({s.device for s in shards}) == 8
    np.testing.assert_allclose(g, cobs_jax.per_example_grads(params, loss_fn, batch, layout), rtol=1e-12)


@pytest.mark.parametrize("method,update", [("woodfisher", "obs"), ("cbs", "cbs"), ("iht", "cbs")])
def test_no_device_gathers_g(setup, method, update):
    """The compiled programs never all-gather a block of G: only N-vectors and N x N matrices."""
    params, loss_fn, batch = setup
    layout = cobs_jax.make_layout(params)
    m = mesh(8)
    g = cobs_jax.per_example_grads(params, loss_fn, batch, layout, mesh=m)
    sel, blocks = cobs_jax.make_selector(method), layout.blocks("layer")
    widths = {e - s for s, e in blocks} | {layout.size}
    args = (params, g, jnp.asarray(1e-2), batch)
    pruned, _ = _prune._select(sel, layout, loss_fn, blocks, m, *args, jnp.int32(30), None, jax.random.key(0))
    texts = [
        _prune._select.lower(sel, layout, loss_fn, blocks, m, *args, jnp.int32(30), None,
                             jax.random.key(0)).compile().as_text(),
        _prune._apply_update.lower(update, layout, loss_fn, blocks, m, params, pruned, g, jnp.asarray(1e-2),
                                   batch, jnp.asarray(1.0)).compile().as_text(),
    ]
    gathered = [tuple(int(d) for d in shape.split(",") if d)
                for text in texts for shape in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather", text)]
    assert gathered, "expected all-gathers of N-vectors / N x N Gram matrices"
    for shape in gathered:
        assert not any(d in widths for d in shape), f"an all-gather of shape {shape} holds columns of G"
    assert "collective-permute" in "".join(texts)  # the Gram matrices are built on a ring


def test_sweep_on_mesh_equals_single_device(setup):
    params, loss_fn, batch = setup
    kw = dict(sparsities=[0.4, 0.8], keys=[0, 1], method=cobs_jax.CBS(num_trials=4), update="cbs",
              fisher_blocks="layer", abs_damping=1e-2)
    for a, b in zip(cobs_jax.prune_sweep(params, loss_fn, batch, **kw),
                    cobs_jax.prune_sweep(params, loss_fn, batch, mesh=mesh(8), **kw)):
        assert_same(a, b)


def test_apply_update_and_gradual_on_mesh(setup):
    params, loss_fn, batch = setup
    layout = cobs_jax.make_layout(params)
    masks = cobs_jax.prune(params, sparsity=0.7).masks
    g1 = cobs_jax.per_example_grads(params, loss_fn, batch, layout)
    g8 = cobs_jax.per_example_grads(params, loss_fn, batch, layout, mesh=mesh(8))
    for update in ("cbs", "obs"):
        a = cobs_jax.apply_update(params, masks, g1, update=update, abs_damping=1e-2)
        b = cobs_jax.apply_update(params, masks, g8, update=update, abs_damping=1e-2, mesh=mesh(8))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    kw = dict(sparsity=0.8, stages=3, method="woodfisher", update="cbs", abs_damping=1e-2)
    assert_same(cobs_jax.prune_multistage(params, loss_fn, batch, **kw),
                cobs_jax.prune_multistage(params, loss_fn, batch, mesh=mesh(8), **kw))


def test_rows_must_split_over_the_mesh(setup):
    params, loss_fn, batch = setup
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        cobs_jax.prune(params, loss_fn, jax.tree.map(lambda x: x[:44], batch), sparsity=0.5,
                       method="woodfisher", mesh=mesh(8))
    with pytest.raises(ValueError, match="mesh"):
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", mesh="rows")


@pytest.mark.parametrize("opts", [dict(sparsity=0.5), dict(pattern="2:4", method="wanda", update="exact"),
                                  dict(sparsity=0.5, asymmetric=True)])  # CBS's per-unit sharding: the next test
def test_prune_layerwise_examples_sharded_equals_single_device(opts):
    """Calibration examples sharded over 8 devices (Hessians summed across them) == 1 device."""
    from flax import nnx

    from test_layerwise import Block

    blocks = [Block(8, 16, nnx.Rngs(i)) for i in range(2)]
    x = np.random.default_rng(0).normal(size=(16, 5, 8))
    one = cobs_jax.prune_layerwise(blocks, x, args=(1.0,), chunk_size=8, **opts)
    many = cobs_jax.prune_layerwise(blocks, x, args=(1.0,), chunk_size=8, mesh=mesh(8), **opts)
    for m1, m8 in zip(one.layer_masks, many.layer_masks):
        for name in m1:
            np.testing.assert_array_equal(m1[name], m8[name])
    for b1, b8 in zip(one.blocks, many.blocks):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
                     nnx.to_pure_dict(nnx.state(b1)), nnx.to_pure_dict(nnx.state(b8)))
    np.testing.assert_allclose(one.outputs, many.outputs, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of the mesh axis"):
        cobs_jax.prune_layerwise(blocks, x, args=(1.0,), chunk_size=4, mesh=mesh(8), **opts)


@pytest.mark.parametrize("opts", [dict(sparsity=0.6, method=cobs_jax.layer.CBS(window=8)),
                                  dict(sparsity=0.5, method="wanda", update="exact")])
def test_prune_layer_output_units_sharded_equals_single_device(opts):
    """The per-unit work of CBS and the exact re-solve split over 8 devices (37 units: padded) == 1 device."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 24)) @ (np.eye(24) + 0.4 * rng.normal(size=(24, 24)))
    w = rng.normal(size=(24, 37))
    one = cobs_jax.prune_layer(w, x.T @ x, **opts)
    many = cobs_jax.prune_layer(w, x.T @ x, mesh=mesh(8), **opts)
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_allclose(one[0], many[0], rtol=1e-9, atol=1e-12)
