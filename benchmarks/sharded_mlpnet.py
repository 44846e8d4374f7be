"""MLPNet on MNIST pruned on 1 vs 8 devices (``prune(..., mesh=mesh)``).

The machine has no accelerator, so the 8 devices are virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set by this script) sharing 2 cores: the
times show the overhead of the sharded program (collectives, ring passes), not a speed-up, which
needs real devices. What the run does prove at full size: the same masks, the same updated weights
(to float rounding) and the same test accuracy, with G split 8 ways by rows.

    python benchmarks/sharded_mlpnet.py

N = 1000 Fisher rows, damping 1e-3, whole-model block, sparsity 0.9 (timed after a compiling call at
0.8). Writes ``results/sharded_mlpnet.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.common import metadata, write  # noqa: E402
from lib.data import CACHE, DataUnavailable, load_mnist  # noqa: E402
from lib.models import accuracy, loss_fn, trained_mlpnet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--fisher-n", type=int, default=1000)
    p.add_argument("--trials", type=int, default=50)
    args = p.parse_args(argv)
    if jax.device_count() < max(args.devices):
        sys.exit(f"error: {jax.device_count()} devices; set XLA_FLAGS before starting Python")
    try:
        ds = load_mnist(None, False)
    except DataUnavailable as e:
        sys.exit(f"error: {e}")
    params, _ = trained_mlpnet(ds, CACHE, f"mnist_{len(ds.x_train)}", epochs=40)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    idx = np.random.default_rng(0).choice(len(x), args.fisher_n, replace=False)
    batch = {"x": x[idx], "y": y[idx]}
    loss_batch = {"x": x, "y": y}
    layout = cobs_jax.make_layout(params)
    methods = [("MP", "magnitude", None), ("WF", "woodfisher", "obs"),
               ("CBS", cobs_jax.CBS(num_trials=args.trials), "cbs"), ("IHT", "iht", "cbs")]
    rows, ref = [], {}
    for p_dev in args.devices:
        mesh = Mesh(np.array(jax.devices()[:p_dev]), ("rows",))
        t0 = time.perf_counter()
        grads = jax.block_until_ready(cobs_jax.per_example_grads(params, loss_fn, batch, layout, mesh=mesh))
        t_grads = time.perf_counter() - t0
        shard_mib = grads.addressable_shards[0].data.nbytes / 2**20
        print(f"{p_dev} device(s): G {grads.shape} sharded {grads.sharding.spec}, {shard_mib:.1f} MiB per "
              f"device, gradients {t_grads:.2f}s", flush=True)
        for name, method, update in methods:
            kw = dict(method=method, update=update, abs_damping=1e-3, grads=grads, loss_batch=loss_batch, mesh=mesh)
            cobs_jax.prune(params, loss_fn, batch, sparsity=args.sparsity - 0.1, **kw)  # compile
            res = cobs_jax.prune(params, loss_fn, batch, sparsity=args.sparsity, **kw)
            t = res.timings
            acc = float(accuracy(res.params, ds.x_test, ds.y_test))
            keep = np.asarray(layout.ravel(res.masks))
            w = np.asarray(layout.ravel(res.params))
            same = diff = None
            if name in ref:
                same = bool((ref[name][0] == keep).all())
                diff = float(np.max(np.abs(ref[name][1] - w)))
            else:
                ref[name] = (keep, w)
            rows.append(dict(devices=p_dev, method=name, select_s=t["select"], update_s=t["update"],
                             grads_s=t_grads, shard_mib=shard_mib, accuracy=acc, same_masks=same,
                             max_abs_weight_diff=diff))
            print(f"  {name}: select {t['select']:.2f}s update {t['update']:.2f}s accuracy {100 * acc:.2f}%"
                  + ("" if same is None else f"; masks equal to 1 device: {same}, max |dw| {diff:.1e}"),
                  flush=True)
    lines = [
        f"MLPNet on MNIST, sparsity {args.sparsity}, N = {args.fisher_n}, whole-model block: `prune(..., mesh=...)` "
        f"on 1 vs 8 virtual CPU devices (2 physical cores, so no speed-up is possible here).", "",
        "| devices | method | G per device (MiB) | gradients (s) | select (s) | update (s) | test acc. (%) | "
        "masks = 1 device | max abs weight diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "" if r["same_masks"] is None else ("yes" if r["same_masks"] else "NO")
        diff = "" if r["max_abs_weight_diff"] is None else f"{r['max_abs_weight_diff']:.1e}"
        lines.append(f"| {r['devices']} | {r['method']} | {r['shard_mib']:.1f} | {r['grads_s']:.2f} | "
                     f"{r['select_s']:.2f} | {r['update_s']:.2f} | {100 * r['accuracy']:.2f} | {same} | {diff} |")
    md = "\n".join(lines)
    print("\n" + md)
    write("sharded_mlpnet", md, metadata(args=vars(args), rows=rows, device_count=jax.device_count()))


if __name__ == "__main__":
    main()
