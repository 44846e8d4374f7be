"""Where CBS spends its time: gradients, RMP, local search, CBS-U, per sparsity (MLPNet, N = 1000).

    python benchmarks/cbs_phases.py [--sparsities 0.5 0.9 0.98] [--repeats 3]

Each phase is one jit-compiled call, timed after a warm-up (median of ``--repeats``). The floor is
one per-example-gradient pass plus the forward passes CBS cannot avoid (one per RMP trial and per
local-search pass) over the loss batch; the table says how far the whole CBS is from it. Writes
``benchmarks/results/cbs_phases.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.data import CACHE, load_mnist  # noqa: E402
from lib.models import loss_fn, trained_mlpnet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.98])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--loss-examples", type=int, default=8000)
    args = p.parse_args(argv)

    ds = load_mnist()
    params, _ = trained_mlpnet(ds, CACHE, f"mnist_{len(ds.x_train)}", epochs=40)
    layout = cobs_jax.make_layout(params)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ds.x_train), 1000, replace=False)
    fisher_batch = {"x": jnp.asarray(ds.x_train[idx]), "y": jnp.asarray(ds.y_train[idx])}
    li = rng.choice(len(ds.x_train), min(args.loss_examples, len(ds.x_train)), replace=False)
    loss_batch = {"x": jnp.asarray(ds.x_train[li]), "y": jnp.asarray(ds.y_train[li])}
    w = layout.ravel(params)
    sel = cobs_jax.CBS(num_trials=args.trials)
    blocks = layout.blocks("model")

    t_grads, grads = median_time(
        lambda: cobs_jax.per_example_grads(params, loss_fn, fisher_batch, layout), args.repeats
    )

    # everything is an argument of the jitted functions (closed-over arrays would be constant-folded)
    def problem(g, w, params, lb):
        fisher = cobs_jax.Fisher(g, jnp.asarray(1e-3, g.dtype), blocks)
        loss = lambda wv: loss_fn(layout.unravel(wv, params), lb)
        return cobs_jax.Problem(w, fisher, layout.layer_ranges(), loss)

    ops = (w, params, loss_batch)
    rmp = jax.jit(lambda g, k, key, *o: sel.rmp(problem(g, *o), k, key)[0])
    ls = jax.jit(lambda g, p0, k, *o: sel.run_local_search(problem(g, *o), p0, k))
    upd = jax.jit(lambda g, p, *o: cobs_jax.cbs_update(o[0], p, problem(g, *o).fisher))
    fwd = jax.jit(lambda g, *o: problem(g, *o).loss(o[0]))
    t_fwd, _ = median_time(lambda: fwd(grads, *ops), max(args.repeats, 5))

    rows = []
    for s in args.sparsities:
        k = jnp.int32(round(s * layout.size))
        key = jax.random.key(0)
        t_rmp, p0 = median_time(lambda: rmp(grads, k, key, *ops), args.repeats)
        t_ls, (best, stats) = median_time(lambda: ls(grads, p0, k, *ops), args.repeats)
        t_upd, _ = median_time(lambda: upd(grads, best, *ops), args.repeats)
        passes = int(stats["ls_passes"])
        swaps = int(np.sum(stats["ls_swaps"]))
        forwards = args.trials + passes + 1
        floor = t_grads + forwards * t_fwd
        total = t_grads + t_rmp + t_ls + t_upd
        rows.append(dict(sparsity=s, grads=t_grads, rmp=t_rmp, ls=t_ls, update=t_upd, total=total,
                         passes=passes, swaps=swaps, forwards=forwards, floor=floor))
        print(f"sparsity {s}: grads {t_grads:.3f}s rmp {t_rmp:.3f}s ls {t_ls:.3f}s ({passes} passes, "
              f"{swaps} swaps) update {t_upd:.3f}s total {total:.2f}s floor {floor:.2f}s", flush=True)

    lines = [
        f"CBS phases on MLPNet (D = {layout.size}, N = 1000, S = {args.trials} RMP trials, loss batch "
        f"{len(li)} examples; one forward pass {1e3 * t_fwd:.1f} ms), {jax.devices()[0].platform.upper()}, "
        f"median of {args.repeats} after compilation.",
        "",
        "| sparsity | gradients (s) | RMP (s) | local search (s) | passes / swaps | CBS-U (s) | total (s) | floor (s) | total / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']:.2f} | {r['grads']:.3f} | {r['rmp']:.3f} | {r['ls']:.3f} | "
            f"{r['passes']} / {r['swaps']} | {r['update']:.3f} | {r['total']:.2f} | {r['floor']:.2f} | "
            f"{r['total'] / r['floor']:.1f}x |"
        )
    md = "\n".join(lines)
    print("\n" + md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cbs_phases.md").write_text(md + "\n")
    (RESULTS / "cbs_phases.json").write_text(json.dumps({"command": "python benchmarks/cbs_phases.py "
                                                         + " ".join(sys.argv[1:]), "rows": rows,
                                                         "forward_s": t_fwd}, indent=1))


if __name__ == "__main__":
    main()
