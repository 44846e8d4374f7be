"""ResNet20 / Fashion-MNIST-32: one-shot pruning with and without BatchNorm statistics re-estimated.

Pruning 80-95 % of the 18 residual 3x3 convs shifts every later layer's activations away from the
running statistics saved at training time. This script prunes the README's ResNet20 in one shot
(MP and MP + CBS-U, per-layer Fisher blocks, N = 1000, damping 1e-5, as ``resnet20_fashion.py``)
and evaluates each result twice: with the saved statistics, and after
``resnet20.batchnorm_refresh`` (the batch statistics of ``--bn-images`` unlabelled training images,
other than the Fisher ones; a forward pass, no gradient step, no labels) — the ``refresh=`` of
``cobs_jax.prune_gradual``, here applied once after one-shot pruning.

    python benchmarks/resnet20.py              # once (about 25 min, resumable): the dense model
    python benchmarks/resnet20_bn_refresh.py   # about 5 minutes on 2 CPU cores

Writes ``results/resnet20_bn_refresh.{md,json}`` (``--out`` renames them). ``--fisher-n`` and
``--fisher-labels sampled`` (labels drawn from the dense model's predictions, a one-sample estimate
of the true Fisher instead of the empirical one) test whether a larger or different Fisher sample
makes the global quadratic model's update help on this conv net:

    python benchmarks/resnet20_bn_refresh.py --sparsities 0.9 0.95 --fisher-n 4000 --out resnet20_bn_refresh_n4000
    python benchmarks/resnet20_bn_refresh.py --sparsities 0.9 0.95 --fisher-n 4000 --fisher-labels sampled \
        --damping 1e-4 --out resnet20_bn_refresh_n4000_sampled
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.common import metadata, write  # noqa: E402
from resnet20 import MODEL, batchnorm_refresh, cached_model_and_data, evaluate, loss_fn, pad32, paper_prunable  # noqa: E402
from resnet20_fashion import fisher_sample  # noqa: E402

METHODS = {"MP": None, "MP + CBS-U": "cbs"}  # the update after magnitude selection


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--fisher-n", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-5)
    p.add_argument("--fisher-labels", choices=("data", "sampled"), default="data",
                   help="labels of the Fisher examples: the data's (the empirical Fisher, as everywhere else) "
                        "or drawn from the dense model's predictions (a one-sample estimate of the true Fisher)")
    p.add_argument("--bn-images", type=int, default=2000)
    p.add_argument("--out", default="resnet20_bn_refresh")
    p.add_argument("--chunk-size", type=int, default=8)
    args = p.parse_args(argv)
    ds, variables = cached_model_and_data(args.data_dir)
    x_te, y_te = pad32(ds.x_test), ds.y_test
    x_tr, y_tr = jnp.asarray(pad32(ds.x_train)), jnp.asarray(ds.y_train)
    layout = cobs_jax.make_layout(variables, paper_prunable)
    dense = evaluate(variables, x_te, y_te)
    rows = []
    for seed in range(args.seeds):
        batch = fisher_sample(x_tr, y_tr, seed, args.fisher_n)
        if args.fisher_labels == "sampled":
            logits = MODEL.apply(variables, batch["x"], train=False)
            batch["y"] = jax.random.categorical(jax.random.key(seed), logits)
        calib = x_tr[np.random.default_rng(1000 + seed).choice(len(x_tr), args.bn_images, replace=False)]
        refresh = jax.jit(batchnorm_refresh(calib))
        if seed == 0:
            dense_refreshed = evaluate(refresh(variables), x_te, y_te)
        grads = cobs_jax.per_example_grads(variables, loss_fn, batch, layout, chunk_size=args.chunk_size)
        for s in args.sparsities:
            for name, update in METHODS.items():
                res = cobs_jax.prune(variables, loss_fn, batch, sparsity=s, method="magnitude", update=update,
                                     abs_damping=args.damping, fisher_blocks="layer", prunable=paper_prunable, grads=grads)
                t0 = time.perf_counter()
                refreshed = jax.block_until_ready(refresh(res.params))
                t_refresh = time.perf_counter() - t0
                row = {"seed": seed, "sparsity": s, "method": name, "accuracy": evaluate(res.params, x_te, y_te),
                       "accuracy_refreshed": evaluate(refreshed, x_te, y_te), "refresh_s": t_refresh}
                rows.append(row)
                print(f"seed {seed} {name} at {s}: {100 * row['accuracy']:.2f} % -> "
                      f"{100 * row['accuracy_refreshed']:.2f} % with BatchNorm re-estimated", flush=True)
    labels = "data labels" if args.fisher_labels == "data" else "labels sampled from the dense model"
    lines = [f"ResNet20 (dense {100 * dense:.2f} %; {100 * dense_refreshed:.2f} % re-estimated) one-shot pruning of the "
             f"18 residual 3x3 convs, N = {args.fisher_n} ({labels}), damping {args.damping}, per-layer blocks: test accuracy "
             f"(%) with the saved BatchNorm statistics -> with statistics re-estimated on {args.bn_images} unlabelled "
             f"training images (mean over {args.seeds} seed(s)).", "",
             "| sparsity | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for s in args.sparsities:
        cells = []
        for name in METHODS:
            got = [r for r in rows if r["sparsity"] == s and r["method"] == name]
            cells.append(f"{100 * np.mean([r['accuracy'] for r in got]):.2f} -> "
                         f"{100 * np.mean([r['accuracy_refreshed'] for r in got]):.2f}")
        lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print("\n" + md)
    write(args.out, md, metadata(dense=dense, dense_refreshed=dense_refreshed, rows=rows, args=vars(args)))


if __name__ == "__main__":
    main()
