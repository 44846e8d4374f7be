import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smallest_k_per_group(seed):
    rng = np.random.default_rng(seed)
    score = np.round(rng.normal(size=60), 1)  # ties
    groups = rng.integers(0, 5, size=60).astype(np.int32)
    sizes = np.bincount(groups, minlength=5)
    k = np.array([rng.integers(0, n + 1) for n in sizes], np.int32)
    got = np.asarray(jax.jit(cobs_jax.smallest_k)(jnp.asarray(score), jnp.asarray(k), jnp.asarray(groups)))
    for g in range(5):
        seg, sc = got[groups == g], score[groups == g]
        assert seg.sum() == k[g]
        if 0 < k[g] < sizes[g]:
            assert sc[seg].max() <= sc[~seg].min()
        # ties by index: the chosen ones are the first k[g] of a stable sort
        expected = np.zeros(sizes[g], bool)
        expected[np.argsort(sc, kind="stable")[: k[g]]] = True
        np.testing.assert_array_equal(seg, expected)


def _expected_per_group(score, k, groups):
    expected = np.zeros(len(score), bool)
    for g in range(len(k)):
        idx = np.flatnonzero(groups == g)
        expected[idx[np.argsort(score[idx], kind="stable")[: k[g]]]] = True
    return expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_smallest_k_with_one_partial_group(dtype):
    """Every group but one pruned whole or kept whole (a global budget with a frozen set): the
    sort-free path gives the per-group stable selection, also with ties, +-inf and +-0 across groups."""
    rng = np.random.default_rng(5)
    score = np.round(rng.normal(size=48), 1)
    if dtype != np.int32:
        score[:6] = [-np.inf, np.inf, -0.0, 0.0, -np.inf, np.inf]
    score = score.astype(dtype)
    groups = (np.arange(48) % 4).astype(np.int32)
    sizes = np.bincount(groups)
    f = jax.jit(cobs_jax.smallest_k)
    for full, empty, partial in [(0, 1, 2), (1, 0, 3), (3, 2, 0)]:
        for kp in range(sizes[partial] + 1):
            k = np.zeros(4, np.int32)  # the group `empty` and the fourth kept whole
            k[full], k[partial] = sizes[full], kp
            got = np.asarray(f(jnp.asarray(score), jnp.asarray(k), jnp.asarray(groups)))
            np.testing.assert_array_equal(got, _expected_per_group(score, k, groups), err_msg=f"{k}")


def test_magnitude_per_layer_groups():
    w = np.random.default_rng(1).normal(size=30)
    groups = np.repeat(np.arange(3), [e - s for s, e in LAYERS]).astype(np.int32)
    k = np.array([2, 0, 9], np.int32)
    problem = cobs_jax.Problem(jnp.asarray(w), None, LAYERS, None, jnp.asarray(groups))
    pruned = np.asarray(cobs_jax.Magnitude().select(problem, jnp.asarray(k), None)[0])
    for (s, e), b in zip(LAYERS, k):
        seg = pruned[s:e]
        assert seg.sum() == b
        if 0 < b:
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smallest_k_global_equals_stable_argsort(dtype):
    rng = np.random.default_rng(4)
    score = np.round(rng.normal(size=41), 1).astype(dtype)  # many ties
    score[:4] = [-0.0, 0.0, np.inf, -np.inf]
    score[10:14] = [-3.5e30, 2e-38, -2e-38, 7.0]
    f = jax.jit(cobs_jax.smallest_k)
    for k in range(42):
        expected = np.zeros(41, bool)
        expected[np.argsort(score, kind="stable")[:k]] = True
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(score), k)), expected, err_msg=f"k={k}")
