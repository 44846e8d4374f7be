import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from helpers import linen_setup

CASES = [
    ("magnitude", None),
    ("woodfisher", "obs"),
    (cobs_jax.CBS(num_trials=5), "cbs"),
    ("iht", "cbs"),
]


@pytest.mark.parametrize("method,update", CASES)
def test_sweep_equals_loop_of_single_calls(method, update):
    params, loss_fn, batch = linen_setup(n=40, dtype=jnp.float64, hidden=8)
    levels, keys = [0.3, 0.6, 0.85], [jax.random.key(3), jax.random.key(7)]
    grads = cobs_jax.per_example_grads(params, loss_fn, batch, cobs_jax.make_layout(params))
    kw = dict(method=method, update=update, abs_damping=1e-2, fisher_blocks="layer", grads=grads)
    sweep = cobs_jax.prune_sweep(params, loss_fn, batch, sparsities=levels, keys=keys, **kw)
    assert len(sweep) == len(levels) * len(keys)
    for b, res in enumerate(sweep):
        s, key = levels[b // 2], keys[b % 2]
        ref = cobs_jax.prune(params, loss_fn, batch, sparsity=s, key=key, **kw)
        assert res.stats["target"] == s and res.stats["key_index"] == b % 2
        assert res.num_pruned == ref.num_pruned == round(s * 56)
        for a, r in zip(jax.tree.leaves(res.masks), jax.tree.leaves(ref.masks)):
            np.testing.assert_array_equal(a, r)
        for a, r in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref.params)):
            np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12)
        if ref.loss is not None:
            np.testing.assert_allclose(res.loss, ref.loss, rtol=1e-9)


def test_sweep_keys_matter_for_cbs_and_ints_are_keys():
    params, loss_fn, batch = linen_setup(n=40, dtype=jnp.float64, hidden=8)
    out = cobs_jax.prune_sweep(
        params, loss_fn, batch, sparsities=[0.7], keys=[0, 1, 2, 3], method=cobs_jax.CBS(num_trials=6),
        abs_damping=1e-2,
    )
    ref = cobs_jax.prune(params, loss_fn, batch, sparsity=0.7, key=jax.random.key(2),
                         method=cobs_jax.CBS(num_trials=6), abs_damping=1e-2)
    np.testing.assert_array_equal(out[2].stats["rmp_losses"], ref.stats["rmp_losses"])
    # different keys draw different RMP trials (trial 0 is magnitude for every key)
    assert not np.allclose(out[0].stats["rmp_losses"][1:], out[1].stats["rmp_losses"][1:])


def test_sweep_bad_input():
    params, loss_fn, batch = linen_setup(n=8)
    with pytest.raises(ValueError, match="sparsities"):
        cobs_jax.prune_sweep(params, sparsities=[])
    with pytest.raises(ValueError, match="sparsity"):
        cobs_jax.prune_sweep(params, sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="keys"):
        cobs_jax.prune_sweep(params, sparsities=[0.5], keys=[])


def test_sweep_with_uniform_budget_and_auto_scale_equals_prune():
    params, loss_fn, batch = linen_setup(n=40, dtype=jnp.float64, hidden=8)
    kw = dict(method="woodfisher", update="cbs", update_scale="auto", abs_damping=1e-2, budget="uniform")
    for res, s in zip(cobs_jax.prune_sweep(params, loss_fn, batch, sparsities=[0.5, 0.8], **kw), [0.5, 0.8]):
        ref = cobs_jax.prune(params, loss_fn, batch, sparsity=s, **kw)
        assert res.layer_sparsity == ref.layer_sparsity
        assert res.stats["update_scale"] == ref.stats["update_scale"]
        np.testing.assert_allclose(res.stats["scale_losses"], ref.stats["scale_losses"], rtol=1e-9)
        for a, r in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref.params)):
            np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12)
