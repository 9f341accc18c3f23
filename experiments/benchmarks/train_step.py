"""Images/s of a full training step, with and without the regularisers.

  python -m experiments.benchmarks.train_step [--models resnet56,digits_cnn]
      [--batch 64] [--repeats 20] [--out benchmarks_out]

For each model (CIFAR-size 32x32x3 for the ResNets, 8x8x1 for digits), a
teacher of the same architecture, and: the task loss only, + Omega_I on the
last stage, + Omega_P on the last stage, + Omega_P on 3 stages. Reports the
median step time (after compilation), images/s and the overhead over the
task-loss-only step. Writes `OUT/train_step.json` and `OUT/train_step.md`.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import median_seconds, write
from experiments.configs import common
from ot_transfer_jax import train
from ot_transfer_jax.models import create_model

INPUTS = {"digits_cnn": (8, 8, 1), "digits_mlp": (8, 8, 1)}
VARIANTS = {
    "task only": ("none", ()),
    "+ Omega_I (1 layer)": ("feature_matching", ("stage3",)),
    "+ Omega_P (1 layer)": ("ot", ("stage3",)),
    "+ Omega_P (3 layers)": ("ot", ("stage1", "stage2", "stage3")),
}


def step_seconds(model_name, method, layers, batch, repeats):
  cfg = common.base_config()
  cfg.model.name = model_name
  if method != "none":
    cfg.loss.terms[method] = common.term(method, 0.1, student_layers=layers)
  model = create_model(model_name, 10)
  shape = INPUTS.get(model_name, (32, 32, 3))
  sample = jnp.zeros((batch, *shape))
  mesh = train.make_mesh()
  teacher_vars = jax.jit(lambda k: model.init(k, sample[:1]))(
      jax.random.PRNGKey(1))
  tx = train.make_optimizer(cfg.optimizer, 1000)
  state = train.create_train_state(cfg, model, model, teacher_vars,
                                   jax.random.PRNGKey(0), sample, tx,
                                   init_variables=teacher_vars)
  step = train.make_train_step(cfg, model, model, tx, mesh)
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.normal(size=(batch, *shape)).astype(np.float32),
              "label": rng.integers(0, 10, batch).astype(np.int32)}
  data = train.shard_batch(batch_np, mesh)
  holder = {"state": train.replicate(state, mesh)}
  teacher_vars = train.replicate(teacher_vars, mesh)

  def call():
    holder["state"], metrics = step(holder["state"], teacher_vars, data)
    return metrics

  for _ in range(3):  # Compile, then let warm-started potentials settle.
    jax.block_until_ready(call())
  return median_seconds(call, repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet56,digits_cnn")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks_out")
  args = parser.parse_args(argv)
  rows = []
  for model_name in args.models.split(","):
    base = None
    for variant, (method, layers) in VARIANTS.items():
      seconds = step_seconds(model_name, method, layers, args.batch,
                             args.repeats)
      base = base or seconds
      rows.append({"model": model_name, "variant": variant,
                   "step_ms": 1e3 * seconds,
                   "images_per_s": args.batch / seconds,
                   "overhead_pct": 100 * (seconds / base - 1)})
      print(rows[-1], flush=True)
  print(write(args.out, "train_step", rows,
              ("model", "variant", "step_ms", "images_per_s", "overhead_pct"),
              {"batch": args.batch, "repeats": args.repeats}))


if __name__ == "__main__":
  main()
