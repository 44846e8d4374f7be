"""Conv nets with BatchNorm: whole variables dicts and nnx state, per-layer Fisher blocks vs dense."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax
from helpers import dense_f, xent
from test_update import dense_cbs_update


class TinyConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, f in enumerate((4, 4)):
            x = nn.Conv(f, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def conv_setup(n=24, dtype=jnp.float64):
    key = jax.random.key(0)
    x = jax.random.normal(key, (n, 5, 5, 2), dtype)
    y = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3)
    model = TinyConvBN()
    variables = model.init(jax.random.key(1), x[:1])
    # non-trivial running statistics, as after training
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = jax.tree.map(lambda a: a.astype(dtype), {"params": variables["params"], **upd})

    def loss_fn(v, b):  # eval mode: BatchNorm uses the running statistics
        return xent(model.apply(v, b["x"]), b["y"])

    return model, variables, loss_fn, {"x": x, "y": y}


ALL = [("magnitude", None), ("woodfisher", None), ("woodfisher", "obs"), ("cbs", None), ("cbs", "cbs"),
       ("iht", "cbs")]


@pytest.mark.parametrize("method,update", ALL)
def test_every_method_on_a_conv_bn_variables_dict(method, update):
    model, variables, loss_fn, batch = conv_setup()
    before = copy.deepcopy(jax.tree.map(np.asarray, variables))
    res = cobs_jax.prune(variables, loss_fn, batch, sparsity=0.5, method=method, update=update,
                         fisher_blocks="layer", abs_damping=1e-2, key=jax.random.key(0))
    layout = cobs_jax.make_layout(variables)
    assert layout.names == ("['params']['conv0']['kernel']", "['params']['conv1']['kernel']",
                            "['params']['fc']['kernel']")
    # BN statistics and parameters come back unchanged; the input is not mutated
    for coll, path in (("batch_stats", "bn0"), ("batch_stats", "bn1"), ("params", "bn0"), ("params", "bn1")):
        for k in variables[coll][path]:
            np.testing.assert_array_equal(res.params[coll][path][k], variables[coll][path][k])
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    keep = np.asarray(layout.from_masks(res.masks))
    assert (~keep).sum() == round(0.5 * layout.size)
    w = np.asarray(layout.ravel(res.params))
    assert np.all(w[~keep] == 0.0)
    # the pruned model's outputs are those of a model built by hand with these zeros
    by_hand = jax.tree.map(np.array, variables if update is None else res.params)
    for name in ("conv0", "conv1", "fc"):
        k = by_hand["params"][name]["kernel"]
        k[~np.asarray(res.masks["params"][name]["kernel"])] = 0.0
    np.testing.assert_array_equal(model.apply(res.params, batch["x"]), model.apply(by_hand, batch["x"]))
    np.testing.assert_allclose(res.loss, loss_fn(by_hand, batch), rtol=1e-12)


def test_layer_blocks_equal_dense_per_layer_computation():
    _, variables, loss_fn, batch = conv_setup()
    layout = cobs_jax.make_layout(variables)
    grads = cobs_jax.per_example_grads(variables, loss_fn, batch, layout)
    lam = 1e-2
    fisher = cobs_jax.Fisher(grads, jnp.asarray(lam), layout.blocks("layer"))
    f = dense_f(fisher)  # block-diagonal per layer, from the dense G
    g = np.asarray(grads)
    for s, e in layout.layer_ranges():  # cross-layer entries are zero, within a layer G^T G / N
        np.testing.assert_allclose(f[s:e, s:e], g[:, s:e].T @ g[:, s:e] / len(g) + lam * np.eye(e - s), rtol=1e-12)
        assert not f[s:e, :s].any() and not f[s:e, e:].any()
    w = np.asarray(layout.ravel(variables))
    finv = np.linalg.inv(f)
    saliency = w**2 / np.diag(finv)
    res = cobs_jax.prune(variables, loss_fn, batch, sparsity=0.6, method="woodfisher", update="cbs",
                         fisher_blocks="layer", abs_damping=lam, grads=grads)
    pruned = ~np.asarray(layout.from_masks(res.masks))
    expected = np.zeros_like(pruned)
    expected[np.argsort(saliency, kind="stable")[: pruned.sum()]] = True
    np.testing.assert_array_equal(pruned, expected)
    np.testing.assert_allclose(np.asarray(layout.ravel(res.params)),
                               np.where(pruned, 0.0, w + dense_cbs_update(f, w, pruned)), rtol=1e-8, atol=1e-10)
    obs = cobs_jax.prune(variables, loss_fn, batch, sparsity=0.6, method="woodfisher", update="obs",
                         fisher_blocks="layer", abs_damping=lam, grads=grads)
    dw = -finv @ np.where(pruned, w / np.diag(finv), 0.0)
    np.testing.assert_allclose(np.asarray(layout.ravel(obs.params)), np.where(pruned, 0.0, w + dw),
                               rtol=1e-8, atol=1e-10)


def test_paper_style_layer_choice_leaves_others_alone():
    _, variables, loss_fn, batch = conv_setup()
    only_convs = lambda path, leaf: "conv" in path and path.endswith("['kernel']")  # noqa: E731
    res = cobs_jax.prune(variables, loss_fn, batch, sparsity=0.7, method="cbs", update="cbs",
                         fisher_blocks="layer", prunable=only_convs, abs_damping=1e-2)
    np.testing.assert_array_equal(res.params["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    assert np.all(res.masks["params"]["fc"]["kernel"])
    assert set(res.layer_sparsity) == {"['params']['conv0']['kernel']", "['params']['conv1']['kernel']"}


class NNXConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def test_nnx_conv_bn_state():
    model = NNXConvBN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (16, 5, 5, 2), jnp.float32)
    y = jax.random.randint(jax.random.key(3), (16,), 0, 3)
    model(x)  # train mode: the running statistics move away from their init
    model.eval()
    graphdef, state = nnx.split(model)

    def loss_fn(st, b):
        return xent(nnx.merge(graphdef, st)(b["x"]), b["y"])

    stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    res = cobs_jax.prune(state, loss_fn, {"x": x, "y": y}, sparsity=0.5, method="woodfisher",
                         update="cbs", fisher_blocks="layer", abs_damping=1e-2)
    assert set(res.layer_sparsity) == {"['conv']['kernel'].value", "['fc']['kernel'].value"}
    nnx.update(model, res.params)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(a, b)
    kernel = np.asarray(model.conv.kernel[...])
    mask = np.asarray(jax.tree.leaves(res.masks["conv"]["kernel"])[0])
    assert np.all(kernel[~mask] == 0.0) and (~mask).sum() > 0
    np.testing.assert_allclose(loss_fn(res.params, {"x": x, "y": y}), res.loss, rtol=1e-6)


def test_gradual_refresh_recomputes_batchnorm_statistics_after_every_stage():
    """`refresh` (here: BatchNorm statistics of the current weights) runs after every stage; the
    compiled schedule and the loop equal stage-by-stage `prune` calls with it applied between them."""
    model, variables, loss_fn, batch = conv_setup()

    def refresh(v):
        return {**v, **model.apply(v, batch["x"], train=True, mutable=["batch_stats"])[1]}

    kw = dict(method="magnitude", update="cbs", fisher_blocks="layer", abs_damping=1e-2)
    p, masks = variables, None
    for t, s in enumerate(cobs_jax.sparsity_schedule(0.7, 3)):
        r = cobs_jax.prune(p, loss_fn, batch, sparsity=s, masks=masks, key=t, **kw)
        p, masks = refresh(r.params), r.masks
    loop = cobs_jax.prune_gradual(variables, loss_fn, batch, sparsity=0.7, stages=3, refresh=refresh,
                                  compiled=False, **kw)
    comp = cobs_jax.prune_multistage(variables, loss_fn, batch, sparsity=0.7, stages=3, refresh=refresh,
                                  warm_start=False, **kw, check=None)
    for res in (loop, comp):
        for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(comp.loss, loss_fn(p, batch), rtol=1e-10)  # the refreshed model's loss
    plain = cobs_jax.prune_multistage(variables, loss_fn, batch, sparsity=0.7, stages=3, **kw, check=None)
    assert not np.allclose(plain.params["batch_stats"]["bn1"]["mean"], comp.params["batch_stats"]["bn1"]["mean"])
    np.testing.assert_array_equal(plain.params["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_gradual_refresh_cannot_revive_pruned_weights_and_must_keep_the_tree():
    model, variables, loss_fn, batch = conv_setup()
    layout = cobs_jax.make_layout(variables)
    shift = lambda v: jax.tree.map(lambda a: a + 1.0, v)  # noqa: E731  (moves every weight, pruned ones too)
    for compiled in (True, False):
        res = cobs_jax.prune_multistage(variables, loss_fn, batch, sparsity=0.6, stages=2, refresh=shift,
                                     fisher_blocks="layer", abs_damping=1e-2, update="cbs")
        w, keep = np.asarray(layout.ravel(res.params)), np.asarray(layout.from_masks(res.masks))
        assert keep.sum() == layout.size - round(0.6 * layout.size) and np.all(w[~keep] == 0.0)
    for bad in (lambda v: v["params"], lambda v: jax.tree.map(lambda a: a.astype(jnp.float32), v)):
        with pytest.raises(ValueError, match="refresh"):
            cobs_jax.prune_multistage(variables, loss_fn, batch, sparsity=0.6, stages=2, refresh=bad, abs_damping=1e-2)
    with pytest.raises(ValueError, match="refresh"):
        cobs_jax.prune_multistage(variables, loss_fn, batch, sparsity=0.6, stages=2, refresh="bn")
