import jax

# Oracles and tiny-problem checks run in float64; model tests still use float32 params.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop every compiled program after each test module: the suite compiles thousands of
    programs in one process, and XLA's CPU compiler segfaulted (rarely, in different tests) late
    in fresh-clone CI runs that kept them all."""
    yield
    jax.clear_caches()
