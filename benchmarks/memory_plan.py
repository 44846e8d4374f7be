"""Memory plan of layer-wise pruning for multi-billion-weight models, computed from their shapes.

    python benchmarks/memory_plan.py            # writes results/memory_plan.{md,json}

What ``cobs_jax.prune_layerwise`` holds at once, per device, when the calibration examples are
sharded over ``--devices`` devices (``mesh=``: each device runs the block on its share of the
examples; XLA sums the Hessians, so every device holds them all):

* the model's weights (``--weight-bytes`` each; the blocks are pruned one at a time, and the
  pruned kernels of a block are new arrays, so one block's kernels twice);
* the calibration hidden states, input and output of the current block, sharded by examples;
* one block's Hessians, one per *distinct* layer input (q/k/v share one, gate/up share one),
  float32, and the factors of the one being pruned (damped H and the upper factor of H⁻¹);
* the largest forward-chunk activations (``--batch-size`` sequences per device);
* the largest layer's working set: SparseGPT's kernel copy and errors (rows x d_in, twice), and
  for ``method="cbs"`` one chunk of rows' solved columns (256 rows x |fixed set| x window) plus
  one row's factorisation (a ``lax.map``: one row at a time).

Nothing here is measured: these are byte counts from the layer shapes, to size the devices.
"""

from __future__ import annotations

import argparse
import json

from lib.common import RESULTS

GiB = 2**30

# name: (layers, d_model, query heads, key/value heads, head dim, d_ff, vocabulary, tied head)
MODELS = {
    "SmolLM2-135M": (30, 576, 9, 3, 64, 1536, 49152, True),
    "Gemma-2B": (18, 2048, 8, 1, 256, 16384, 256000, True),
    "Gemma-7B": (28, 3072, 16, 16, 256, 24576, 256000, True),
    "Llama-3-8B": (32, 4096, 32, 8, 128, 14336, 128256, False),
}


def block_layers(d, q, kv, ff):
    """(name, d_in, d_out, input id) of one Llama/Gemma block; layers with one input id share H."""
    return [("q_proj", d, q, "attn_in"), ("k_proj", d, kv, "attn_in"), ("v_proj", d, kv, "attn_in"),
            ("o_proj", q, d, "o_in"), ("gate_proj", d, ff, "mlp_in"), ("up_proj", d, ff, "mlp_in"),
            ("down_proj", ff, d, "down_in")]


def plan(name, a):
    n_layers, d, heads, kv_heads, hd, ff, vocab, tied = MODELS[name]
    q, kv = heads * hd, kv_heads * hd
    layers = block_layers(d, q, kv, ff)
    block_weights = sum(i * o for _, i, o, _ in layers)
    total_weights = n_layers * block_weights + (1 if tied else 2) * vocab * d  # norms omitted
    inputs = {}
    for _, i, _, key in layers:
        inputs[key] = i
    f32 = 4
    b = a.weight_bytes
    tokens = a.sequences * a.seq_len
    rows = {
        "weights (all blocks, embeddings, head)": total_weights * b,
        "pruned kernels of the current block": block_weights * b,
        "hidden states in + out (sharded)": 2 * tokens * d * f32 / a.devices,
        "block Hessians (one per distinct input)": sum(i * i for i in inputs.values()) * f32,
        "factors of the largest (damped H, U)": 2 * max(inputs.values()) ** 2 * f32,
        # a block's intermediate tensors, and attention scores in 64-query blocks (benchmarks/lib/llama.py)
        "forward chunk activations (per device)": a.batch_size * a.seq_len * (3 * ff + 4 * d + 2 * q + 2 * kv) * f32
        + a.batch_size * heads * 64 * a.seq_len * f32,
    }
    d_big, out_big = max(((i, o) for _, i, o, _ in layers), key=lambda t: t[0] * t[1])
    rows["SparseGPT working set (largest layer)"] = 2 * d_big * out_big * f32
    fixed = int(d_big * max(a.sparsity, 1 - a.sparsity) / 2 + 0.5)  # rows eliminate the smaller fixed set
    rows["CBS: one chunk's solved columns + one row's factor"] = (256 * fixed * a.window + 256 * a.window**2 * 4
                                                                  + 3 * fixed**2) * f32
    total = sum(rows.values())
    return dict(model=name, weights=total_weights, rows={k: v / GiB for k, v in rows.items()}, total_gib=total / GiB)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=128, help="calibration sequences (SparseGPT's default)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--devices", type=int, default=8, help="devices the examples are sharded over")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward chunk (all devices)")
    ap.add_argument("--weight-bytes", type=int, default=2, help="2 for bfloat16 weights, 4 for float32")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=64)
    a = ap.parse_args()
    a.batch_size = max(1, a.batch_size // a.devices)
    plans = [plan(m, a) for m in MODELS]
    head = (f"Per-device memory (GiB) of `prune_layerwise` with {a.sequences} x {a.seq_len} calibration tokens "
            f"sharded over {a.devices} devices, {a.weight_bytes}-byte weights, float32 Hessians, sparsity "
            f"{a.sparsity}, CBS window {a.window} (`python benchmarks/memory_plan.py`; computed from the shapes, "
            f"not measured).")
    lines = [head, "", "| | " + " | ".join(p["model"] for p in plans) + " |", "|---|" + "---|" * len(plans),
             "| weights (billions) | " + " | ".join(f"{p['weights'] / 1e9:.2f}" for p in plans) + " |"]
    for key in plans[0]["rows"]:
        lines.append(f"| {key} | " + " | ".join(f"{p['rows'][key]:.2f}" for p in plans) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p['total_gib']:.1f}**" for p in plans) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_plan.md").write_text(text)
    (RESULTS / "memory_plan.json").write_text(json.dumps(dict(args=vars(a), plans=plans), indent=1))


if __name__ == "__main__":
    main()
