"""Shared fixtures: tiny models (linen and nnx), random low-rank problems, dense oracles."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cobs_jax


class TinyMLP(nn.Module):
    hidden: int = 6

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(3)(x)


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def xent(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def linen_setup(n=32, seed=0, dtype=jnp.float32, hidden=6):
    key = jax.random.key(seed)
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, 4), dtype)
    y = jax.random.randint(ky, (n,), 0, 3)
    model = TinyMLP(hidden)
    params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp, x[:1]))

    def loss_fn(p, b):
        return xent(model.apply(p, b["x"]), b["y"])

    return params, loss_fn, {"x": x, "y": y}


def nnx_setup(n=32, seed=0):
    model = TinyNNX(nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    key = jax.random.key(seed + 1)
    x = jax.random.normal(key, (n, 4), jnp.float32)
    y = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3)

    def loss_fn(st, b):
        return xent(nnx.merge(graphdef, st)(b["x"]), b["y"])

    return state, loss_fn, {"x": x, "y": y}


def random_fisher(d=12, n=6, blocks=None, seed=0, damping=0.1):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    blocks = blocks or ((0, d),)
    return jnp.asarray(w), cobs_jax.Fisher(jnp.asarray(g), jnp.asarray(damping), blocks)


def dense_f(fisher, damped=True):
    """NumPy float64 block-diagonal F(_lambda)."""
    g = np.asarray(fisher.grads, np.float64)
    n, d = g.shape
    f = np.zeros((d, d))
    for s, e in fisher.blocks:
        f[s:e, s:e] = g[:, s:e].T @ g[:, s:e] / n
    return f + float(fisher.damping) * np.eye(d) if damped else f


def selection_objective(f_undamped, w, pruned):
    wp = np.where(pruned, w, 0.0)
    return float(wp @ f_undamped @ wp)


def brute_force_best(f_undamped, w, k):
    """Exact minimum of w_P^T F w_P over all C(d, k) sets P (vectorised enumeration)."""
    d = len(w)
    subsets = np.array(list(itertools.combinations(range(d), k)))
    masks = np.zeros((len(subsets), d), bool)
    np.put_along_axis(masks, subsets, True, axis=1)
    wp = np.where(masks, w, 0.0)
    vals = np.einsum("sd,de,se->s", wp, f_undamped, wp)
    i = int(np.argmin(vals))
    return float(vals[i]), masks[i]
