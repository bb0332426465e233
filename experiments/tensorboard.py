r"""TensorBoard event files from trainings' metrics.jsonl (runs trained without tensorboard=True).

  python -m experiments.tensorboard runs/dm_mnist runs/dm_cl_il
  tensorboard --logdir=runs

writes WORKDIR/tensorboard/ for each workdir (the scalars a training with
``--config.tensorboard=True`` writes as it goes). Needs tensorboardX.
"""
from absl import app

from l2ojax.meta import tensorboard


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("name one or more training workdirs (folders with metrics.jsonl)")
  for workdir in workdirs:
    print(tensorboard.from_metrics(workdir))


if __name__ == "__main__":
  app.run(main)
