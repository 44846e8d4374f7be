import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from helpers import dense_f, linen_setup, random_fisher

BLOCKS = [((0, 12),), ((0, 5), (5, 12)), ((0, 4), (4, 8), (8, 12))]


@pytest.mark.parametrize("blocks", BLOCKS)
def test_inv_diag_matches_dense_inverse(blocks):
    _, fisher = random_fisher(d=12, n=6, blocks=blocks, damping=0.05)
    dense_inv = np.linalg.inv(dense_f(fisher))
    np.testing.assert_allclose(fisher.inv_diag(), np.diag(dense_inv), rtol=1e-9)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_matvec_and_inv_matvec_match_dense(blocks):
    w, fisher = random_fisher(d=12, n=20, blocks=blocks, damping=0.3)
    f = dense_f(fisher)
    np.testing.assert_allclose(fisher.matvec(w), f @ np.asarray(w), rtol=1e-10)
    np.testing.assert_allclose(fisher.matvec(w, damped=False), dense_f(fisher, False) @ w, rtol=1e-10)
    np.testing.assert_allclose(fisher.inv_matvec(w), np.linalg.solve(f, w), rtol=1e-9)
    np.testing.assert_allclose(fisher.diag(), np.diag(dense_f(fisher, False)), rtol=1e-12)
    np.testing.assert_allclose(fisher.quadratic(w), w @ dense_f(fisher, False) @ w, rtol=1e-10)
    np.testing.assert_allclose(fisher.dense(), f, rtol=1e-12)


def test_dense_refuses_large():
    _, fisher = random_fisher(d=12)
    with pytest.raises(ValueError, match="dense"):
        fisher.dense(max_dim=8)


def test_grads_rows_are_per_example_and_mean_is_full_gradient():
    params, loss_fn, batch = linen_setup(n=32)
    layout = cobs_jax.make_layout(params)
    g = cobs_jax.per_example_grads(params, loss_fn, batch, layout)
    assert g.shape == (32, layout.size)
    full = layout.ravel(jax.grad(loss_fn)(params, batch))
    np.testing.assert_allclose(g.mean(0), full, rtol=1e-5, atol=1e-7)
    one = jax.tree.map(lambda x: x[5:6], batch)
    np.testing.assert_allclose(g[5], layout.ravel(jax.grad(loss_fn)(params, one)), rtol=1e-5, atol=1e-7)


def test_chunked_equals_unchunked_and_mini_batch_averages():
    params, loss_fn, batch = linen_setup(n=30, dtype=jnp.float64)
    layout = cobs_jax.make_layout(params)
    g_all = cobs_jax.per_example_grads(params, loss_fn, batch, layout, chunk_size=1000)
    g_chunk = cobs_jax.per_example_grads(params, loss_fn, batch, layout, chunk_size=7)
    np.testing.assert_allclose(g_chunk, g_all, rtol=1e-12, atol=1e-14)
    g_mb = cobs_jax.per_example_grads(params, loss_fn, batch, layout, mini_batch=3, chunk_size=4)
    assert g_mb.shape == (10, layout.size)
    np.testing.assert_allclose(g_mb, g_all.reshape(10, 3, -1).mean(1), rtol=1e-10, atol=1e-12)


def test_grads_bad_batch_and_nonfinite():
    params, loss_fn, batch = linen_setup(n=8)
    layout = cobs_jax.make_layout(params)
    with pytest.raises(ValueError, match="leading axis"):
        cobs_jax.per_example_grads(params, loss_fn, {"x": batch["x"], "y": batch["y"][:5]}, layout)
    with pytest.raises(ValueError, match="mini_batch"):
        cobs_jax.per_example_grads(params, loss_fn, batch, layout, mini_batch=3)
    with pytest.raises(ValueError, match="chunk_size"):
        cobs_jax.per_example_grads(params, loss_fn, batch, layout, chunk_size=0)

    def bad_loss(p, b):  # d/dk sqrt(k) is NaN for negative k: only Dense_0 gets NaN gradients
        return loss_fn(p, b) + 0.0 * jnp.sum(jnp.sqrt(p["params"]["Dense_0"]["kernel"]))

    with pytest.raises(ValueError, match=r"NaN or Inf in layer\(s\) \[\"\['params'\]\['Dense_0'\]\['kernel'\]\"\]$"):
        cobs_jax.per_example_grads(params, bad_loss, batch, layout)


@pytest.mark.parametrize("width", [1, 7, 8, 20, 64])
def test_column_reduce_matches_whole_reduction(width):
    from cobs_jax._fisher.fisher import column_reduce

    g = jax.random.normal(jax.random.key(0), (5, 20), jnp.float64).at[2, 13].set(jnp.inf)
    np.testing.assert_allclose(column_reduce(g, jnp.square, width=width), np.sum(np.asarray(g) ** 2, 0))
    np.testing.assert_array_equal(column_reduce(g, jnp.isfinite, jnp.all, width), np.isfinite(g).all(0))
