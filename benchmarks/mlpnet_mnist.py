"""Main benchmark: one-shot pruning of MLPNet on real MNIST (or Fashion-MNIST), paper Table 1.

For each seed: a Fisher sample of N = 1000 training examples (the seed picks it and keys RMP), damping
1e-3, whole-model block; every method prunes the trained MLPNet at all sparsities in one batched
``cobs_jax.prune_sweep`` call and the test accuracy is measured without fine-tuning. For seed 0 the
sweep is also timed against a loop of single ``prune`` calls (``--no-loop-timing`` skips it). Prints a markdown table (mean +- std over seeds) and writes
``benchmarks/results/<name>.{md,json}`` plus accuracy and time plots.

    python benchmarks/mlpnet_mnist.py                 # MNIST, 5 seeds, 7 sparsities
    python benchmarks/mlpnet_mnist.py --quick         # a one-minute look
    python benchmarks/mlpnet_mnist.py --dataset fashion
    python benchmarks/mlpnet_mnist.py --train sgd     # MLPNet trained by SGD (momentum 0.9) instead of Adam

Methods (paper names): MP, WF-S, WF (OBS-sum update, scale 0.9 as the paper's MLPNet runs), CBS-S
(RMP + local search) and CBS (CBS-S + CBS-U). WF and CBS reuse the masks of WF-S and CBS-S, as the
paper's pipeline does. IHT (ours): iterative hard thresholding on the damped quadratic model, warm
started from the WoodFisher support, then the exact CBS-U re-solve on its support. CBS-UA (ours,
``--methods ... CBS-UA``): CBS whose swap search minimises the model loss after the CBS-U update.
CBS-auto (``--methods ... CBS-auto``): CBS with ``update_scale="auto"`` (the CBS-U scale s in
{0, 0.1, ..., 1} with the lowest loss on the loss batch).

Multi-stage table (``--ms-methods``, ``--ms-sparsities``, ``--ms-seeds``; ``--ms-methods`` with no
name skips it): ``cobs_jax.prune_multistage(stages=16)`` without fine-tuning, the Fisher recomputed at
the updated weights before every stage, each stage selecting with MP, CBS (default columns, with CBS-geo) or
IHT (``--ms-methods MP CBS IHT``; several minutes per run) and updating with CBS-U, the whole
schedule one compiled program with loss-checked stages (``--ms-loss-check``, default 3.0 as in
``prune_multistage``; 0 turns the check off and runs exactly the planned stages, written to
``<name>_check0_multistage.*``). Columns ``MP-geo`` and ``CBS-geo`` take the geometric schedule
without the check (``schedule="geometric", check=None``). Its time is set against the floor of 16 stages: 16
per-example-gradient passes and 16 loss evaluations on the loss batch, timed just before each run (the
speed of a shared machine drifts within minutes). Rows are saved as they finish (``<name>_multistage.json``) and a rerun
skips them, so an interrupted run resumes.
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
from lib.common import (RESULTS, markdown, metadata, multistage_table, plot, run_one, run_sweep,  # noqa: E402
                    summarise, time_loop_vs_sweep, write)
from lib.data import CACHE, DataUnavailable, load_fashion_mnist, load_mnist  # noqa: E402
from lib.models import accuracy, dense_accuracy, loss_fn, trained_mlpnet  # noqa: E402

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


DEFAULT_METHODS = ("MP", "WF-S", "WF", "CBS-S", "CBS", "IHT")


def method_table(args):
    """name -> (selector or method name, update, update_scale, base) ; base = method whose mask is reused."""
    cbs = cobs_jax.CBS(num_trials=args.trials)
    return {
        "MP": ("magnitude", None, 1.0, None),
        "WF-S": ("woodfisher", None, 1.0, None),
        "WF": ("woodfisher", "obs", 0.9, "WF-S"),
        "CBS-S": (cbs, None, 1.0, None),
        "CBS": (cbs, "cbs", 1.0, "CBS-S"),
        "IHT": (cobs_jax.IHT(), "cbs", 1.0, None),
        "CBS-UA": (cobs_jax.CBS(num_trials=args.trials, objective="update_aware"), "cbs", 1.0, None),
        "CBS-auto": (cbs, "cbs", "auto", None),
    }


def sweep(args, ds, params):
    table = method_table(args)
    wanted = [m for m in table if m in args.methods]
    bases = [table[m][3] for m in wanted if table[m][3] and table[m][3] not in wanted]
    methods = {m: table[m] for m in table if m in wanted or m in bases}  # bases run first, unreported
    layout = cobs_jax.make_layout(params)
    rows = []
    x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    n_loss = min(len(x_tr), args.loss_examples)
    try:
        from tqdm import tqdm
    except ImportError:  # progress without tqdm
        tqdm = None
    jobs = [(seed, s) for seed in range(args.seeds) for s in args.sparsities]
    bar = tqdm(total=len(jobs) * len(wanted), desc="pruning", unit="run") if tqdm else None
    warmed = False
    speed = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(x_tr), args.fisher_n, replace=False)
        loss_idx = rng.choice(len(x_tr), n_loss, replace=False)
        batch = {"x": x_tr[idx], "y": y_tr[idx],
                 "loss": {"x": x_tr[loss_idx], "y": y_tr[loss_idx]}}
        fisher_batch = {"x": batch["x"], "y": batch["y"]}
        t0 = time.perf_counter()
        grads = jax.block_until_ready(cobs_jax.per_example_grads(params, loss_fn, fisher_batch, layout))
        t_grads = time.perf_counter() - t0
        key = jax.random.key(seed)
        if not warmed:  # compile every stage once so that timings exclude compilation
            t0 = time.perf_counter()
            results = {}
            for name, spec in methods.items():
                results[name] = run_sweep(spec, results, params, loss_fn, batch, grads, args.sparsities, key,
                                          damping=args.damping, blocks="model")
                if spec[3] is None:  # the loop of single calls, compiled too
                    run_one(spec, {}, params, loss_fn, batch, grads, 0.5, key, damping=args.damping,
                            blocks="model")
            print(f"compiled all methods in {time.perf_counter() - t0:.1f}s", flush=True)
            warmed = True
            for name, spec in methods.items():
                if spec[3] is None and not args.no_loop_timing:
                    t_loop, t_sweep = time_loop_vs_sweep(spec, params, loss_fn, batch, grads, args.sparsities,
                                                         key, damping=args.damping, blocks="model")
                    speed.append({"method": name, "loop_s": t_loop, "sweep_s": t_sweep})
                    print(f"{name}: {len(args.sparsities)} single prune calls {t_loop:.2f}s, one prune_sweep "
                          f"{t_sweep:.2f}s ({t_loop / t_sweep:.1f}x)", flush=True)
        results = {}
        for name, spec in methods.items():
            results[name] = run_sweep(spec, results, params, loss_fn, batch, grads, args.sparsities, key,
                                      damping=args.damping, blocks="model")
            if name not in wanted:
                continue
            for s, r in zip(args.sparsities, results[name]):
                acc = float(accuracy(r["params"], ds.x_test, ds.y_test))
                needs_grads = name != "MP"
                rows.append({
                    "seed": seed, "sparsity": s, "method": name, "accuracy": acc,
                    "time_s": r["time"] + (t_grads if needs_grads else 0.0),
                    "loss": float(loss_fn(r["params"], batch["loss"])),
                    **({"ls_passes": int(r["info"]["ls_passes"]),
                        "rmp_best_trial": int(r["info"]["rmp_best_trial"])} if "ls_passes" in r["info"] else {}),
                })
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(f"seed {seed} s={s} {name} {100 * acc:.2f}%")
                else:
                    print(f"seed {seed} sparsity {s} {name}: {100 * acc:.2f}%", flush=True)
    if bar:
        bar.close()
    return rows, wanted, speed


# column: prune_multistage keywords (cubic schedule, loss check --ms-loss-check unless given); CBS-vs-MP keeps, at
# every stage, the lower of CBS's and MP's deployed masks; the -geo columns take the geometric schedule, unchecked
GEO = dict(schedule="geometric", check=None)
MS_METHODS = {"MP": dict(method="magnitude"), "CBS": dict(method="cbs"), "IHT": dict(method="iht"),
              "CBS-vs-MP": dict(method="cbs", compare_magnitude=True),
              "MP-geo": dict(method="magnitude", **GEO), "CBS-geo": dict(method="cbs", **GEO)}
TRAINED = {"adam": "Adam-trained", "sgd": "SGD-trained"}


def multistage(args, ds, params, name):
    """The multi-stage table: rows of prune_multistage runs, resumed from ``<name>_multistage.json``."""
    path = RESULTS / f"{name}_multistage.json"
    done = json.loads(path.read_text())["rows"] if path.exists() else []
    x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    n_loss = min(len(x_tr), args.ms_loss_examples)
    layout = cobs_jax.make_layout(params)
    grads = lambda p, b: cobs_jax.per_example_grads(p, loss_fn, b, layout)  # noqa: E731
    loss = jax.jit(loss_fn)

    def time_floor(batch, loss_batch):  # 16 gradient passes + 16 loss evaluations, plain jitted JAX
        jax.block_until_ready((grads(params, batch), loss(params, loss_batch)))
        t0 = time.perf_counter()
        for _ in range(args.ms_stages):
            jax.block_until_ready((grads(params, batch), loss(params, loss_batch)))
        return time.perf_counter() - t0

    warm = set()  # methods whose program is compiled (once per process: counts are traced)
    for seed in range(args.ms_seeds):
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(x_tr), args.fisher_n, replace=False)
        loss_idx = rng.choice(len(x_tr), n_loss, replace=False)
        batch, loss_batch = {"x": x_tr[idx], "y": y_tr[idx]}, {"x": x_tr[loss_idx], "y": y_tr[loss_idx]}
        todo = [(m, s) for m in args.ms_methods for s in args.ms_sparsities
                if not any(r["seed"] == seed and r["method"] == m and r["sparsity"] == s for r in done)]
        for m in args.ms_methods:
            for s in args.ms_sparsities:
                if (m, s) not in todo:
                    continue
                check = cobs_jax.LossCheck(ratio=args.ms_loss_check) if args.ms_loss_check else None
                kw = {"check": check, **MS_METHODS[m]}  # the -geo columns: check=None
                run = lambda: cobs_jax.prune_multistage(  # noqa: E731
                    params, loss_fn, batch, sparsity=s, stages=args.ms_stages, update="cbs", loss_batch=loss_batch,
                    abs_damping=args.damping, fisher_blocks="model", key=seed, **kw)
                if m not in warm:  # compiled once per method: the counts are traced, so no recompilation
                    jax.block_until_ready(run().params)
                    warm.add(m)
                # the floor is timed beside every run: this machine's speed drifts by up to 1.5x within minutes
                floor = time_floor(batch, loss_batch)
                t0 = time.perf_counter()
                res = run()
                jax.block_until_ready(res.params)
                dt = time.perf_counter() - t0
                acc = float(accuracy(res.params, ds.x_test, ds.y_test))
                done.append({"seed": seed, "method": m, "sparsity": s, "accuracy": acc, "time_s": dt,
                             "floor_s": floor, "stages_run": len(res.stages),
                             "loss": float(res.loss)})
                print(f"multi-stage seed {seed} {m} x{args.ms_stages} at {s}: {100 * acc:.2f}% in {dt:.1f}s "
                      f"({dt / floor:.1f}x the floor of {floor:.2f}s, {len(res.info['stages'])} stages run)", flush=True)
                path.write_text(json.dumps({"command": " ".join(sys.argv), "rows": done}, indent=1))
    rows = [r for r in done if r["seed"] < args.ms_seeds and r["method"] in args.ms_methods
            and r["sparsity"] in args.ms_sparsities]
    seeds = sorted({r["seed"] for r in rows})
    fl = sorted(r["floor_s"] for r in rows) or [float("nan")]
    floors = f"{fl[0]:.2f}-{fl[-1]:.2f} s, timed just before each run"
    header = (f"MLPNet ({TRAINED[args.train]}), multi-stage, no fine-tuning: `prune_multistage(stages={args.ms_stages}, "
              f"update=\"cbs\")`, loss batch "
              f"{n_loss} training images, test accuracy (%) mean ± std over seed(s) {seeds}; time per run (s), "
              f"its ratio to the floor ({args.ms_stages} gradient passes + loss evaluations, {floors}) and the stages run "
              + (f"(check=LossCheck(ratio={args.ms_loss_check:g}): stages split, at most twice the planned number)."
                 if args.ms_loss_check else "(check=None: the planned stages only).")
              + (" The -geo columns: `schedule=\"geometric\", check=None` (the planned stages only)."
                 if any(m.endswith("-geo") for m in args.ms_methods) else ""))
    return multistage_table(rows, args.ms_methods, args.ms_sparsities, args.ms_stages, header)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "fashion"), default="mnist")
    p.add_argument("--data-dir", help="folder with the four standard IDX files")
    p.add_argument("--download", action="store_true", help="download the full data set if not available offline")
    p.add_argument("--train", choices=("adam", "sgd"), default="adam",
                   help="how the dense MLPNet is trained (40 epochs; cached per choice)")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 sparsities, 10 RMP trials")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--fisher-n", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--trials", type=int, default=50, help="RMP trials of CBS")
    p.add_argument("--loss-examples", type=int, default=10000, help="training examples scoring CBS masks")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   choices=list(DEFAULT_METHODS) + ["CBS-UA", "CBS-auto"], help="columns of the table")
    p.add_argument("--no-loop-timing", action="store_true",
                   help="skip timing a loop of single prune calls against prune_sweep")
    p.add_argument("--out", default=None, help="output name under benchmarks/results/")
    p.add_argument("--ms-methods", nargs="*", default=["MP", "CBS", "CBS-geo"], choices=list(MS_METHODS),
                   help="multi-stage columns (none: skip the multi-stage table; IHT x16 takes minutes per run)")
    p.add_argument("--ms-sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--ms-seeds", type=int, default=3)
    p.add_argument("--ms-stages", type=int, default=16)
    p.add_argument("--ms-loss-examples", type=int, default=8000)
    p.add_argument("--ms-loss-check", type=float, default=3.0,
                   help="prune_multistage's LossCheck ratio (0: check=None, exactly the planned stages)")
    p.add_argument("--only-multistage", action="store_true", help="skip the one-shot table")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sparsities, args.trials = 1, [0.8, 0.9, 0.95], 10
        args.ms_methods, args.ms_sparsities, args.ms_seeds = ["MP"], [0.95], 1
    name = args.out or (f"mlpnet_{args.dataset}" + ("_sgd" if args.train == "sgd" else "")
                        + ("_quick" if args.quick else "")
                        + (f"_check{args.ms_loss_check:g}" if args.ms_loss_check != 3.0 else ""))

    try:
        ds = (load_mnist if args.dataset == "mnist" else load_fashion_mnist)(args.data_dir, args.download)
    except DataUnavailable as e:
        sys.exit(f"error: {e}")
    print(f"data: {ds.source}; train {len(ds.x_train)}, test {len(ds.x_test)}")
    tag = f"{args.dataset}_{len(ds.x_train)}" + ("_sgd" if args.train == "sgd" else "")
    params, t_train = trained_mlpnet(ds, CACHE, tag, epochs=40, optimizer=args.train)
    dense = dense_accuracy(params, ds)
    print(f"MLPNet: dense test accuracy {100 * dense:.2f} %" + (f" (trained in {t_train:.1f}s)" if t_train else " (cached)"))

    if args.ms_methods:
        ms_md = multistage(args, ds, params, name)
        print("\n" + ms_md)
        (RESULTS / f"{name}_multistage.md").write_text(ms_md + "\n")
    if args.only_multistage:
        return
    t0 = time.perf_counter()
    rows, methods, speed = sweep(args, ds, params)
    wall = time.perf_counter() - t0
    table = summarise(rows, methods, args.sparsities)
    header = (f"MLPNet ({TRAINED[args.train]}) on {ds.source}: test accuracy (%) after one-shot pruning, mean ± std over "
              f"{args.seeds} seed(s); N = {args.fisher_n}, damping {args.damping}, whole-model Fisher.")
    md = markdown(table, methods, args.sparsities, dense, header)
    if speed:
        md += (f"\n\nOne `prune_sweep` over the {len(args.sparsities)} sparsities vs a loop of single `prune` "
               "calls (seed 0, compiled, shared gradients; WF and CBS reuse the WF-S / CBS-S masks):\n\n"
               "| method | loop of prune (s) | prune_sweep (s) | speed-up |\n|---|---|---|---|\n")
        md += "\n".join(f"| {r['method']} | {r['loop_s']:.2f} | {r['sweep_s']:.2f} | "
                        f"{r['loop_s'] / r['sweep_s']:.1f}x |" for r in speed)
    print("\n" + md + f"\n\nsweep wall time {wall:.1f}s")
    write(name, md, metadata(data_source=ds.source, dense_accuracy=dense, args=vars(args), wall_time_s=wall,
                             rows=rows, loop_vs_sweep=speed))
    plot(table, methods, args.sparsities, RESULTS / f"{name}_accuracy.png", RESULTS / f"{name}_time.png",
         f"MLPNet, {args.dataset}")
    print(f"wrote {RESULTS / name}.{{md,json}} and plots")


if __name__ == "__main__":
    main()
