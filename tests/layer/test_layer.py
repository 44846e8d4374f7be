"""prune_layer and layer_hessian against dense oracles (float64: tests/conftest.py enables x64)."""

import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax


def _problem(seed=0, n=40, d=12, out=5, corr=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if corr:  # correlated inputs: OBS updates matter
        x = x @ (np.eye(d) + 0.5 * rng.normal(size=(d, d)))
    w = rng.normal(size=(d, out))
    return x, w, x.T @ x


def _damped(h, damping=0.01):
    return h + damping * np.mean(np.diag(h)) * np.eye(len(h))


def _err(w0, w, h):  # rows layout inputs are (d, out) kernels here
    dw = w - w0
    return float(np.sum(dw * (h @ dw)))


# ---------------------------------------------------------------------------- layer_hessian


def test_layer_hessian_streamed_equals_at_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 5))
    h = None
    for part in np.array_split(x, 3):
        h = cobs_jax.layer_hessian(part, into=h)
    flat = x.reshape(-1, 5)
    np.testing.assert_allclose(h, flat.T @ flat, rtol=1e-12)
    np.testing.assert_allclose(cobs_jax.layer_hessian(x), flat.T @ flat, rtol=1e-12)
    assert h.dtype == jnp.float64
    assert cobs_jax.layer_hessian(x.astype(np.float32)).dtype == jnp.float64  # accumulate dtype, not x's


@pytest.mark.parametrize("d", [256, 257, 600, 1100])
def test_layer_hessian_blocked_symmetric_product(d):
    """Above 256 inputs only the upper blocks are multiplied and mirrored: still exactly XᵀX."""
    x = np.random.default_rng(d).normal(size=(40, d))
    h = np.asarray(cobs_jax.layer_hessian(x))
    np.testing.assert_allclose(h, x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(h, h.T, rtol=1e-12, atol=1e-10)


def test_layer_hessian_bad_input():
    with pytest.raises(ValueError, match="`x`"):
        cobs_jax.layer_hessian(np.ones(3))
    with pytest.raises(ValueError, match="`into`"):
        cobs_jax.layer_hessian(np.ones((2, 3)), into=np.zeros((2, 2)))


# ---------------------------------------------------------------------------- oracles


def _sequential_obs(w, h, damping, sparsity=None, nm=None):
    """SparseGPT with one block = d_in, done densely: mask from OBS saliencies at each column's
    turn, then remove columns left to right with the OBS update of the remaining weights."""
    hd = _damped(h, damping)
    d = len(hd)
    w = w.T.copy()  # rows = output units
    rows = w.shape[0]
    hinvs = [np.linalg.inv(hd[j:, j:]) for j in range(d)]
    diag = np.array([hinvs[j][0, 0] for j in range(d)])  # = U_jj^2
    keep = np.ones_like(w, bool)
    if nm is None:
        k = int(round(sparsity * w.size))
        order = np.argsort((w**2 / diag).ravel(), kind="stable")
        keep.ravel()[order[:k]] = False
    for j in range(d):
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            seg = w[:, j : j + m] ** 2 / diag[j : j + m]
            for r in range(rows):
                keep[r, j + np.argsort(seg[r], kind="stable")[: m - n]] = False
        q = np.where(keep[:, j], w[:, j], 0.0)
        e = (w[:, j] - q) / hinvs[j][0, 0]
        w[:, j:] -= e[:, None] * hinvs[j][0][None, :]
        w[:, j] = q
    return w.T, keep.T


@pytest.mark.parametrize("seed", range(4))
def test_sparsegpt_one_block_equals_dense_sequential_obs(seed):
    x, w, h = _problem(seed)
    new, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=0.5, method=cobs_jax.layer.SparseGPT(block_size=16))
    ref_w, ref_keep = _sequential_obs(w, h, 0.01, sparsity=0.5)
    np.testing.assert_array_equal(np.asarray(mask), ref_keep)
    np.testing.assert_allclose(np.asarray(new), ref_w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("pattern,nm", [("2:4", (2, 4)), ("1:3", (1, 3))])
def test_sparsegpt_nm_equals_dense_sequential_obs(pattern, nm):
    x, w, h = _problem(3)
    new, mask, *_ = cobs_jax.prune_layer(w, h, pattern=pattern, method=cobs_jax.layer.SparseGPT(block_size=12))
    ref_w, ref_keep = _sequential_obs(w, h, 0.01, nm=nm)
    np.testing.assert_array_equal(np.asarray(mask), ref_keep)
    np.testing.assert_allclose(np.asarray(new), ref_w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_sub_blocks_equal_dense_sequential_obs(pattern):
    # d_in = 80 in one block: the per-column loop runs in sub-blocks of 20 columns whose errors
    # reach the later columns through the lazy product; the result must not change.
    x, w, h = _problem(7, n=120, d=80, out=6)
    if pattern is None:
        new, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=0.5, method=cobs_jax.layer.SparseGPT(block_size=80))
        ref_w, ref_keep = _sequential_obs(w, h, 0.01, sparsity=0.5)
    else:
        new, mask, *_ = cobs_jax.prune_layer(w, h, pattern=pattern, method=cobs_jax.layer.SparseGPT(block_size=80))
        ref_w, ref_keep = _sequential_obs(w, h, 0.01, nm=(2, 4))
    np.testing.assert_array_equal(np.asarray(mask), ref_keep)
    np.testing.assert_allclose(np.asarray(new), ref_w, rtol=1e-8, atol=1e-10)


def test_factor_hessian_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from cobs_jax._layer.layer import factor_hessian

    x, w, h = _problem(2, n=40, d=9, out=3)
    h = h.copy()
    h[4, :] = h[:, 4] = 0.0  # a dead input
    f = factor_hessian(jnp.asarray(h), 0.01, "layer")
    u = np.asarray(f.u)
    hd = h + np.diag(np.diag(h) == 0)
    hd = hd + 0.01 * np.mean(np.diag(hd)) * np.eye(9)
    np.testing.assert_allclose(np.asarray(f.h), hd, rtol=1e-12)
    np.testing.assert_array_equal(u, np.triu(u))
    assert np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(f.dead), np.arange(9) == 4)


def test_sparsegpt_blocks_lazy_update_equals_one_block_when_mask_is_fixed():
    # With blocks, the mask of later blocks is chosen from updated weights; with 2:4 the mask of
    # every group is chosen at its first column from the updated weights in both cases, so the
    # lazy (blocked) update must give exactly the unblocked result.
    x, w, h = _problem(5, d=16)
    a = cobs_jax.prune_layer(w, h, pattern="2:4", method=cobs_jax.layer.SparseGPT(block_size=4))
    b = cobs_jax.prune_layer(w, h, pattern="2:4", method=cobs_jax.layer.SparseGPT(block_size=16))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_update_equals_lstsq_per_output_unit(method):
    x, w, h = _problem(1, n=30, d=10, out=4)
    damping = 0.01
    new, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=0.6, method=method, update="exact", rel_damping=damping)
    new, mask = np.asarray(new), np.asarray(mask)
    lam = damping * np.mean(np.diag(h))
    for r in range(w.shape[1]):
        k = mask[:, r]
        a = np.vstack([x[:, k], np.sqrt(lam) * np.eye(10)[:, k]])
        b = np.concatenate([x @ w[:, r], np.sqrt(lam) * w[:, r]])
        sol = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(new[k, r], sol, rtol=1e-8, atol=1e-10)
        assert np.all(new[~k, r] == 0)


def test_exact_update_rows_of_different_counts_each_use_their_smaller_system():
    # rows keeping 1..11 of 12 inputs (so both forms in one call, padded to min(|K|, |P|) <= 6)
    from cobs_jax._layer.layer import factor_hessian
    from cobs_jax._layer.exact import exact_update

    x, w, h = _problem(4, n=60, d=12, out=11)
    rng = np.random.default_rng(0)
    keep = np.zeros((11, 12), bool)
    for r in range(11):
        keep[r, rng.permutation(12)[: r + 1]] = True
    f = factor_hessian(jnp.asarray(h), 0.01, "layer")
    new = np.asarray(exact_update(jnp.asarray(w.T), f.h, f.u, keep))
    hd = np.asarray(f.h)
    for r in range(11):
        k = keep[r]
        sol = np.linalg.solve(hd[np.ix_(k, k)], (hd @ w[:, r])[k])
        np.testing.assert_allclose(new[r, k], sol, rtol=1e-8, atol=1e-10)
        assert np.all(new[r, ~k] == 0)


def test_exact_update_both_forms_agree():
    # few pruned -> the OBS ("pruned") form; many pruned -> the kept form; both are the optimum
    x, w, h = _problem(2, n=50, d=12, out=6)
    hd = _damped(h)
    for s in (0.25, 0.75):
        new, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=s, method="magnitude", update="exact")
        new, mask = np.asarray(new), np.asarray(mask)
        for r in range(6):
            k = mask[:, r]
            ref = np.zeros(12)
            ref[k] = np.linalg.solve(hd[np.ix_(k, k)], (hd @ w[:, r])[k])
            np.testing.assert_allclose(new[:, r], ref, rtol=1e-8, atol=1e-10)


def test_wanda_choice_equals_dense_formula():
    x, w, h = _problem(4, d=12, out=5)
    _, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=0.5, method="wanda")
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    for r in range(5):
        pruned = np.argsort(score[:, r], kind="stable")[:6]
        assert set(np.flatnonzero(~np.asarray(mask)[:, r])) == set(pruned)
    _, m24, *_ = cobs_jax.prune_layer(w, h, pattern="2:4", method="wanda")
    g = score.T.reshape(5, 3, 4)
    ref = np.argsort(np.argsort(g, -1, kind="stable"), -1, kind="stable") >= 2
    np.testing.assert_array_equal(np.asarray(m24), ref.reshape(5, 12).T)


def test_magnitude_is_one_threshold_over_the_layer():
    x, w, h = _problem(6)
    _, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=0.4, method="magnitude")
    k = int(round(0.4 * w.size))
    thr = np.sort(np.abs(w).ravel())[k - 1]
    np.testing.assert_array_equal(np.asarray(mask), np.abs(w) > thr)


def _pruner(name, **opts):
    """A layer pruner by name; SparseGPT with 16-column blocks."""
    return cobs_jax.layer.LAYER_METHODS[name](**opts, **({"block_size": 16} if name == "sparsegpt" else {}))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("gran", ["layer", "unit"])
def test_counts_exact(method, gran):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(64, 40)), rng.normal(size=(40, 7))
    h = x.T @ x
    for s in (0.1, 0.37, 0.5, 0.9):
        _, mask, *_ = cobs_jax.prune_layer(w, h, sparsity=s, method=_pruner(method, granularity=gran))
        mask = np.asarray(mask)
        if gran == "layer":
            assert (~mask).sum() == round(s * w.size)
        else:
            assert np.all((~mask).sum(0) == round(s * 40))
    for pattern, (n, m) in (("2:4", (2, 4)), ("4:8", (4, 8))):
        _, mask, *_ = cobs_jax.prune_layer(w, h, pattern=pattern, method=_pruner(method))
        groups = np.asarray(mask).T.reshape(7, 40 // m, m)
        assert np.all(groups.sum(-1) == n)


def test_conv_and_einsum_layouts():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 4, 5))
    p = rng.normal(size=(50, 36))  # patches in (kh, kw, c_in) order
    h = p.T @ p
    new, mask, *_ = cobs_jax.prune_layer(k, h, sparsity=0.5, update="exact")
    flat_new, flat_mask, *_ = cobs_jax.prune_layer(k.reshape(36, 5), h, sparsity=0.5, update="exact")
    np.testing.assert_allclose(np.asarray(new).reshape(36, 5), flat_new, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(mask).reshape(36, 5), flat_mask)
    # einsum kernel (heads, head_dim, d_out) contracting over its first two axes; and one whose
    # contraction axis is last: (d_out, d_in) with in_axes=(1,)
    e = rng.normal(size=(3, 12, 5))
    he = rng.normal(size=(60, 36))
    he = he.T @ he
    new_e, _, *_ = cobs_jax.prune_layer(e, he, sparsity=0.5, in_axes=(0, 1))
    ref_e, _, *_ = cobs_jax.prune_layer(e.reshape(36, 5), he, sparsity=0.5)
    np.testing.assert_allclose(np.asarray(new_e).reshape(36, 5), ref_e, rtol=1e-12)
    new_t, _, *_ = cobs_jax.prune_layer(e.reshape(36, 5).T, he, sparsity=0.5, in_axes=(1,))
    np.testing.assert_allclose(np.asarray(new_t).T, ref_e, rtol=1e-12)


def test_small_layers_error_ordering():
    """d_in <= 12, 40 instances: the exact update is never above its method's own weights; SparseGPT
    is below magnitude on average and in most instances. (Not in all: its mask is fixed up front
    from the sequential OBS saliencies, and on these tiny layers that loses to magnitude in about
    1 of 4 instances; the dense-oracle tests above show the algorithm is the published one.)"""
    wins, ratios = 0, []
    for seed in range(40):
        x, w, h = _problem(seed, n=30, d=8 + seed % 5, out=4)
        hd = _damped(h)
        errs = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            for update in (None, "exact"):
                new, _, *_ = cobs_jax.prune_layer(w, h, sparsity=0.5, method=method, update=update)
                errs[method, update] = _err(w, np.asarray(new), hd)
        for method in ("magnitude", "wanda", "sparsegpt"):
            assert errs[method, "exact"] <= errs[method, None] * (1 + 1e-9) + 1e-12
        wins += errs["sparsegpt", None] <= errs["magnitude", None]
        ratios.append(errs["sparsegpt", None] / errs["magnitude", None])
    print(f"SparseGPT <= magnitude in {wins}/40 instances; mean error ratio {np.mean(ratios):.3f}")
    assert wins >= 24 and np.mean(ratios) < 0.95


def test_dead_inputs_are_zeroed_and_pruned_first():
    x, w, h = _problem(0)
    h = h.copy()
    h[3, :] = h[:, 3] = 0.0
    res = cobs_jax.prune_layer(w, h, sparsity=0.5)
    assert np.all(np.asarray(res.kernel)[3] == 0) and not np.asarray(res.mask)[3].any()
    assert np.isfinite(res.error)


def test_cholesky_failure_redamps_then_raises():
    h = np.array([[1.0, 1.5], [1.5, 1.0]])  # indefinite; damping 0.01, 0.1 fail, 1.0 succeeds
    w = np.array([[1.0, -2.0], [0.5, 0.3]])
    res = cobs_jax.prune_layer(w, h, sparsity=0.5)
    assert res.rel_damping == pytest.approx(1.0)
    assert np.all(np.isfinite(np.asarray(res.kernel)))
    with pytest.raises(ValueError, match="Cholesky"):
        cobs_jax.prune_layer(w, np.array([[1.0, 100.0], [100.0, 1.0]]), sparsity=0.5, name="blk/q")


def test_inputs_not_mutated_and_deterministic():
    x, w, h = _problem(0)
    w32, h32 = w.astype(np.float32), h.astype(np.float32)
    wc, hc = w32.copy(), h32.copy()
    a = cobs_jax.prune_layer(w32, h32, sparsity=0.5, update="exact")
    b = cobs_jax.prune_layer(w32, h32, sparsity=0.5, update="exact")
    np.testing.assert_array_equal(w32, wc)
    np.testing.assert_array_equal(h32, hc)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == jnp.float32 and a[1].dtype == jnp.bool_


def test_bad_input():
    x, w, h = _problem(0)
    bad_h = h.copy()
    bad_h[0, 0] = np.nan
    bad_w = w.copy()
    bad_w[1, 1] = np.inf
    cases = [
        (dict(kernel=w, hessian=h[:5, :5], sparsity=0.5), "hessian"),
        (dict(kernel=w, hessian=h[:, :5], sparsity=0.5), "square"),
        (dict(kernel=w, hessian=bad_h, sparsity=0.5), "NaN or Inf"),
        (dict(kernel=bad_w, hessian=h, sparsity=0.5), "NaN or Inf"),
        (dict(kernel=w, hessian=h, sparsity=1.0), "sparsity"),
        (dict(kernel=w, hessian=h, sparsity=-0.1), "sparsity"),
        (dict(kernel=w, hessian=h), "sparsity"),
        (dict(kernel=w, hessian=h, pattern="4:2"), "pattern"),
        (dict(kernel=w, hessian=h, pattern="2:5"), "multiple of 5"),
        (dict(kernel=w, hessian=h, pattern="2:4", sparsity=0.3), "contradicts"),
        (dict(kernel=w, hessian=h, pattern="2:4", method=cobs_jax.layer.SparseGPT(block_size=6)), "block_size"),
        (dict(kernel=w, hessian=h, sparsity=0.5, rel_damping=0.0), "rel_damping"),
        (dict(kernel=w, hessian=h, sparsity=0.5, method="obs"), "method"),
        (dict(kernel=w, hessian=h, sparsity=0.5, update="cbs"), "update"),
        (dict(kernel=w[:, 0], hessian=h, sparsity=0.5), "ndim"),
        (dict(kernel=w, hessian=h, sparsity=0.5, in_axes=(0, 1)), "in_axes"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            cobs_jax.prune_layer(kw.pop("kernel"), kw.pop("hessian"), **kw)
    for cls in (cobs_jax.layer.Magnitude, cobs_jax.layer.Wanda, cobs_jax.layer.SparseGPT):
        with pytest.raises(ValueError, match=rf"`{cls.__name__}\(granularity=...\)`"):
            cls(granularity="row")
    with pytest.raises(ValueError, match=r"`SparseGPT\(block_size=...\)`"):
        cobs_jax.layer.SparseGPT(block_size=0)
