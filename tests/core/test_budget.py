"""Layer-wise budgets, N:M patterns and frozen (earlier) masks, for every method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from helpers import dense_f, linen_setup
from test_update import dense_cbs_update

METHODS = ["magnitude", "woodfisher", "cbs", "iht"]


def _setup(hidden=8):
    params, loss_fn, batch = linen_setup(n=40, dtype=jnp.float64, hidden=hidden)
    return params, loss_fn, batch, cobs_jax.make_layout(params)


def _prune(params, loss_fn, batch, **kw):
    kw.setdefault("abs_damping", 1e-2)
    return cobs_jax.prune(params, loss_fn, batch, key=jax.random.key(3), **kw)


def _counts(layout, masks):
    keep = np.asarray(layout.from_masks(masks))
    return [int((~keep[s:e]).sum()) for s, e in layout.layer_ranges()]


# ---- make_budget -------------------------------------------------------------------------------
def test_make_budget_counts():
    _, _, _, layout = _setup()
    sizes = layout.sizes  # (4*8, 8*3) = (32, 24)
    assert make(layout, 0.5).counts == 28 and make(layout, 0.5).groups is None
    uni = make(layout, 0.3, budget="uniform")
    np.testing.assert_array_equal(uni.counts, [round(0.3 * n) for n in sizes])
    np.testing.assert_array_equal(np.bincount(uni.groups), sizes)
    d = make(layout, 0.1, budget={"Dense_1/kernel": 0.75})
    np.testing.assert_array_equal(d.counts, [round(0.1 * 32), 18])
    full = make(layout, budget={"['params']['Dense_0']['kernel']": 0.5, "params/Dense_1/kernel": 0.25})
    np.testing.assert_array_equal(full.counts, [16, 6])
    nm = make(layout, pattern="2:4")
    assert nm.total == 28 and np.all(np.bincount(nm.groups) == 4) and np.all(nm.counts == 2)


def make(layout, sparsity=None, **kw):
    return cobs_jax.make_budget(layout, sparsity, **kw)


def test_nm_groups_run_along_the_input_axis_of_conv_kernels():
    params = {"conv": {"kernel": jnp.zeros((3, 3, 8, 5))}}
    layout = cobs_jax.make_layout(params)
    groups = cobs_jax.make_budget(layout, pattern="1:4").groups.reshape(3, 3, 8, 5)
    for a in range(3):
        for b in range(3):
            for o in range(5):
                col = groups[a, b, :, o]
                assert len(set(col[:4])) == 1 and len(set(col[4:])) == 1 and col[0] != col[4]
    assert len(np.unique(groups)) == 3 * 3 * 2 * 5


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"sparsity": 0.5, "budget": "per-layer"}, "budget"),
        ({"sparsity": 0.5, "budget": {"Dense_9/kernel": 0.5}}, "Dense_9"),
        ({"sparsity": 0.5, "budget": {"kernel": 0.5}}, "several"),
        ({"budget": {"Dense_0/kernel": 0.5}}, "Dense_1"),
        ({"sparsity": 0.5, "budget": {"Dense_0/kernel": 1.0}}, "Dense_0"),
        ({"sparsity": 0.5, "budget": 3}, "budget"),
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "2-4"}, "pattern"),
        ({"sparsity": 0.3, "pattern": "2:4"}, "contradicts"),
        ({"pattern": "2:4", "budget": "uniform"}, "global"),
        ({"pattern": "1:3"}, "multiple of 3"),
        ({}, "sparsity"),
        ({"sparsity": 1.0}, "sparsity"),
    ],
)
def test_bad_budget_and_pattern(kw, match):
    params, loss_fn, batch, _ = _setup()
    with pytest.raises(ValueError, match=match):
        _prune(params, loss_fn, batch, **kw)


# ---- budgets through prune, every method --------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_per_layer_budgets_are_met_exactly(method):
    params, loss_fn, batch, layout = _setup()
    update = None if method == "magnitude" else "cbs"
    res = _prune(params, loss_fn, batch, sparsity=0.4, method=method, update=update, budget="uniform")
    assert _counts(layout, res.masks) == [round(0.4 * n) for n in layout.sizes]
    res = _prune(
        params, loss_fn, batch, sparsity=0.2, method=method, update=update,
        budget={"Dense_1/kernel": 0.7}, fisher_blocks="layer",
    )
    assert _counts(layout, res.masks) == [round(0.2 * 32), round(0.7 * 24)]
    ls = res.layer_sparsity
    assert ls["['params']['Dense_1']['kernel']"] == pytest.approx(round(0.7 * 24) / 24)
    w = np.asarray(layout.ravel(res.params))
    assert np.all(w[~np.asarray(layout.from_masks(res.masks))] == 0)


def test_uniform_magnitude_thresholds_each_layer():
    params, loss_fn, batch, layout = _setup()
    res = _prune(params, loss_fn, batch, sparsity=0.5, budget="uniform")
    w, keep = np.asarray(layout.ravel(params)), np.asarray(layout.from_masks(res.masks))
    for s, e in layout.layer_ranges():
        assert np.abs(w[s:e][~keep[s:e]]).max() <= np.abs(w[s:e][keep[s:e]]).min()


# ---- N:M ----------------------------------------------------------------------------------------
def _assert_nm(params, masks, n, m):
    for kernel in (masks["params"]["Dense_0"]["kernel"], masks["params"]["Dense_1"]["kernel"]):
        k = np.asarray(kernel)
        groups = k.reshape(k.shape[0] // m, m, k.shape[1])  # M consecutive along the input axis
        np.testing.assert_array_equal(groups.sum(axis=1), n)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_nm_pattern_every_method(method, pattern):
    params, loss_fn, batch, layout = _setup()
    n, m = map(int, pattern.split(":"))
    res = _prune(params, loss_fn, batch, pattern=pattern, method=method, update="cbs")
    _assert_nm(params, res.masks, n, m)
    assert res.sparsity == pytest.approx(1 - n / m)
    assert res.stats["pattern"] == pattern


def test_nm_woodfisher_chooses_by_obs_saliency_and_update_is_exact():
    params, loss_fn, batch, layout = _setup()
    grads = cobs_jax.per_example_grads(params, loss_fn, batch, layout)
    res = _prune(params, loss_fn, batch, pattern="2:4", method="woodfisher", update="cbs", grads=grads)
    fisher = cobs_jax.Fisher(grads, jnp.asarray(1e-2), ((0, layout.size),))
    f = dense_f(fisher)
    w = np.asarray(layout.ravel(params))
    saliency = w**2 / np.diag(np.linalg.inv(f))
    pruned = ~np.asarray(layout.from_masks(res.masks))
    groups = cobs_jax.make_budget(layout, pattern="2:4").groups
    for g in range(groups.max() + 1):
        idx = np.flatnonzero(groups == g)
        expected = idx[np.argsort(saliency[idx], kind="stable")[:2]]
        assert set(np.flatnonzero(pruned[idx]) + 0) == set(np.searchsorted(idx, expected))
    # the update is the exact constrained minimiser for this N:M mask
    expected_w = np.where(pruned, 0.0, w + dense_cbs_update(f, w, pruned))
    np.testing.assert_allclose(np.asarray(layout.ravel(res.params)), expected_w, rtol=1e-7, atol=1e-9)


def test_nm_cbs_not_worse_than_its_magnitude_start():
    params, loss_fn, batch, layout = _setup(hidden=16)
    mp = _prune(params, loss_fn, batch, pattern="2:4", method="magnitude")
    cbs = _prune(params, loss_fn, batch, pattern="2:4", method=cobs_jax.CBS(num_trials=4))
    assert cbs.loss <= mp.loss + 1e-12
    _assert_nm(params, cbs.masks, 2, 4)


# ---- frozen masks (gradual pruning) -------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_earlier_masks_stay_pruned(method, budget):
    params, loss_fn, batch, layout = _setup()
    update = None if method == "magnitude" else "cbs"
    first = _prune(params, loss_fn, batch, sparsity=0.3, method=method, update=update, budget=budget)
    second = _prune(
        first.params, loss_fn, batch, sparsity=0.6, method=method, update=update, budget=budget,
        masks=first.masks,
    )
    k1 = ~np.asarray(layout.from_masks(first.masks))
    k2 = ~np.asarray(layout.from_masks(second.masks))
    assert np.all(k2[k1])  # nested
    assert k2.sum() == cobs_jax.make_budget(layout, 0.6, budget=budget).total
    with pytest.raises(ValueError, match="more than the target"):
        _prune(second.params, loss_fn, batch, sparsity=0.3, method=method, budget=budget, masks=second.masks)
