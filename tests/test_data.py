"""Data loading: IDX folders, npz files, tfds (through its own mock facility), real files."""
import gzip
import os

import jax
import numpy as np
import optax
import pytest

from l2ojax import optimizees
from l2ojax.meta.unroll import rollout
from l2ojax.optimizees import data

FASHION = data.DEBIAN_FASHION_MNIST


def _write_idx(path, array, gz=True):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.fixture
def idx_folder(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
    images = rng.integers(0, 256, (n, 6, 7)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    arrays[prefix] = (images, labels)
  return tmp_path, arrays


def test_idx_folder_loads_both_splits_gzipped_or_not(idx_folder):
  folder, arrays = idx_folder
  for split, prefix in (("train", "train"), ("test", "t10k")):
    for source in ("idx", "auto"):
      ds = data.load("fashion_mnist", source=source, path=str(folder), split=split)
      images, labels = arrays[prefix]
      assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
      np.testing.assert_array_equal(ds.images, images[..., None])
      np.testing.assert_array_equal(ds.labels, labels)


def test_idx_errors_say_what_is_wrong(idx_folder, tmp_path_factory):
  folder, _ = idx_folder
  with pytest.raises(ValueError, match="data.split='validation'"):
    data.load("fashion_mnist", source="idx", path=str(folder), split="validation")
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", source="idx", path=str(empty), split="train")
  with pytest.raises(data.DataUnavailableError, match="not a folder"):
    data.load("mnist", source="idx", path=str(empty / "nope"), split="train")
  with pytest.raises(ValueError, match="needs data.path"):
    data.load("fashion_mnist", source="idx")
  bad = tmp_path_factory.mktemp("bad")
  (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
  (bad / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
  with pytest.raises(ValueError, match="not a uint8 IDX file"):
    data.load("mnist", source="idx", path=str(bad), split="train")
  truncated = tmp_path_factory.mktemp("truncated")
  _write_idx(truncated / "train-labels-idx1-ubyte.gz", np.zeros(3))
  with gzip.open(truncated / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 3]) + np.asarray([3, 2, 2], ">u4").tobytes() + b"\x00" * 5)
  with pytest.raises(ValueError, match="holds 5 values"):
    data.load("mnist", source="idx", path=str(truncated), split="train")


def test_npz_color_images_stay_nhwc_uint8(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (9, 4, 4, 3)).astype(np.uint8)
  np.savez(tmp_path / "c.npz", images=images, labels=np.arange(9))
  ds = data.load("cifar10", path=str(tmp_path / "c.npz"))
  np.testing.assert_array_equal(ds.images, images)
  with pytest.raises(data.DataUnavailableError, match="tfds build cifar10"):
    data.load("cifar10", path=str(tmp_path / "missing.npz"))


def test_tfds_loading_through_tfds_mock_data():
  """tfds's own mock (patches DatasetBuilder.as_data_source): no network, no TensorFlow."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data.load.cache_clear()
  try:
    with tfds.testing.mock_data(num_examples=12):
      mnist = data.load("mnist", source="tfds", split="test")
      cifar = data.load("cifar10", source="auto", split="train")
      net = optimizees.get("cifar_conv", source="tfds", split="train", batch_size=8)
  finally:
    data.load.cache_clear()  # never leave mocked arrays in the cache for other tests
  assert mnist.images.shape == (12, 28, 28, 1) and mnist.images.dtype == np.uint8
  assert cifar.images.shape == (12, 32, 32, 3) and cifar.labels.dtype == np.int32
  assert mnist.labels.shape == (12,) and 0 <= mnist.labels.min() and mnist.labels.max() < 10
  params, inst = net.init(jax.random.PRNGKey(0))
  assert np.isfinite(float(net.loss(params, inst, jax.random.PRNGKey(1))))


def test_fashion_mlp_trains_on_the_real_debian_idx_files(debian_fashion_mnist):
  """CI installs dataset-fashion-mnist; elsewhere the skip names the package."""
  for split, n in (("test", 10000), ("train", 60000)):
    ds = data.load("fashion_mnist", source="idx", path=FASHION, split=split)
    assert ds.images.shape == (n, 28, 28, 1) and sorted(set(ds.labels.tolist())) == list(range(10))
    assert np.bincount(ds.labels).min() == n // 10  # Fashion-MNIST is balanced
  opt = optimizees.get("fashion_mlp", path=FASHION, split="test")
  assert opt.images.shape == (10000, 784)
  losses = np.asarray(jax.jit(lambda k: rollout(optax.adam(1e-2), opt, k, 40))(
      jax.random.PRNGKey(0)))
  assert abs(losses[0] - np.log(10)) < 0.1
  assert np.mean(losses[-5:]) < 0.7 * losses[0], losses
