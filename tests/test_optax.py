import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cobs_jax
from helpers import linen_setup, nnx_setup

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
}


def _train(params, loss_fn, batch, tx, steps=25):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, batch)
        g = jax.tree.map(lambda x: x + 1.0, g)  # non-zero gradient on every weight
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _pruned_entries(params, masks):
    return np.concatenate(
        [np.asarray(p)[~np.asarray(m)] for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))]
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(name):
    params, loss_fn, batch = linen_setup(n=32)
    res = cobs_jax.prune(params, sparsity=0.6)
    tx = optax.chain(OPTIMIZERS[name](), cobs_jax.keep_sparsity(res.masks))
    trained, _ = _train(res.params, loss_fn, batch, tx)
    assert np.all(_pruned_entries(trained, res.masks) == 0.0)
    # kept weights did train
    kept = [np.asarray(a)[np.asarray(m)] - np.asarray(b)[np.asarray(m)]
            for a, b, m in zip(jax.tree.leaves(trained), jax.tree.leaves(res.params), jax.tree.leaves(res.masks))]
    assert max(np.abs(k).max() for k in kept) > 1e-3
    # without the transform the same optimizer revives pruned weights: the test can fail
    loose, _ = _train(res.params, loss_fn, batch, OPTIMIZERS[name]())
    assert np.any(_pruned_entries(loose, res.masks) != 0.0)


def test_optimizer_state_does_not_leak_into_pruned_weights():
    params, loss_fn, batch = linen_setup(n=32)
    res = cobs_jax.prune(params, sparsity=0.5)
    keep = cobs_jax.keep_sparsity(res.masks)
    tx = optax.chain(keep, optax.adam(1e-2), keep)
    trained, state = _train(res.params, loss_fn, batch, tx)
    adam = state[1][0]
    for moment in (adam.mu, adam.nu):
        assert np.all(_pruned_entries(moment, res.masks) == 0.0)
    assert np.all(_pruned_entries(trained, res.masks) == 0.0)


def test_keep_sparsity_with_nnx_state():
    state, loss_fn, batch = nnx_setup(n=32)
    res = cobs_jax.prune(state, sparsity=0.5)
    tx = optax.chain(optax.adam(1e-2), cobs_jax.keep_sparsity(res.masks))
    trained, _ = _train(res.params, loss_fn, batch, tx)
    assert isinstance(trained, nnx.State)
    assert np.all(_pruned_entries(trained, res.masks) == 0.0)


def test_keep_sparsity_rejects_mismatched_masks():
    params, _, _ = linen_setup(n=8)
    other, _, _ = linen_setup(n=8, hidden=5)
    masks = cobs_jax.prune(other, sparsity=0.5).masks
    with pytest.raises(ValueError, match="masks"):
        cobs_jax.keep_sparsity(masks).init(params)
    with pytest.raises(ValueError, match="structure"):
        cobs_jax.keep_sparsity({"a": jnp.ones(3, bool)}).init(params)
