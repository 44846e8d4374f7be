import os
import pathlib
import shutil
import sys
import tempfile

# tests/ mirrors the package (core/, fisher/, layer/); helpers and the shared test models import
# from any of them by module name
_HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(_HERE)] + [str(_HERE / d) for d in ("core", "fisher", "layer")]

# The suite compiles thousands of tiny programs, where XLA's CPU backend spends far more time
# optimising than running them: compile them with LLVM's cheap pipeline (the programs and their
# numerics are XLA's; only the machine code is less optimised), and keep every compiled program in a
# per-run persistent cache, so a program compiled again in a later module (the in-memory caches are
# cleared after every module, see below) is read back, not rebuilt.
_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if _FAST not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
_OWN_CACHE = "COBS_JAX_TEST_CACHE" not in os.environ  # subprocesses of the suite share the parent's
if _OWN_CACHE:
    os.environ["COBS_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="cobs_jax_xla_cache_")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["COBS_JAX_TEST_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
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


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["COBS_JAX_TEST_CACHE"], ignore_errors=True)
