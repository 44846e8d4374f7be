"""Inference with pruned kernels: dense vs ``cobs_jax.to_sparse`` (BCOO) vs N:M packed, memory and time.

    python benchmarks/sparse_inference.py            # this machine's default backend (CPU here)
    python benchmarks/sparse_inference.py --quick    # fewer repeats

Two models: an MLP (MLPNet's 784-300-100-10) on a batch of 256 images, and a transformer MLP
block (SmolLM2's 576 -> 1536 -> 576, ReLU between) on 512 tokens. Kernels are pruned by magnitude
(unstructured, 50-95 %) or to 2:4; every variant is one jitted forward, timed after compilation
(median of repeats). Memory is the bytes of the kernels as stored: dense float32; BCOO float32
values + int32 indices (``to_sparse``); 2:4 packed float32 values + uint8 positions
(``pack_nm``, expanded inside the jitted call). Writes ``results/sparse_inference.{json,md}``.
The same script runs unchanged on a GPU or TPU.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import cobs_jax
from lib.common import RESULTS, metadata

MODELS = {"MLP 784-300-100-10 (batch 256)": ((784, 300, 100, 10), 256),
          "transformer MLP 576-1536-576 (512 tokens)": ((576, 1536, 576), 512)}
SPARSITIES = (0.5, 0.7, 0.9, 0.95)


def _magnitude(w, s):
    k = int(round(s * w.size))
    t = jnp.sort(jnp.abs(w).ravel())[k - 1] if k else -1.0
    return jnp.where(jnp.abs(w) > t, w, 0.0)


def _two_four(w):
    g = jnp.abs(w).reshape(w.shape[0] // 4, 4, w.shape[1])
    rank = jnp.argsort(jnp.argsort(-g, axis=1), axis=1)
    return jnp.where((rank < 2).reshape(w.shape), w, 0.0)


def _forward(kernels, x, mm):
    for i, w in enumerate(kernels):
        x = mm(x, w)
        if i < len(kernels) - 1:
            x = jax.nn.relu(x)
    return x


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _nbytes(tree):
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    repeats = 5 if a.quick else 30
    key = jax.random.key(0)
    rows = []
    dense_fn = jax.jit(lambda ks, x: _forward(ks, x, lambda x, w: x @ w))
    sparse_fn = jax.jit(lambda ks, x: _forward(ks, x, lambda x, w: x @ w))
    packed_fn = jax.jit(lambda ks, x: _forward(ks, x, lambda x, p: x @ cobs_jax.unpack_nm(p)))
    for model, (sizes, batch) in MODELS.items():
        ks = jax.random.split(key, len(sizes))
        dense = [jax.random.normal(k, (i, o)) / np.sqrt(i) for k, i, o in zip(ks, sizes[:-1], sizes[1:])]
        x = jax.random.normal(ks[-1], (batch, sizes[0]))
        t_dense = _time(dense_fn, dense, x, repeats=repeats)
        rows.append(dict(model=model, variant="dense", sparsity=0.0, bytes=_nbytes(dense), seconds=t_dense))
        for s in SPARSITIES:
            pruned = [_magnitude(w, s) for w in dense]
            sp = cobs_jax.to_sparse(pruned)
            err = float(jnp.max(jnp.abs(sparse_fn(sp, x) - dense_fn(pruned, x))))
            rows.append(dict(model=model, variant="BCOO (to_sparse)", sparsity=s, bytes=_nbytes(sp),
                             seconds=_time(sparse_fn, sp, x, repeats=repeats), max_abs_diff=err))
            rows.append(dict(model=model, variant="dense with zeros", sparsity=s, bytes=_nbytes(pruned),
                             seconds=_time(dense_fn, pruned, x, repeats=repeats)))
        if all(i % 4 == 0 for i in sizes[:-1]):
            pruned = [_two_four(w) for w in dense]
            packed = [cobs_jax.pack_nm(w, "2:4") for w in pruned]
            err = float(jnp.max(jnp.abs(packed_fn(packed, x) - dense_fn(pruned, x))))
            rows.append(dict(model=model, variant="2:4 packed (pack_nm)", sparsity=0.5, bytes=_nbytes(packed),
                             seconds=_time(packed_fn, packed, x, repeats=repeats), max_abs_diff=err))
        for r in rows:
            if r["model"] == model:
                r["x_dense_time"] = r["seconds"] / t_dense
                r["x_dense_bytes"] = r["bytes"] / rows[[q["model"] for q in rows].index(model)]["bytes"]
    backend = jax.default_backend()
    lines = [f"Inference with pruned kernels on `{backend}` ({jax.devices()[0].device_kind}); "
             f"median of {repeats} jitted calls. Command: `python benchmarks/sparse_inference.py"
             f"{' --quick' if a.quick else ''}`.", "",
             "| model | kernels | sparsity | kernel bytes | x dense bytes | ms | x dense time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['sparsity']:.2f} | {r['bytes']:,} | "
                     f"{r['x_dense_bytes']:.2f} | {1e3 * r['seconds']:.3f} | {r['x_dense_time']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sparse_inference.md").write_text(text)
    (RESULTS / "sparse_inference.json").write_text(json.dumps(metadata(rows=rows, repeats=repeats), indent=1))


if __name__ == "__main__":
    main()
