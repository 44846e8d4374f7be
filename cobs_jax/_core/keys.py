"""PRNG keys as users pass them: ``None``, an int seed, a typed key or a legacy uint32 key."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_key"]


def as_key(key: Any, name: str = "key") -> jax.Array:
    """A typed PRNG key: ``None`` -> ``jax.random.key(0)``, an int -> ``jax.random.key(int)``,
    a typed key (``jax.random.key``) as is, a legacy ``uint32[2]`` key (``jax.random.PRNGKey``)
    wrapped. Anything else raises a ``ValueError`` naming the argument."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return jax.random.key(int(key))
    if isinstance(key, (jax.Array, np.ndarray)):
        arr = jnp.asarray(key)
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) and arr.shape == ():
            return arr
        if arr.dtype == jnp.uint32 and arr.shape == (2,):
            return jax.random.wrap_key_data(arr)
    raise ValueError(
        f"`{name}` must be None, an int seed or a single PRNG key (jax.random.key(seed)), got "
        f"{type(key).__name__}{getattr(key, 'shape', '')}"
    )
