"""Programs lowered for CUDA on a machine without a GPU."""
import inspect

import jax


def lower_for_cuda(fn, *args):
  """jitted ``fn`` traced and lowered for CUDA without a GPU. From jax 0.11 the Pallas
  Triton lowering reads the target's kind from the abstract mesh: name an H100 there."""
  abstract_device = getattr(jax.sharding, "AbstractDevice", None)
  if (jax.default_backend() == "gpu" or abstract_device is None  # older jax: no target needed
      or "platform" not in inspect.signature(abstract_device).parameters):
    return fn.trace(*args).lower(lowering_platforms=("cuda",))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("d",), (jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return fn.trace(*args).lower(lowering_platforms=("cuda",))
