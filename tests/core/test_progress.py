import sys

import pytest

import cobs_jax
from cobs_jax._core.progress import progress
from helpers import linen_setup


def test_progress_off_is_the_iterable_itself():
    it = [1, 2, 3]
    assert progress(it, False) is it


def test_plain_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(progress(iter("ab"), True, 2, "demo")) == ["a", "b"]
    out = capsys.readouterr().out
    assert "demo: 1/2" in out and "demo: 2/2" in out


@pytest.mark.parametrize("call", ["prune", "prune_gradual"])
def test_long_calls_report_progress(call, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    params, loss_fn, batch = linen_setup(n=32)
    if call == "prune":
        cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="cbs", chunk_size=8, progress=True)
        out = capsys.readouterr().out
        assert "per-example gradients (chunks): 4/4" in out and "CBS local search pass 1:" in out
    else:
        cobs_jax.prune_multistage(params, loss_fn, batch, sparsity=0.5, stages=3, update="cbs", progress=True)
        assert "prune_gradual stage 3: pruned 21/42" in capsys.readouterr().out  # from the compiled loop
        cobs_jax.prune_gradual(params, loss_fn, batch, sparsity=0.5, stages=3, update="cbs", progress=True,
                               compiled=False)
        assert "prune_gradual (3 stages): 3/3" in capsys.readouterr().out
    res = cobs_jax.prune(params, loss_fn, batch, sparsity=0.5, method="woodfisher", chunk_size=8)
    assert capsys.readouterr().out == "" and res.sparsity == pytest.approx(0.5, abs=0.02)
