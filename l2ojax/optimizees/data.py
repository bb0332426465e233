"""Data sets for the optimizees, loaded once into compact device arrays.

Images stay uint8 on the device (a quarter of the float32 size) and are
normalised inside the jitted loss. Sources:

* ``tfds``: tensorflow-datasets (downloads on first use, needs the network);
* ``npz``: a local ``.npz`` file with ``images`` (uint8, [N, H, W] or
  [N, H, W, C]) and ``labels`` (integers, [N]);
* ``idx``: a folder of the standard IDX files of MNIST and Fashion-MNIST
  (``train-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, ..., gzipped
  or not), e.g. Debian's ``dataset-fashion-mnist`` at
  /usr/share/datasets/fashion-mnist; split ``train`` or ``test``;
* ``auto``: ``idx`` when the path is a folder, ``npz`` when it is a file,
  ``tfds`` when no path is given.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import NamedTuple

import numpy as np

SOURCES = ("auto", "tfds", "npz", "idx")
IDX_SPLITS = {"train": "train", "test": "t10k"}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DataUnavailableError(RuntimeError):
  """A data set could not be had; the message says how to get it."""


class Dataset(NamedTuple):
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]


def _how_to_get(name: str) -> str:
  text = (f"To get {name!r}: run once on a machine with internet access so that "
          f"tensorflow-datasets can download it (or set data.data_dir to a folder "
          f"where `tfds build {name}` has prepared it, and copy that folder to the "
          f"offline machine), or pass a local file with data.source='npz' and "
          f"data.path=FILE.npz holding uint8 `images` [N, H, W(, C)] and integer "
          f"`labels` [N]")
  if name in ("mnist", "fashion_mnist"):
    text += (", or a folder of the IDX files (train-images-idx3-ubyte.gz, ...) with "
             "data.source='idx' and data.path=FOLDER")
  if name == "fashion_mnist":
    text += (f"; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
             f"{DEBIAN_FASHION_MNIST}")
  return text + "."


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"images must have shape [N, H, W] or [N, H, W, C], got {images.shape}")
  if images.dtype != np.uint8:
    if images.dtype.kind == "f" and images.size and images.max() <= 1.0:
      images = np.round(images * 255.0)
    images = np.clip(images, 0, 255).astype(np.uint8)
  return images


def load_npz(path: str, name: str = "mnist") -> Dataset:
  if not os.path.isfile(path):
    raise DataUnavailableError(f"data.path={path!r} does not exist. " + _how_to_get(name))
  with np.load(path) as f:
    missing = {"images", "labels"} - set(f.files)
    if missing:
      raise ValueError(f"{path}: missing arrays {sorted(missing)}; it holds {sorted(f.files)}")
    images, labels = _as_nhwc(f["images"]), np.asarray(f["labels"]).astype(np.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
  return Dataset(images, labels)


def _read_idx(path: str) -> np.ndarray:
  """One IDX file (gzipped or not): magic 0x0000 0x08 (uint8) ndim, then big-endian dims."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path}: not a uint8 IDX file (magic bytes {raw[:4]!r})")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says shape {dims} but holds {data.size} values")
  return data.reshape(dims)


def _find_idx(folder: str, stem: str) -> str | None:
  for name in (f"{stem}.gz", stem):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def load_idx(folder: str, split: str = "train", name: str = "fashion_mnist") -> Dataset:
  """A folder of IDX files: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
  if split not in IDX_SPLITS:
    raise ValueError(f"data.split={split!r} is not an IDX split; allowed: {sorted(IDX_SPLITS)}")
  if not os.path.isdir(folder):
    raise DataUnavailableError(f"data.path={folder!r} is not a folder of IDX files. "
                               + _how_to_get(name))
  prefix = IDX_SPLITS[split]
  paths = [_find_idx(folder, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
  if None in paths:
    raise DataUnavailableError(
        f"data.path={folder!r} lacks {prefix}-images-idx3-ubyte[.gz] or "
        f"{prefix}-labels-idx1-ubyte[.gz] (it holds {sorted(os.listdir(folder))[:8]}). "
        + _how_to_get(name))
  images, labels = _as_nhwc(_read_idx(paths[0])), _read_idx(paths[1]).astype(np.int32)
  if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"{folder}: images {images.shape} do not match labels {labels.shape}")
  return Dataset(images, labels)


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # a declared dependency; say so rather than guess
    raise DataUnavailableError(
        f"tensorflow-datasets is not installed (pip install tensorflow-datasets). "
        + _how_to_get(name)) from e
  try:
    # data_source reads ArrayRecord files with no TensorFlow at run time.
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # network, missing builder files, ...
    raise DataUnavailableError(
        f"tensorflow-datasets could not load {name!r} split {split!r} "
        f"({type(e).__name__}: {str(e)[:300]}). " + _how_to_get(name)) from e
  images = _as_nhwc(np.stack([ex["image"] for ex in examples]))
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return Dataset(images, labels)


@functools.lru_cache(maxsize=8)
def load(name: str, source: str = "auto", path: str = "", split: str = "test",
         data_dir: str = "") -> Dataset:
  """Loads data set ``name`` (a tfds name: "mnist", "fashion_mnist", "cifar10") from ``source``.

  The paper trains its MNIST optimizees on MNIST's 10k test split, hence the
  default split. ``split`` selects the IDX files and the tfds split; an npz
  file is one split already.
  """
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r}; allowed: {SOURCES}")
  if source == "auto":
    source = ("idx" if os.path.isdir(path) else "npz") if path else "tfds"
  if source in ("npz", "idx") and not path:
    raise ValueError(f"data.source={source!r} needs data.path. " + _how_to_get(name))
  if source == "npz":
    return load_npz(path, name)
  if source == "idx":
    return load_idx(path, split, name)
  return load_tfds(name, split, data_dir or None)
