"""Fashion-MNIST IDX parsing, checksums, offline failure and the digits fallback.

Every file here is built by the tests; nothing is downloaded (mirrors are file:// URLs or
patched to fail).
"""

import gzip
import hashlib
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from jaxfit import datasets
from jaxfit.datasets import (
    ChecksumError,
    DatasetError,
    DatasetUnavailableError,
    fetch_fashion_mnist,
    load_digits_images,
    load_fashion_mnist,
    load_image_dataset,
    read_idx,
)


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fake_fashion(folder: Path, n_train=6, n_test=4, seed=0) -> dict:
    """Writes four tiny gzip IDX files named like Fashion-MNIST's; returns name -> (md5, size)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_train, 28, 28), np.uint8), 8),
        "train-labels-idx1-ubyte.gz": (rng.integers(0, 10, n_train).astype(np.uint8), 8),
        "t10k-images-idx3-ubyte.gz": (rng.integers(0, 256, (n_test, 28, 28), np.uint8), 8),
        "t10k-labels-idx1-ubyte.gz": (rng.integers(0, 10, n_test).astype(np.uint8), 8),
    }
    table = {}
    for name, (array, code) in arrays.items():
        blob = gzip.compress(idx_bytes(array, code))
        (folder / name).write_bytes(blob)
        table[name] = ("md5:" + hashlib.md5(blob).hexdigest(), len(blob))
    return {"table": table, "arrays": {k: v[0] for k, v in arrays.items()}}


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    made = write_fake_fashion(tmp_path / "src")
    for name, entry in made["table"].items():
        monkeypatch.setitem(datasets.FASHION_MNIST_FILES, name, entry)
    return tmp_path / "src", made["arrays"]


@pytest.fixture
def offline(monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", refuse)


@pytest.mark.parametrize(
    "dtype, code",
    [("u1", 0x08), ("i1", 0x09), ("i2", 0x0B), ("i4", 0x0C), ("f4", 0x0D), ("f8", 0x0E)],
)
def test_read_idx_round_trips_every_type_code(tmp_path, dtype, code):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "u1":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array, code))
    got = read_idx(tmp_path / "a.idx")
    np.testing.assert_array_equal(got, array)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative


def test_read_idx_reads_gzip_by_suffix(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), array)


def test_read_idx_rejects_bad_magic(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DatasetError, match="is not an IDX file"):
        read_idx(tmp_path / "a.idx")


def test_read_idx_rejects_unknown_type_code(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DatasetError, match="unknown IDX type code 0x07"):
        read_idx(tmp_path / "a.idx")


def test_read_idx_rejects_truncated_data(tmp_path):
    blob = idx_bytes(np.zeros((2, 3), np.uint8), 0x08)[:-1]
    (tmp_path / "a.idx").write_bytes(blob)
    with pytest.raises(DatasetError, match=r"declares shape \(2, 3\).*holds 5"):
        read_idx(tmp_path / "a.idx")


def test_read_idx_rejects_broken_gzip(tmp_path):
    (tmp_path / "a.idx.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read IDX file"):
        read_idx(tmp_path / "a.idx.gz")


def test_load_fashion_mnist_from_a_directory(fake_fashion, offline):
    folder, arrays = fake_fashion
    data = load_fashion_mnist(folder)
    assert data.name == "fashion_mnist" and data.fallback_reason is None
    assert data.x_train.shape == (6, 28, 28, 1) and data.x_val.shape == (4, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    expected = arrays["train-images-idx3-ubyte.gz"].astype(np.float32) / 255.0
    np.testing.assert_allclose(data.x_train[..., 0], expected)
    np.testing.assert_array_equal(data.y_val, arrays["t10k-labels-idx1-ubyte.gz"])
    assert data.classes[9] == "Ankle boot"


def test_corrupt_file_on_disk_raises_checksum_error(fake_fashion):
    folder, _ = fake_fashion
    path = folder / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # same size, different content: only the hash can tell
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match=r"t10k-labels.*md5 [0-9a-f]{32}, expected"):
        load_fashion_mnist(folder, download=False)


def test_wrong_size_raises_checksum_error_naming_sizes(fake_fashion):
    folder, _ = fake_fashion
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ChecksumError, match=r"bytes, expected \d+.*Delete it"):
        fetch_fashion_mnist(folder)


def test_download_from_mirror_fills_the_cache(fake_fashion, tmp_path, monkeypatch):
    source, arrays = fake_fashion
    monkeypatch.setenv("JAXFIT_DATA", str(tmp_path / "cache"))
    bad_mirror = (tmp_path / "no_such_mirror").as_uri() + "/"
    folder = fetch_fashion_mnist(mirrors=[bad_mirror, source.as_uri() + "/"])
    assert folder == tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == sorted(datasets.FASHION_MNIST_FILES)
    data = load_fashion_mnist(download=False)
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte.gz"])


def test_download_with_wrong_checksum_leaves_no_file(fake_fashion, tmp_path, monkeypatch):
    source, _ = fake_fashion
    name = "train-images-idx3-ubyte.gz"
    checksum, size = datasets.FASHION_MNIST_FILES[name]
    monkeypatch.setitem(datasets.FASHION_MNIST_FILES, name, ("md5:" + "0" * 32, size))
    dest = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError, match=r"does not match the published checksum"):
        fetch_fashion_mnist(dest, mirrors=[source.as_uri() + "/"])
    assert list(dest.iterdir()) == []  # neither the final name nor a .part file is left


def test_offline_message_says_what_to_do(tmp_path, offline):
    with pytest.raises(DatasetUnavailableError) as info:
        fetch_fashion_mnist(tmp_path / "cache")
    message = str(info.value)
    assert "could not be downloaded (offline?)" in message
    assert "Name or service not known" in message
    assert str(tmp_path / "cache") in message and "JAXFIT_DATA" in message
    assert info.value.summary.endswith("could not be downloaded (offline?)")


def test_download_false_never_touches_the_network(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("urlopen called with download=False")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", fail)
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        fetch_fashion_mnist(tmp_path, download=False)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXFIT_DATA", str(tmp_path / "d"))
    assert datasets.default_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("JAXFIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.default_cache_dir() == tmp_path / "xdg" / "jaxfit"


def test_digits_images_are_8x8x1_in_unit_range():
    data = load_digits_images(val_fraction=0.25, seed=1)
    assert data.x_train.shape[1:] == (8, 8, 1) and data.x_train.dtype == np.float32
    assert len(data.x_train) + len(data.x_val) == 1797 and len(data.x_val) == 449
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert set(np.unique(data.y_train)) == set(range(10))


def test_digits_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got"):
        load_digits_images(val_fraction=1.0)


def test_image_dataset_falls_back_to_digits_and_says_why(tmp_path, offline):
    data = load_image_dataset(tmp_path / "empty")
    assert data.name == "digits"
    assert "scikit-learn digits" in data.fallback_reason
    assert "offline?" in data.fallback_reason
    assert data.fallback_reason in data.describe()


def test_image_dataset_uses_fashion_mnist_when_present(fake_fashion, offline):
    folder, _ = fake_fashion
    data = load_image_dataset(folder)
    assert data.name == "fashion_mnist" and data.fallback_reason is None
    assert data.subset(3, 2).x_train.shape == (3, 28, 28, 1)


def test_sha256_checksums_are_verified_too(fake_fashion, monkeypatch):
    folder, _ = fake_fashion
    name = "t10k-labels-idx1-ubyte.gz"
    blob = (folder / name).read_bytes()
    good = "sha256:" + hashlib.sha256(blob).hexdigest()
    monkeypatch.setitem(datasets.FASHION_MNIST_FILES, name, (good, len(blob)))
    assert fetch_fashion_mnist(folder, download=False) == folder
    monkeypatch.setitem(datasets.FASHION_MNIST_FILES, name, ("sha256:" + "f" * 64, len(blob)))
    with pytest.raises(ChecksumError, match=r"sha256 [0-9a-f]{64}, expected f{64}"):
        fetch_fashion_mnist(folder, download=False)
