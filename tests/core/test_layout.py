import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from helpers import linen_setup, nnx_setup


def test_default_prunable_linen_kernels_only():
    params, _, _ = linen_setup()
    layout = cobs_jax.make_layout(params)
    assert layout.names == ("['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']")
    assert layout.size == 4 * 6 + 6 * 3
    assert layout.layer_ranges() == ((0, 24), (24, 42))


def test_default_prunable_nnx_state():
    state, _, _ = nnx_setup()
    layout = cobs_jax.make_layout(state)
    assert len(layout.names) == 2 and all("kernel" in n for n in layout.names)
    assert layout.size == 4 * 6 + 6 * 3


def test_whole_variables_dict_only_params_collection():
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5)(x)
            return nn.BatchNorm(use_running_average=True)(x)

    variables = BNNet().init(jax.random.key(0), jnp.ones((1, 3)))
    # a 2-D float leaf in batch_stats must still not be pruned
    variables = {**variables, "batch_stats": {"fake": jnp.ones((2, 2))}}
    layout = cobs_jax.make_layout(variables)
    assert layout.names == ("['params']['Dense_0']['kernel']",)


def test_predicate_and_bool_tree_override():
    params, _, _ = linen_setup()
    by_pred = cobs_jax.make_layout(params, lambda path, leaf: "Dense_1" in path)
    assert by_pred.names == ("['params']['Dense_1']['bias']", "['params']['Dense_1']['kernel']")
    flags = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.tree_util.keystr(kp).endswith("['Dense_0']['kernel']"), params
    )
    by_tree = cobs_jax.make_layout(params, flags)
    assert by_tree.names == ("['params']['Dense_0']['kernel']",)
    with pytest.raises(ValueError, match="prunable"):
        cobs_jax.make_layout(params, {"params": True})


def test_ravel_unravel_roundtrip_and_order():
    params, _, _ = linen_setup()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 2 else x, params)
    layout = cobs_jax.make_layout(params)
    vec = layout.ravel(params)
    assert vec.dtype == jnp.float32 and vec.shape == (layout.size,)
    k0 = params["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(vec[:24], np.asarray(k0, np.float32).ravel())
    back = layout.unravel(vec, params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_masks_roundtrip():
    params, _, _ = linen_setup()
    layout = cobs_jax.make_layout(params)
    keep = jnp.arange(layout.size) % 3 != 0
    masks = layout.to_masks(keep)
    assert jax.tree.structure(masks) == jax.tree.structure(params)
    assert masks["params"]["Dense_0"]["bias"].all()
    np.testing.assert_array_equal(layout.from_masks(masks), keep)


def test_blocks_specs():
    params, _, _ = linen_setup()
    layout = cobs_jax.make_layout(params)
    assert layout.blocks("model") == ((0, 42),)
    assert layout.blocks("layer") == ((0, 24), (24, 42))
    assert layout.blocks(10) == ((0, 10), (10, 20), (20, 24), (24, 34), (34, 42))
    for bad in ("rows", 0, -3, 1.5):
        with pytest.raises(ValueError, match="blocks"):
            layout.blocks(bad)


def test_errors_empty_and_no_prunable():
    with pytest.raises(ValueError, match="empty"):
        cobs_jax.make_layout({})
    with pytest.raises(ValueError, match="no prunable"):
        cobs_jax.make_layout({"b": jnp.ones(3)})
    params, _, _ = linen_setup()
    layout = cobs_jax.make_layout(params)
    with pytest.raises(ValueError, match="structure"):
        layout.ravel({"params": {}})
