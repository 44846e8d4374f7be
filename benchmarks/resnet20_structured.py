"""ResNet20 / Fashion-MNIST-32 filter pruning: whole filters removed, one shot, no labels, no fine-tuning.

In each of the nine BasicBlocks, conv1's filters (with their bn1 entries) are the units; conv2,
which reads them, is the consumer where the selection and the compensation happen
(``Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1}, bias_into="bn2")``; the residual
channels stay, as in every ResNet filter-pruning method that keeps the shortcuts). Budgets are
30 % and 50 % of the whole model's FLOPs (XLA's count of the compiled forward; a unit's cost is
the FLOPs it takes away, measured the same way), every method the same count:

* ``magnitude-sp``, ``wanda-sp``: FLAP's baselines, each block the same share, no compensation;
* ``flap``: FLAP's WIFV scores, standardised and pooled over the blocks, bias compensation;
* ``obs``: greedy group OBS (SlimGPT's selection and update), each block the same share;
* ``cbs``: GroupCBS (greedy + swap search, exact update with the intercept), each block the same share;
* ``cbs-global``: GroupCBS at the counts of a global allocation by the measured error curves.

Every result is rebuilt as a smaller ``ResNet20(mids=...)`` (its outputs checked against the
masked model's), evaluated with the saved BatchNorm statistics and with them re-estimated on
2000 other unlabelled training images, and timed against the dense model in the same process
(compiled forward, batch 500 and batch 1, the median of alternating runs).

    python benchmarks/resnet20.py              # once (about 30 min, resumable): the dense model
    python benchmarks/resnet20_structured.py   # 12 cells of 10-40 s; each is saved as it finishes
    python benchmarks/resnet20_structured.py --multiple 8   # widths kept multiples of 8 (no flap)

Writes ``results/<name>.{md,json,png}`` (``--name``, default ``resnet20_structured``); an
interrupted run resumes from ``results/<name>.partial.json``.
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

from cobs_jax.structured import (GroupCBS, GroupOBS, MagnitudeSP, Units, WandaSP, allocate, calibrate,  # noqa: E402
                                 error_curves, flap_plan, prune_structured, share_plan, shrunk_params)
from lib.common import RESULTS, metadata, write  # noqa: E402
from resnet20 import MODEL, ResNet20, batchnorm_refresh, cached_model_and_data, evaluate, pad32  # noqa: E402
from resnet20_fashion import fisher_sample  # noqa: E402
from resnet20_layerwise import BLOCKS, blocks_of, stem  # noqa: E402

def units(multiple: int = 1) -> list:
    """conv1's filters (with bn1's entries) as conv2's input channels; plans remove ``multiple`` at a time."""
    return [Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1}, bias_into="bn2", multiple=multiple)]

METHODS = {  # name: (plan, selection, intercept)
    "magnitude-sp": ("uniform", MagnitudeSP(), False),
    "wanda-sp": ("uniform", WandaSP(), False),
    "flap": ("flap", WandaSP(), True),
    "obs": ("uniform", GroupOBS(), False),
    "cbs": ("uniform", GroupCBS(), True),
    "cbs-global": ("global", GroupCBS(), True),
}


def flops(model, variables, shape) -> float:
    """XLA's FLOP count of ``model``'s compiled eval-mode forward on an input of ``shape``."""
    cost = jax.jit(lambda v, x: model.apply(v, x, False)).lower(variables, jnp.zeros(shape)).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def unit_flops(blocks, inputs) -> list[float]:
    """Per block, the FLOPs one conv1 filter costs: the block's count minus that of the block
    with one filter fewer (both convs' work scales with the filter count)."""
    out, x = [], inputs[:1]
    for module, v in blocks:
        mid = v["params"]["conv1"]["kernel"].shape[-1]
        one_less = module.clone(mid=mid - 1)
        small = one_less.init(jax.random.key(0), x, False)
        out.append(flops(module, v, x.shape) - flops(one_less, small, x.shape))
        x = module.apply(v, x, False)
    return out


def assemble(variables, blocks) -> dict:
    """``variables`` with the nine blocks' parameters and BatchNorm statistics replaced."""
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for name, (_, v) in zip(BLOCKS, blocks):
        params[name], stats[name] = v["params"], v["batch_stats"]
    return {"params": params, "batch_stats": stats}


def shrunk_model(variables, masked_blocks, removed, x1):
    """The smaller ``ResNet20(mids=...)`` and its variables (the removed filters sliced away)."""
    small, mids, x = [], [], stem(variables, x1)
    for (module, v), rem in zip(masked_blocks, removed):
        pure = shrunk_params((module, v), units(), rem, x, args=(False,))
        mids.append(int(pure["params"]["conv1"]["kernel"].shape[-1]))
        small.append((module, pure))
        x = module.apply(v, x, False)
    model = ResNet20(mids=tuple(mids))
    return model, assemble(variables, small)


def speed(models, x, repeats: int = 7) -> list[float]:
    """Median seconds of each ``(model, variables)``'s compiled forward on ``x``, the models run
    in turn ``repeats`` times (so that a slow spell of the machine hits every one alike)."""
    fns = [(jax.jit(lambda v, x, m=m: m.apply(v, x, False)), v) for m, v in models]
    for f, v in fns:
        f(v, x).block_until_ready()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, (f, v) in zip(times, fns):
            t0 = time.perf_counter()
            f(v, x).block_until_ready()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def table(rows, budgets, dense, multiple: int = 1) -> str:
    lines = [f"ResNet20 / Fashion-MNIST-32 (dense {100 * dense['accuracy']:.2f} %, {dense['flops'] / 1e6:.1f} MFLOPs, "
             f"{dense['params']:,} parameters): conv1 filters of the nine residual blocks removed with conv2's "
             "inputs and bn1's entries"
             + (f" ({multiple} at a time: every width a multiple of {multiple})" if multiple > 1 else "") +
             ", one shot from unlabelled images, no fine-tuning. Accuracy (%) with the "
             "saved BatchNorm statistics / re-estimated; FLOPs removed (XLA count of the shrunk model); forward "
             "time of the shrunk model / the dense one (batch 500; batch 1 in brackets); prune seconds.", "",
             "| method | " + " | ".join(f"{int(100 * b)} % FLOPs: accuracy | removed | time" for b in budgets) + " | prune s |",
             "|---|" + "---|---|---|" * len(budgets) + "---|"]
    for name in [n for n in METHODS if any(r["method"] == n for r in rows)]:
        cells, secs = [], []
        for b in budgets:
            r = next((r for r in rows if r["method"] == name and r["budget"] == b), None)
            if r is None:
                cells.append("- | - | -")
                continue
            secs.append(r["prune_seconds"])
            cells.append(f"{100 * r['accuracy']:.2f} / **{100 * r['accuracy_refreshed']:.2f}** | "
                         f"{100 * (1 - r['flops'] / dense['flops']):.1f} % | "
                         f"{r['seconds_b500'] / r['dense_seconds_b500']:.2f}x ({r['seconds_b1'] / r['dense_seconds_b1']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if not secs else f'{min(secs):.0f}-{max(secs):.0f}'} |")
    return "\n".join(lines)


def plot(rows, dense, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name in METHODS:
        got = sorted((r for r in rows if r["method"] == name), key=lambda r: r["budget"])
        if got:
            removed = [100 * (1 - r["flops"] / dense["flops"]) for r in got]
            ax[0].plot(removed, [100 * r["accuracy_refreshed"] for r in got], "o-", label=name)
            ax[1].plot(removed, [r["seconds_b500"] / r["dense_seconds_b500"] for r in got], "o-", label=name)
    ax[0].axhline(100 * dense["accuracy"], color="k", ls=":", label="dense")
    ax[0].set(xlabel="FLOPs removed (%)", ylabel="test accuracy, BN re-estimated (%)")
    ax[1].set(xlabel="FLOPs removed (%)", ylabel="forward time / dense (batch 500)")
    ax[0].legend(fontsize=8)
    fig.suptitle("ResNet20 / Fashion-MNIST-32 filter pruning, one shot")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5], help="fractions of the model's FLOPs")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--calib", type=int, default=1000, help="calibration images")
    p.add_argument("--damping", type=float, default=0.01, help="relative damping")
    p.add_argument("--bn-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100, help="calibration images per forward chunk")
    p.add_argument("--multiple", type=int, default=1,
                   help="keep every block's width a multiple of this (8: XLA's CPU convs are slow on odd widths); "
                        "results in <name>_x<multiple>; not for flap, whose plan picks single filters")
    p.add_argument("--name", default="resnet20_structured", help="results file stem")
    args = p.parse_args(argv)
    if args.multiple > 1:
        args.name = f"{args.name}_x{args.multiple}"
        args.methods = [m for m in args.methods if METHODS[m][0] != "flap"]
    ds, variables = cached_model_and_data(args.data_dir)
    x_te, y_te = pad32(ds.x_test), ds.y_test
    x_tr, y_tr = pad32(ds.x_train), ds.y_train
    settings = {k: v for k, v in vars(args).items() if k not in ("budgets", "methods", "name")}
    spec = units(args.multiple)
    partial = RESULTS / f"{args.name}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"settings": settings, "rows": []}
    if state["settings"] != settings:
        sys.exit(f"{partial} was made with other settings ({state['settings']}); delete it to start again")
    blocks = blocks_of(variables)
    calib = fisher_sample(x_tr, y_tr, 0, args.calib)["x"]
    x0 = stem(variables, calib)
    bn_x = x_tr[np.random.default_rng(1000).choice(len(x_tr), args.bn_images, replace=False)]
    dense = {"accuracy": evaluate(variables, x_te, y_te), "flops": flops(MODEL, variables, (1, 32, 32, 1)),
             "params": sum(int(np.size(a)) for a in jax.tree.leaves(variables["params"]))}
    t = time.perf_counter()
    stats, infos, _ = calibrate(blocks, x0, spec, args=(False,), chunk_size=args.batch_size)
    costs = unit_flops(blocks, x0)
    dense_stats_seconds = time.perf_counter() - t
    infos = [info._replace(costs={"conv2": c}) for info, c in zip(infos, costs)]  # budgets in FLOPs
    x500, x1 = jnp.asarray(x_te[:500]), jnp.asarray(x_te[:1])
    print(f"dense: {100 * dense['accuracy']:.2f} %, {dense['flops'] / 1e6:.2f} MFLOPs; FLOPs per filter by block: "
          + ", ".join(f"{c / 1e3:.0f}k" for c in costs), flush=True)
    done = {(r["method"], r["budget"]) for r in state["rows"]}
    for b in args.budgets:
        for name in args.methods:
            if (name, b) in done:
                continue
            kind, how, intercept = METHODS[name]
            target = b * dense["flops"]
            t = time.perf_counter()
            if kind == "uniform":
                plan = share_plan(infos, target)
            elif kind == "flap":
                plan = flap_plan(stats, infos, spec, target)
            else:
                plan = allocate(error_curves(stats, infos, spec, rel_damping=args.damping), infos, target)
            res = prune_structured(blocks, x0, spec, plan, method=how, intercept=intercept,
                                   rel_damping=args.damping, args=(False,), chunk_size=args.batch_size)
            seconds = time.perf_counter() - t + (0.0 if kind == "uniform" else dense_stats_seconds)
            masked = assemble(variables, res.blocks)
            model, small = shrunk_model(variables, res.blocks, res.removed, x1)
            gap = float(jnp.max(jnp.abs(model.apply(small, x500, False) - MODEL.apply(masked, x500, False))))
            refresh = jax.jit(batchnorm_refresh(bn_x, model=model))
            dense_b500, small_b500 = speed([(MODEL, variables), (model, small)], x500)
            dense_b1, small_b1 = speed([(MODEL, variables), (model, small)], x1, repeats=51)
            row = {"method": name, "budget": b, "plan": kind, "mids": list(model.mids),
                   "flops": flops(model, small, (1, 32, 32, 1)), "params": sum(int(np.size(a)) for a in jax.tree.leaves(small["params"])),
                   "accuracy": evaluate(masked, x_te, y_te), "accuracy_shrunk": evaluate(small, x_te, y_te, model=model),
                   "accuracy_refreshed": evaluate(refresh(small), x_te, y_te, model=model), "shrunk_vs_masked_max_logit_gap": gap,
                   "prune_seconds": seconds, "dense_stats_seconds": 0.0 if kind == "uniform" else dense_stats_seconds,
                   "timings": res.timings, "errors": [float(e["conv2"]) for e in res.errors],
                   "seconds_b500": small_b500, "dense_seconds_b500": dense_b500, "seconds_b1": small_b1, "dense_seconds_b1": dense_b1}
            state["rows"].append(row)
            partial.write_text(json.dumps(state, indent=1))
            print(f"{name} at {100 * b:.0f} % FLOPs: {100 * row['accuracy']:.2f} % ({100 * row['accuracy_refreshed']:.2f} % "
                  f"BN re-estimated), {100 * (1 - row['flops'] / dense['flops']):.1f} % FLOPs removed, mids {row['mids']}, "
                  f"{seconds:.0f} s; forward {small_b500 / dense_b500:.2f}x dense (batch 500), "
                  f"{small_b1 / dense_b1:.2f}x (batch 1); shrunk-vs-masked logit gap {gap:.1e}", flush=True)
    rows = state["rows"]
    md = table(rows, sorted({r["budget"] for r in rows}), dense, args.multiple)
    print("\n" + md)
    plot(rows, dense, RESULTS / f"{args.name}.png")
    write(args.name, md, metadata(dense=dense, rows=rows, args=vars(args)))
    partial.unlink()


if __name__ == "__main__":
    main()
