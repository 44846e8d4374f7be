"""prune_layer(method="cbs"): the swap search on the layer objective against enumeration and dense
solves (float64: tests/conftest.py enables x64)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import cobs_jax
from cobs_jax._layer.cbs import _kept_form, _pair_scores, _pruned_form, _weights, spd_inverse


def _problem(seed, n=40, d=12, out=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x = x @ (np.eye(d) + 0.5 * rng.normal(size=(d, d)))  # correlated inputs: the update matters
    return rng.normal(size=(d, out)), x.T @ x


def _damped(h, damping=0.01):
    return h + damping * np.mean(np.diag(h)) * np.eye(len(h))


def _row_losses(w0, w, h):
    """Per output unit: (w - w̄)ᵀ H (w - w̄), kernels in (d_in, d_out) layout."""
    dw = np.asarray(w) - w0
    return np.einsum("ir,ij,jr->r", dw, h, dw)


def _optimal_weights(w0col, h, keep):
    w = np.zeros_like(w0col)
    k = np.flatnonzero(keep)
    w[k] = np.linalg.solve(h[np.ix_(k, k)], (h @ w0col)[k])
    return w


def _enumerated_optimum(w0col, h, masks):
    return min(_row_losses(w0col[:, None], _optimal_weights(w0col, h, m)[:, None], h)[0] for m in masks)


def _unstructured_masks(d, kept):
    for k in itertools.combinations(range(d), kept):
        m = np.zeros(d, bool)
        m[list(k)] = True
        yield m


def _nm_masks(d, n, m):
    groups = [list(itertools.combinations(range(m), n))] * (d // m)
    for choice in itertools.product(*groups):
        mask = np.zeros(d, bool)
        for g, c in enumerate(choice):
            mask[[g * m + j for j in c]] = True
        yield mask


def test_spd_inverse_equals_dense_inverse():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 9, 9))
    a = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(9)
    np.testing.assert_allclose(spd_inverse(jnp.asarray(a)), np.linalg.inv(a), rtol=1e-9, atol=1e-9)


def test_pair_scores_equal_recomputed_objective():
    """Every swap's score (rank-2 formula) equals f(B') = g_B'ᵀ T_B'B'⁻¹ g_B' computed from scratch."""
    rng = np.random.default_rng(1)
    m = 7
    a = rng.normal(size=(3, m, m))
    t = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(m)
    g = rng.normal(size=(3, m))
    kept = np.array([[1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1, 0]], bool)
    v = np.zeros_like(t)
    for r in range(3):
        k = np.flatnonzero(kept[r])
        v[r][np.ix_(k, k)] = np.linalg.inv(t[r][np.ix_(k, k)])
    allowed = np.ones((3, m, m), bool)
    score, f, _, _ = _pair_scores(jnp.asarray(v), jnp.asarray(t), jnp.asarray(g), jnp.asarray(kept), jnp.asarray(allowed))
    score = np.asarray(score)
    for r in range(3):
        k = np.flatnonzero(kept[r])
        np.testing.assert_allclose(f[r], g[r, k] @ np.linalg.solve(t[r][np.ix_(k, k)], g[r, k]), rtol=1e-10)
        for b, c in itertools.product(range(m), range(m)):
            if not (kept[r, b] and not kept[r, c]):
                assert score[r, b, c] == -np.inf
                continue
            k2 = np.flatnonzero(kept[r] & (np.arange(m) != b) | (np.arange(m) == c))
            want = g[r, k2] @ np.linalg.solve(t[r][np.ix_(k2, k2)], g[r, k2])
            np.testing.assert_allclose(score[r, b, c], want, rtol=1e-9)


@pytest.mark.parametrize("form", ["kept", "pruned"])
def test_both_elimination_forms_give_the_window_problem_and_exact_weights(form):
    """Fixed sets eliminated by either form: T, g and the weights of any window choice equal the
    dense optimum w_K = [H_KK]⁻¹ (H w̄)_K for K = K0 ∪ B."""
    rng = np.random.default_rng(2)
    d, rows, m = 16, 3, 5
    w0 = rng.normal(size=(rows, d))
    x = rng.normal(size=(50, d)) @ (np.eye(d) + 0.4 * rng.normal(size=(d, d)))
    h = _damped(x.T @ x)
    q = np.linalg.inv(h)
    widx = np.stack([rng.permutation(d)[:m] for _ in range(rows)]).astype(np.int32)
    k0 = np.zeros((rows, d), bool)
    for r in range(rows):
        rest = np.setdiff1d(np.arange(d), widx[r])
        k0[r, rng.choice(rest, 6, replace=False)] = True
    in_w = np.zeros((rows, d), bool)
    in_w[np.arange(rows)[:, None], widx] = True
    fixed = k0 if form == "kept" else ~k0 & ~in_w
    n = int(fixed.sum(1).max()) + 2  # padded
    idx = np.argsort(~fixed, axis=1, kind="stable")[:, :n].astype(np.int32)
    valid = np.arange(n)[None, :] < fixed.sum(1, keepdims=True)
    wv = np.ones((rows, m), bool)
    args = (jnp.asarray(w0), jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(widx), jnp.asarray(wv))
    parts, t, g = _kept_form(jnp.asarray(h), *args) if form == "kept" else _pruned_form(jnp.asarray(q), *args)
    b_choice = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    beta = np.zeros((rows, m))
    for r in range(rows):
        keep = k0[r].copy()
        keep[widx[r][b_choice[r]]] = True
        want = _optimal_weights(w0[r], h, keep)
        # window problem: the optimum's window weights are T_BB⁻¹ g_B
        bsel = np.flatnonzero(b_choice[r])
        beta[r, bsel] = np.linalg.solve(np.asarray(t)[r][np.ix_(bsel, bsel)], np.asarray(g)[r, bsel])
        np.testing.assert_allclose(beta[r, b_choice[r]], want[widx[r][b_choice[r]]], rtol=1e-8, atol=1e-10)
    w = np.asarray(_weights(jnp.asarray(q), parts, t, jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(widx),
                            jnp.asarray(beta)))
    for r in range(rows):
        keep = k0[r].copy()
        keep[widx[r][b_choice[r]]] = True
        np.testing.assert_allclose(w[r][keep], _optimal_weights(w0[r], h, keep)[keep], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("start", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("config", [dict(sparsity=0.5, granularity="unit"), dict(sparsity=0.75, granularity="unit"),
                                    dict(pattern="2:4")])
def test_cbs_reaches_the_enumerated_optimum_in_most_instances_never_worse_than_start(start, config):
    """d_in = 12: every kept set of each output unit enumerated (its weights re-solved); CBS's
    window covers the row, so it is a full single-swap local search from the start's mask."""
    hits = total = 0
    for seed in range(4):
        w, h = _problem(seed)
        hd = _damped(h)
        d = w.shape[0]
        if "pattern" in config:
            masks = list(_nm_masks(d, 2, 4))
        else:
            masks = list(_unstructured_masks(d, d - round(config["sparsity"] * d)))
        first = cobs_jax.layer.LAYER_METHODS[start](**{k: v for k, v in config.items() if k == "granularity"})
        options = {k: v for k, v in config.items() if k != "granularity"}
        ws, ms, *_ = cobs_jax.prune_layer(w, h, method=first, update="exact", **options)
        res = cobs_jax.prune_layer(w, h, method=cobs_jax.layer.CBS(start=first), **options)
        wc, mc = res.kernel, res.mask
        wc, mc = np.asarray(wc), np.asarray(mc)
        # the same counts per unit (and per N:M group) as the start; pruned entries exactly 0
        np.testing.assert_array_equal(mc.sum(0), np.asarray(ms).sum(0))
        assert np.all(wc[~mc] == 0)
        if "pattern" in config:
            assert np.all(mc.reshape(3, 4, -1).sum(1) == 2)
        # exact weights for the mask it returns
        for r in range(w.shape[1]):
            np.testing.assert_allclose(wc[:, r], _optimal_weights(w[:, r], hd, mc[:, r]), rtol=1e-7, atol=1e-9)
        lc, ls = _row_losses(w, wc, hd), _row_losses(w, ws, hd)
        assert np.all(lc <= ls * (1 + 1e-9))  # never worse than the start with its exact weights
        opt = np.array([_enumerated_optimum(w[:, r], hd, masks) for r in range(w.shape[1])])
        assert np.all(lc >= opt * (1 - 1e-9))
        hits += int(np.sum(lc <= opt * (1 + 1e-9)))
        total += w.shape[1]
        assert res.stats["swaps"] >= 0
    print(f"{start} {config}: optimum reached in {hits}/{total}")
    assert hits > 0.5 * total, f"optimum reached in {hits}/{total}"


@pytest.mark.parametrize("config", [dict(sparsity=0.5), dict(sparsity=0.3, granularity="unit"),
                                    dict(sparsity=0.8), dict(pattern="4:8")])
def test_cbs_with_a_window_smaller_than_the_row(config):
    """d_in = 48, window 8: rows eliminate their fixed sets (some in the kept form, some in the
    pruned form when a per-layer mask gives rows different counts); exact weights, counts kept,
    never worse than the start with exact weights, better on most rows."""
    w, h = _problem(7, n=120, d=48, out=10)
    hd = _damped(h)
    start = cobs_jax.layer.SparseGPT(**{k: v for k, v in config.items() if k == "granularity"})
    options = {k: v for k, v in config.items() if k != "granularity"}
    ws, ms, *_ = cobs_jax.prune_layer(w, h, method=start, update="exact", **options)
    wc, mc, *_ = cobs_jax.prune_layer(w, h, method=cobs_jax.layer.CBS(start=start, window=8), **options)
    wc, mc, ms = np.asarray(wc), np.asarray(mc), np.asarray(ms)
    np.testing.assert_array_equal(mc.sum(0), ms.sum(0))
    if "pattern" in config:
        assert np.all(mc.reshape(6, 8, -1).sum(1) == 4)
    for r in range(w.shape[1]):
        np.testing.assert_allclose(wc[:, r], _optimal_weights(w[:, r], hd, mc[:, r]), rtol=1e-7, atol=1e-9)
    lc, ls = _row_losses(w, wc, hd), _row_losses(w, ws, hd)
    assert np.all(lc <= ls * (1 + 1e-9))
    assert np.sum(lc < ls * (1 - 1e-6)) >= w.shape[1] // 2


def test_cbs_deterministic_inputs_untouched_and_bad_args():
    w, h = _problem(3)
    w_copy, h_copy = w.copy(), h.copy()
    a = cobs_jax.prune_layer(w, h, sparsity=0.5, method="cbs")
    b = cobs_jax.prune_layer(w, h, sparsity=0.5, method="cbs")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(w, w_copy)
    np.testing.assert_array_equal(h, h_copy)
    with pytest.raises(ValueError, match=r"`CBS\(start=...\)`"):
        cobs_jax.layer.CBS(start="cbs")
    with pytest.raises(ValueError, match=r"`CBS\(start=...\)`"):
        cobs_jax.layer.CBS(start="obs")
    with pytest.raises(ValueError, match=r"`CBS\(window=...\)`"):
        cobs_jax.layer.CBS(window=1)
    with pytest.raises(ValueError, match=r"`CBS\(max_swaps=...\)`"):
        cobs_jax.layer.CBS(max_swaps=0)

