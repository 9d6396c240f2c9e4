"""Small image datasets for examples and quick experiments.

Fashion-MNIST is read from the standard IDX files (gzip or raw). When they are missing they are
downloaded once into a cache directory and checked against the published checksums. Offline, the
loader fails with a message that says where to put the files by hand. scikit-learn's digits
(8x8 grey images, shipped inside scikit-learn) are the fallback that always works.

Example:
    >>> from jaxfit.datasets import load_image_dataset
    >>> data = load_image_dataset(download=False)
    >>> data.x_train.ndim, data.x_train.dtype.name
    (4, 'float32')
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "DatasetError",
    "ChecksumError",
    "DatasetUnavailableError",
    "ImageDataset",
    "FASHION_MNIST_CLASSES",
    "default_cache_dir",
    "read_idx",
    "fetch_fashion_mnist",
    "load_fashion_mnist",
    "load_digits_images",
    "load_image_dataset",
]


class DatasetError(RuntimeError):
    """A dataset file is malformed or cannot be obtained."""


class ChecksumError(DatasetError):
    """A dataset file does not match its published checksum."""


class DatasetUnavailableError(DatasetError):
    """The dataset is neither on disk nor downloadable (offline, or downloads disabled).

    Attributes:
        summary: one line saying what is missing, for logs and fallback notices.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary if summary is not None else message.splitlines()[0]


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# The files and checksums published with Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017). MD5 is
# what the authors publish; sizes catch a truncated download before hashing.
FASHION_MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte.gz": ("md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26421880),
    "train-labels-idx1-ubyte.gz": ("md5:25c81989df183df01b3e8a0aad5dffbe", 29515),
    "t10k-images-idx3-ubyte.gz": ("md5:bef4ecab320f06d8554ea6380940ec79", 4422102),
    "t10k-labels-idx1-ubyte.gz": ("md5:bb300cfdad3c16e7a12a480ee83cd310", 5148),
}
FASHION_MNIST_MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train and validation images, NHWC float32 in [0, 1], with int32 labels.

    Attributes:
        name: ``"fashion_mnist"`` or ``"digits"``.
        x_train, y_train, x_val, y_val: the arrays.
        classes: the class names, indexed by label.
        fallback_reason: why the preferred dataset was not used, or ``None``.

    Example:
        >>> data = load_digits_images()
        >>> data.x_train.shape[1:], data.num_classes
        ((8, 8, 1), 10)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: tuple[str, ...]
    fallback_reason: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int, n_val: int) -> ImageDataset:
        """The first ``n_train`` / ``n_val`` examples (already shuffled by the loaders)."""
        return ImageDataset(
            self.name, self.x_train[:n_train], self.y_train[:n_train],
            self.x_val[:n_val], self.y_val[:n_val], self.classes, self.fallback_reason,
        )  # fmt: skip

    def describe(self, with_reason: bool = True) -> str:
        """One line for logs: name, shapes, and the fallback reason when there is one."""
        shape = "x".join(str(d) for d in self.x_train.shape[1:])
        text = f"{self.name}: {len(self.x_train)} train / {len(self.x_val)} val images {shape}"
        if self.fallback_reason is None or not with_reason:
            return text
        return f"{text} ({self.fallback_reason})"


def default_cache_dir() -> Path:
    """Where datasets are cached: ``$JAXFIT_DATA``, else ``$XDG_CACHE_HOME/jaxfit``, else
    ``~/.cache/jaxfit``."""
    if os.environ.get("JAXFIT_DATA"):
        return Path(os.environ["JAXFIT_DATA"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxfit"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (gzip-compressed when its name ends in ``.gz``) into a numpy array.

    Args:
        path: the file.

    Returns:
        An array with the file's shape, in native byte order.

    Raises:
        DatasetError: the file is not valid IDX (bad magic, unknown type, wrong length).

    Example:
        >>> import tempfile, os, numpy as np
        >>> f = os.path.join(tempfile.mkdtemp(), "a.idx")
        >>> _ = open(f, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]))
        >>> read_idx(f)
        array([7, 9], dtype=uint8)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(
            f"{path} is not an IDX file: it should start with two zero bytes, a type code and "
            f"the number of dimensions, got {raw[:4]!r}."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known}).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header}).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: the header declares shape {shape} of {dtype.name} ({expected} bytes of "
            f"data) but the file holds {len(raw) - header}: the file is truncated or corrupt. "
            "Delete it so that it is downloaded again."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, checksum: str, size: int | None) -> None:
    """Raises ChecksumError unless ``path`` has ``size`` bytes and the ``"algo:hex"`` checksum."""
    algorithm, _, expected = checksum.partition(":")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        got = f"{actual_size} bytes, expected {size}"
    else:
        actual = _digest(path, algorithm)
        if actual == expected.lower():
            return
        got = f"{algorithm} {actual}, expected {expected}"
    raise ChecksumError(
        f"{path} does not match the published checksum ({got}): the file is corrupt or not "
        "the one published. Delete it so that it is downloaded again."
    )


def _download(name: str, dest: Path, mirrors: Sequence[str], timeout: float) -> None:
    """Downloads ``name`` from the first mirror that answers into ``dest``, atomically."""
    checksum, size = FASHION_MNIST_FILES[name]
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        # Write next to the destination, check, then rename: an interrupted or corrupt download
        # never leaves a file under the final name.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    out.write(chunk)
            _verify(Path(tmp), checksum, size)
            os.replace(tmp, dest)
            return
        except ChecksumError as e:
            errors.append(f"{url}: {e}")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    tried = "\n  ".join(errors)
    summary = (
        f"Fashion-MNIST file {name} is not in {dest.parent} and could not be downloaded (offline?)"
    )
    raise DatasetUnavailableError(
        f"{summary}; tried:\n  {tried}\n"
        f"If this machine is offline, download the four files {sorted(FASHION_MNIST_FILES)} "
        f"on a machine with network access and copy them into {dest.parent} (or pass "
        "data_dir=..., or set JAXFIT_DATA to the folder that holds them).",
        summary,
    )


def fetch_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] = FASHION_MNIST_MIRRORS,
    timeout: float = 30.0,
) -> Path:
    """Makes sure the four Fashion-MNIST files are in ``data_dir`` and match their checksums.

    Args:
        data_dir: the folder with the IDX files; ``None`` uses :func:`default_cache_dir`.
        download: fetch missing files from ``mirrors``; when False a missing file raises.
        mirrors: base URLs tried in order for each missing file.
        timeout: seconds to wait for a mirror to answer.

    Returns:
        The folder holding the verified files.

    Raises:
        DatasetUnavailableError: a file is missing and cannot be downloaded.
        ChecksumError: a file on disk is not the published one.
    """
    folder = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    missing = [name for name in FASHION_MNIST_FILES if not (folder / name).exists()]
    if missing and not download:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files {missing} are not in {folder} and download=False. Put the "
            "IDX files there, or call with download=True.",
            f"Fashion-MNIST is not in {folder} (downloads disabled)",
        )
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
    for name, (checksum, size) in FASHION_MNIST_FILES.items():
        if name in missing:
            _download(name, folder / name, mirrors, timeout)
        else:
            _verify(folder / name, checksum, size)
    return folder


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] = FASHION_MNIST_MIRRORS,
    timeout: float = 30.0,
) -> ImageDataset:
    """Loads Fashion-MNIST: 60,000 train and 10,000 test images of 28x28x1 in [0, 1].

    The test split is returned as the validation split (``x_val``, ``y_val``), in file order.

    Args:
        data_dir, download, mirrors, timeout: as for :func:`fetch_fashion_mnist`.

    Raises:
        DatasetUnavailableError, ChecksumError: see :func:`fetch_fashion_mnist`.
        DatasetError: a file is not valid IDX, or images and labels disagree.
    """
    folder = fetch_fashion_mnist(data_dir, download=download, mirrors=mirrors, timeout=timeout)
    arrays = {}
    for split in ("train", "t10k"):
        images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{folder}: {split} images have shape {images.shape} and labels {labels.shape}; "
                "expected (N, rows, cols) images and N labels."
            )
        arrays[split] = (_to_unit_nhwc(images, 255.0), labels.astype(np.int32))
    (x_train, y_train), (x_val, y_val) = arrays["train"], arrays["t10k"]
    return ImageDataset("fashion_mnist", x_train, y_train, x_val, y_val, FASHION_MNIST_CLASSES)


def load_digits_images(val_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's digits (1,797 images) as 8x8x1 float32 in [0, 1], shuffled and split.

    Args:
        val_fraction: the share of images held out for validation, in (0, 1).
        seed: the seed of the shuffle.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1).
        ImportError: scikit-learn is not installed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction = {val_fraction}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'jaxfit[examples]'"
        ) from e
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    x = _to_unit_nhwc(digits.images[order], 16.0)  # digits pixels are 0..16
    y = digits.target[order].astype(np.int32)
    n_val = max(1, round(len(x) * val_fraction))
    classes = tuple(str(d) for d in range(10))
    return ImageDataset("digits", x[n_val:], y[n_val:], x[:n_val], y[:n_val], classes)


def load_image_dataset(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    timeout: float = 30.0,
) -> ImageDataset:
    """Fashion-MNIST when it can be had, else scikit-learn's digits with the reason recorded.

    Args:
        data_dir, download, timeout: as for :func:`fetch_fashion_mnist`.

    Returns:
        An :class:`ImageDataset`; ``fallback_reason`` says why digits were used, if they were.
        A corrupt Fashion-MNIST file is not a reason to fall back: it raises ChecksumError.
    """
    try:
        return load_fashion_mnist(data_dir, download=download, timeout=timeout)
    except DatasetUnavailableError as e:
        reason = f"using scikit-learn digits 8x8x1 instead: {e.summary}"
        data = load_digits_images()
        return ImageDataset(
            data.name, data.x_train, data.y_train, data.x_val, data.y_val, data.classes, reason
        )


def _to_unit_nhwc(images: np.ndarray, max_value: float) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(max_value))[..., None]
