"""Structured pruning of one consumer layer against dense float64 oracles: the compensation is
least squares (with and without an intercept), the selections meet the enumerated optimum."""

import itertools
from functools import partial

import numpy as np
import pytest

from cobs_jax.structured import Calibration, GroupCBS, GroupOBS, MagnitudeSP, WandaSP, head_groups, prune_groups

TINY = 1e-10  # relative damping small enough that the damped solution is the plain least squares


def _layer(seed, n=200, d=12, out=5, size=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ (np.eye(d) + 0.5 * rng.normal(size=(d, d))) + rng.normal(size=d)
    w = rng.normal(size=(d, out))
    return x, w, np.arange(d).reshape(d // size, size)


def _cal(x):
    return Calibration(x.T @ x, x.sum(0), x.shape[0])


@pytest.mark.parametrize("method", [GroupCBS(), GroupOBS(), WandaSP(), MagnitudeSP()])
def test_compensation_is_least_squares_per_output_unit(method):
    x, w, groups = _layer(0)
    r = prune_groups(w, _cal(x), groups, num_remove=3, method=method, rel_damping=TINY)
    removed = np.asarray(r.removed)
    assert removed.sum() == 3
    cols = np.zeros(12, bool)
    cols[groups[removed].ravel()] = True
    new = np.asarray(r.kernel)
    assert np.all(new[cols] == 0)
    if method.compensates:
        fit = np.linalg.lstsq(x[:, ~cols], x @ w, rcond=None)[0]  # every output unit at once
        np.testing.assert_allclose(new[~cols], fit, rtol=1e-6, atol=1e-8)
    else:  # the published baselines keep their weights
        np.testing.assert_array_equal(new[~cols], w[~cols])
    np.testing.assert_array_equal(np.asarray(r.bias_delta), 0.0)
    dy = x @ (new - w)
    assert r.error == pytest.approx(np.sum(dy**2) / np.sum((x @ w) ** 2), rel=1e-6)


def test_intercept_is_least_squares_with_a_constant_column():
    x, w, groups = _layer(1)
    b = np.random.default_rng(2).normal(size=5)
    r = prune_groups(w, _cal(x), groups, num_remove=2, method=GroupOBS(), intercept=True, rel_damping=TINY)
    cols = np.zeros(12, bool)
    cols[groups[np.asarray(r.removed)].ravel()] = True
    a = np.concatenate([x[:, ~cols], np.ones((x.shape[0], 1))], axis=1)
    fit = np.linalg.lstsq(a, x @ w + b, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(r.kernel)[~cols], fit[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b + np.asarray(r.bias_delta), fit[-1], rtol=1e-6, atol=1e-8)
    plain = prune_groups(w, _cal(x), groups, num_remove=2, method=GroupOBS(), rel_damping=TINY)
    # against the outputs with their bias, the intercept can only help
    new_plain = np.asarray(plain.kernel)
    err_plain = np.sum((x @ (new_plain - w)) ** 2)
    err_int = np.sum((x @ (np.asarray(r.kernel) - w) + np.asarray(r.bias_delta)) ** 2)
    if np.array_equal(np.asarray(plain.removed), np.asarray(r.removed)):
        assert err_int <= err_plain * (1 + 1e-9)


def test_flap_bias_compensation_on_a_hand_example():
    """Baselines with an intercept keep their weights and add W_P μ_P to the bias (FLAP)."""
    x = np.array([[1.0, 2.0, 0.0, 3.0], [3.0, 0.0, 1.0, 1.0], [2.0, 1.0, 2.0, 2.0]])
    w = np.array([[1.0, 0.0], [0.1, 0.2], [2.0, 1.0], [0.0, 0.1]])
    groups = np.array([[0], [1], [2], [3]])
    r = prune_groups(w, _cal(x), groups, num_remove=2, method=MagnitudeSP(), intercept=True)
    # column norms: 1.0, 0.224, 2.236, 0.1 -> channels 1 and 3 go
    np.testing.assert_array_equal(np.asarray(r.removed), [False, True, False, True])
    mu = x.mean(0)
    np.testing.assert_allclose(np.asarray(r.bias_delta), mu[1] * w[1] + mu[3] * w[3])
    # Wanda-sp: mean |W_rj| * sqrt(mean x_j^2)
    score = np.abs(w).mean(1) * np.sqrt((x**2).mean(0))
    r = prune_groups(w, Calibration(x.T @ x, x.sum(0), 3), groups, num_remove=1, method=WandaSP())
    assert np.asarray(r.removed).tolist() == (score == score.min()).tolist()


def _exact_error(x, w, groups, removed):
    cols = np.zeros(w.shape[0], bool)
    cols[groups[list(removed)].ravel()] = True
    fit = np.linalg.lstsq(x[:, ~cols], x @ w, rcond=None)[0]
    return np.sum((x[:, ~cols] @ fit - x @ w) ** 2)


@pytest.mark.parametrize("size,k", [(1, 4), (2, 2), (2, 3), (3, 2)])
def test_cbs_on_groups_reaches_the_enumerated_optimum_and_never_loses_to_greedy(size, k):
    hits = total = greedy_hits = 0
    worst = 1.0
    for seed in range(5):
        x, w, groups = _layer(10 + seed, d=12, size=size)
        x[:, :6] += 0.9 * x[:, 6:]  # correlated inputs: the groups interact
        n = groups.shape[0]
        errs = {s: _exact_error(x, w, groups, s) for s in itertools.combinations(range(n), k)}
        best = min(errs.values())
        cbs = prune_groups(w, x.T @ x, groups, num_remove=k, method=GroupCBS(), rel_damping=TINY)
        obs = prune_groups(w, x.T @ x, groups, num_remove=k, method=GroupOBS(), rel_damping=TINY)
        e_cbs = errs[tuple(np.flatnonzero(np.asarray(cbs.removed)))]
        e_obs = errs[tuple(np.flatnonzero(np.asarray(obs.removed)))]
        assert best * (1 - 1e-9) <= e_cbs <= e_obs * (1 + 1e-9)
        hits += e_cbs <= best * (1 + 1e-9)
        greedy_hits += e_obs <= best * (1 + 1e-9)
        worst = max(worst, e_obs / best)
        total += 1
        # the greedy's first pick is the best single group
        one = prune_groups(w, x.T @ x, groups, num_remove=1, method=GroupOBS(), rel_damping=TINY)
        singles = [_exact_error(x, w, groups, (g,)) for g in range(n)]
        assert singles[int(np.flatnonzero(np.asarray(one.removed))[0])] == pytest.approx(min(singles), rel=1e-6)
    print(f"size {size}, k {k}: optimum reached by GroupCBS in {hits}/{total}, by GroupOBS in {greedy_hits}/{total} "
          f"(worst GroupOBS / optimum {worst:.2f})")
    assert hits >= 4, f"optimum reached in {hits}/{total}"


def test_bad_groups_and_arguments_are_named():
    x, w, groups = _layer(3)
    h = x.T @ x
    cases = [
        (dict(groups=np.array([[0, 1], [1, 2]])), "overlap"),
        (dict(groups=np.array([[0, 12]])), "at least two"),
        (dict(groups=np.array([[0, 1], [2, 12]])), "outside"),
        (dict(groups=np.arange(12)), r"\(n_groups, size\)"),
        (dict(num_remove=6), "num_remove"),
        (dict(num_remove=-1), "num_remove"),
        (dict(method="cbs"), "GroupPruner"),
        (dict(intercept=True), "intercept needs"),
        (dict(rel_damping=0.0), "rel_damping"),
    ]
    for kw, match in cases:
        args = dict(groups=groups, num_remove=2) | kw
        with pytest.raises(ValueError, match=match):
            prune_groups(w, h, **args)
    with pytest.raises(ValueError, match="max_swaps"):
        GroupCBS(max_swaps=0)
    bad = h.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prune_groups(w, bad, groups, num_remove=2)


def test_head_groups_follow_the_head_major_layout():
    g = head_groups(4, 3)
    np.testing.assert_array_equal(g, np.arange(12).reshape(4, 3))
    kv = head_groups(6, 2, num_kv_heads=2, unit="kv")  # 3 query heads share each KV head
    np.testing.assert_array_equal(kv, np.arange(12).reshape(2, 6))
    np.testing.assert_array_equal(head_groups(6, 2, num_kv_heads=2), np.arange(12).reshape(6, 2))
    # an o_proj kernel (heads x head_dim, d) flattened head-major: removing a KV group zeroes its query heads' rows
    x, w, _ = _layer(5, d=12)
    r = prune_groups(w, x.T @ x, kv, num_remove=1, method=GroupOBS())
    gone = kv[np.asarray(r.removed)].ravel()
    assert np.all(np.asarray(r.kernel)[gone] == 0) and len(gone) == 6
    for kw, match in [(dict(num_heads=6, head_dim=2, num_kv_heads=4), "divide"), (dict(num_heads=0, head_dim=2), "num_heads"),
                      (dict(num_heads=4, head_dim=2, unit="query"), "unit")]:
        with pytest.raises(ValueError, match=match):
            head_groups(**kw)


@pytest.mark.parametrize("s", [1, 3])
def test_every_swap_delta_equals_the_recomputed_objective(s):
    """The all-pairs formulas (single columns; blocks of ``s`` columns) against E recomputed per swap."""
    import jax.numpy as jnp

    from cobs_jax._structured.select import column_swap_deltas, group_swap_deltas, objective

    n = 10
    d = n * s
    x, w, _ = _layer(7, d=d, size=1)
    x[:, : d // 2] += 0.8 * x[:, d - d // 2:]
    g = np.linalg.inv(x.T @ x + 1e-3 * np.eye(d))
    wr = jnp.asarray(w.T)  # rows layout
    removed = np.zeros(n, bool)
    removed[[1, 4, 6, 8]] = True
    deltas = column_swap_deltas if s == 1 else partial(group_swap_deltas, s=s)
    p, q, delta, value = deltas(wr, jnp.asarray(g), jnp.asarray(removed), 4)
    p, q = np.asarray(p), np.asarray(q)
    cols = lambda groups: jnp.asarray((np.sort(groups)[:, None] * s + np.arange(s)).ravel())  # noqa: E731
    base = float(objective(wr, jnp.asarray(g), cols(p)))
    assert float(value) == pytest.approx(base, rel=1e-10)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            want = float(objective(wr, jnp.asarray(g), cols(np.append(p[p != a], b)))) - base
            assert float(delta[i, j]) == pytest.approx(want, rel=1e-7, abs=1e-9 * base)


def test_channel_search_on_many_columns_never_loses_to_greedy():
    """Single-column groups take the all-pairs path; the set is never worse than greedy's."""
    rng = np.random.default_rng(3)
    d = 96
    x = rng.normal(size=(400, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
    w = rng.normal(size=(d, 16))
    groups = np.arange(d)[:, None]
    cbs = prune_groups(w, x.T @ x, groups, num_remove=40, method=GroupCBS(max_swaps=200), rel_damping=TINY)
    obs = prune_groups(w, x.T @ x, groups, num_remove=40, method=GroupOBS(), rel_damping=TINY)
    assert int(np.asarray(cbs.removed).sum()) == 40
    assert cbs.error <= obs.error * (1 + 1e-9)
    print(f"96 channels, 40 removed: GroupCBS {cbs.error:.4f} ({cbs.stats['swaps']} swaps) vs GroupOBS {obs.error:.4f}")


@pytest.mark.parametrize("method", [GroupCBS(), GroupOBS(), WandaSP(), MagnitudeSP()])
def test_families_lose_the_same_count_and_cbs_meets_the_constrained_optimum(method):
    """Query heads inside GQA groups: 6 heads of 2 columns in 2 families, 2 removed = 1 from each."""
    hits = 0
    for seed in range(4):
        x, w, groups = _layer(20 + seed, d=12, size=2)
        x[:, :6] += 0.9 * x[:, 6:]
        r = prune_groups(w, x.T @ x, groups, num_remove=2, method=method, families=2, rel_damping=TINY)
        removed = np.flatnonzero(np.asarray(r.removed))
        assert len(removed) == 2 and removed[0] < 3 <= removed[1]
        best = min(_exact_error(x, w, groups, (a, b)) for a in range(3) for b in range(3, 6))
        hits += _exact_error(x, w, groups, tuple(removed)) <= best * (1 + 1e-9)
        if isinstance(method, GroupCBS):  # single swaps inside a family: never worse than greedy
            obs = prune_groups(w, x.T @ x, groups, num_remove=2, method=GroupOBS(), families=2, rel_damping=TINY)
            assert r.error <= obs.error * (1 + 1e-9)
    if isinstance(method, GroupCBS):
        assert hits >= 3, hits
    with pytest.raises(ValueError, match="families"):
        prune_groups(w, x.T @ x, groups, num_remove=3, method=method, families=2)
