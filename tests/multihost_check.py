"""One process of a meta-training under jax.distributed (see test_multihost.py):
python multihost_check.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT MAX_SECONDS.

Each process has 4 / NUM_PROCESSES host devices; with one process it is the
single-host reference on 4 devices. Writes OUT/theta_<PROCESS_ID>.npz."""
import os
import sys

pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
workdir, out, max_seconds = sys.argv[4], sys.argv[5], float(sys.argv[6])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={4 // nproc}").strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

if nproc > 1:
  if "jax_cpu_collectives_implementation" in jax.config.values:  # CPU all-reduces over gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                             process_id=pid)
assert len(jax.devices()) == 4 and len(jax.local_devices()) == 4 // nproc

from l2ojax.meta import trainer  # noqa: E402
from tests.helpers.configs import tiny_quadratic  # noqa: E402

config = tiny_quadratic(episodes=4, checkpoint_every=2, validation_period=2)
config.meta.shard = True
# the curriculum's validations and imitation episodes (2 of the 4 with seed 0) too
config.curriculum.enabled = config.imitation.enabled = True
config.curriculum.schedule = (20, 40)
config.curriculum.min_num_eval = 1
config.imitation.ratios = (0.5, 0.5)
res = trainer.train(config, workdir, progress=False,
                    max_seconds=None if max_seconds < 0 else max_seconds)
np.savez(os.path.join(out, f"theta_{pid}.npz"), theta=np.asarray(ravel_pytree(res.theta)[0]),
         episodes=res.episodes, finished=res.finished)
