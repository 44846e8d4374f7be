"""Structured pruning of SmolLM2-135M (or Gemma 3 270M): whole KV groups (query heads) and MLP channels removed, the model shrunk.

For each budget (a share of the decoder's linear weights removed: 20 %, 30 %, 50 %) and each
mode (``attn+mlp``: GQA KV groups and MLP channels; ``mlp``: MLP channels only), every method
removes the same number of weights (to within one unit) and the model is physically shrunk
(per-layer widths); then, in this process:

* perplexity of the **shrunk** model on held-out Brown-corpus windows (same split as
  ``llm_prune.py``; or ``--calib-tokens/--eval-tokens``);
* prune seconds (calibration passes included);
* forward seconds of the decoder blocks, dense vs shrunk (the blocks alone: the embedding
  and LM head do not shrink), of the whole model, and greedy generation tokens/s.

Methods: ``magnitude-sp`` and ``wanda-sp`` (FLAP's repository: uniform per layer, KV groups by
ratio and the rest in channels, no compensation), ``flap`` (WIFV metric from the dense model,
adaptive global structure, bias compensation), ``slimgpt`` (SlimGPT's depth-increasing ratio and
OBS compensation, with exact greedy group OBS in place of its estimates), ``cbs`` (ours:
GroupCBS selection and exact least-squares compensation with an intercept, at FLAP's per-layer
counts) and the allocation variants measured in docs/structured.md: ``cbs-uniform`` (the
baselines' uniform counts), ``cbs-global`` (``allocate`` over the error curves), ``cbs-within``
(uniform shares, the curves choosing KV groups vs channels), ``cbs-probe`` (the curves scaled by
``probe_scales``) and ``cbs-slimgpt`` (SlimGPT's depth-increasing shares). ``sparsegpt-50%`` is the unstructured reference for the
cost goal (prune time only matters there).

``--model gemma3-270m``: Gemma 3 270M (``lib/gemma.py``, gemma's einsum kernels). It has one KV
head, so its ``attn+mlp`` units are query heads (``attn_vec_einsum`` / ``q_einsum`` along the
head axis) and MLP channels; results in ``results/llm_structured_gemma3*``.

``--multiple N``: every MLP width kept a multiple of ``N`` (``Units(multiple=N)``; results in
``<name>_xN``), to measure what round widths buy on this CPU.

Resumable: every finished cell is saved to ``benchmarks/results/llm_structured[_gemma3][_quick].json``
(with ``.md`` and ``.png``); a rerun computes only the missing cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cobs_jax
from cobs_jax.structured import (GroupCBS, GroupOBS, MagnitudeSP, WandaSP, allocate, calibrate, error_curves,
                                 flap_plan, probe_scales, prune_structured, share_plan, slimgpt_shares)
from lib import gemma, llama
from lib.common import RESULTS, metadata
from lib.text import SOURCE
from llm_prune import Gemma3_270M, SmolLM2, load_tokens, perplexity, user_tokens, with_blocks

METHODS = ["magnitude-sp", "wanda-sp", "flap", "slimgpt", "cbs", "cbs-uniform", "cbs-global", "cbs-probe", "cbs-within", "cbs-slimgpt"]
PROMPT = "The history of the city began"


@nnx.jit
def _blocks(model, x, cos, sin):
    for layer in model.layers:
        x = layer(x, cos, sin)
    return x


@nnx.jit
def _tail_nll(model, h, tokens):
    """Mean next-token NLL of ``tokens`` from the last block's outputs ``h``."""
    logp = jax.nn.log_softmax(model.head(h)[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@nnx.jit
def _nll(model, tokens):
    logits = model(tokens)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], axis=1)


def _best(f, reps: int = 3) -> float:
    jax.block_until_ready(f())  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return min(times)


def _generation(greedy, model, tokenizer) -> dict:
    greedy(model, tokenizer, PROMPT, 2)  # compile
    t = time.perf_counter()
    greedy(model, tokenizer, PROMPT, 32)
    return dict(tokens_per_second=32 / (time.perf_counter() - t))


class SmolLM2Port:
    """SmolLM2-135M (nnx Llama port) as the benchmark sees a model: blocks and their arguments,
    units, shrinking, NLL, speed; ``o_proj`` / ``down_proj`` with zero biases for the intercept."""

    name, file = SmolLM2.name, "llm_structured"
    modes = {"attn+mlp": "kv", "mlp": None}  # attn: GQA KV groups with their query heads

    def __init__(self):
        self.lm = SmolLM2()
        self.tokenizer, self.prepare = self.lm.tokenizer, self.lm.prepare
        self.model = llama.with_proj_bias(self.lm.model)

    def blocks(self, model=None) -> list:
        return list((model or self.model).layers)

    def args(self, seq: int):
        return self.model.rope(seq)

    def embed(self, tokens):
        return self.model.embed(jnp.asarray(tokens))

    def units(self, mode: str):
        return llama.structured_units(self.model.config, self.modes[mode])

    def shrink(self, blocks, removed, units):
        return llama.shrink(self.model, blocks, removed, units)

    def with_blocks(self, blocks):
        return with_blocks(self.lm.model, blocks)

    def decoder_params(self, model) -> int:
        return llama.decoder_params(model)

    def widths(self, model) -> list:
        return list(model.config.layer_widths)

    def nll(self, model, windows) -> np.ndarray:
        return np.concatenate([np.asarray(_nll(model, jnp.asarray(windows[s : s + 4]))) for s in range(0, len(windows), 4)])

    def tail_nll(self, h, tokens):
        return _tail_nll(self.model, h, tokens)

    def speed(self, model, tokens) -> dict:
        """Best-of-3 seconds of the decoder blocks and of the whole model on ``tokens``, and greedy
        generation tokens/s (32 new tokens, 128-token buffer)."""
        cos, sin = model.rope(tokens.shape[1])
        x = model.embed(tokens)
        return dict(blocks_seconds=_best(lambda: _blocks(model, x, cos, sin)), model_seconds=_best(lambda: _nll(model, tokens)),
                    **_generation(llama.greedy, model, self.tokenizer))

    def sample(self, model) -> str:
        return llama.greedy(model, self.tokenizer, PROMPT, 30)


class Gemma3Port(SmolLM2Port):
    """Gemma 3 270M (linen port, gemma's einsum tree): one KV head, so the attention's units are
    query heads; ``attn_vec_einsum`` and the MLP's ``linear`` with zero biases for the intercept."""

    name, file = Gemma3_270M.name, "llm_structured_gemma3"
    modes = {"attn+mlp": True, "mlp": False}

    def __init__(self):
        self.lm = Gemma3_270M()
        self.tokenizer, self.prepare = self.lm.tokenizer, self.lm.prepare
        self.model = gemma.with_proj_bias(self.lm.model)

    def blocks(self, model=None) -> list:
        return (model or self.model).blocks

    def args(self, seq: int):
        return ()

    def embed(self, tokens):
        return self.model.embed(tokens)

    def units(self, mode: str):
        return gemma.structured_units(self.model.config, self.modes[mode])

    def shrink(self, blocks, removed, units):
        return gemma.shrink(self.model, blocks, removed, units)

    def with_blocks(self, blocks):
        return self.lm.model.with_blocks(blocks)

    def decoder_params(self, model) -> int:
        return gemma.decoder_params(model)

    def nll(self, model, windows) -> np.ndarray:
        return np.concatenate([model.nll(windows[s : s + 4]) for s in range(0, len(windows), 4)])

    def tail_nll(self, h, tokens):
        p = self.model.params
        nll = gemma._nll(h, tokens, p["final_norm"]["scale"], p["embedder"]["input_embedding"])
        return jnp.sum(nll) / (tokens.shape[0] * (tokens.shape[1] - 1))

    def speed(self, model, tokens) -> dict:
        modules, params = model.modules, [v["params"] for _, v in model.blocks]
        run = jax.jit(lambda ps, x: _gemma_blocks(modules, ps, x))
        x = model.embed(tokens)
        return dict(blocks_seconds=_best(lambda: run(params, x)), model_seconds=_best(lambda: model.nll(tokens)),
                    **_generation(gemma.greedy, model, self.tokenizer))

    def sample(self, model) -> str:
        return gemma.greedy(model, self.tokenizer, PROMPT, 30)


def _gemma_blocks(modules, params, x):
    for m, p in zip(modules, params):
        x = m.apply({"params": p}, x)
    return x


PORTS = {"smollm2-135m": SmolLM2Port, "gemma3-270m": Gemma3Port}
MODES = list(SmolLM2Port.modes)


class Runner:
    def __init__(self, a):
        self.port = PORTS[a.model]()
        self.multiple = a.multiple
        self.model = self.port.model
        self.calib, self.ev, self.split = load_tokens(a, self.port)
        self.x = self.port.embed(self.calib)
        self.args = self.port.args(self.calib.shape[1])
        self.batch = a.batch
        self.rel_damping = a.rel_damping
        self.total = self.port.decoder_params(self.model)
        self.dense_stats: dict = {}

    def ppl(self, model) -> float:
        return perplexity(self.port.nll(model, self.ev), self.ev)

    def speed(self, model) -> dict:
        return self.port.speed(model, jnp.asarray(self.ev[: self.batch]))

    def dense(self) -> dict:
        return dict(ppl=self.ppl(self.model), decoder_params=self.total, **self.speed(self.model),
                    sample=self.port.sample(self.model))

    def units(self, mode):
        """The port's units, the MLP channels kept in multiples of ``--multiple``."""
        *attn, mlp = self.port.units(mode)
        return (*attn, dataclasses.replace(mlp, multiple=self.multiple))

    def stats(self, mode):
        """Dense-model statistics of a mode (shared by flap and ours; their time is charged to
        each method that uses them)."""
        if mode not in self.dense_stats:
            t = time.perf_counter()
            st = calibrate(self.port.blocks(), self.x, self.units(mode), args=self.args, chunk_size=self.batch,
                           progress=True)
            self.dense_stats[mode] = (st, time.perf_counter() - t)
        return self.dense_stats[mode]

    def cell(self, method: str, mode: str, frac: float) -> dict:
        units = self.units(mode)
        attn = tuple(u.consumer for u in units[:-1])  # FLAP squares the attention's metric
        budget = int(round(frac * self.total))
        (stats, infos, energy), t_cal = self.stats(mode)
        t = time.perf_counter()
        extra = t_cal
        kw: dict = dict(args=self.args, chunk_size=self.batch, progress=True, rel_damping=self.rel_damping)
        blocks = self.port.blocks()
        if method in ("magnitude-sp", "wanda-sp", "slimgpt"):
            extra = 0.0  # no dense pass: the plan needs only the shapes
            shares = slimgpt_shares(len(blocks)) if method == "slimgpt" else None
            how = {"magnitude-sp": MagnitudeSP(), "wanda-sp": WandaSP(), "slimgpt": GroupOBS()}[method]
            res = prune_structured(blocks, self.x, units, share_plan(infos, budget, shares), method=how,
                                   intercept=False, **kw)
        elif method == "flap":
            plan = flap_plan(stats, infos, units, budget, squared=attn)
            res = prune_structured(blocks, self.x, units, plan, method=WandaSP(), intercept=True, **kw)
        else:
            if method == "cbs-uniform":
                extra, plan = 0.0, share_plan(infos, budget)
            elif method == "cbs-slimgpt":  # SlimGPT's depth-increasing shares
                extra, plan = 0.0, share_plan(infos, budget, slimgpt_shares(len(blocks)))
            elif method == "cbs-global":
                plan = allocate(error_curves(stats, infos, units, rel_damping=self.rel_damping), infos, budget)
            elif method == "cbs-probe":  # the curves scaled by each block's measured loss, then global
                curves = error_curves(stats, infos, units, rel_damping=self.rel_damping)
                n = min(4, len(self.calib))
                toks = jnp.asarray(self.calib[:n])
                scales = probe_scales(blocks, self.x[:n], units, stats, infos, curves, share_plan(infos, budget),
                                      lambda h: self.port.tail_nll(h, toks), args=self.args, rel_damping=self.rel_damping,
                                      chunk_size=self.batch, progress=True)
                plan = allocate([{c: v * sc for c, v in row.items()} for row, sc in zip(curves, scales)], infos,
                                budget)
            elif method == "cbs-within":  # each block its uniform share; the curves choose KV groups vs channels
                plan = allocate(error_curves(stats, infos, units, rel_damping=self.rel_damping), infos, budget,
                                shares=np.ones(len(blocks)))
            else:  # FLAP's adaptive per-layer counts (its standardised WIFV), our selection and compensation
                flap = flap_plan(stats, infos, units, budget, squared=attn)
                plan = [{c: int(v.sum()) for c, v in row.items()} for row in flap]
            res = prune_structured(blocks, self.x, units, plan, method=GroupCBS(), intercept=True, **kw)
        seconds = time.perf_counter() - t + extra
        small = self.port.shrink(res.blocks, res.removed, units)
        dense_speed = self.speed(self.model)  # in this process, next to the shrunk model's
        kept = self.port.decoder_params(small)
        assert kept == self.total - res.removed_params, (kept, self.total, res.removed_params)
        return dict(method=method, mode=mode, budget=frac, removed_params=res.removed_params, kept_params=kept,
                    kept_fraction=kept / self.total, ppl=self.ppl(small), prune_seconds=seconds,
                    dense_stats_seconds=extra, timings=res.timings, widths=self.port.widths(small),
                    errors=[{k: float(v) for k, v in e.items()} for e in res.errors],
                    dense_blocks_seconds=dense_speed["blocks_seconds"], dense_model_seconds=dense_speed["model_seconds"],
                    dense_tokens_per_second=dense_speed["tokens_per_second"],
                    **self.speed(small), **({"sample": self.port.sample(small)}
                                            if frac >= 0.5 else {}))

    def sparsegpt(self) -> dict:
        t = time.perf_counter()
        res = cobs_jax.prune_layerwise(self.port.blocks(self.port.lm.model), self.x, method="sparsegpt", sparsity=0.5,
                                       args=self.args, chunk_size=self.batch, progress=True)
        seconds = time.perf_counter() - t
        return dict(method="sparsegpt (unstructured)", ppl=self.ppl(self.port.with_blocks(res.blocks)),
                    prune_seconds=seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(PORTS),
                    help="smollm2-135m (results/llm_structured*) or gemma3-270m (results/llm_structured_gemma3*)")
    ap.add_argument("--calib-tokens", default=None, help="int tokens .npy (n, seq) to calibrate on, instead of Brown")
    ap.add_argument("--eval-tokens", default=None, help="int tokens .npy (n, seq) to evaluate on, instead of Brown")
    ap.add_argument("--out", default=None, help="also write one JSON record per cell to this file")
    ap.add_argument("--calib", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows of --seq tokens")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward chunk (and the timed batch)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ",".join(METHODS))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ",".join(MODES))
    ap.add_argument("--rel-damping", type=float, default=0.01,
                    help="relative damping of the compensating methods' least squares (ridge)")
    ap.add_argument("--multiple", type=int, default=1,
                    help="keep every MLP width a multiple of this (results in <name>_x<multiple>; flap refuses it)")
    ap.add_argument("--budgets", default="20,30,50", help="percent of decoder linear weights removed")
    ap.add_argument("--quick", action="store_true", help="8 calibration and 8 eval windows, 20 and 50 %%, attn+mlp")
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    ap.add_argument("--rerun", action="store_true", help="recompute the requested cells even when saved")
    ap.add_argument("--name", default=None, help="results file stem")
    a = ap.parse_args()
    if bool(a.calib_tokens) != bool(a.eval_tokens):
        raise SystemExit("give both --calib-tokens and --eval-tokens")
    if a.quick:
        a.calib, a.eval, a.budgets, a.modes = 8, 8, "20,50", "attn+mlp"
    stem = PORTS[a.model].file
    name = a.name or (f"{stem}_quick" if a.quick else stem)
    if a.multiple > 1:
        name += f"_x{a.multiple}"
    path = RESULTS / f"{name}.json"
    RESULTS.mkdir(exist_ok=True)
    setup = dict(calib=a.calib, seq=a.seq, eval=a.eval, batch=a.batch)
    if a.rel_damping != 0.01:
        setup["rel_damping"] = a.rel_damping
    if a.multiple > 1:
        setup["multiple"] = a.multiple
    if a.calib_tokens:
        (a.calib, a.seq), a.eval = user_tokens(a.calib_tokens).shape, len(user_tokens(a.eval_tokens))
        setup.update(calib=a.calib, seq=a.seq, eval=a.eval, calib_tokens=os.path.abspath(a.calib_tokens),
                     eval_tokens=os.path.abspath(a.eval_tokens))
    saved = json.loads(path.read_text()) if path.exists() and not a.fresh else {}
    cells = saved.get("cells", {}) if saved.get("setup") == setup else {}
    meta = metadata(model=PORTS[a.model].name, text="user tokens" if a.calib_tokens else SOURCE, setup=setup)
    methods, modes = a.methods.split(","), a.modes.split(",")
    budgets = [float(b) / 100 for b in a.budgets.split(",")]
    bad = [m for m in methods if m not in METHODS + ["sparsegpt"]] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown {bad}; methods: {METHODS}, modes: {list(MODES)}")
    keys = ["dense"] + [f"{m} @ {mode} @ {round(b * 100)}%" for mode in modes for b in budgets for m in methods
                        if m != "sparsegpt"] + ["sparsegpt @ 50%"]
    todo = [k for k in keys if k not in cells or (a.rerun and k != "dense")]
    if not todo:
        print("every cell is saved; --fresh recomputes")
    runner = Runner(a) if todo else None
    for key in todo:
        t = time.perf_counter()
        if key == "dense":
            v = runner.dense()
        elif key == "sparsegpt @ 50%":
            v = runner.sparsegpt()
        else:
            m, mode, b = key.split(" @ ")
            v = runner.cell(m, mode, float(b[:-1]) / 100)
        cells[key] = v
        meta["split"], meta["cells"] = runner.split, cells
        path.write_text(json.dumps(meta, indent=1))
        write_tables(meta, name)
        if a.out:
            write_records(meta, a.out)
        print(f"{key}: ppl {v['ppl']:.2f}" + (f", prune {v['prune_seconds']:.1f} s" if "prune_seconds" in v else "")
              + (f", kept {v['kept_fraction']:.3f}, blocks {v['blocks_seconds']:.3f} s" if "kept_fraction" in v else "")
              + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    if not todo:
        meta["cells"] = cells
        write_tables(meta, name)


def write_records(meta, out):
    """One flat JSON record per cell (``--out``), written atomically."""
    dense = meta["cells"].get("dense", {})
    recs = []
    for k, v in meta["cells"].items():
        recs.append(dict(model=meta["model"], method=v.get("method", "dense"), mode=v.get("mode"), budget=v.get("budget"),
                         kept_decoder_weights=v.get("kept_params", v.get("decoder_params")), perplexity=v["ppl"],
                         prune_seconds=v.get("prune_seconds"), dense_blocks_seconds=dense.get("blocks_seconds"),
                         shrunk_blocks_seconds=v.get("blocks_seconds") if k != "dense" else None,
                         dense_model_seconds=dense.get("model_seconds"), shrunk_model_seconds=v.get("model_seconds")
                         if k != "dense" else None, tokens_per_second=v.get("tokens_per_second")))
    with open(out + ".part", "w") as f:
        json.dump(dict(setup=meta["setup"], text=meta["text"], records=recs), f, indent=1)
    os.replace(out + ".part", out)


def write_tables(meta, name):
    cells = meta["cells"]
    dense = cells.get("dense")
    if dense is None:
        return
    s = meta["setup"]
    lines = [f"{meta['model']}: structured pruning, perplexity of the shrunk model on {s['eval']} x {s['seq']} held-out "
             f"tokens (calibration {s['calib']} x {s['seq']}). Dense: **{dense['ppl']:.2f}**, "
             f"{dense['decoder_params']:,} decoder linear weights. Command: `{meta['command']}`.", ""]
    runs = [v for k, v in cells.items() if "mode" in v]
    for mode in MODES:
        sub = [v for v in runs if v["mode"] == mode]
        if not sub:
            continue
        budgets = sorted({v["budget"] for v in sub})
        methods = [m for m in METHODS if any(v["method"] == m for v in sub)]
        lines += [f"**{mode}**: perplexity (kept decoder weights) at each share removed", "",
                  "| method | " + " | ".join(f"{round(b * 100)} %" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for m in methods:
            row = []
            for b in budgets:
                v = next((v for v in sub if v["method"] == m and v["budget"] == b), None)
                row.append(f"{v['ppl']:.2f} ({v['kept_fraction']:.3f})" if v else "")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Speed of the shrunk model in the same process as the dense one (best of 3; blocks = the decoder "
              f"blocks on {s['batch']} x {s['seq']} tokens; goal: blocks ratio <= 1.1 x kept fraction; the ratio is "
              "against the dense blocks timed in the cell's own process where the cell has them (dense s), "
              "else against the dense row), prune time:", "",
              "| run | kept | blocks s (ratio) | dense s | goal | model s | generation tok/s | prune s |",
              "|---|---|---|---|---|---|---|---|",
              f"| dense | 1.000 | {dense['blocks_seconds']:.3f} | | | {dense['model_seconds']:.3f} | "
              f"{dense['tokens_per_second']:.1f} | |"]
    for k, v in cells.items():
        if "mode" in v:  # against the dense model timed in the cell's own process when it was
            r = v["blocks_seconds"] / v.get("dense_blocks_seconds", dense["blocks_seconds"])
            own = f"{v['dense_blocks_seconds']:.3f}" if "dense_blocks_seconds" in v else ""
            lines.append(f"| {k} | {v['kept_fraction']:.3f} | {v['blocks_seconds']:.3f} ({r:.2f}) | {own} | "
                         f"{'ok' if r <= 1.1 * v['kept_fraction'] else 'missed'} | {v['model_seconds']:.3f} | "
                         f"{v['tokens_per_second']:.1f} | {v['prune_seconds']:.1f} |")
    if "sparsegpt @ 50%" in cells:
        sg = cells["sparsegpt @ 50%"]
        lines += ["", f"Reference: unstructured SparseGPT at 50 % in this process: ppl {sg['ppl']:.2f}, "
                  f"{sg['prune_seconds']:.1f} s (the cost goal is 2x this)."]
    lines += ["", f"Greedy continuations (30 tokens) of {PROMPT!r}:", "", f"* dense: {dense['sample']!r}"]
    lines += [f"* {k}: {v['sample']!r}" for k, v in cells.items() if "sample" in v and k != "dense"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(runs, dense, RESULTS / f"{name}.png", meta["model"].split(" (")[0])


def _plot(runs, dense, out, model):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = [m for m in MODES if any(v["mode"] == m for v in runs)]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for m in METHODS:
            pts = sorted((1 - v["kept_fraction"], v["ppl"]) for v in runs if v["mode"] == mode and v["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.axhline(dense["ppl"], color="k", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("share of decoder linear weights removed")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"{model}, structured ({mode})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
