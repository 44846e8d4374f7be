import jax

# Oracles and tiny-problem checks run in float64; model tests still use float32 params.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
