"""The Fisher half's vocabulary: abs_damping, fisher_blocks, (params, loss_fn, batch), typed
results, prune_multistage vs prune_gradual; version 0.1's names warn and mean the same."""

import jax
import numpy as np
import pytest

import cobs_jax
from cobs_jax._core.layout import leaf_name
from helpers import linen_setup


def test_renamed_options_warn_and_give_the_same_result():
    params, loss_fn, batch = linen_setup()
    kw = dict(sparsity=0.5, method="woodfisher", update="cbs")
    new = cobs_jax.prune(params, loss_fn, batch, abs_damping=1e-2, fisher_blocks="layer", **kw)
    with pytest.warns(DeprecationWarning, match="abs_damping"):
        old = cobs_jax.prune(params, loss_fn, batch, damping=1e-2, fisher_blocks="layer", **kw)
    with pytest.warns(DeprecationWarning, match="fisher_blocks"):
        old2 = cobs_jax.prune(params, loss_fn, batch, abs_damping=1e-2, blocks="layer", **kw)
    for r in (old, old2):
        jax.tree.map(np.testing.assert_array_equal, r.params, new.params)
    with pytest.raises(TypeError, match="unexpected keyword"):
        cobs_jax.prune(params, loss_fn, batch, dampin=1e-2, **kw)
    with pytest.raises(ValueError, match="`abs_damping`"):
        cobs_jax.prune(params, loss_fn, batch, abs_damping=0.0, **kw)


def test_prune_result_is_typed():
    params, loss_fn, batch = linen_setup()
    res = cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method=cobs_jax.CBS(num_trials=4), update="cbs")
    assert res.sparsity == pytest.approx(res.num_pruned / res.num_prunable)
    assert res.num_pruned == round(0.5 * res.num_prunable)
    assert isinstance(res.loss, float) and np.isfinite(res.loss)
    assert {"grads", "select", "update"} <= set(res.timings)
    assert res.stats["method"] == "CBS" and "objective" in res.stats
    with pytest.warns(DeprecationWarning, match="info"):
        info = res.info
    assert info["sparsity"] == res.sparsity and info["loss"] == res.loss and info["method"] == "CBS"


def test_per_example_grads_takes_prunes_argument_order():
    params, loss_fn, batch = linen_setup(n=8)
    g = cobs_jax.per_example_grads(params, loss_fn, batch)
    assert g.shape == (8, cobs_jax.make_layout(params).size)
    with pytest.warns(DeprecationWarning, match=r"\(params, loss_fn, batch\)"):
        old = cobs_jax.per_example_grads(loss_fn, params, batch, cobs_jax.make_layout(params))
    np.testing.assert_array_equal(g, old)


def test_prune_multistage_is_the_compiled_path_and_prune_gradual_the_loop():
    params, loss_fn, batch = linen_setup()
    kw = dict(sparsity=0.6, stages=2, method="woodfisher", update="cbs", abs_damping=1e-2)
    comp = cobs_jax.prune_multistage(params, loss_fn, batch, check=cobs_jax.LossCheck(ratio=2.0), **kw)
    assert isinstance(comp, cobs_jax.StagedResult) and comp.stats["compiled"]
    assert comp.num_pruned == round(0.6 * comp.num_prunable) and len(comp.stages) >= 2
    with pytest.warns(DeprecationWarning, match="prune_multistage"):
        old = cobs_jax.prune_gradual(params, loss_fn, batch, loss_check=2.0, **kw)
    jax.tree.map(np.testing.assert_array_equal, old.params, comp.params)
    calls = []
    loop = cobs_jax.prune_gradual(params, loss_fn, batch, finetune=lambda p, m, t: calls.append(t) or p, **kw)
    assert calls == [0] and not loop.stats["compiled"] and loop.num_pruned == comp.num_pruned
    with pytest.raises(ValueError, match="compiled schedule"):
        cobs_jax.prune_gradual(params, loss_fn, batch, finetune=lambda p, m, t: p, warm_start=False, **kw)
    with pytest.raises(ValueError, match=r"LossCheck\(ratio"):
        cobs_jax.LossCheck(ratio=0.0)
    unchecked = cobs_jax.prune_multistage(params, loss_fn, batch, check=None, **kw)
    assert len(unchecked.stages) == 2 and all(e["halvings"] == 0 for e in unchecked.stages)


def test_exclude_is_the_same_idea_in_both_halves():
    params, loss_fn, batch = linen_setup()
    names = [leaf_name(p) for p in cobs_jax.make_layout(params).names]
    assert names == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    a = cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", exclude="Dense_1")
    b = cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher",
                       prunable=lambda path, leaf: leaf.ndim >= 2 and "Dense_1" not in path)
    jax.tree.map(np.testing.assert_array_equal, a.masks, b.masks)
    assert list(a.layer_sparsity) == ["['params']['Dense_0']['kernel']"]
    c = cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", exclude=lambda n: n.endswith("1/kernel"))
    jax.tree.map(np.testing.assert_array_equal, a.masks, c.masks)
    with pytest.raises(ValueError, match="`exclude` pattern 'Dense_7' matches no layer"):
        cobs_jax.prune(params, sparsity=0.5, exclude=["Dense_0", "Dense_7"])
    with pytest.raises(ValueError, match="no prunable leaves"):
        cobs_jax.prune(params, sparsity=0.5, exclude="Dense")
