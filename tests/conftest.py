import os
import tempfile

# Set before jax is imported (here and in the subprocesses tests start, which
# inherit the environment). Tests run on the CPU; keep XLA from grabbing all
# threads of a 2-core machine.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
# Many tests build the same meta-step again (each train() call, each killed and
# resumed subprocess): a persistent compilation cache compiles it once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"l2ojax-test-xla-cache-{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_image_npz(tmp_path_factory):
  """A small learnable image set: the label is the brightest of 10 vertical bands."""
  rng = np.random.default_rng(0)
  n, h, w = 512, 8, 10
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.integers(0, 60, (n, h, w)).astype(np.uint8)
  images[np.arange(n), :, labels] = 250
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, images=images, labels=labels)
  return str(path)


@pytest.fixture
def debian_fashion_mnist() -> str:
  """Debian's dataset-fashion-mnist folder: required on CI (.ci/run installs it), skipped
  with the install command elsewhere."""
  from l2ojax.optimizees import data
  folder = data.DEBIAN_FASHION_MNIST
  names = [f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k")
           for k, d in (("images", 3), ("labels", 1))]
  if not all(os.path.isfile(os.path.join(folder, n)) for n in names):
    if os.environ.get("CI"):
      pytest.fail(f"{folder} is missing on CI: apt-get install dataset-fashion-mnist")
    pytest.skip("apt-get install dataset-fashion-mnist")
  return folder
