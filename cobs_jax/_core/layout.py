"""Prunable leaves of a parameter pytree, their flat order, and Fisher blocks.

A :class:`Layout` is a static (hashable) description of which leaves of a parameter pytree are
prunable and where each one sits in the flat vector of prunable weights. It is built once from the
params with :func:`make_layout` and then used as a ``jax.jit`` static argument.

Flat order: the leaves are taken in ``jax.tree_util.tree_flatten_with_path`` order (for dicts,
sorted keys; for ``flax.nnx.State``, its own sorted order), and each prunable leaf is raveled in
C (row-major) order. Non-prunable leaves are not part of the vector.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from .exclude import Exclude, Excluder

PyTree = Any
Prunable = Union[None, Callable[[str, Any], bool], PyTree]
BlockSpec = Union[str, int]

__all__ = ["Layout", "make_layout", "default_prunable", "leaf_name"]


def same_structure(a: Any, b: Any) -> bool:
    """Whether two ``PyTreeDef`` s are equal (typed ``Any``: jaxlib ships no stub for their ``==``)."""
    return bool(a == b)


def _is_floating(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_prunable(path: str, leaf) -> bool:
    """Default choice of prunable leaves: floating arrays with ``ndim >= 2``.

    That selects Dense and Conv kernels (and embeddings) and leaves out biases, norm scales and
    BatchNorm statistics. When the pytree is a whole Flax variables dict (it has a ``'params'``
    collection), :func:`make_layout` additionally restricts the choice to leaves under ``'params'``.
    """
    return _is_floating(leaf) and leaf.ndim >= 2


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of the prunable leaves of a parameter pytree.

    Attributes:
      treedef: structure of the whole parameter pytree.
      paths: ``jax.tree_util.keystr`` of every leaf, in flattening order.
      prunable: per leaf, whether it is prunable.
      shapes: per leaf, its shape.
      dtypes: per leaf, its dtype name.
    """

    treedef: Any
    paths: tuple[str, ...]
    prunable: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    # ----- derived, static ------------------------------------------------------------------------
    @property
    def leaf_ids(self) -> tuple[int, ...]:
        """Indices (into the flattened leaves) of the prunable leaves."""
        return tuple(i for i, p in enumerate(self.prunable) if p)

    @property
    def names(self) -> tuple[str, ...]:
        """Paths of the prunable leaves, in flat order."""
        return tuple(self.paths[i] for i in self.leaf_ids)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of weights of each prunable leaf."""
        return tuple(int(np.prod(self.shapes[i], dtype=np.int64)) for i in self.leaf_ids)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each prunable leaf in the flat vector (one more entry: the total size)."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)]))

    @property
    def size(self) -> int:
        """D, the number of prunable weights."""
        return self.offsets[-1]

    @property
    def dtype(self):
        """dtype of the flat vector: the promoted dtype of the prunable leaves, at least float32."""
        return jnp.result_type(jnp.float32, *[self.dtypes[i] for i in self.leaf_ids])

    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of each prunable leaf in the flat vector."""
        o = self.offsets
        return tuple((o[i], o[i + 1]) for i in range(len(self.sizes)))

    def blocks(self, spec: BlockSpec) -> tuple[tuple[int, int], ...]:
        """Contiguous ``(start, stop)`` ranges of the Fisher blocks.

        Args:
          spec: ``"model"`` (one block over all prunable weights, with cross-layer terms),
            ``"layer"`` (one block per prunable leaf) or a positive int ``c`` (each leaf cut into
            consecutive chunks of at most ``c`` weights, as WoodFisher/CBS do for MobileNet).
        """
        if isinstance(spec, bool) or not isinstance(spec, (str, int, np.integer)):
            raise ValueError(f"`blocks` must be 'model', 'layer' or a positive int, got {spec!r}")
        if isinstance(spec, str):
            if spec == "model":
                return ((0, self.size),)
            if spec == "layer":
                return self.layer_ranges()
            raise ValueError(f"`blocks` must be 'model', 'layer' or a positive int, got {spec!r}")
        if spec <= 0:
            raise ValueError(f"`blocks` chunk size must be positive, got {spec}")
        out: list[tuple[int, int]] = []
        for s, e in self.layer_ranges():
            out.extend((a, min(a + int(spec), e)) for a in range(s, e, int(spec)))
        return tuple(out)

    # ----- params <-> flat vector -----------------------------------------------------------------
    def _check(self, params: PyTree, name: str = "params") -> list:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.treedef:
            raise ValueError(
                f"`{name}` does not have the structure of the params this layout was built from: "
                f"expected {self.treedef}, got {treedef}"
            )
        return leaves

    def check_finite(self, params: PyTree, name: str = "params") -> None:
        """Raise ``ValueError`` naming the prunable layers of ``params`` that hold NaN or Inf."""
        leaves = self._check(params, name)
        flags = jax.device_get([jnp.all(jnp.isfinite(jnp.asarray(leaves[i]))) for i in self.leaf_ids])
        bad = [n for n, ok in zip(self.names, flags) if not ok]
        if bad:
            raise ValueError(f"`{name}` contain NaN or Inf in prunable layer(s) {bad}")

    def ravel(self, params: PyTree) -> jax.Array:
        """Concatenate the prunable leaves of ``params`` into one (D,) vector (see module doc)."""
        leaves = self._check(params)
        return jnp.concatenate(
            [jnp.ravel(jnp.asarray(leaves[i])).astype(self.dtype) for i in self.leaf_ids]
        )

    def unravel(self, vec: jax.Array, params: PyTree) -> PyTree:
        """Return a copy of ``params`` whose prunable leaves are taken from the (D,) vector ``vec``.

        Each leaf keeps its own shape and dtype; non-prunable leaves are passed through.
        """
        leaves = list(self._check(params))
        for j, i in enumerate(self.leaf_ids):
            s, e = self.offsets[j], self.offsets[j + 1]
            leaves[i] = vec[s:e].reshape(self.shapes[i]).astype(self.dtypes[i])
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def to_masks(self, keep: jax.Array) -> PyTree:
        """Bool keep-mask pytree (True = kept) from a (D,) keep vector; non-prunable leaves all True."""
        out = []
        j = 0
        for i, shape in enumerate(self.shapes):
            if self.prunable[i]:
                s, e = self.offsets[j], self.offsets[j + 1]
                out.append(jnp.asarray(keep[s:e]).reshape(shape))
                j += 1
            else:
                out.append(jnp.ones(shape, bool))
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def from_masks(self, masks: PyTree) -> jax.Array:
        """(D,) keep vector from a bool mask pytree with the params' structure."""
        leaves = self._check(masks, "masks")
        for i in self.leaf_ids:
            if tuple(np.shape(leaves[i])) != self.shapes[i]:
                raise ValueError(
                    f"`masks` leaf {self.paths[i]} has shape {np.shape(leaves[i])}, "
                    f"expected {self.shapes[i]}"
                )
        return jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], bool)) for i in self.leaf_ids])

    def per_layer_sparsity(self, keep) -> dict[str, float]:
        """Fraction of zeroed (pruned) weights per prunable leaf, from a (D,) keep vector."""
        keep = np.asarray(keep)
        return {
            name: float(1.0 - keep[s:e].mean()) if e > s else 0.0
            for name, (s, e) in zip(self.names, self.layer_ranges())
        }


def _collection_filter(params: PyTree) -> Callable[[tuple], bool]:
    """Restrict to the 'params' collection when given a whole Flax variables dict."""
    if isinstance(params, dict) and "params" in params and len(params) > 1:

        def under_params(keypath) -> bool:
            first = keypath[0]
            return getattr(first, "key", getattr(first, "name", None)) == "params"

        return under_params
    return lambda keypath: True


def leaf_name(path: str) -> str:
    """A leaf's ``keystr`` path as ``/``-joined names: ``"params/Dense_0/kernel"`` (nnx: ``"l1/kernel"``)."""
    if path.endswith(".value"):  # flax.nnx State leaves: "['l1']['kernel'].value"
        path = path[: -len(".value")]
    return "/".join(re.findall(r"[^\[\]'\".]+", path))


def make_layout(params: PyTree, prunable: Prunable = None, exclude: Exclude = None) -> Layout:
    """Build the static :class:`Layout` of ``params``.

    Args:
      params: any parameter pytree (a linen params dict, a whole linen variables dict with
        ``'params'`` and ``'batch_stats'``, or a ``flax.nnx.State``).
      prunable: which leaves are prunable. ``None`` uses :func:`default_prunable` (floating leaves
        with ``ndim >= 2``, under ``'params'`` if the tree has such a collection); a callable
        ``prunable(path: str, leaf) -> bool`` receives ``jax.tree_util.keystr`` of each leaf path;
        or a pytree of Python/NumPy bools with the structure of ``params``.
      exclude: leaves left dense, by name (:func:`leaf_name`: ``"params/Dense_1/kernel"``): a
        regex or a list of them searched in the name, or ``callable(name) -> bool``; the layer
        half's ``exclude``. A pattern that matches no leaf raises.

    Raises:
      ValueError: if ``params`` is empty, ``prunable`` has the wrong structure, a chosen leaf is not
        a floating array, or no leaf is prunable.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not path_leaves:
        raise ValueError("`params` is an empty pytree: there is nothing to prune")
    paths = tuple(jax.tree_util.keystr(kp) for kp, _ in path_leaves)
    leaves = [leaf for _, leaf in path_leaves]
    if prunable is None:
        in_coll = _collection_filter(params)
        flags = [
            bool(in_coll(kp) and default_prunable(p, leaf))
            for (kp, leaf), p in zip(path_leaves, paths)
        ]
    elif callable(prunable):
        flags = [bool(prunable(p, leaf)) for p, leaf in zip(paths, leaves)]
    else:
        pl, ptd = jax.tree_util.tree_flatten(prunable)
        if not same_structure(ptd, treedef):
            raise ValueError(
                "`prunable` must be a callable or a bool pytree with the structure of `params`; "
                f"got structure {ptd}, expected {treedef}"
            )
        flags = [bool(np.all(np.asarray(x))) for x in pl]
    if exclude is not None:
        skip = Excluder(exclude)
        names = [leaf_name(p) for p in paths]
        dense = [skip(n) for n in names]
        flags = [f and not d for f, d in zip(flags, dense)]
        skip.check_used(names)
    for p, leaf, f in zip(paths, leaves, flags):
        if f and not _is_floating(leaf):
            raise ValueError(f"`prunable` selects leaf {p}, which is not a floating-point array")
    if not any(flags):
        raise ValueError(
            "no prunable leaves: by default only floating leaves with ndim >= 2 (kernels) are "
            "pruned; pass `prunable=` to choose leaves explicitly"
        )
    return Layout(
        treedef=treedef,
        paths=paths,
        prunable=tuple(flags),
        shapes=tuple(tuple(int(d) for d in np.shape(x)) for x in leaves),
        dtypes=tuple(str(jnp.asarray(x).dtype) if hasattr(x, "dtype") else "float32" for x in leaves),
    )
