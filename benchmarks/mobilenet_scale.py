"""Scale: one-shot pruning of a MobileNetV1-sized model (4.2M prunable weights, 28 layers) on CPU.

MobileNetV1 (width 1.0, 1000 classes: the standard conv, 13 depthwise-separable blocks and the
classifier) with the paper's MobileNet Fisher set-up: N = 400 gradient rows, each averaged over a
mini-batch of examples, per-layer blocks cut into 10,000-weight chunks (421 blocks), damping 1e-5.
**The inputs are synthetic** (random 32x32 images, random labels; the weights are the random
initialisation): ImageNet is not available here. The parameter count does not depend on the input
size, and neither does the cost of selection and update, which is what this benchmark measures:
time and peak memory of every phase (gradients, MP, WF-S + OBS, CBS-S + CBS-U, IHT), and that each
result has exactly the requested sparsity. Accuracy is meaningless on random data and not reported.

    python benchmarks/mobilenet_scale.py            # about 12 minutes, peak RSS ~9 GiB
    python benchmarks/mobilenet_scale.py --quick    # N = 64: a smoke run
    python benchmarks/mobilenet_scale.py --rows 16 --methods --grad-chunk 16 --out mobilenet_grads16

Each phase is timed twice, at sparsity 0.5 and 0.7: the first call includes compilation, the second
does not (the sparsity is a traced value). Peak memory is the process's peak resident set size
after each phase (it only grows). Writes ``results/mobilenet_scale.{md,json}``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.common import metadata, write  # noqa: E402

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNetV1
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv_bn(x, features, kernel, stride=1, groups=1):
            x = nn.Conv(features, kernel, strides=stride, padding="SAME", feature_group_count=groups,
                        use_bias=False)(x)
            return nn.relu(nn.BatchNorm(use_running_average=not train)(x))

        x = conv_bn(x, 32, (3, 3), 2)
        for features, stride in BLOCKS:
            x = conv_bn(x, x.shape[-1], (3, 3), stride, groups=x.shape[-1])  # depthwise
            x = conv_bn(x, features, (1, 1))  # pointwise
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


MODEL = MobileNetV1()


def loss_fn(variables, batch):
    logits = MODEL.apply(variables, batch["x"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400, help="N, gradient rows")
    p.add_argument("--mini-batch", type=int, default=4, help="examples averaged per row")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=10_000, help="Fisher block size within a layer")
    p.add_argument("--damping", type=float, default=1e-5)
    p.add_argument("--trials", type=int, default=10, help="RMP trials of CBS")
    p.add_argument("--iht-iters", type=int, default=10)
    p.add_argument("--grad-chunk", type=int, default=1,
                   help="gradient rows per vmap (1 is fastest for convs on CPU; try 16 to see why)")
    p.add_argument("--methods", nargs="*", default=["MP", "WF", "CBS", "IHT"], choices=["MP", "WF", "CBS", "IHT"],
                   help="methods to run (none: only the gradient phase)")
    p.add_argument("--quick", action="store_true", help="N = 64: a smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rows = 64
    name = args.out or "mobilenet_scale" + ("_quick" if args.quick else "")

    key = jax.random.key(0)
    n_ex = args.rows * args.mini_batch
    shape = (n_ex, args.image_size, args.image_size, 3)
    batch = {"x": jax.random.normal(key, shape), "y": jax.random.randint(jax.random.fold_in(key, 1), (n_ex,), 0, 1000)}
    loss_batch = {"x": batch["x"][:256], "y": batch["y"][:256]}
    variables = MODEL.init(jax.random.fold_in(key, 2), batch["x"][:1])
    layout = cobs_jax.make_layout(variables)
    blocks = layout.blocks(args.chunk)
    g_gib = args.rows * layout.size * 4 / 2**30
    print(f"MobileNetV1: {layout.size:,} prunable weights in {len(layout.names)} layers, {len(blocks)} Fisher "
          f"blocks of <= {args.chunk:,}; N = {args.rows} rows x {args.mini_batch} synthetic "
          f"{args.image_size}x{args.image_size} images; G = {g_gib:.2f} GiB (float32)", flush=True)
    phases = []

    def record(phase, seconds, **extra):
        phases.append({"phase": phase, "seconds": seconds, "peak_rss_gib": peak_gib(), **extra})
        print(f"  {phase:<34} {seconds:8.2f} s   peak RSS {phases[-1]['peak_rss_gib']:.2f} GiB", flush=True)

    record("setup (init, synthetic data)", 0.0)
    t0 = time.perf_counter()
    grads = jax.block_until_ready(cobs_jax.per_example_grads(
        variables, loss_fn, batch, layout, mini_batch=args.mini_batch, chunk_size=args.grad_chunk,
        progress=True))
    record(f"gradients (N x D, {args.grad_chunk} row(s) per vmap)", time.perf_counter() - t0)

    methods = {
        "MP": ("MP", "magnitude", None),
        "WF": ("WF-S + OBS (WF)", "woodfisher", "obs"),
        "CBS": ("CBS-S + CBS-U (CBS)", cobs_jax.CBS(num_trials=args.trials), "cbs"),
        "IHT": ("IHT + CBS-U", cobs_jax.IHT(max_iter=args.iht_iters, line_search=False), "cbs"),
    }
    for label, method, update in (methods[m] for m in args.methods):
        for s, note in ((0.5, "incl. compile"), (0.7, "compiled")):
            res = cobs_jax.prune(variables, loss_fn, batch, sparsity=s, method=method, update=update,
                                 abs_damping=args.damping, fisher_blocks=args.chunk, grads=grads, loss_batch=loss_batch,
                                 progress=True)
            t = res.timings
            assert res.num_pruned == round(s * layout.size), res.num_pruned
            assert int(jnp.sum(layout.ravel(res.params) == 0)) >= res.num_pruned
            record(f"{label} @ {s} ({note})", t["select"] + t["update"], method=label, sparsity=s,
                   select_s=t["select"], update_s=t["update"], sparsity_reached=res.sparsity,
                   loss=res.loss)
            del res

    lines = [
        f"MobileNetV1-sized pruning on CPU (2 cores): {layout.size:,} prunable weights, {len(layout.names)} "
        f"layers, {len(blocks)} Fisher blocks (<= {args.chunk:,} weights), N = {args.rows} rows averaged over "
        f"{args.mini_batch} synthetic {args.image_size}x{args.image_size} images each (random inputs and "
        f"weights: no ImageNet here), damping {args.damping}, G = {g_gib:.2f} GiB. CBS: {args.trials} RMP "
        f"trials + local search; IHT: {args.iht_iters} iterations.",
        "",
        "| phase | select (s) | update (s) | total (s) | sparsity reached | peak RSS after (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for ph in phases:
        if "select_s" in ph:
            lines.append(f"| {ph['phase']} | {ph['select_s']:.2f} | {ph['update_s']:.2f} | {ph['seconds']:.2f} | "
                         f"{ph['sparsity_reached']:.4f} | {ph['peak_rss_gib']:.2f} |")
        else:
            lines.append(f"| {ph['phase']} | | | {ph['seconds']:.2f} | | {ph['peak_rss_gib']:.2f} |")
    md = "\n".join(lines)
    print("\n" + md)
    write(name, md, metadata(args=vars(args), num_prunable=layout.size, num_layers=len(layout.names),
                             num_blocks=len(blocks), g_gib=g_gib, phases=phases))
    print(f"wrote benchmarks/results/{name}.{{md,json}}")


if __name__ == "__main__":
    main()
