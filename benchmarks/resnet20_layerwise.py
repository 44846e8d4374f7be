"""ResNet20 / Fashion-MNIST-32 pruned layer by layer (activation Hessians), one shot, no labels.

The README's ResNet20 (dense 92.70 %) is cut into its stem, nine BasicBlocks and head; the nine
blocks go to :func:`cobs_jax.prune_layerwise` as linen ``(module, variables)`` pairs, called with
``train=False`` (BatchNorm on its saved statistics), and their 18 residual 3x3 convs (the paper's
prunable set; the 1x1 shortcut convs are excluded) are pruned to a uniform sparsity from the
images of the N = 1000 Fisher examples of ``resnet20_fashion.py`` (no labels). Methods:
magnitude selection + the exact re-solve, SparseGPT, and layer-wise CBS (swap search from
SparseGPT's mask, exact weights; ``CBS seq`` with ``true_sequential=True``: each block's second
conv captured after its first is pruned), each with the usual objective (the dense layer on the
pruned model's inputs, SparseGPT's) and with ``asymmetric=True`` (the dense model's layer outputs).
Each result is evaluated with the saved BatchNorm statistics and after
``resnet20.batchnorm_refresh`` (batch statistics of 2000 other unlabelled training images).

    python benchmarks/resnet20.py              # once (about 30 min, resumable): the dense model
    python benchmarks/resnet20_layerwise.py    # 24 cells of 16-58 s each on 2 CPU cores

Each finished cell is saved at once (``results/<name>.partial.json``): an interrupted run resumes
where it stopped. Writes ``results/<name>.{md,json}`` (``--name``, default ``resnet20_layerwise``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cobs_jax  # noqa: E402
from lib.common import RESULTS, metadata, write  # noqa: E402
from resnet20 import MEAN, STD, BasicBlock, batchnorm_refresh, cached_model_and_data, evaluate, pad32  # noqa: E402
from resnet20_fashion import fisher_sample  # noqa: E402

METHODS = {  # name: prune_layerwise options
    "MP + exact": dict(method="magnitude", update="exact"),
    "SparseGPT": dict(method="sparsegpt"),
    "CBS": dict(method="cbs"),
    "CBS seq": dict(method="cbs", true_sequential=True),  # conv2 captured after conv1 is pruned
}
BLOCKS = [f"layer{s + 1}_{b}" for s in range(3) for b in range(3)]


def blocks_of(variables) -> list:
    """The nine BasicBlocks as linen ``(module, variables)`` pairs."""
    out = []
    for name in BLOCKS:
        stage, b = int(name[5]) - 1, int(name[7])
        module = BasicBlock((16, 32, 64)[stage], 2 if stage > 0 and b == 0 else 1)
        out.append((module, {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}))
    return out


@jax.jit
def stem(variables, x):
    """The first block's inputs: normalised images through conv_stem + BatchNorm + ReLU."""
    p, s = variables["params"], variables["batch_stats"]
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False).apply({"params": p["conv_stem"]}, (x - MEAN) / STD)
    bn = nn.BatchNorm(use_running_average=True, momentum=0.9)
    return nn.relu(bn.apply({"params": p["bn_stem"], "batch_stats": s["bn_stem"]}, x))


def with_blocks(variables, pruned_blocks):
    """``variables`` with the nine blocks' parameters replaced."""
    params = dict(variables["params"])
    for name, (_, v) in zip(BLOCKS, pruned_blocks):
        params[name] = v["params"]
    return {**variables, "params": params}


def _pm(values) -> str:
    """Mean in %, with ± the standard deviation over more than one draw."""
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f}" + (f" ± {v.std():.2f}" if len(v) > 1 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=1, help="calibration draws (the Fisher examples of each seed)")
    p.add_argument("--calib", type=int, default=1000, help="calibration images")
    p.add_argument("--damping", type=float, default=0.01, help="relative damping (SparseGPT's percdamp)")
    p.add_argument("--bn-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100, help="calibration images per forward chunk")
    p.add_argument("--name", default="resnet20_layerwise", help="results file stem")
    args = p.parse_args(argv)
    ds, variables = cached_model_and_data(args.data_dir)
    x_te, y_te = pad32(ds.x_test), ds.y_test
    x_tr, y_tr = pad32(ds.x_train), ds.y_train
    dense = evaluate(variables, x_te, y_te)
    settings = {k: v for k, v in vars(args).items() if k not in ("sparsities", "methods", "seeds", "name")}
    partial = RESULTS / f"{args.name}.partial.json"
    state = json.loads(partial.read_text()) if partial.exists() else {"settings": settings, "rows": []}
    if state["settings"] != settings:
        sys.exit(f"{partial} was made with other settings ({state['settings']}); delete it to start again")
    done_cells = {(r["seed"], r["sparsity"], r["method"], r["asymmetric"]) for r in state["rows"]}
    blocks = blocks_of(variables)
    for seed in range(args.seeds):
        calib = fisher_sample(x_tr, y_tr, seed, args.calib)["x"]
        x0 = stem(variables, calib)
        bn_x = x_tr[np.random.default_rng(1000 + seed).choice(len(x_tr), args.bn_images, replace=False)]
        refresh = jax.jit(batchnorm_refresh(bn_x))
        for s in args.sparsities:
            for name in args.methods:
                for asym in (False, True):
                    if (seed, s, name, asym) in done_cells:
                        continue
                    t0 = time.perf_counter()
                    res = cobs_jax.prune_layerwise(blocks, x0, sparsity=s, rel_damping=args.damping, asymmetric=asym,
                                                   exclude="down_conv", kwargs={"train": False},
                                                   chunk_size=args.batch_size, **METHODS[name])
                    seconds = time.perf_counter() - t0
                    pruned = with_blocks(variables, res.blocks)
                    row = {"seed": seed, "sparsity": s, "method": name, "asymmetric": asym, "seconds": seconds,
                           "achieved_sparsity": res.sparsity, "timings": res.timings,
                           "accuracy": evaluate(pruned, x_te, y_te),
                           "accuracy_refreshed": evaluate(refresh(pruned), x_te, y_te)}
                    state["rows"].append(row)
                    partial.write_text(json.dumps(state, indent=1))
                    print(f"seed {seed} {name}{' asymmetric' if asym else ''} at {s}: {100 * row['accuracy']:.2f} % "
                          f"({100 * row['accuracy_refreshed']:.2f} % with BatchNorm re-estimated) in {seconds:.0f} s",
                          flush=True)
    rows = state["rows"]
    lines = [f"ResNet20 / Fashion-MNIST-32 (dense {100 * dense:.2f} %), layer-wise one-shot pruning of the 18 residual "
             f"3x3 convs to a uniform sparsity from {args.calib} unlabelled images, damping {args.damping}: test "
             f"accuracy (%) with the saved BatchNorm statistics / with them re-estimated on {args.bn_images} other "
             f"images, and seconds (mean over {args.seeds} calibration draw(s)). `asym`: `asymmetric=True`.", "",
             "| method | " + " | ".join(f"{s:.2f}" for s in args.sparsities) + " |",
             "|---|" + "---|" * len(args.sparsities)]
    for name in args.methods:
        for asym in (False, True):
            cells = []
            for s in args.sparsities:
                got = [r for r in rows if r["sparsity"] == s and r["method"] == name and r["asymmetric"] == asym]
                cells.append(f"{_pm([r['accuracy'] for r in got])} / {_pm([r['accuracy_refreshed'] for r in got])} "
                             f"({np.mean([r['seconds'] for r in got]):.0f} s)" if got else "-")
            lines.append(f"| {name}{' asym' if asym else ''} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print("\n" + md)
    write(args.name, md, metadata(dense=dense, rows=rows, args=vars(args)))
    partial.unlink()


if __name__ == "__main__":
    main()
