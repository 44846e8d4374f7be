import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from cobs_jax._selectors import layer_budgets
from helpers import dense_f, random_fisher

LAYERS = ((0, 5), (5, 12), (12, 30))


def _problem(w, fisher=None):
    return cobs_jax.Problem(jnp.asarray(w), fisher, LAYERS, None)


@pytest.mark.parametrize("k", [0, 1, 7, 29])
def test_magnitude_exact_k_with_ties(k):
    w = np.round(np.random.default_rng(0).normal(size=30), 1)  # many ties
    pruned, _ = cobs_jax.Magnitude().select(_problem(w), k, None)
    pruned = np.asarray(pruned)
    assert pruned.sum() == k
    if 0 < k < 30:
        assert np.abs(w[pruned]).max() <= np.abs(w[~pruned]).min()


@pytest.mark.parametrize("k", [0, 3, 10, 17, 29])
def test_layer_magnitude_budgets(k):
    budgets = np.asarray(layer_budgets(LAYERS, k))
    sizes = np.array([e - s for s, e in LAYERS])
    assert budgets.sum() == k
    assert np.all(np.abs(budgets - k * sizes / 30) < 1)
    w = np.random.default_rng(1).normal(size=30)
    pruned = np.asarray(cobs_jax.LayerMagnitude().select(_problem(w), k, None)[0])
    for (s, e), b in zip(LAYERS, budgets):
        seg = pruned[s:e]
        assert seg.sum() == b
        if 0 < b < e - s:
            assert np.abs(w[s:e][seg]).max() <= np.abs(w[s:e][~seg]).min()


@pytest.mark.parametrize("blocks", [((0, 12),), ((0, 4), (4, 12))])
def test_woodfisher_ranking_matches_dense(blocks):
    w, fisher = random_fisher(d=12, n=5, blocks=blocks, seed=3, damping=0.02)
    saliency = np.asarray(w) ** 2 / np.diag(np.linalg.inv(dense_f(fisher)))
    for k in range(13):
        pruned = np.asarray(cobs_jax.WoodFisher().select(_problem(w, fisher), k, None)[0])
        expected = np.zeros(12, bool)
        expected[np.argsort(saliency, kind="stable")[:k]] = True
        np.testing.assert_array_equal(pruned, expected)


def test_smallest_k_traced_k_under_jit():
    f = jax.jit(cobs_jax.smallest_k)
    x = jnp.array([3.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(f(x, 2), [False, True, False, True])
    np.testing.assert_array_equal(f(x, 3), [False, True, True, True])
