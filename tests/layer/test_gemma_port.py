"""The benchmark's Gemma 3 port (benchmarks/lib/gemma.py): the gemma library's parameter tree, its
Einsum kernels pruned through ``register_kernel``, the chunked perplexity head, the local window.

The real 270M GGUF is exercised by ``benchmarks/llm_prune.py --model gemma3-270m``; here a tiny
random Gemma is built in the same layout.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lib import gemma  # noqa: E402

import cobs_jax  # noqa: E402

C = gemma.GemmaConfig(vocab_size=64, dim=16, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, hidden_dim=24,
                      window=4, global_every=2)


@pytest.fixture(autouse=True)
def _broadcasting():
    # the port broadcasts the norm scales as gemma does; the library itself is rank-clean
    with jax.numpy_rank_promotion("allow"):
        yield


def test_the_parameter_tree_is_the_gemma_librarys():
    p = gemma.init_params(C, jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, p["layer_0"])
    assert shapes == {
        "pre_attention_norm": {"scale": (16,)}, "post_attention_norm": {"scale": (16,)},
        "pre_ffw_norm": {"scale": (16,)}, "post_ffw_norm": {"scale": (16,)},
        "attn": {"q_einsum": {"w": (4, 16, 8)}, "kv_einsum": {"w": (2, 1, 16, 8)},
                 "attn_vec_einsum": {"w": (4, 8, 16)}, "_query_norm": {"scale": (8,)}, "_key_norm": {"scale": (8,)}},
        "mlp": {"gating_einsum": (2, 24, 16), "linear": (24, 16)},
    }
    assert set(p) == {"embedder", "final_norm", "layer_0", "layer_1"}


def test_chunked_nll_equals_the_full_softmax_and_the_window_is_local():
    model = gemma.Gemma3(C, gemma.init_params(C, jax.random.key(1), seq=12))
    tokens = np.random.default_rng(0).integers(0, C.vocab_size, (2, 12)).astype(np.int32)
    h = model.hidden(tokens)
    logits = gemma._head(h, model.params["final_norm"]["scale"], model.params["embedder"]["input_embedding"])
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    want = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0].sum(1)
    np.testing.assert_allclose(model.nll(tokens), want, rtol=1e-5)
    # block 0 is local (window 4): a token 4 or more positions back does not reach it directly
    m, v = model.blocks[0]
    x = model.embed(tokens)
    y = m.apply(v, x)
    x2 = x.at[:, 0].add(1.0)
    y2 = m.apply(v, x2)
    np.testing.assert_allclose(y[:, 4:], y2[:, 4:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[:, 1:4], y2[:, 1:4])
    m1, v1 = model.blocks[1]  # global
    assert not np.allclose(m1.apply(v1, x)[:, 4:], m1.apply(v1, x2)[:, 4:])


def test_every_einsum_kernel_of_every_block_is_pruned():
    model = gemma.Gemma3(C, gemma.init_params(C, jax.random.key(2), seq=6))
    x = model.embed(np.random.default_rng(1).integers(0, C.vocab_size, (4, 6)))
    res = cobs_jax.prune_layerwise(model.blocks, x, sparsity=0.5, method="magnitude", chunk_size=2)
    names = {"attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w", "mlp/gating_einsum", "mlp/linear"}
    for i, (_, v) in enumerate(res.blocks):
        assert set(res.layer_masks[i]) == names
        for n in names:
            *path, last = n.split("/")
            d = v["params"]
            for k in path:
                d = d[k]
            assert int(jnp.sum(d[last] == 0)) == d[last].size // 2, n
    assert res.sparsity == pytest.approx(0.5)
    pruned = model.with_blocks(res.blocks)
    assert np.isfinite(pruned.nll(np.zeros((1, 6), np.int32))).all()
