"""Shared by the sweeps: running a method (reusing a base method's mask), tables, plots, metadata."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import cobs_jax

RESULTS = Path(__file__).resolve().parents[1] / "results"


_COMPILE_S = [0.0]


def _on_duration(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
    """Seconds XLA spent compiling in this process so far (JAX's backend-compile events)."""
    return _COMPILE_S[0]


def run_one(spec, results, params, loss_fn, batch, grads, sparsity, key, *, damping, blocks, prunable=None):
    """Run one method of a sweep's method table.

    ``spec = (method, update, update_scale, base)``; with a ``base`` the mask of ``results[base]``
    is reused and only the update is applied (as the paper's pipeline does for WF and CBS).
    ``batch["loss"]`` holds the examples that score CBS masks. Returns params, masks, info and the
    time, which includes the base method's time and the gradient pass (``info["timings"]``).
    """
    method, update, scale, base = spec
    t0 = time.perf_counter()
    if base is None:
        res = cobs_jax.prune(
            params, loss_fn, batch, sparsity=sparsity, method=method, update=update, abs_damping=damping,
            fisher_blocks=blocks, key=key, grads=grads, loss_batch=batch["loss"], update_scale=scale,
            prunable=prunable,
        )
        return {"params": res.params, "masks": res.masks, "info": res.info,
                "time": time.perf_counter() - t0 + res.timings.get("grads", 0.0)}
    prev = results[base]
    out = jax.block_until_ready(cobs_jax.apply_update(
        params, prev["masks"], grads, update=update, abs_damping=damping, fisher_blocks=blocks, update_scale=scale,
        prunable=prunable,
    ))
    dt = time.perf_counter() - t0
    info = {**prev["info"], "timings": {**prev["info"]["timings"], "update": dt}}
    return {"params": out, "masks": prev["masks"], "info": info, "time": dt + prev["time"]}


def run_sweep(spec, results, params, loss_fn, batch, grads, sparsities, key, *, damping, blocks, prunable=None):
    """:func:`run_one` for every sparsity at once: one ``cobs_jax.prune_sweep`` call.

    ``results`` maps a base method to its list of per-level results. Returns one dict per level;
    its time is the sweep's time divided by the number of levels (plus the base's, for methods that
    reuse a base mask and only apply an update, which is done level by level).
    """
    method, update, scale, base = spec
    if base is not None:
        return [run_one(spec, {base: prev}, params, loss_fn, batch, grads, s, key, damping=damping,
                        blocks=blocks, prunable=prunable)
                for s, prev in zip(sparsities, results[base])]
    t0 = time.perf_counter()
    out = cobs_jax.prune_sweep(
        params, loss_fn, batch, sparsities=sparsities, keys=[key], method=method, update=update,
        abs_damping=damping, fisher_blocks=blocks, grads=grads, loss_batch=batch["loss"], update_scale=scale,
        prunable=prunable,
    )
    dt = (time.perf_counter() - t0) / len(sparsities)
    return [{"params": r.params, "masks": r.masks, "info": r.info, "time": dt} for r in out]


def time_loop_vs_sweep(spec, params, loss_fn, batch, grads, sparsities, key, *, damping, blocks):
    """Seconds for a loop of single ``prune`` calls and for one ``prune_sweep`` (both compiled)."""
    method, update, scale, _ = spec
    kw = dict(method=method, update=update, abs_damping=damping, fisher_blocks=blocks, grads=grads,
              loss_batch=batch["loss"], update_scale=scale)
    t0 = time.perf_counter()
    for s in sparsities:
        jax.block_until_ready(cobs_jax.prune(params, loss_fn, batch, sparsity=s, key=key, **kw).params)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready([r.params for r in cobs_jax.prune_sweep(
        params, loss_fn, batch, sparsities=sparsities, keys=[key], **kw)])
    return t_loop, time.perf_counter() - t0


def summarise(rows, methods, sparsities):
    """(sparsity, method) -> (mean accuracy %, std %, mean time s); times leave out rows that compiled."""
    table = {}
    for s in sparsities:
        for m in methods:
            rs = [r for r in rows if r["sparsity"] == s and r["method"] == m]
            times = [r["time_s"] for r in rs if not r.get("compiled")] or [r["time_s"] for r in rs]
            accs = [r["accuracy"] for r in rs]
            table[(s, m)] = (100 * np.mean(accs), 100 * np.std(accs), np.mean(times))
    return table


def markdown(table, methods, sparsities, dense_acc, header):
    lines = [header, "", "| sparsity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for s in sparsities:
        best = max(table[(s, m)][0] for m in methods)
        cells = []
        for m in methods:
            mu, sd, _ = table[(s, m)]
            cell = f"{mu:.2f} ± {sd:.2f}"
            cells.append(f"**{cell}**" if mu == best else cell)
        lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Dense test accuracy: {100 * dense_acc:.2f} %. Mean pruning time per run (s, after compilation; "
              "WF/CBS include the shared gradient pass):", "",
              "| method | " + " | ".join(f"{s:.2f}" for s in sparsities) + " |",
              "|---|" + "---|" * len(sparsities)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{table[(s, m)][2]:.2f}" for s in sparsities) + " |")
    return "\n".join(lines)


def multistage_table(rows, methods, sparsities, stages, header):
    """Markdown: accuracy mean ± std over the rows' seeds, time per run and its ratio to the floor.

    ``rows`` are dicts with ``method``, ``sparsity``, ``accuracy`` (fraction), ``time_s``,
    ``floor_s`` and ``stages_run``; a missing (method, sparsity) cell shows a dash.
    """
    lines = [header, "", "| sparsity | " + " | ".join(f"{m} x{stages}" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for s in sparsities:
        cells = []
        for m in methods:
            rs = [r for r in rows if r["method"] == m and r["sparsity"] == s]
            if not rs:
                cells.append("—")
                continue
            t = np.mean([r["time_s"] for r in rs])
            acc = 100 * np.asarray([r["accuracy"] for r in rs])
            cells.append(f"{acc.mean():.2f} ± {acc.std():.2f} ({t:.0f} s, "
                         f"{t / np.mean([r['floor_s'] for r in rs]):.1f}x, "
                         f"{np.mean([r['stages_run'] for r in rs]):.0f} st.)")
        lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table, methods, sparsities, path_acc, path_time, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping plots (pip install '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods:
        mu = np.array([table[(s, m)][0] for s in sparsities])
        sd = np.array([table[(s, m)][1] for s in sparsities])
        ax.errorbar(sparsities, mu, yerr=sd, marker="o", capsize=3, label=m)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_acc, dpi=120)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    means = [np.mean([table[(s, m)][2] for s in sparsities]) for m in methods]
    ax.bar(methods, means)
    ax.set_ylabel("seconds per pruning run (mean over sparsities)")
    ax.set_title(title + ": time")
    fig.tight_layout()
    fig.savefig(path_time, dpi=120)


def metadata(**extra):
    """The command line, library versions and device, plus ``extra``, for a result JSON."""
    import flax
    import optax

    return {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "cobs_jax": cobs_jax.__version__},
        "device": str(jax.devices()[0]),
        **extra,
    }


def write(name, md, meta):
    """``results/<name>.md`` and ``results/<name>.json``."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(meta, indent=1))
