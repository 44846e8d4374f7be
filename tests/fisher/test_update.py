import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from helpers import dense_f, random_fisher

BLOCKS = [((0, 12),), ((0, 5), (5, 12)), ((0, 3), (3, 6), (6, 9), (9, 12))]


def dense_cbs_update(f, w, pruned):
    """-F^-1 E_P (E_P^T F^-1 E_P)^-1 w_P, blockwise through the block-diagonal dense F."""
    finv = np.linalg.inv(f)
    p = np.flatnonzero(pruned)
    lam = np.linalg.solve(finv[np.ix_(p, p)], w[p])
    return -finv[:, p] @ lam


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cbs_update_matches_dense_and_kkt(blocks, seed):
    w, fisher = random_fisher(d=12, n=7, blocks=blocks, seed=seed, damping=0.05)
    w = np.asarray(w)
    rng = np.random.default_rng(seed)
    pruned = np.zeros(12, bool)
    pruned[rng.choice(12, 5, replace=False)] = True
    new = np.asarray(cobs_jax.cbs_update(jnp.asarray(w), jnp.asarray(pruned), fisher))
    f = dense_f(fisher)
    dw = dense_cbs_update(f, w, pruned)
    np.testing.assert_allclose(new - w, np.where(pruned, -w, dw), rtol=1e-8, atol=1e-10)
    assert np.all(new[pruned] == 0.0)
    # KKT: the gradient of 1/2 dw^T F dw vanishes on the kept coordinates.
    np.testing.assert_allclose((f @ (new - w))[~pruned], 0.0, atol=1e-9)
    # ... and it is the minimiser: any feasible perturbation increases the quadratic.
    q = lambda x: 0.5 * x @ f @ x
    pert = np.where(pruned, 0.0, rng.normal(size=12) * 1e-2)
    assert q(new - w + pert) > q(new - w)


def test_cbs_update_scale():
    w, fisher = random_fisher(d=12, n=5)
    pruned = jnp.arange(12) < 4
    full = cobs_jax.cbs_update(w, pruned, fisher)
    half = cobs_jax.cbs_update(w, pruned, fisher, scale=0.5)
    np.testing.assert_allclose(half[4:], w[4:] + 0.5 * (full[4:] - w[4:]), rtol=1e-10)
    assert np.all(np.asarray(half[:4]) == 0)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_obs_update_matches_dense(blocks):
    w, fisher = random_fisher(d=12, n=7, blocks=blocks, damping=0.05)
    w = np.asarray(w)
    pruned = np.arange(12) % 3 == 0
    finv = np.linalg.inv(dense_f(fisher))
    dw = -finv @ np.where(pruned, w / np.diag(finv), 0.0)
    new = cobs_jax.obs_update(jnp.asarray(w), jnp.asarray(pruned), fisher, scale=0.9)
    np.testing.assert_allclose(new, np.where(pruned, 0.0, w + 0.9 * dw), rtol=1e-8, atol=1e-10)


def test_single_weight_obs_equals_cbs():
    """For |P| = 1 (per block) the OBS-sum and CBS-U updates coincide."""
    w, fisher = random_fisher(d=12, n=7, blocks=((0, 6), (6, 12)), damping=0.05)
    pruned = jnp.zeros(12, bool).at[2].set(True).at[9].set(True)
    np.testing.assert_allclose(
        cobs_jax.obs_update(w, pruned, fisher), cobs_jax.cbs_update(w, pruned, fisher), rtol=1e-8
    )
