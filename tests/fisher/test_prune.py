import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax
from helpers import TinyNNX, linen_setup, nnx_setup

COMBOS = [
    ("magnitude", None),
    ("woodfisher", None),
    ("woodfisher", "obs"),
    ("cbs", None),
    ("cbs", "cbs"),
    ("magnitude", "cbs"),
]


def _check_result(res, params, sparsity):
    layout = cobs_jax.make_layout(params)
    assert jax.tree.structure(res.params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
    keep = np.asarray(layout.from_masks(res.masks))
    assert (~keep).sum() == round(sparsity * layout.size)
    w = np.asarray(layout.ravel(res.params))
    assert np.all(w[~keep] == 0.0)
    # non-prunable leaves untouched, masks all True there
    for ok, a, b, m in zip(
        layout.prunable, jax.tree.leaves(res.params), jax.tree.leaves(params), jax.tree.leaves(res.masks)
    ):
        if not ok:
            np.testing.assert_array_equal(a, b)
            assert np.all(m)
    assert res.sparsity == pytest.approx((~keep).mean())


@pytest.mark.parametrize("method,update", COMBOS)
def test_end_to_end_linen(method, update):
    params, loss_fn, batch = linen_setup(n=48)
    before = copy.deepcopy(jax.tree.map(np.asarray, params))
    res = cobs_jax.prune(
        params, loss_fn, batch, sparsity=0.5, method=method, update=update, abs_damping=1e-2,
        fisher_blocks="layer", key=jax.random.key(1),
    )
    _check_result(res, params, 0.5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # input not mutated
    assert np.isfinite(res.loss)
    assert set(res.layer_sparsity) == set(cobs_jax.make_layout(params).names)
    again = cobs_jax.prune(
        params, loss_fn, batch, sparsity=0.5, method=method, update=update, abs_damping=1e-2,
        fisher_blocks="layer", key=jax.random.key(1),
    )
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)  # deterministic for a key


@pytest.mark.parametrize("method,update", [("woodfisher", "obs"), ("cbs", "cbs")])
def test_end_to_end_nnx(method, update):
    state, loss_fn, batch = nnx_setup(n=48)
    res = cobs_jax.prune(state, loss_fn, batch, sparsity=0.6, method=method, update=update, abs_damping=1e-2)
    _check_result(res, state, 0.6)
    model = TinyNNX(nnx.Rngs(0))
    nnx.update(model, res.params)
    mask = np.asarray(jax.tree.leaves(res.masks["l1"]["kernel"])[0])
    assert np.all(np.asarray(model.l1.kernel[...])[~mask] == 0)
    out = model(batch["x"])
    np.testing.assert_allclose(loss_fn(res.params, batch), res.loss, rtol=1e-5)
    assert np.all(np.isfinite(out))


def test_cbs_update_is_best_quadratic_for_the_mask():
    params, loss_fn, batch = linen_setup(n=48)
    kw = dict(sparsity=0.5, method="woodfisher", abs_damping=1e-2)
    none = cobs_jax.prune(params, loss_fn, batch, **kw)
    obs = cobs_jax.prune(params, loss_fn, batch, update="obs", **kw)
    cbs = cobs_jax.prune(params, loss_fn, batch, update="cbs", **kw)
    assert cbs.stats["quadratic_loss"] <= obs.stats["quadratic_loss"] + 1e-9
    assert cbs.stats["quadratic_loss"] <= none.stats["quadratic_loss"] + 1e-9
    # without update: 1/2 w_P^T F_lambda w_P = 1/2 (objective + lambda ||w_P||^2)
    layout = cobs_jax.make_layout(params)
    w_p = np.where(np.asarray(layout.from_masks(none.masks)), 0.0, np.asarray(layout.ravel(params)))
    expected = 0.5 * (none.stats["objective"] + 1e-2 * np.sum(w_p**2))
    assert none.stats["quadratic_loss"] == pytest.approx(expected, rel=1e-5)


def test_precomputed_grads_and_zero_sparsity():
    params, loss_fn, batch = linen_setup(n=16)
    layout = cobs_jax.make_layout(params)
    g = cobs_jax.per_example_grads(params, loss_fn, batch, layout)
    a = cobs_jax.prune(params, loss_fn, batch, sparsity=0.3, method="woodfisher", grads=g)
    b = cobs_jax.prune(params, loss_fn, batch, sparsity=0.3, method="woodfisher")
    np.testing.assert_array_equal(layout.from_masks(a.masks), layout.from_masks(b.masks))
    z = cobs_jax.prune(params, sparsity=0.0)
    for x, y in zip(jax.tree.leaves(z.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="grads"):
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.3, method="woodfisher", grads=g[:, :5])


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(sparsity):
    params, _, _ = linen_setup()
    with pytest.raises(ValueError, match="sparsity"):
        cobs_jax.prune(params, sparsity=sparsity)


@pytest.mark.parametrize("damping", [0.0, -1e-3, float("inf")])
def test_bad_damping(damping):
    params, loss_fn, batch = linen_setup()
    with pytest.raises(ValueError, match="damping"):
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", abs_damping=damping)


def test_bad_inputs_named():
    params, loss_fn, batch = linen_setup()
    with pytest.raises(ValueError, match="batch"):
        bad = {"x": batch["x"], "y": batch["y"][:3]}
        cobs_jax.prune(params, loss_fn, bad, sparsity=0.5, method="woodfisher")
    with pytest.raises(ValueError, match="no prunable"):
        cobs_jax.prune({"b": jnp.ones(4)}, sparsity=0.5)
    with pytest.raises(ValueError, match="method"):
        cobs_jax.prune(params, sparsity=0.5, method="random")
    with pytest.raises(ValueError, match="update"):
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, update="sgd")
    with pytest.raises(ValueError, match="loss_fn"):
        cobs_jax.prune(params, sparsity=0.5, method="woodfisher")
    with pytest.raises(ValueError, match="batch"):
        cobs_jax.prune(params, loss_fn, sparsity=0.5, method="cbs")
    with pytest.raises(ValueError, match="blocks"):
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", fisher_blocks="rows")

    def nan_loss(p, b):
        return loss_fn(p, b) + 0.0 * jnp.sum(jnp.sqrt(p["params"]["Dense_1"]["kernel"]))

    with pytest.raises(ValueError, match=r"NaN or Inf.*Dense_1"):
        cobs_jax.prune(params, nan_loss, batch, sparsity=0.5, method="woodfisher")


def test_apply_masks_and_mismatch():
    params, _, _ = linen_setup()
    res = cobs_jax.prune(params, sparsity=0.5)
    masked = cobs_jax.apply_masks(params, res.masks)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(res.params)):
        np.testing.assert_array_equal(a, b)
    assert cobs_jax.sparsity_of(res.masks) == pytest.approx(21 / sum(x.size for x in jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="masks"):
        cobs_jax.apply_masks(params, {"params": res.masks["params"]["Dense_0"]})
    wrong = jax.tree.map(lambda m: m[..., :1], res.masks)
    with pytest.raises(ValueError, match="masks"):
        cobs_jax.apply_masks(params, wrong)


@pytest.mark.parametrize("method,update", COMBOS + [("iht", None)])
def test_nan_weights_raise_naming_the_layer(method, update):
    params, loss_fn, batch = linen_setup()
    bad = jax.tree.map(lambda a: a, params)
    kernel = bad["params"]["Dense_1"]["kernel"]
    bad["params"]["Dense_1"]["kernel"] = kernel.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1"):
        cobs_jax.prune(bad, loss_fn, batch, sparsity=0.5, method=method, update=update)
    assert not np.isnan(np.asarray(params["params"]["Dense_1"]["kernel"])).any()


def test_int_key_is_a_seed_and_bad_keys_are_named():
    params, loss_fn, batch = linen_setup()
    kw = dict(sparsity=0.5, method="cbs")
    a = cobs_jax.prune(params, loss_fn, batch, key=3, **kw)
    b = cobs_jax.prune(params, loss_fn, batch, key=jax.random.key(3), **kw)
    c = cobs_jax.prune(params, loss_fn, batch, key=jax.random.PRNGKey(3), **kw)
    for r in (b, c):
        for x, y in zip(jax.tree.leaves(a.masks), jax.tree.leaves(r.masks)):
            np.testing.assert_array_equal(x, y)
    for key in ("seed", 1.5, jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(ValueError, match="`key`"):
            cobs_jax.prune(params, loss_fn, batch, key=key, **kw)
    with pytest.raises(ValueError, match=r"`keys\[1\]`"):
        cobs_jax.prune_sweep(params, loss_fn, batch, sparsities=[0.5], keys=[0, "x"], method="cbs")
