"""Meta-training: truncated unrolls, meta-losses, the jitted meta-step, the loop."""
from l2ojax.meta import curriculum, imitation, losses
from l2ojax.meta.step import make_init_states, make_meta_step, make_validate
from l2ojax.meta.unroll import (UnrollState, batch_rollout, init_state, rollout, scan_steps,
                                unroll)

__all__ = ["curriculum", "imitation", "losses", "make_init_states", "make_meta_step",
           "make_validate", "UnrollState", "batch_rollout", "init_state", "rollout", "scan_steps",
           "unroll"]
