"""ResNet20 (CIFAR style, BatchNorm) on Fashion-MNIST padded to 32x32: model, evaluation, training.

The architecture of the paper's ResNet20 (cbs.md section 6): conv3x3(1->16) + BN + ReLU, three
stages of three BasicBlocks (16/32/64 channels, stride 2 at stages 2 and 3, 1x1 conv + BN projection
shortcuts where the shape changes), global average pooling, fc 64->10. The paper prunes the 18 3x3
convs of the residual stages (267,264 weights): :func:`paper_prunable`.

    python benchmarks/resnet20.py               # train (or resume) to the cached checkpoint
    python benchmarks/resnet20.py --budget 540  # stop within ~9 minutes; run again to resume

Training: SGD (Nesterov momentum 0.9, weight decay 5e-4 on kernels, batch 128) with a one-cycle
cosine learning rate and random horizontal flips, for 4 epochs (a step of 128 images takes about
0.8 s on 2 CPU cores: about 25 minutes in all). A checkpoint is written
after every epoch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.data import CACHE, DataUnavailable, load_fashion_mnist  # noqa: E402

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    mid: Optional[int] = None  # conv1's filters (default ``features``; fewer after structured pruning)

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
        y = nn.Conv(self.mid or self.features, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.features, (3, 3), 1, padding=1, use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False, name="down_conv")(x)
            x = norm("down_bn")(x)
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """CIFAR ResNet20; input (n, 32, 32, 1) in [0, 1]. ``mids``: the nine blocks' conv1 widths
    (after filter pruning; default the stage widths)."""

    num_classes: int = 10
    mids: Optional[tuple[int, ...]] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = (x - MEAN) / STD
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="conv_stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_stem")(x))
        for stage, features in enumerate((16, 32, 64)):
            for b in range(3):
                stride = 2 if stage > 0 and b == 0 else 1
                mid = self.mids[3 * stage + b] if self.mids else None
                x = BasicBlock(features, stride, mid, name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


MODEL = ResNet20()
_PAPER_LAYER = re.compile(r"layer\d_\d'\]\['conv[12]'\]\['kernel'\]")


def paper_prunable(path: str, leaf: Any) -> bool:
    """The paper's choice: the 18 3x3 convs of the residual stages (not the stem, shortcuts or fc)."""
    return bool(_PAPER_LAYER.search(path))


def pad32(x: np.ndarray) -> np.ndarray:
    """(n, 784) in [0, 1] -> (n, 32, 32, 1) float32, zero-padded by 2 pixels on each side."""
    return np.pad(x.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32)


def loss_fn(variables, batch):
    """Mean cross-entropy in eval mode (BatchNorm uses its running statistics)."""
    logits = MODEL.apply(variables, batch["x"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def batchnorm_refresh(x, momentum: float = 0.9, model: ResNet20 = MODEL):
    """``refresh`` for :func:`cobs_jax.prune_gradual`: every BatchNorm's running statistics replaced
    by the batch statistics of the images ``x`` (train-mode forward, no gradient step).

    A train-mode pass returns ``momentum * old + (1 - momentum) * batch`` (Flax's moving average, the
    model's ``momentum``); the batch statistics are solved from it.
    """

    def refresh(variables):
        _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        fresh = jax.tree.map(lambda new, old: (new - momentum * old) / (1.0 - momentum),
                             upd["batch_stats"], variables["batch_stats"])
        return {**variables, "batch_stats": fresh}

    return refresh


@partial(jax.jit, static_argnums=0)
def _correct(model, variables, x, y):
    return jnp.sum(jnp.argmax(model.apply(variables, x, train=False), -1) == y)


def evaluate(variables, x, y, batch_size: int = 1000, model: ResNet20 = MODEL) -> float:
    """Test accuracy in eval mode, in compiled batches of ``batch_size`` (the last one padded)."""
    n = len(x)
    correct = 0
    for s in range(0, n, batch_size):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        pad = batch_size - len(xb)
        if pad:  # keep one compiled shape; padded rows get label -1 and never count
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, -np.ones(pad, yb.dtype)])
        correct += int(_correct(model, variables, jnp.asarray(xb), jnp.asarray(yb)))
    return correct / n


def _augment(key, x):
    """Random horizontal flips."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)


def make_optimizer(steps_total: int, lr: float = 0.1, weight_decay: float = 5e-4):
    schedule = optax.cosine_onecycle_schedule(steps_total, lr, pct_start=0.15)
    decay_mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), p
    )
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=0.9, nesterov=True),
    )


def train(ds, *, epochs: int, ckpt: Path, budget_s: float, batch_size: int = 128, seed: int = 0, log=print):
    """Train (or resume from ``ckpt``) for ``epochs``; stops before an epoch that would end after
    ``budget_s`` seconds (judged by the previous epoch's time).

    Returns ``(variables, done)``; ``done`` is False when the budget ran out first.
    """
    x_tr, y_tr = jnp.asarray(pad32(ds.x_train)), jnp.asarray(ds.y_train)
    steps_per_epoch = len(x_tr) // batch_size
    opt = make_optimizer(epochs * steps_per_epoch)
    key = jax.random.key(seed)
    variables = MODEL.init(key, x_tr[:1])
    state = {"variables": variables, "opt": opt.init(variables["params"]), "epoch": 0}
    if ckpt.exists():
        state = serialization.from_bytes(state, ckpt.read_bytes())
        log(f"resumed from {ckpt} after epoch {int(state['epoch'])}")

    @jax.jit
    def train_step(variables, opt_state, xb, yb, step_key):
        def loss(p):
            logits, upd = MODEL.apply({"params": p, "batch_stats": variables["batch_stats"]}, _augment(step_key, xb),
                                      train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

        (l, upd), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        u, opt_state = opt.update(g, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], u), **upd}, opt_state, l

    def run_epoch(variables, opt_state, epoch):
        # steps dispatched from Python: XLA's CPU backend runs conv gradients inside a lax.scan
        # about 25x slower than as standalone programs
        ekey = jax.random.fold_in(key, epoch)
        perm = np.asarray(jax.random.permutation(ekey, len(x_tr)))[: steps_per_epoch * batch_size]
        losses = []
        for i, idx in enumerate(perm.reshape(steps_per_epoch, batch_size)):
            variables, opt_state, l = train_step(variables, opt_state, x_tr[idx], y_tr[idx], jax.random.fold_in(ekey, i))
            losses.append(l)
        return variables, opt_state, jnp.mean(jnp.stack(losses))

    t_start = time.perf_counter()
    x_te = pad32(ds.x_test)
    while int(state["epoch"]) < epochs:
        t0 = time.perf_counter()
        e = int(state["epoch"])
        variables, opt_state, loss = run_epoch(state["variables"], state["opt"], e)
        state = {"variables": variables, "opt": opt_state, "epoch": e + 1}
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(serialization.to_bytes(state))
        acc = evaluate(variables, x_te, ds.y_test)
        log(f"epoch {e + 1}/{epochs}: train loss {float(loss):.4f}, test acc {100 * acc:.2f} %, "
            f"{time.perf_counter() - t0:.0f}s")
        elapsed, last = time.perf_counter() - t_start, time.perf_counter() - t0
        if elapsed + last > budget_s and e + 1 < epochs:  # the next epoch would not fit
            return state["variables"], False
    return state["variables"], True


def trained_resnet20(ds, cache_dir: Path = CACHE, *, epochs: int = 4, budget_s: float = float("inf")):
    """The trained checkpoint ``cache_dir/resnet20_fashion32_e<epochs>.msgpack``, training it if needed.

    Returns ``(variables, done)``.
    """
    final = Path(cache_dir) / f"resnet20_fashion32_e{epochs}.msgpack"
    template = MODEL.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    if final.exists():
        return serialization.from_bytes(template, final.read_bytes()), True
    variables, done = train(ds, epochs=epochs, ckpt=final.with_suffix(".partial"), budget_s=budget_s)
    if done:
        final.write_bytes(serialization.to_bytes(variables))
        final.with_suffix(".partial").unlink()
    return variables, done


def cached_model_and_data(data_dir=None, download: bool = False):
    """``(Fashion-MNIST, the trained variables)`` for the pruning scripts; exits with a message when
    the data are missing or the checkpoint is not trained yet (this never trains)."""
    try:
        ds = load_fashion_mnist(data_dir, download)
    except DataUnavailable as e:
        sys.exit(f"error: {e}")
    variables, done = trained_resnet20(ds, budget_s=0)
    if not done:
        sys.exit("no trained ResNet20 yet: run `python benchmarks/resnet20.py` (again) until it reports done")
    return ds, variables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--download", action="store_true")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--budget", type=float, default=540,
                   help="stop before an epoch that would end after this many seconds (run again to resume)")
    args = p.parse_args(argv)
    try:
        ds = load_fashion_mnist(args.data_dir, args.download)
    except DataUnavailable as e:
        sys.exit(f"error: {e}")
    variables, done = trained_resnet20(ds, epochs=args.epochs, budget_s=args.budget)
    if not done:
        sys.exit("budget reached: run the same command again to resume")
    t0 = time.perf_counter()
    acc = evaluate(variables, pad32(ds.x_test), ds.y_test)
    dt = time.perf_counter() - t0
    print(f"ResNet20 on Fashion-MNIST-32: test accuracy {100 * acc:.2f} % ({len(ds.x_test) / dt:.0f} images/s eval)")


if __name__ == "__main__":
    main()
