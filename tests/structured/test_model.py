"""Structured pruning of whole models: the shrunk model computes what the masked one does, the
counts are exact, the budgets add up, FLAP's metric is its formula, bad specs are named."""

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cobs_jax.structured import (Calibration, Given, GroupCBS, GroupOBS, MagnitudeSP, Units, WandaSP, allocate, calibrate,
                                 error_curves, flap_plan, flap_scores, prune_structured, share_plan, shrunk_params,
                                 slimgpt_shares)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lib import llama  # noqa: E402



@pytest.fixture(autouse=True)
def _port_broadcasts():
    """The Llama port broadcasts implicitly (the library does not: the suite raises elsewhere)."""
    import jax

    with jax.numpy_rank_promotion("allow"):
        yield


CFG = llama.LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=48)


def _model():
    m = llama.with_proj_bias(llama.Llama(CFG, nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(6, 16)), jnp.int32)
    return m, tokens


def _with_blocks(model, blocks):
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    new.layers = nnx.List(blocks)
    return new


@pytest.mark.parametrize("method", [GroupCBS(), MagnitudeSP()])  # compensated or not
def test_shrunk_llama_equals_the_masked_one_with_exact_counts(method):
    m, tokens = _model()
    units = llama.structured_units(CFG)
    plan = [{"self_attn/o_proj": 1, "mlp/down_proj": 20}, {"self_attn/o_proj": 0, "mlp/down_proj": 10}]
    r = prune_structured(list(m.layers), m.embed(tokens), units, plan, method=method, args=m.rope(16), chunk_size=3)
    assert [{k: int(v.sum()) for k, v in rem.items()} for rem in r.removed] == plan
    masked = _with_blocks(m, r.blocks)
    small = llama.shrink(m, r.blocks, r.removed, units)
    assert small.config.layer_widths == ((2, 1, 28), (4, 2, 38))
    assert llama.decoder_params(small) == llama.decoder_params(m) - r.removed_params == 15360 - 4416
    assert r.total_params == llama.decoder_params(m)
    a, b = np.asarray(masked(tokens)), np.asarray(small(tokens))
    np.testing.assert_allclose(b, a, atol=2e-5 * np.abs(a).max())
    # the masked consumer columns are exactly zero
    down = np.asarray(r.blocks[0].mlp.down_proj.kernel[...])
    assert np.all(down[r.removed[0]["mlp/down_proj"]] == 0)


def test_compensation_beats_the_uncompensated_baseline_on_the_block_outputs():
    m, tokens = _model()
    units = llama.structured_units(CFG, attention=None)
    x = m.embed(tokens)
    plan = [{"mlp/down_proj": 24}] * 2
    ours = prune_structured(list(m.layers), x, units, plan, method=GroupOBS(), args=m.rope(16))
    base = prune_structured(list(m.layers), x, units, plan, method=WandaSP(), intercept=False, args=m.rope(16))
    assert ours.errors[0]["mlp/down_proj"] < base.errors[0]["mlp/down_proj"]


def test_budgets_add_up_exactly():
    m, tokens = _model()
    units = llama.structured_units(CFG)
    stats, infos, energy = calibrate(list(m.layers), m.embed(tokens), units, args=m.rope(16))
    assert infos[0].counts == {"self_attn/o_proj": 2, "mlp/down_proj": 48}
    assert infos[0].costs == {"self_attn/o_proj": 16 * 32 + 16 * 32 + 2 * 8 * 32,  # o cols, q, k, v rows
                              "mlp/down_proj": 3 * 32}
    # uniform shares: 1536 weights per block -> no KV group (0.2 of 2), 1536 / 96 = 16 channels
    assert share_plan(infos, 3072) == [{"self_attn/o_proj": 0, "mlp/down_proj": 16}] * 2
    # 1550 per block = 16.15 channels: 16 each, then one more where the remainder is largest (block 0 on a tie)
    assert share_plan(infos, 3100) == [{"self_attn/o_proj": 0, "mlp/down_proj": 17}, {"self_attn/o_proj": 0, "mlp/down_proj": 16}]
    # half the layer: one KV group (1536) and the rest, 3840 - 1536 = 2304, in 24 channels
    assert share_plan(infos, 7680) == [{"self_attn/o_proj": 1, "mlp/down_proj": 24}] * 2
    np.testing.assert_allclose(slimgpt_shares(32, 4.0)[[0, 31]], [1.0, 4.0])
    deep = share_plan(infos, 3072, slimgpt_shares(2, 3.0))  # shares 1 : 3
    assert deep[0]["mlp/down_proj"] == 8 and deep[1]["mlp/down_proj"] == 24
    # Units(multiple=8): counts in steps of 8 channels, the total within one step
    units8 = (units[0], dataclasses.replace(units[1], multiple=8))
    infos8 = calibrate(list(m.layers), m.embed(tokens), units8, args=m.rope(16))[1]
    for plan in (share_plan(infos8, 3100), allocate(error_curves(stats, infos8, units8, energy=energy), infos8, 3100)):
        assert all(row["mlp/down_proj"] % 8 == 0 for row in plan)
        got = sum(n * infos8[i].costs[c] for i, row in enumerate(plan) for c, n in row.items())
        assert 3100 <= got < 3100 + 8 * infos8[0].costs["mlp/down_proj"]
    with pytest.raises(ValueError, match="multiple"):
        flap_plan(stats, infos8, units8, 3100)
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="`shares` must be 2 non-negative numbers"):
            share_plan(infos, 3100, bad)
        with pytest.raises(ValueError, match="`shares` must be 2 non-negative numbers"):
            allocate(error_curves(stats, infos, units, energy=energy), infos, 3100, shares=bad)
    with pytest.raises(ValueError, match="not a multiple of `multiple` = 5"):
        calibrate(list(m.layers), m.embed(tokens), (dataclasses.replace(units[1], multiple=5),), args=m.rope(16))
    rng = np.random.default_rng(0)
    for budget in rng.integers(100, 7000, size=20):  # the total: at least the budget, less than one unit beyond
        got = sum(n * infos[i].costs[c] for i, row in enumerate(share_plan(infos, int(budget), rng.random(2) + 0.1))
                  for c, n in row.items())
        assert budget <= got < budget + infos[0].costs["mlp/down_proj"]
    curves = error_curves(stats, infos, units, energy=energy)
    assert len(curves[0]["mlp/down_proj"]) == int(0.9 * 48) and len(curves[0]["self_attn/o_proj"]) == 1
    assert np.all(np.diff(curves[0]["mlp/down_proj"]) >= 0)
    budget = 3000
    plan = allocate(curves, infos, budget)
    got = sum(n * infos[i].costs[c] for i, row in enumerate(plan) for c, n in row.items())
    assert budget <= got < budget + infos[0].costs["mlp/down_proj"]  # within the smallest unit
    fplan = flap_plan(stats, infos, units, budget, squared=("self_attn/o_proj",))
    got = sum(int(v.sum()) * infos[i].costs[c] for i, row in enumerate(fplan) for c, v in row.items())
    assert budget <= got < budget + infos[0].costs["mlp/down_proj"]  # within the smallest unit
    r = prune_structured(list(m.layers), m.embed(tokens), units, fplan, method=WandaSP(), args=m.rope(16))
    assert all(np.array_equal(r.removed[i][c], fplan[i][c]) for i in range(2) for c in fplan[i])


def test_flap_wifv_on_a_hand_example():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    w = np.array([[1.0, 2.0], [3.0, 0.5]])  # rows layout: (outputs, inputs)
    cal = Calibration(jnp.asarray(x.T @ x), jnp.asarray(x.sum(0)), 3)
    want = x.var(0, ddof=1) * (w**2).sum(0)
    np.testing.assert_allclose(np.asarray(flap_scores(jnp.asarray(w), cal)), want, rtol=1e-6)


def test_bad_unit_specs_are_named():
    m, tokens = _model()
    x = m.embed(tokens)
    with pytest.raises(ValueError, match="size"):
        Units("mlp/down_proj", 0)
    with pytest.raises(ValueError, match="entries per unit of producer"):
        Units("mlp/down_proj", 1, {"mlp/up_proj": 0})
    cases = [
        ((Units("mlp/nope", 1),), "does not call"),
        ((Units("mlp/down_proj", 5),), "not a whole number of units"),
        ((Units("mlp/down_proj", 1, {"mlp/up_proj": 2}),), "not 2 per unit"),
    ]
    for units, match in cases:
        with pytest.raises(ValueError, match=match):
            prune_structured(list(m.layers), x, units, [{}, {}], args=m.rope(16))
    with pytest.raises(ValueError, match="has no bias"):
        plain = llama.Llama(CFG, nnx.Rngs(0))
        prune_structured(list(plain.layers), x, llama.structured_units(CFG, attention=None),
                         [{"mlp/down_proj": 2}] * 2, args=m.rope(16))
    with pytest.raises(ValueError, match="plan"):
        prune_structured(list(m.layers), x, llama.structured_units(CFG), [{}], args=m.rope(16))


def test_shrunk_llama_round_trips_through_a_safetensors_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models

    m, tokens = _model()
    units = llama.structured_units(CFG)
    plan = [{"self_attn/o_proj": 1, "mlp/down_proj": 8}, {"self_attn/o_proj": 0, "mlp/down_proj": 4}]
    r = prune_structured(list(m.layers), m.embed(tokens), units, plan, args=m.rope(16))
    small = llama.shrink(m, r.blocks, r.removed, units)
    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    llama.save_safetensors(small, tok, str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layer_head_num"] == [2, 4] and cfg["layer_inter_size"] == [40, 44] and cfg["head_dim"] == 8
    assert cfg["attention_bias"] and cfg["mlp_bias"]
    back, _, c = llama.load_safetensors(str(tmp_path))
    assert c.layer_widths == small.config.layer_widths
    np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(small(tokens)), rtol=1e-6, atol=1e-6)
    # equal widths everywhere: a standard Llama config, no per-layer lists
    uni = prune_structured(list(m.layers), m.embed(tokens), units, [{"self_attn/o_proj": 1, "mlp/down_proj": 8}] * 2,
                           args=m.rope(16))
    llama.save_safetensors(llama.shrink(m, uni.blocks, uni.removed, units), tok, str(tmp_path / "uniform"))
    cfg = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert "layer_inter_size" not in cfg and (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    assert cfg["intermediate_size"] == 40
    # and through cobs_jax.save / load into a model built from the shrunk config
    import cobs_jax

    cobs_jax.save(str(tmp_path / "small.safetensors"), nnx.state(small))
    fresh = llama.Llama(small.config, nnx.Rngs(1))
    nnx.update(fresh, cobs_jax.load(str(tmp_path / "small.safetensors"), nnx.state(fresh)))
    np.testing.assert_array_equal(np.asarray(fresh(tokens)), np.asarray(small(tokens)))


def test_shrunk_resnet_block_equals_the_masked_one():
    """ResNet20's basic block: conv1's filters (with bn1's entries) feed conv2's input channels."""
    import jax
    from resnet20 import BasicBlock  # the benchmark's ResNet20 block (conv1 width `mid` once shrunk)

    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 8), jnp.float32)
    v = BasicBlock(8).init(jax.random.key(1), x, False)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda a: jnp.asarray(a + 0.3 * rng.normal(size=a.shape), a.dtype), v)  # non-trivial BN
    v["batch_stats"]["bn1"]["var"] = jnp.abs(v["batch_stats"]["bn1"]["var"]) + 0.5
    v["batch_stats"]["bn2"]["var"] = jnp.abs(v["batch_stats"]["bn2"]["var"]) + 0.5
    units = [Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1})]
    r = prune_structured([(BasicBlock(8), v)], x, units, [{"conv2": 3}], method=GroupOBS(), intercept=False,
                         args=(False,))
    removed = r.removed[0]["conv2"]
    assert removed.sum() == 3 and r.removed_params == 3 * (9 * 8) * 2  # conv2 inputs + conv1 filters
    masked = r.blocks[0]
    small = shrunk_params(masked, units, r.removed[0], x[:1], args=(False,))
    assert small["params"]["conv1"]["kernel"].shape == (3, 3, 8, 5)
    assert small["params"]["conv2"]["kernel"].shape == (3, 3, 5, 8)
    assert small["batch_stats"]["bn1"]["mean"].shape == (5,) and small["params"]["bn1"]["scale"].shape == (5,)
    want = np.asarray(BasicBlock(8).apply(masked[1], x, False))
    got = np.asarray(BasicBlock(8, mid=5).apply(small, x, False))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the compensated consumer: conv2's kept input channels re-solved, removed ones exactly 0
    k2 = np.asarray(masked[1]["params"]["conv2"]["kernel"])
    assert np.all(k2[:, :, removed] == 0) and not np.allclose(k2[:, :, ~removed], np.asarray(v["params"]["conv2"]["kernel"])[:, :, ~removed])


def test_intercept_goes_into_the_following_batchnorm():
    """conv2 has no bias: with ``bias_into="bn2"`` the intercept moves bn2's running mean (and
    nothing else of it), so that bn2's output error has mean zero over the calibration data
    (the least-squares intercept's normal equation), which it has not without the intercept;
    the shrunk block still equals the masked one."""
    import jax
    from resnet20 import BasicBlock

    x = jax.random.normal(jax.random.key(0), (32, 6, 6, 8), jnp.float32)
    v = BasicBlock(8).init(jax.random.key(1), x, False)
    v["params"]["bn1"]["bias"] = v["params"]["bn1"]["bias"] + 2.0  # conv2's inputs have a large mean
    runs = {}
    for into in (None, "bn2"):
        units = [Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1}, bias_into=into)]
        runs[into] = prune_structured([(BasicBlock(8), v)], x, units, [{"conv2": 4}], method=Given(np.arange(8) < 4),
                                      intercept=into is not None, args=(False,))
    got = runs["bn2"].blocks[0][1]
    stats0, stats1 = v["batch_stats"]["bn2"], got["batch_stats"]["bn2"]
    assert not np.allclose(stats1["mean"], stats0["mean"]) and np.array_equal(stats1["var"], stats0["var"])
    np.testing.assert_array_equal(got["params"]["bn2"]["bias"], v["params"]["bn2"]["bias"])

    def bn2_out(variables):
        _, inter = BasicBlock(8).apply(variables, x, False, capture_intermediates=True)
        return np.asarray(inter["intermediates"]["bn2"]["__call__"][0], np.float64)

    dense = bn2_out(v)
    bias = {k: np.abs((bn2_out(r.blocks[0][1]) - dense).mean(axis=(0, 1, 2))).max() for k, r in runs.items()}
    assert bias["bn2"] < 1e-4 * np.abs(dense).mean() and bias[None] > 1e-2 * np.abs(dense).mean()
    units = [Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1}, bias_into="bn2")]
    small = shrunk_params(runs["bn2"].blocks[0], units, runs["bn2"].removed[0], x[:1], args=(False,))
    np.testing.assert_allclose(np.asarray(BasicBlock(8, mid=4).apply(small, x, False)),
                               np.asarray(BasicBlock(8).apply(got, x, False)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`bias_into` 'conv1' of 'conv2' must be a BatchNorm"):
        prune_structured([(BasicBlock(8), v)], x, [Units("conv2", 1, {"conv1": 1}, bias_into="conv1")], [{"conv2": 2}],
                         method=GroupOBS(), args=(False,))
    with pytest.raises(ValueError, match="has no bias"):
        prune_structured([(BasicBlock(8), v)], x, [Units("conv2", 1, {"conv1": 1})], [{"conv2": 2}],
                         method=GroupOBS(), args=(False,))


def test_shrunk_gemma_block_equals_the_masked_one():
    """Gemma's einsum layout: query heads are axis 0 of q_einsum (N, D, H) and attn_vec_einsum
    (N, H, D); MLP channels axis 1 of gating_einsum (2, F, D) and axis 0 of linear (F, D)."""
    import dataclasses

    import jax

    from lib import gemma

    c = gemma.GemmaConfig(vocab_size=64, dim=16, num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8, hidden_dim=24,
                          window=4, global_every=1)
    v = {"params": gemma.init_params(c, jax.random.key(0))["layer_0"]}
    x = jax.random.normal(jax.random.key(1), (4, 6, 16), jnp.float32)
    units = [Units("attn/attn_vec_einsum/w", 1, {"attn/q_einsum/w": 1}, axis=0),
             Units("mlp/linear", 1, {"mlp/gating_einsum": (1, 1)})]
    plan = [{"attn/attn_vec_einsum/w": 1, "mlp/linear": 10}]
    r = prune_structured([(gemma.Block(c, True), v)], x, units, plan, method=GroupCBS(), intercept=False)
    assert r.removed_params == (8 * 16) * 2 + 10 * 16 * 3
    small = shrunk_params(r.blocks[0], units, r.removed[0], x[:1])
    assert small["params"]["attn"]["q_einsum"]["w"].shape == (3, 16, 8)
    assert small["params"]["mlp"]["gating_einsum"].shape == (2, 14, 16)
    c2 = dataclasses.replace(c, num_heads=3, hidden_dim=14)
    want = np.asarray(gemma.Block(c, True).apply(r.blocks[0][1], x))
    got = np.asarray(gemma.Block(c2, True).apply(small, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shrunk_gemma_model_with_biases_equals_the_masked_one(tmp_path):
    """The Gemma port end to end: zero biases added for the intercept, query heads and channels
    removed by GroupCBS with the intercept, the model shrunk to per-block widths: its NLL is the
    masked model's, its einsum weights are the dense count minus ``removed_params``, and it
    round-trips through ``cobs_jax.save`` / ``load``."""
    import jax

    from lib import gemma

    c = gemma.GemmaConfig(vocab_size=64, dim=16, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8, hidden_dim=24,
                          window=4, global_every=2)
    model = gemma.with_proj_bias(gemma.Gemma3(c, gemma.init_params(c, jax.random.key(0))))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(6, 12)), jnp.int32)
    units = gemma.structured_units(model.config)
    r = prune_structured(model.blocks, model.embed(tokens), units, [{"attn/attn_vec_einsum/w": 1, "mlp/linear/linear": 5},
                                                                    {"attn/attn_vec_einsum/w": 2, "mlp/linear/linear": 9}],
                         method=GroupCBS(), intercept=True)
    assert any(np.any(b[1]["params"]["mlp"]["linear"]["bias"] != 0) for b in r.blocks)  # the intercept landed
    small = gemma.shrink(model, r.blocks, r.removed, units)
    assert small.config.layer_widths == ((3, 19), (2, 15))
    assert gemma.decoder_params(small) == gemma.decoder_params(model) - r.removed_params
    np.testing.assert_allclose(small.nll(tokens), model.with_blocks(r.blocks).nll(tokens), rtol=1e-5)
    # the shrunk params through cobs_jax.save, read back into a freshly initialised model of the same widths
    import cobs_jax

    cobs_jax.save(str(tmp_path / "gemma.safetensors"), small.params)
    fresh = gemma.init_params(small.config, jax.random.key(5))  # the tree the shrunk config builds
    like = jax.tree.map(lambda a, b: a.astype(b.dtype), fresh, small.params)  # (the test's mixed dtypes)
    back = gemma.Gemma3(small.config, cobs_jax.load(str(tmp_path / "gemma.safetensors"), like))
    np.testing.assert_array_equal(back.nll(tokens), small.nll(tokens))


def test_docs_example(capsys):
    """docs/structured.md's whole-model example runs and prints what the page says."""
    import re

    page = (Path(__file__).resolve().parents[2] / "docs" / "structured.md").read_text()
    code, printed = re.search(r"## A whole model\n\n```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", page, re.S).groups()
    exec(compile(code, "docs/structured.md", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out == printed


def test_probe_scales_measure_each_blocks_loss():
    import jax

    from cobs_jax.structured import probe_scales

    m, tokens = _model()
    units = llama.structured_units(CFG, attention=None)
    x = m.embed(tokens)
    stats, infos, _ = calibrate(list(m.layers), x, units, args=m.rope(16))
    curves = error_curves(stats, infos, units)

    def tail(h):  # mean NLL of the tokens from the last block's outputs
        logp = np.asarray(jax.nn.log_softmax(m.head(h)[:, :-1].astype(jnp.float32), axis=-1))
        return -np.mean(np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], axis=-1))

    plan = [{"mlp/down_proj": 16}, {"mlp/down_proj": 0}]
    s = probe_scales(list(m.layers), x, units, stats, infos, curves, plan, tail, args=m.rope(16))
    assert s.shape == (2,) and np.all(np.isfinite(s)) and s[1] == s[0]  # block 1 removes nothing: the median
    # block 0's scale is its loss change over its curve error at 16 channels
    r = prune_structured(list(m.layers), x, units, plan, method=GroupOBS(), args=m.rope(16))
    h = x
    for b in r.blocks[:1] + list(m.layers)[1:]:
        h = b(h, *m.rope(16))
    dense = x
    for b in m.layers:
        dense = b(dense, *m.rope(16))
    want = max(tail(h) - tail(dense), 0.0) / curves[0]["mlp/down_proj"][15]
    assert s[0] == pytest.approx(want, rel=1e-4)


def test_query_heads_inside_gqa_groups_shrink_equally():
    m, tokens = _model()
    units = llama.structured_units(CFG, attention="heads")  # 4 query heads, 2 KV heads: families of 2
    x = m.embed(tokens)
    r = prune_structured(list(m.layers), x, units, [{"self_attn/o_proj": 2, "mlp/down_proj": 4}] * 2,
                         args=m.rope(16))
    for rem in r.removed:
        assert rem["self_attn/o_proj"][:2].sum() == 1 and rem["self_attn/o_proj"][2:].sum() == 1
    small = llama.shrink(m, r.blocks, r.removed, units)
    assert small.config.layer_widths is None or small.config.layer_widths == ((2, 2, 44), (2, 2, 44))
    np.testing.assert_allclose(np.asarray(small(tokens)), np.asarray(_with_blocks(m, r.blocks)(tokens)), atol=2e-5 * 10)
    with pytest.raises(ValueError, match="families"):
        prune_structured(list(m.layers), x, units, [{"self_attn/o_proj": 1}] * 2, args=m.rope(16))
    stats, infos, _ = calibrate(list(m.layers), x, units, args=m.rope(16))
    plan = allocate(error_curves(stats, infos, units), infos, 5000)
    assert all(p["self_attn/o_proj"] % 2 == 0 for p in plan)
