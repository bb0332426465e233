#!/bin/bash
# Training cut at the last checkpoints (time limit); evaluate in parallel, then tabulate.
cd /work/wt/issue3
export XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
W=/work/runs_issue3/ablation_cpu
COMMON="--workdir=$W --eval_steps=300 --eval_optimizees=10
 --override=data.path=/work/shared/data/mnist10k.npz --override=meta.batch_size=1
 --override=meta.num_episodes=16 --override=dm_aug:meta.num_episodes=2
 --override=dm_cl:meta.num_episodes=4 --override=dm_cl_il:meta.num_episodes=4
 --override=validation.period=4 --override=validation.num_optimizees=4 --override=checkpoint_every=2
 --override=dm_cl:validation.period=2 --override=dm_cl_il:validation.period=2
 --override=dm_cl:validation.num_optimizees=2 --override=dm_cl_il:validation.num_optimizees=2
 --override=curriculum.schedule=(100,200,400) --override=curriculum.min_num_eval=1"
pids=""
for g in dm_cl dm_cl_il dm_aug; do
  python -m experiments.ablation $COMMON --variants=$g > $W.eval_$g.log 2>&1 &
  pids="$pids $!"
done
wait $pids
python -m experiments.ablation $COMMON --variants=dm,dm_aug,dm_il,dm_cl,dm_cl_il \
  --label="SCALED-DOWN CPU run (see NOTES_issue3.md for the settings)." > $W.final.log 2>&1
echo done > $W.done
