"""The meta-batch sharded over a 4-device mesh gives the unsharded theta.

The check runs in a subprocess (tests/sharding_check.py) because the number
of host devices is fixed when JAX initialises: XLA_FLAGS must carry
--xla_force_host_platform_device_count=4 before the first import, and the
rest of the suite keeps its single device.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from l2ojax.meta import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_check.py"), "8"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_meta_step_gives_the_unsharded_theta(report):
  assert report["devices"] == 4 and report["mesh_devices"] == 4
  assert report["theta_changed"] > 1e-4  # the two meta-steps did move theta
  # Not bitwise: the mean meta-loss over the batch is summed per device, then
  # all-reduced, a different order of float additions than one device's sum.
  assert report["theta_max_abs_diff"] <= 1e-6, report
  assert report["states_max_abs_diff"] <= 1e-5, report
  np.testing.assert_allclose(*report["meta_loss"], rtol=1e-6)


def test_per_device_programs_give_the_unsharded_theta(report):
  """make_meta_step(mesh=): each device unrolls its own rows (shard_map), with XLA's
  ops and with the fused kernels; an imitation step likewise."""
  for kernel, diff in report["per_device_theta_max_abs_diff"].items():
    assert diff <= 1e-6, (kernel, report)
  assert report["per_device_out_devices"] == 4
  assert report["imitation_theta_changed"] > 1e-4
  assert report["imitation_theta_max_abs_diff"] <= 1e-6, report


def test_states_live_on_all_devices(report):
  assert report["born_sharded"]
  assert report["moved_devices"] == 4
  assert report["out_devices"] == 4  # the meta-step keeps them sharded


def test_indivisible_batch_is_a_clear_error(report):
  assert "multiple of the 4 devices" in report["indivisible_error"]


def test_single_device_mesh_is_a_no_op_placement():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == jax.device_count()
  x = sharding.shard_states({"a": np.arange(6.0).reshape(3, 2)}, mesh)
  np.testing.assert_array_equal(np.asarray(x["a"]), np.arange(6.0).reshape(3, 2))
  with pytest.raises(ValueError, match="leading"):
    sharding.shard_states({"a": np.float32(1.0)}, mesh)
