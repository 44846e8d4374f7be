"""ResNet20 on Fashion-MNIST-32: one-shot pruning of the 18 residual 3x3 convs (paper Table 2 setup).

Per-layer Fisher blocks for selection and update, N = 1000 Fisher rows (one example each), damping
1e-5, as in the paper; CBS scores masks by the loss on the same 1000 examples (the official code
does the same for ResNet20). The BatchNorm statistics are used in eval mode and never change.
Methods: MP, WF-S, WF (OBS-sum update, scale 1 as the paper's ResNet20 runs), CBS-S, CBS.

Multi-stage table (``--ms-methods``, default MP and CBS; ``--ms-methods`` with no name skips it):
``cobs_jax.prune_multistage(stages=16, update="cbs")`` without fine-tuning, the whole schedule one
compiled program (per-layer Fisher blocks recomputed at the updated weights every stage, loss-checked
stages on the 1000 Fisher examples), at 0.8 / 0.9 / 0.95 for ``--ms-seeds`` seeds (default 1: a run
takes 20-36 minutes on 2 CPU cores; ``--budget 0`` renders the table from the saved rows). Its time
(compilation left out) is set against the floor of 16 stages: 16 x (one per-example-gradient pass +
one loss evaluation), timed in the same run.

    python benchmarks/resnet20.py             # once (about 25 min, resumable): the dense model
    python benchmarks/resnet20_fashion.py     # the sweep; resumable: run again until it says done
    python benchmarks/resnet20_fashion.py --only-multistage   # the multi-stage table alone

Each (seed, sparsity) result is saved as it completes (``results/<name>.partial.json``); a run stops
before ``--budget`` seconds and the next run continues. Writes ``results/<name>.{md,json}`` and
plots when every job is done.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.common import (RESULTS, compile_seconds, markdown, metadata, multistage_table, plot,  # noqa: E402
                    run_one, summarise, write)
from resnet20 import batchnorm_refresh, cached_model_and_data, evaluate, loss_fn, pad32, paper_prunable  # noqa: E402

SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def method_table(args):
    cbs = cobs_jax.CBS(num_trials=args.trials)
    return {
        "MP": ("magnitude", None, 1.0, None),
        "WF-S": ("woodfisher", None, 1.0, None),
        "WF": ("woodfisher", "obs", 1.0, "WF-S"),
        "CBS-S": (cbs, None, 1.0, None),
        "CBS": (cbs, "cbs", 1.0, "CBS-S"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--download", action="store_true")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--fisher-n", type=int, default=1000)
    p.add_argument("--damping", type=float, default=1e-5)
    p.add_argument("--trials", type=int, default=20, help="RMP trials of CBS (paper: 50)")
    p.add_argument("--chunk-size", type=int, default=8,
                   help="per-example gradients computed at once (small chunks are fastest for convs on CPU)")
    p.add_argument("--budget", type=float, default=540, help="stop before this many seconds; run again to resume")
    p.add_argument("--out", default="resnet20_fashion")
    p.add_argument("--ms-methods", nargs="*", default=["MP", "CBS"],
                   choices=[m + bn for m in ("MP", "CBS", "CBS-vs-MP", "MP-geo", "CBS-geo") for bn in ("", "+BN")],
                   help="multi-stage columns (none: skip the multi-stage table; CBS-vs-MP: CBS with "
                        "compare_magnitude=True; -geo: schedule=\"geometric\", check=None; +BN: "
                        "BatchNorm statistics re-estimated after every stage, see --bn-images)")
    p.add_argument("--bn-images", type=int, default=2000,
                   help="+BN columns: unlabelled training images whose batch statistics replace the "
                        "BatchNorm running statistics after every stage (no gradient step)")
    p.add_argument("--ms-sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--ms-seeds", type=int, default=1)
    p.add_argument("--ms-stages", type=int, default=16)
    p.add_argument("--ms-max-halvings", type=int, default=1, help="prune_multistage LossCheck's max_halvings")
    p.add_argument("--ms-loss-check", type=float, default=3.0,
                   help="prune_multistage's LossCheck ratio for the cubic columns (0: None, the planned stages only)")
    p.add_argument("--only-multistage", action="store_true", help="skip the one-shot sweep")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    ds, variables = cached_model_and_data(args.data_dir, args.download)
    x_te = pad32(ds.x_test)
    t0 = time.perf_counter()
    dense = evaluate(variables, x_te, ds.y_test)
    eval_ips = len(x_te) / (time.perf_counter() - t0)  # includes compilation on first use
    t0 = time.perf_counter()
    dense = evaluate(variables, x_te, ds.y_test)
    eval_ips = len(x_te) / (time.perf_counter() - t0)
    print(f"data: {ds.source}; ResNet20 dense test accuracy {100 * dense:.2f} % (eval {eval_ips:.0f} images/s)")

    layout = cobs_jax.make_layout(variables, paper_prunable)
    x_tr, y_tr = jnp.asarray(pad32(ds.x_train)), jnp.asarray(ds.y_train)
    if args.ms_methods:
        ms_md, complete = multistage(args, variables, layout, x_tr, y_tr, x_te, ds.y_test, dense, t_start)
        print("\n" + ms_md)
        (RESULTS / f"{args.out}_multistage.md").write_text(ms_md + "\n")
        if not complete:
            sys.exit("budget reached in the multi-stage table: run the same command again to resume")
    if args.only_multistage:
        return
    methods = method_table(args)
    partial = RESULTS / f"{args.out}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"rows": [], "grads": {}}
    if state.get("args") not in (None, _job_args(args)):
        sys.exit(f"{partial} was made with other settings ({state['args']}); delete it or use --out")
    state["args"] = _job_args(args)
    done_jobs = {(r["seed"], r["sparsity"]) for r in state["rows"]}
    first_job, last_job = True, 0.0  # the first job of a run compiles; a job's time predicts the next
    for seed in range(args.seeds):
        todo = [s for s in args.sparsities if (seed, s) not in done_jobs]
        if not todo:
            continue
        fisher_batch = fisher_sample(x_tr, y_tr, seed, args.fisher_n)
        batch = {**fisher_batch, "loss": fisher_batch}
        t0 = time.perf_counter()
        grads = jax.block_until_ready(cobs_jax.per_example_grads(
            variables, loss_fn, fisher_batch, layout, chunk_size=args.chunk_size, progress=True))
        t_grads = time.perf_counter() - t0
        state["grads"][str(seed)] = {"seconds": t_grads, "rows_per_s": args.fisher_n / t_grads}
        print(f"seed {seed}: {args.fisher_n} per-example gradients of {layout.size} weights in {t_grads:.1f}s "
              f"({args.fisher_n / t_grads:.0f} rows/s)", flush=True)
        key = jax.random.key(seed)
        for s in todo:
            if time.perf_counter() - t_start + last_job > args.budget:
                partial.write_text(json.dumps(state, indent=1))
                sys.exit(f"budget reached after {len(state['rows'])} rows: run the same command again to resume")
            t_job = time.perf_counter()
            results = {}
            for name, spec in methods.items():
                t0 = time.perf_counter()
                r = run_one(spec, results, variables, loss_fn, batch, grads, s, key, damping=args.damping,
                            blocks="layer", prunable=paper_prunable)
                results[name] = r
                t_run = time.perf_counter() - t0
                acc = evaluate(r["params"], x_te, ds.y_test)
                info = r["info"]
                row = {"seed": seed, "sparsity": s, "method": name, "accuracy": acc,
                       "time_s": r["time"] + (t_grads if name != "MP" else 0.0),
                       "select_s": info["timings"]["select"], "update_s": info["timings"]["update"],
                       "wall_s": t_run, "compiled": first_job, "loss": float(info["loss"]) if "loss" in info and spec[3] is None else None}
                if "ls_passes" in info:
                    row.update(ls_passes=int(info["ls_passes"]), rmp_best_trial=int(info["rmp_best_trial"]))
                state["rows"].append(row)
                print(f"seed {seed} sparsity {s} {name}: {100 * acc:.2f} % (select {row['select_s']:.1f}s, "
                      f"update {row['update_s']:.1f}s)", flush=True)
            partial.write_text(json.dumps(state, indent=1))
            first_job, last_job = False, time.perf_counter() - t_job

    rows = state["rows"]
    names = list(methods)
    table = summarise(rows, names, args.sparsities)
    header = (f"ResNet20 on {ds.source} padded to 32x32 (dense {100 * dense:.2f} %): test accuracy (%) after one-shot "
              f"pruning of the 18 residual 3x3 convs ({layout.size} weights), mean ± std over {args.seeds} seed(s); "
              f"N = {args.fisher_n}, damping {args.damping}, per-layer Fisher blocks, CBS with {args.trials} RMP trials.")
    md = markdown(table, names, args.sparsities, dense, header)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this run's peak (Linux: KiB)
    md += "\n\n" + phase_table(rows, names, state["grads"], eval_ips)
    md += f"\n\nPeak resident memory of the last run: {peak_gb:.1f} GiB (G alone: {args.fisher_n * layout.size * 4 / 2**30:.2f} GiB)."
    print("\n" + md)
    write(args.out, md, metadata(data_source=ds.source, dense_accuracy=dense, args=vars(args), rows=rows,
                                 grads=state["grads"], eval_images_per_s=eval_ips, peak_rss_gib=peak_gb))
    plot(table, names, args.sparsities, RESULTS / f"{args.out}_accuracy.png", RESULTS / f"{args.out}_time.png",
         "ResNet20, Fashion-MNIST-32")
    partial.unlink()
    print(f"done: wrote {RESULTS / args.out}.{{md,json}} and plots")


def fisher_sample(x_tr, y_tr, seed, n):
    """The seed's N Fisher examples (also the loss batch, as the one-shot sweep uses them)."""
    idx = np.random.default_rng(seed).choice(len(x_tr), n, replace=False)
    return {"x": x_tr[idx], "y": y_tr[idx]}


def multistage(args, variables, layout, x_tr, y_tr, x_te, y_te, dense, t_start):
    """The multi-stage table and whether it is complete.

    Rows are saved as they finish (``results/<out>_multistage.json``) and a rerun resumes; when the
    budget stops the runs, the table shows the rows done so far (a dash for the others).
    """
    path = RESULTS / f"{args.out}_multistage.json"
    state = json.loads(path.read_text()) if path.exists() else {"rows": []}
    settings = {k: getattr(args, k) for k in ("fisher_n", "damping", "trials", "ms_stages", "ms_max_halvings")}
    if args.ms_loss_check != 3.0:  # recorded when not the default (older files predate the option)
        settings["ms_loss_check"] = args.ms_loss_check
    stored = dict(state.get("args") or settings)
    with_bn = any(m.endswith("+BN") for m in args.ms_methods)
    if with_bn or "bn_images" in stored:
        settings["bn_images"] = args.bn_images
        stored.setdefault("bn_images", args.bn_images)  # files from before the +BN columns
    if stored != settings:
        sys.exit(f"{path} was made with other settings ({state['args']}); delete it or use --out")
    state["args"] = settings
    cbs = cobs_jax.CBS(num_trials=args.trials)
    geo = dict(schedule="geometric", check=None)
    columns = {"MP": dict(method="magnitude"), "CBS": dict(method=cbs), "CBS-vs-MP": dict(method=cbs, compare_magnitude=True),
               "MP-geo": dict(method="magnitude", **geo), "CBS-geo": dict(method=cbs, **geo)}
    last_run, complete = 0.0, True
    for seed in range(args.ms_seeds):
        if not complete:
            break
        todo = [(m, s) for m in args.ms_methods for s in args.ms_sparsities
                if not any(r["seed"] == seed and r["method"] == m and r["sparsity"] == s for r in state["rows"])]
        if not todo:
            continue
        batch = fisher_sample(x_tr, y_tr, seed, args.fisher_n)
        # +BN: other training images than the Fisher sample, labels unused; one jitted function
        # object per seed, so the runs of a seed share the compiled schedule
        refresh = batchnorm_refresh(x_tr[np.random.default_rng(1000 + seed).choice(len(x_tr), args.bn_images, replace=False)])
        grads = lambda: cobs_jax.per_example_grads(variables, loss_fn, batch, layout,  # noqa: E731
                                                   chunk_size=args.chunk_size)
        loss = jax.jit(loss_fn)

        def time_floor():  # one gradient pass + one loss evaluation (after a warm-up call), times the stages
            jax.block_until_ready((grads(), loss(variables, batch)))
            t0 = time.perf_counter()
            jax.block_until_ready(grads())
            t_g = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(loss(variables, batch))
            print(f"multi-stage floor: {args.ms_stages} x (gradient pass {t_g:.1f}s + loss evaluation)", flush=True)
            return args.ms_stages * (t_g + time.perf_counter() - t0)

        for m, s in todo:
            if time.perf_counter() - t_start + last_run > args.budget:
                complete = False
                break
            floor = time_floor()  # beside every run: this machine's speed drifts within minutes
            t0, c0 = time.perf_counter(), compile_seconds()
            res = cobs_jax.prune_multistage(
                variables, loss_fn, batch, sparsity=s, stages=args.ms_stages, update="cbs",
                **{"check": cobs_jax.LossCheck(ratio=args.ms_loss_check, max_halvings=args.ms_max_halvings)
                   if args.ms_loss_check else None, **columns[m.removesuffix("+BN")]},
                refresh=refresh if m.endswith("+BN") else None,
                loss_batch=batch, abs_damping=args.damping, fisher_blocks="layer", prunable=paper_prunable,
                chunk_size=args.chunk_size, key=seed, progress=True)
            jax.block_until_ready(res.params)
            last_run = time.perf_counter() - t0
            compile_s = compile_seconds() - c0
            acc = evaluate(res.params, x_te, y_te)
            state["rows"].append({"seed": seed, "method": m, "sparsity": s, "accuracy": acc,
                                  "time_s": last_run - compile_s, "compile_s": compile_s,
                                  "floor_s": floor, "floor_beside_run": True, "stages_run": len(res.stages),
                                  "max_halvings": args.ms_max_halvings,
                                  "loss": res.loss, "stages": res.stages})
            print(f"multi-stage seed {seed} {m} x{args.ms_stages} at {s}: {100 * acc:.2f} % in {last_run:.0f}s "
                  f"({compile_s:.0f}s compiling; {len(res.info['stages'])} stages run)", flush=True)
            path.write_text(json.dumps(state, indent=1))
    rows = [r for r in state["rows"] if r["seed"] < args.ms_seeds]
    seeds = sorted({r["seed"] for r in rows})
    fl = [r["floor_s"] for r in rows]
    floors = (f"{min(fl):.0f}-{max(fl):.0f} s" if round(min(fl)) != round(max(fl)) else f"{fl[0]:.0f} s") if fl else "not timed"
    if all(r.get("floor_beside_run") for r in rows):
        floors += ", timed just before each run"
    else:  # rows from before the floor was timed per run share one timed at the file's first run
        floors += ", timed just before each run, or once at the file's first run for the older rows"
    header = (f"ResNet20 (dense {100 * dense:.2f} %) multi-stage, no fine-tuning: "
              f"`prune_multistage(stages={args.ms_stages}, update=\"cbs\", fisher_blocks=\"layer\", "
              f"check=LossCheck(ratio={args.ms_loss_check or None}, max_halvings={args.ms_max_halvings}))` (-geo columns: `schedule=\"geometric\", check=None`; "
              f"CBS: {args.trials} RMP trials at the first stage, "
              f"warm-started swap search after), N = {args.fisher_n} (also the loss batch), damping {args.damping}; test accuracy (%) mean "
              f"± std over seed(s) {seeds}; time per run without compilation (s), its ratio to the floor "
              f"({args.ms_stages} gradient passes + loss evaluations, {floors}) "
              "and the stages run."
              + (f" +BN columns: `refresh=` re-estimates the BatchNorm statistics on {args.bn_images} unlabelled "
                 "training images after every stage (no gradient step)." if with_bn else ""))
    return multistage_table(rows, args.ms_methods, args.ms_sparsities, args.ms_stages, header), complete


def _job_args(args):
    return {k: getattr(args, k) for k in ("seeds", "sparsities", "fisher_n", "damping", "trials")}


def phase_table(rows, names, grads, eval_ips):
    """Mean seconds of each phase per method, leaving out the rows that include compilation."""
    t_g = np.mean([g["seconds"] for g in grads.values()])
    ips = np.mean([g["rows_per_s"] for g in grads.values()])
    lines = [f"Phases (s, mean over runs after compilation): "
             f"per-example gradients {t_g:.1f} s ({ips:.0f} rows/s, shared by all methods of a seed); "
             f"evaluation {eval_ips:.0f} images/s.", "",
             "| method | selection (s) | update (s) |", "|---|---|---|"]
    for m in names:
        rs = [r for r in rows if r["method"] == m and not r["compiled"]] or [r for r in rows if r["method"] == m]
        lines.append(f"| {m} | {np.mean([r['select_s'] for r in rs]):.2f} | {np.mean([r['update_s'] for r in rs]):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
