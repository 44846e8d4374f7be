import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax
from helpers import TinyNNX, linen_setup


def _pruned(pattern=None):
    params, loss_fn, batch = linen_setup()
    kw = dict(pattern=pattern) if pattern else dict(sparsity=0.75)
    return cobs_jax.prune(params, loss_fn, batch, method="magnitude", **kw)


def test_save_load_round_trip(tmp_path):
    res = _pruned()
    path = str(tmp_path / "pruned.safetensors")
    cobs_jax.save(path, res.params, res.masks)
    params, masks = cobs_jax.load(path, res.params, res.masks)
    for a, b in zip(jax.tree.leaves((params, masks)), jax.tree.leaves((res.params, res.masks))):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    only = cobs_jax.load(path, res.params)
    assert jax.tree.structure(only) == jax.tree.structure(res.params)


def test_save_load_nnx_state(tmp_path):
    model = TinyNNX(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    path = str(tmp_path / "nnx.safetensors")
    cobs_jax.save(path, state)
    back = cobs_jax.load(path, state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_load_rejects_another_model(tmp_path):
    res = _pruned()
    path = str(tmp_path / "p.safetensors")
    cobs_jax.save(path, res.params, res.masks)
    other = jax.tree.map(lambda a: jnp.zeros(a.shape + (1,), a.dtype), res.params)
    with pytest.raises(ValueError, match="expected"):
        cobs_jax.load(path, other)
    with pytest.raises(ValueError, match="no tensor"):
        cobs_jax.load(path, {"params": {"Nope": {"kernel": jnp.zeros((2, 2))}}})
    with pytest.raises(ValueError, match="structure"):
        cobs_jax.save(path, res.params, {"x": 1})


def test_to_sparse_stores_only_kept_and_multiplies_like_dense():
    res = _pruned()
    sp = cobs_jax.to_sparse(res.params, res.masks)
    for w, s, m in zip(jax.tree.leaves(res.params), jax.tree.leaves(sp, is_leaf=lambda v: hasattr(v, "todense")),
                       jax.tree.leaves(res.masks)):
        if w.ndim == 2:
            assert s.nse == int(np.sum(m))
            np.testing.assert_array_equal(s.todense(), w)
            xi = jax.random.normal(jax.random.key(1), (5, w.shape[0]))
            np.testing.assert_allclose(jax.jit(lambda a, b: a @ b)(xi, s), xi @ w, rtol=1e-5, atol=1e-6)
        else:
            assert s is w or np.array_equal(s, w)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_pack_nm_round_trip(pattern):
    n, m = map(int, pattern.split(":"))
    w = jax.random.normal(jax.random.key(0), (16, 6))
    score = jnp.abs(w).reshape(16 // m, m, 6)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
    w = jnp.where((rank < n).reshape(16, 6), w, 0.0)
    p = cobs_jax.pack_nm(w, pattern)
    assert p.values.shape == (16 // m, n, 6) and p.index.dtype == jnp.uint8
    np.testing.assert_array_equal(jax.jit(cobs_jax.unpack_nm)(p), w)
    with pytest.raises(ValueError, match="not"):
        cobs_jax.pack_nm(jnp.ones((16, 6)), pattern)
