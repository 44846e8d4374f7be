"""The benchmark's Llama port (benchmarks/lib/llama.py): the Hugging Face loader and the attention.

The SmolLM2 GGUF path is exercised by ``benchmarks/llm_prune.py`` (it needs the 98 MB file); here
a tiny random Llama is written as a Hugging Face checkpoint directory and read back.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lib import llama  # noqa: E402



@pytest.fixture(autouse=True)
def _broadcasting():
    # the benchmark model broadcasts implicitly (norm weights); the library itself is rank-clean
    with jax.numpy_rank_promotion("allow"):
        yield


CFG = llama.LlamaConfig(vocab_size=50, dim=24, num_layers=2, num_heads=6, num_kv_heads=2, hidden_dim=40)


def _hf_weights(model: llama.Llama) -> dict:
    w = {"model.embed_tokens.weight": model.embed_tokens.embedding[...], "model.norm.weight": model.norm.weight[...]}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = layer.input_layernorm.weight[...]
        w[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight[...]
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"self_attn.{n}.weight"] = getattr(layer.self_attn, n).kernel[...].T
        for n in ("gate_proj", "up_proj", "down_proj"):
            w[p + f"mlp.{n}.weight"] = getattr(layer.mlp, n).kernel[...].T
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in w.items()}


def test_load_safetensors_reads_a_hugging_face_directory(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    model = llama.Llama(CFG, nnx.Rngs(3), max_len=64)
    for layer in model.layers:  # non-trivial norms, so a swapped norm would show
        layer.input_layernorm.weight[...] = jnp.linspace(0.5, 1.5, CFG.dim, dtype=jnp.float32)
    safetensors.save_file(_hf_weights(model), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        intermediate_size=CFG.hidden_dim, rope_theta=CFG.rope_theta, rms_norm_eps=CFG.norm_eps,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)))
    vocab = {f"w{i}": i for i in range(CFG.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))

    loaded, tokenizer, cfg = llama.load_safetensors(str(tmp_path), max_len=64)
    assert cfg == CFG
    assert tokenizer.encode("w3 w7").ids == [3, 7]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)))
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [5, 64, 100])
def test_blocked_causal_attention_equals_the_full_softmax(t):
    b, h, kv, hd = 2, 6, 2, 8
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (b, t, h, hd))
    k = jax.random.normal(k2, (b, t, kv, hd))
    v = jax.random.normal(k3, (b, t, kv, hd))
    g = h // kv
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, g, hd), k) / np.sqrt(hd)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    ref = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, h * hd)
    np.testing.assert_allclose(np.asarray(llama.causal_attention(q, k, v, kv)), np.asarray(ref), rtol=1e-5, atol=1e-6)  # softmax in float32
