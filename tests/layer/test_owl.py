"""Non-uniform layer-wise budgets: OWL's outlier rule with the model's total count exact."""

import numpy as np
import pytest
from flax import nnx

import cobs_jax
from cobs_jax._layer.owl import allocate_counts
from test_layerwise import NAMES, Block, _data, _fwd


def test_allocate_counts_exact_total_in_whole_granules():
    rng = np.random.default_rng(0)
    sizes = np.array([64, 128, 48, 96, 200])
    for gran in (np.ones(5, np.int64), np.array([8, 16, 4, 8, 10])):
        for _ in range(20):
            frac = rng.uniform(0.3, 0.8, size=5)
            total = int(round(0.55 * sizes.sum()))
            if rng.uniform() < 0.5:
                frac = frac * total / (frac @ sizes)
            c = allocate_counts(frac, sizes, gran, total)
            assert np.all(c % gran == 0) and np.all(c < sizes)
            if abs(frac @ sizes - total) < 1:  # fractions that already add up: each count within a granule
                assert np.all(np.abs(c - frac * sizes) <= (1 if np.all(gran == 1) else 2) * gran)
            if np.all(gran == 1):
                assert c.sum() == total
            else:
                assert total - gran.max() < c.sum() <= total


def _blocks():
    return [Block(8, 16, nnx.Rngs(i)) for i in range(3)]


@pytest.mark.parametrize("gran", ["layer", "unit"])
def test_owl_sparsities_follow_the_rule_with_the_total_exact(gran):
    blocks, x = _blocks(), _data()
    s = cobs_jax.owl_sparsities(blocks, x, 0.6, granularity=gran, outlier_threshold=3.0, args=(1.0,), chunk_size=4)
    sizes = {n: getattr(getattr(blocks[0], n.split("/")[0]), n.split("/")[1]).kernel[...].size for n in NAMES}
    pruned = sum(v * sizes[n] for blk in s for n, v in blk.items())
    total = sum(sizes.values()) * 3
    assert set(s[0]) == set(NAMES)
    for blk in s:
        for n, v in blk.items():
            assert abs(v * sizes[n] - round(v * sizes[n])) < 1e-9  # whole counts
    if gran == "layer":
        assert round(pruned) == round(0.6 * total)
    # OWL's rule written out with numpy on the dense model's activations
    kernels = [{n: np.asarray(getattr(getattr(b, n.split("/")[0]), n.split("/")[1]).kernel[...]) for n in NAMES}
               for b in blocks]
    h, ratios = np.asarray(x), []
    for k in kernels:
        h_next, acts = _fwd(k, h, 1.0, NAMES)
        scores = np.concatenate([(np.abs(k[n]) * np.linalg.norm(acts[n].reshape(-1, k[n].shape[0]), axis=0)[:, None]).ravel()
                                 for n in NAMES])
        ratios.append(np.mean(scores > 3.0 * scores.mean()))
        h = h_next
    ratios = np.array(ratios)
    shift = (ratios - ratios.min()) / (ratios.max() - ratios.min()) * 0.16
    want = 1.0 - (shift - shift.mean() + 0.4)
    for b, blk in enumerate(s):
        for n, v in blk.items():
            tol = (2 if gran == "layer" else 3) * (1 if gran == "layer" else sizes[n] // 8) / sizes[n]
            assert abs(v - want[b]) <= tol + 1e-9, (b, n, v, want[b])
    assert len(set(ratios)) == 3  # distinct ratios: the rule had something to order
    # the driver takes the per-layer dicts and prunes exactly that many weights
    res = cobs_jax.prune_layerwise(blocks, x, sparsity=s, args=(1.0,), chunk_size=4,
                                   method=cobs_jax.layer.Wanda(granularity=gran))
    got = sum(int(np.sum(~np.asarray(m))) for blk in res.layer_masks for m in blk.values())
    assert got == round(pruned)


def test_owl_without_spread_is_uniform_and_bad_args():
    blocks, x = _blocks(), _data()
    s = cobs_jax.owl_sparsities(blocks, x, 0.5, spread=0.0, args=(1.0,), chunk_size=4)
    assert all(v == pytest.approx(0.5) for b in s for v in b.values())
    with pytest.raises(ValueError, match="`sparsity`"):
        cobs_jax.owl_sparsities(blocks, x, 1.0, args=(1.0,))
    with pytest.raises(ValueError, match="`spread`"):
        cobs_jax.owl_sparsities(blocks, x, 0.5, spread=1.5, args=(1.0,))
    with pytest.raises(ValueError, match="one entry per block"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=[0.5, 0.5], args=(1.0,))
    with pytest.raises(ValueError, match=r"sparsity\[1\]"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=[0.5, 1.2, 0.5], args=(1.0,))
    with pytest.raises(ValueError, match=r"must name exactly block 0's pruned layers .*missing \['attn/o_proj'"):
        cobs_jax.prune_layerwise(blocks, x, sparsity=[{"mlp/up_proj": 0.5}] * 3, args=(1.0,))
