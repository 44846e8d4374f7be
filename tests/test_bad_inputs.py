"""Bad inputs to the layer half and to export get a clear error naming the argument, layer or leaf
(issue 34's sweep: the 40 cases that were not clear errors)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cobs_jax


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="b", param_dtype=jnp.float64)(jax.nn.relu(nn.Dense(6, name="a", param_dtype=jnp.float64)(x)))


def _pair(seed=0):
    m = Two()
    return m, m.init(jax.random.key(seed), jnp.ones((1, 4)))


X = np.random.default_rng(0).normal(size=(8, 4))


def _h(d=6, seed=0):
    a = np.random.default_rng(seed).normal(size=(20, d))
    return a.T @ a


# --- prune_layer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(hessian=np.zeros((6, 6))), "all zero"),
    (dict(rel_damping=float("inf")), "`rel_damping` must be a positive finite"),
    (dict(in_axes=(2,)), "`in_axes` must be axes of the 2-d kernel"),
    (dict(hessian=_h() + np.triu(np.ones((6, 6)), 1)), "not symmetric"),
])
def test_prune_layer_refuses(kwargs, match):
    args = dict(kernel=np.random.default_rng(1).normal(size=(6, 3)), hessian=_h(), sparsity=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        cobs_jax.prune_layer(args.pop("kernel"), args.pop("hessian"), **args)


def test_prune_layer_refuses_a_zero_width_kernel():
    with pytest.raises(ValueError, match="no entries"):
        cobs_jax.prune_layer(np.zeros((6, 0)), _h(), sparsity=0.5)


def test_layer_hessian_refuses_nan_activations():
    with pytest.raises(ValueError, match="NaN or Inf"):
        cobs_jax.layer_hessian(np.array([[1.0, np.nan]]))


# --- prune_layerwise ------------------------------------------------------------------------------

def _raises(match, blocks=None, x=X, **kw):
    with pytest.raises(ValueError, match=match):
        cobs_jax.prune_layerwise([_pair()] if blocks is None else blocks, x, **({"sparsity": 0.5} | kw))


def test_prune_layerwise_refuses_bad_arguments():
    _raises("`blocks` is empty", blocks=[])
    _raises("`exclude` must be a regex", exclude=5)
    _raises("`kwargs` must be a dict", kwargs=[1])
    _raises("'zzz' matches no layer", exclude="zzz")
    _raises(r"`sparsity\[0\]` must name exactly .*unknown \['c'\]", sparsity=[{"a": 0.5, "b": 0.5, "c": 0.5}])
    _raises("'params' collection", blocks=[(Two(), {"batch_stats": {}})])
    _raises("`sparsity` is required", sparsity=None)


def test_bad_sparsity_is_refused_before_any_capture(monkeypatch):
    from cobs_jax._layer import layerwise as _layerwise

    def boom(*a, **k):
        raise AssertionError("a capture pass ran")

    monkeypatch.setattr(_layerwise, "forward_chunks", boom)
    _raises("in \\[0, 1\\)", sparsity=1.5)
    _raises("`sparsity` is required", sparsity=None)


def test_wrong_input_width_and_a_failing_block_name_the_block():
    _raises(r"block 0: calling it on inputs of shape \(None, 5\) raised \w+Error", x=np.ones((8, 5)))

    class Fails(nnx.Module):
        def __init__(self):
            self.l = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            raise RuntimeError("broken block")

    _raises("block 1: .*RuntimeError: broken block", blocks=[_pair(), Fails()])
    with pytest.raises(ValueError, match=r"block 0: .*raised \w+Error"):
        cobs_jax.owl_sparsities([_pair()], np.ones((8, 5)), 0.5)


def test_an_int_kernel_in_a_block_is_refused_by_name():
    class IntDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", lambda *_: jnp.ones((4, 6), jnp.int32))
            return x @ k.astype(x.dtype)

    class B(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="b")(IntDense(name="a")(x))

    cobs_jax.register_kernel(IntDense, lambda mod, x: ("bi,io->bo", x))
    b = B()
    _raises(r"layer 'a': its kernel is int32", blocks=[(b, b.init(jax.random.key(0), jnp.ones((1, 4))))])


def test_nan_calibration_activations_are_refused():
    m, v = _pair()
    v = jax.tree.map(lambda a: a, v)
    v["params"]["a"]["bias"] = jnp.full((6,), jnp.inf)  # the second layer's inputs are Inf
    _raises("layer 'b'.*NaN or Inf", blocks=[(m, v)])
    with pytest.raises(ValueError, match="NaN or Inf"):
        cobs_jax.owl_sparsities([(m, v)], X, 0.5)


def test_owl_sparsities_refuses_bad_arguments_and_takes_a_generator():
    with pytest.raises(ValueError, match="`blocks` is empty"):
        cobs_jax.owl_sparsities([], X, 0.5)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        cobs_jax.owl_sparsities([_pair()], X, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="leaves no layer"):
        cobs_jax.owl_sparsities([_pair()], X, 0.5, exclude=["a", "b"])
    got = cobs_jax.owl_sparsities((p for p in [_pair(0), _pair(1)]), X, 0.5)
    assert [sorted(d) for d in got] == [["a", "b"], ["a", "b"]]


# --- export ---------------------------------------------------------------------------------------

def test_to_sparse_refuses_masks_of_another_shape_and_bad_min_sparsity():
    w = {"k": jnp.ones((4, 6))}
    with pytest.raises(ValueError, match=r"shape \(6,\), the leaf \(4, 6\)"):
        cobs_jax.to_sparse(w, {"k": jnp.ones((6,), bool)})  # broadcasts, but is not the kernel's mask
    with pytest.raises(ValueError, match="must be bool"):
        cobs_jax.to_sparse(w, {"k": jnp.ones((4, 6))})
    with pytest.raises(ValueError, match="`min_sparsity`"):
        cobs_jax.to_sparse(w, min_sparsity=1.5)


def test_save_refuses_bad_masks_and_leaves_by_name(tmp_path):
    path = str(tmp_path / "m.safetensors")
    params = {"k": jnp.ones((4, 6))}
    with pytest.raises(ValueError, match=r"mask of \['k'\] has shape"):
        cobs_jax.save(path, params, {"k": jnp.ones((6,), bool)})
    with pytest.raises(ValueError, match="must be bool"):
        cobs_jax.save(path, params, {"k": jnp.ones((4, 6), jnp.float32)})
    with pytest.raises(ValueError, match=r"leaf \"params\['s'\]\""):
        cobs_jax.save(path, {"s": "text"})
    state = nnx.state(nnx.Dropout(0.1, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="PRNG key"):
        cobs_jax.save(path, state)
    assert not (tmp_path / "m.safetensors").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_load_takes_eval_shape_and_names_a_bad_file(tmp_path):
    path = str(tmp_path / "m.safetensors")
    params = {"k": jnp.arange(6.0).reshape(2, 3)}
    cobs_jax.save(path, params)
    like = jax.eval_shape(lambda: params)
    np.testing.assert_array_equal(cobs_jax.load(path, like)["k"], params["k"])
    data = open(path, "rb").read()
    for bad in (data[: len(data) // 2], b"random bytes, not a safetensors header"):
        open(path, "wb").write(bad)
        with pytest.raises(ValueError, match="m.safetensors: not a readable safetensors file"):
            cobs_jax.load(path, like)


def test_unpack_nm_refuses_positions_out_of_range():
    packed = cobs_jax.pack_nm(jnp.array([[1.0], [0.0], [2.0], [0.0]]), "2:4")
    bad = cobs_jax.NMPacked(packed.values, packed.index.at[0, 0, 0].set(7), packed.m)
    with pytest.raises(ValueError, match="outside 0..3"):
        cobs_jax.unpack_nm(bad)


def test_prune_refuses_a_vector_loss():
    with pytest.raises(ValueError, match="must return a scalar"):
        cobs_jax.prune({"w": jnp.ones((3, 2))}, lambda p, b: (b @ p["w"]).sum(-1), jnp.ones((4, 3)), sparsity=0.5,
                       method="woodfisher")
