"""Run in a fresh process with 4 host devices (see test_sharding.py): one
meta-step unsharded and sharded over a 4-device mesh from the same inputs;
prints a JSON report."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

from l2ojax import models, optimizees  # noqa: E402
from l2ojax.meta import imitation  # noqa: E402
from l2ojax.meta import sharding  # noqa: E402
from l2ojax.meta import step as step_lib  # noqa: E402


def main(batch_size: int) -> None:
  q = optimizees.get("quadratic", dim=4, num_instances=4)
  lopt = models.dm(preprocessing="identity", scale=1.0, hidden_sizes=(4,))
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-2)
  init_states = step_lib.make_init_states(lopt, batch_size)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=3)
  key_init, key_steps = jax.random.PRNGKey(1), jax.random.split(jax.random.PRNGKey(2), 2)

  def run(theta, states, outer_state, optimizee):
    for k in key_steps:
      theta, outer_state, states, metrics = meta_step(theta, outer_state, states, k, optimizee)
    return theta, states, metrics

  states = init_states(theta, key_init, q)
  plain_theta, plain_states, plain_m = run(theta, states, outer.init(theta), q)

  mesh = sharding.make_mesh()
  s_theta, s_outer, s_q = sharding.replicate((theta, outer.init(theta), q), mesh)
  s_states = sharding.sharded_init_states(init_states, mesh)(s_theta, key_init, s_q)
  born_sharded = s_states.params["x"].sharding.spec == sharding.batch_sharding(mesh).spec
  moved = sharding.shard_states(init_states(theta, key_init, q), mesh)
  sh_theta, sh_states, sh_m = run(s_theta, s_states, s_outer, s_q)

  # each device unrolling its rows in a program of its own (shard_map), as the fused
  # kernels need: with XLA's ops and with the kernels (interpreted)
  per_device = {}
  for kernel in ("xla", "pallas_interpret"):
    lopt_k = models.dm(preprocessing="identity", scale=1.0, hidden_sizes=(4,), lstm_kernel=kernel)
    step_k = step_lib.make_meta_step(lopt_k, outer, segment_length=3, mesh=mesh)
    th, os_ = s_theta, s_outer  # fresh states: the meta-step donates its states
    st = sharding.sharded_init_states(init_states, mesh)(s_theta, key_init, s_q)
    for k in key_steps:
      th, os_, st, _ = step_k(th, os_, st, k, s_q)
    per_device[kernel] = (th, st)

  # an imitation step, unsharded and per device
  teacher = optax.adam(0.01)
  il_init = imitation.make_init_imitation_states(lopt, teacher, batch_size)
  il_plain = imitation.make_imitation_step(lopt, teacher, outer, 4, 1)
  il_sharded = imitation.make_imitation_step(lopt, teacher, outer, 4, 1, mesh=mesh)
  il_states = il_init(theta, key_init, q)
  il_a = il_plain(theta, outer.init(theta), il_states, key_steps[0], q)[0]
  il_states = sharding.sharded_init_states(il_init, mesh)(s_theta, key_init, s_q)
  il_b = il_sharded(s_theta, s_outer, il_states, key_steps[0], s_q)[0]

  try:
    sharding.shard_states(jax.tree_util.tree_map(lambda x: x[:batch_size - 1], moved), mesh)
    indivisible_error = ""
  except ValueError as e:
    indivisible_error = str(e)

  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  a, b = flat(plain_theta), flat(sh_theta)
  print(json.dumps({
      "devices": jax.device_count(),
      "mesh_devices": int(mesh.devices.size),
      "born_sharded": bool(born_sharded),
      "moved_devices": len(moved.params["x"].sharding.device_set),
      "out_devices": len(sh_states.params["x"].sharding.device_set),
      "theta_changed": float(np.max(np.abs(a - flat(theta)))),
      "theta_max_abs_diff": float(np.max(np.abs(a - b))),
      "theta_bitwise_equal": bool(np.array_equal(a, b)),
      "states_max_abs_diff": float(np.max(np.abs(flat(plain_states.params)
                                                 - flat(sh_states.params)))),
      "indivisible_error": indivisible_error,
      "per_device_theta_max_abs_diff": {
          k: float(np.max(np.abs(a - flat(th)))) for k, (th, _) in per_device.items()},
      "per_device_out_devices": len(per_device["xla"][1].params["x"].sharding.device_set),
      "imitation_theta_changed": float(np.max(np.abs(flat(il_a) - flat(theta)))),
      "imitation_theta_max_abs_diff": float(np.max(np.abs(flat(il_a) - flat(il_b)))),
      "meta_loss": [float(plain_m["meta_loss"]), float(sh_m["meta_loss"])],
  }))


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
