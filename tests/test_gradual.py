import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cobs_jax
from helpers import linen_setup


@pytest.mark.parametrize("stages", [1, 2, 5])
@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_schedule_rises_to_exactly_the_target(stages, schedule):
    s = cobs_jax.sparsity_schedule(0.93, stages, schedule)
    assert len(s) == stages and s[-1] == 0.93
    assert all(0 < a <= b for a, b in zip(s, s[1:] + [1.0]))
    if stages == 5 and schedule == "cubic":
        np.testing.assert_allclose(s, [0.93 * (1 - (1 - t / 5) ** 3) for t in range(1, 6)])


@pytest.mark.parametrize(
    "args,match",
    [((0.9, 0), "stages"), ((0.9, 3, "cosine"), "schedule"), ((1.2, 3), "sparsity"),
     ((0.9, 3, lambda x: 1 - x), "schedule")],
)
def test_bad_schedule(args, match):
    with pytest.raises(ValueError, match=match):
        cobs_jax.sparsity_schedule(*args)


@pytest.mark.parametrize("method,update", [("magnitude", None), ("woodfisher", "obs"), ("cbs", "cbs"), ("iht", "cbs")])
def test_gradual_reaches_exact_target_with_nested_masks(method, update):
    params, loss_fn, batch = linen_setup(n=40, dtype=jnp.float64, hidden=8)
    layout = cobs_jax.make_layout(params)
    seen = []
    opt = optax.chain(optax.adam(1e-2))

    def finetune(p, masks, stage):
        seen.append((stage, ~np.asarray(layout.from_masks(masks))))
        tx = optax.chain(opt, cobs_jax.keep_sparsity(masks))
        st = tx.init(p)
        for _ in range(5):
            u, st = tx.update(jax.grad(loss_fn)(p, batch), st, p)
            p = optax.apply_updates(p, u)
        return p

    res = cobs_jax.prune_gradual(
        params, loss_fn, batch, sparsity=0.8, stages=3, method=method, update=update, damping=1e-2,
        finetune=finetune, key=jax.random.key(0),
    )
    pruned = ~np.asarray(layout.from_masks(res.masks))
    assert pruned.sum() == round(0.8 * layout.size)
    assert [s for s, _ in seen] == [0, 1]  # between stages only
    for (_, a), (_, b) in zip(seen, seen[1:] + [(None, pruned)]):
        assert np.all(b[a])  # every stage keeps the earlier pruned set
    targets = [e["target"] for e in res.info["stages"]]
    np.testing.assert_allclose(targets, cobs_jax.sparsity_schedule(0.8, 3))
    for e in res.info["stages"]:
        assert e["sparsity"] == pytest.approx(round(e["target"] * layout.size) / layout.size)
    assert np.all(np.asarray(layout.ravel(res.params))[pruned] == 0.0)


def test_gradual_per_layer_budget_and_batch_callable():
    params, loss_fn, batch = linen_setup(n=40, hidden=8)
    layout = cobs_jax.make_layout(params)
    calls = []

    def batches(t):
        calls.append(t)
        return jax.tree.map(lambda x: x[t * 5 : t * 5 + 30], batch)

    res = cobs_jax.prune_gradual(
        params, loss_fn, batches, budget={"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.9}, stages=3,
        method="woodfisher", update="cbs", damping=1e-2,
    )
    assert calls == [0, 1, 2]
    keep = np.asarray(layout.from_masks(res.masks))
    assert [int((~keep[s:e]).sum()) for s, e in layout.layer_ranges()] == [16, round(0.9 * 24)]


def test_finetune_cannot_revive_pruned_weights():
    params, loss_fn, batch = linen_setup(n=40, hidden=8)
    res = cobs_jax.prune_gradual(
        params, loss_fn, batch, sparsity=0.5, stages=2,
        finetune=lambda p, m, t: jax.tree.map(lambda x: x + 1.0, p),  # ignores the masks
    )
    layout = cobs_jax.make_layout(params)
    keep = np.asarray(layout.from_masks(res.masks))
    assert np.all(np.asarray(layout.ravel(res.params))[~keep] == 0.0)


@pytest.mark.parametrize("kw,match", [({"masks": None}, "masks"), ({"pattern": "2:4"}, "pattern"),
                                      ({"finetune": 3}, "finetune"), ({"stages": 0}, "stages"), ({}, "sparsity")])
def test_gradual_bad_arguments(kw, match):
    params, loss_fn, batch = linen_setup(n=8)
    kw = {"sparsity": 0.5, **kw} if match != "sparsity" else kw
    with pytest.raises(ValueError, match=match):
        cobs_jax.prune_gradual(params, loss_fn, batch, **kw)
