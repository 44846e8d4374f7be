"""MLPNet (784-40-20-10, ReLU, no biases; cbs.md section 6), trained once with optax and cached."""

from __future__ import annotations

import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import serialization

import cobs_jax

MEAN, STD = 0.1307, 0.3081


class MLPNet(nn.Module):
    """The paper's MNIST MLP: 784 -> 40 -> 20 -> 10 with ReLU and no biases (32,360 weights)."""

    @nn.compact
    def __call__(self, x):
        x = (x - MEAN) / STD
        x = nn.relu(nn.Dense(40, use_bias=False)(x))
        x = nn.relu(nn.Dense(20, use_bias=False)(x))
        return nn.Dense(10, use_bias=False)(x)


MODEL = MLPNet()


def loss_fn(params, batch):
    """Mean cross-entropy of MLPNet on ``batch = {"x": (n, 784), "y": (n,)}``."""
    logits = MODEL.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(MODEL.apply(params, x), -1) == y)


# name -> (optimizer from a learning rate, default learning rate)
OPTIMIZERS = {"adam": (optax.adam, 1e-3), "sgd": (lambda lr: optax.sgd(lr, momentum=0.9), 0.02)}


def train(x, y, *, epochs=30, batch_size=128, optimizer="adam", lr=None, seed=0, params=None, masks=None,
          on_epoch=None):
    """Mini-batch training on mean cross-entropy with ``OPTIMIZERS[optimizer]`` (Adam, or SGD with
    momentum 0.9) at ``lr`` (default: the optimizer's); returns params.

    From scratch, or from ``params`` (fine-tuning); with ``masks`` the optimizer is chained with
    ``cobs_jax.keep_sparsity`` so pruned weights stay exactly zero. ``on_epoch(epoch, params)`` is
    called after every epoch.
    """
    key = jax.random.key(seed)
    if params is None:
        params = MODEL.init(key, x[:1])
    make, default_lr = OPTIMIZERS[optimizer]
    opt = make(default_lr if lr is None else lr)
    if masks is not None:
        opt = optax.chain(opt, cobs_jax.keep_sparsity(masks))
    state = opt.init(params)

    @jax.jit
    def epoch(params, state, perm):
        def step(carry, idx):
            p, s = carry
            g = jax.grad(loss_fn)(p, {"x": x[idx], "y": y[idx]})
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), None

        steps = perm[: len(perm) // batch_size * batch_size].reshape(-1, batch_size)
        return jax.lax.scan(step, (params, state), steps)[0]

    x, y = jnp.asarray(x), jnp.asarray(y)
    for e in range(epochs):
        perm = jax.random.permutation(jax.random.fold_in(key, e), len(x))
        params, state = epoch(params, state, perm)
        if on_epoch is not None:
            on_epoch(e, params)
    return params


def trained_mlpnet(ds, cache_dir: Path, tag: str, **train_kw):
    """Train MLPNet on ``ds`` once; later calls load ``cache_dir/mlpnet_<tag>.msgpack``."""
    path = Path(cache_dir) / f"mlpnet_{tag}.msgpack"
    template = MODEL.init(jax.random.key(0), ds.x_train[:1])
    if path.exists():
        return serialization.from_bytes(template, path.read_bytes()), 0.0
    t0 = time.perf_counter()
    params = train(ds.x_train, ds.y_train, **train_kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(params))
    return params, time.perf_counter() - t0


def dense_accuracy(params, ds) -> float:
    return float(accuracy(params, ds.x_test, ds.y_test))


__all__ = ["MLPNet", "loss_fn", "accuracy", "train", "trained_mlpnet", "dense_accuracy"]
