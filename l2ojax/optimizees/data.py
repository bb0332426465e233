"""Data sets for the optimizees, loaded once into compact device arrays.

Images stay uint8 on the device (a quarter of the float32 size) and are
normalised inside the jitted loss. Sources:

* ``tfds``: tensorflow-datasets (downloads on first use, needs the network);
* ``npz``: a local ``.npz`` file with ``images`` (uint8, [N, H, W] or
  [N, H, W, C]) and ``labels`` (integers, [N]);
* ``auto``: ``npz`` when a path is given, else ``tfds``.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np

SOURCES = ("auto", "tfds", "npz")


class DataUnavailableError(RuntimeError):
  """A data set could not be had; the message says how to get it."""


class Dataset(NamedTuple):
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]


def _how_to_get(name: str) -> str:
  return (f"To get {name!r}: run once on a machine with internet access so that "
          f"tensorflow-datasets can download it (or set data.data_dir to a folder "
          f"where `tfds build {name}` has prepared it), or pass a local file with "
          f"data.source='npz' and data.path=FILE.npz holding uint8 `images` "
          f"[N, H, W(, C)] and integer `labels` [N].")


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


def load_npz(path: str) -> Dataset:
  if not os.path.exists(path):
    raise DataUnavailableError(f"data.path={path!r} does not exist.")
  with np.load(path) as f:
    missing = {"images", "labels"} - set(f.files)
    if missing:
      raise ValueError(f"{path}: missing arrays {sorted(missing)}; it holds {sorted(f.files)}")
    images, labels = _as_nhwc(f["images"]), np.asarray(f["labels"]).astype(np.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
  return Dataset(images, labels)


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # a declared dependency; say so rather than guess
    raise DataUnavailableError(
        f"tensorflow-datasets is not installed (pip install tensorflow-datasets). "
        + _how_to_get(name)) from e
  try:
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
  """Loads data set ``name`` (a tfds name, e.g. "mnist") from ``source``.

  The paper trains its MNIST optimizees on MNIST's 10k test split, hence the
  default split.
  """
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r}; allowed: {SOURCES}")
  if source == "auto":
    source = "npz" if path else "tfds"
  if source == "npz":
    if not path:
      raise ValueError("data.source='npz' needs data.path")
    return load_npz(path)
  return load_tfds(name, split, data_dir or None)
