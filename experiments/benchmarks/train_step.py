"""Images/s of a full training step, with and without the regularisers.

  python -m experiments.benchmarks.train_step [--models resnet56,digits_cnn]
      [--batch 64] [--repeats 20] [--out benchmarks_out]

For each model at its native input size (32x32x3 for the CIFAR ResNets and
WRNs, 224x224x3 for the torchvision-layout ResNets, 8x8x1 for digits), a
teacher of the same architecture, and: the task loss only, + Omega_I and
+ Omega_P on the last stage and on the last 3 stages. Reports the median step
time (after compilation), images/s and the overhead over the task-loss-only
step. Writes `OUT/train_step.json` and `OUT/train_step.md`.
"""

import argparse
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import median_seconds, write
from ot_transfer_jax import optim, parallel, regularizers, train
from ot_transfer_jax.features import available_layers
from ot_transfer_jax.models import create_model

# Native input size per model; every other model is CIFAR-size, 32x32x3.
INPUTS = {"digits_cnn": (8, 8, 1), "digits_mlp": (8, 8, 1),
          **{f"resnet{d}": (224, 224, 3) for d in (18, 34, 50, 101)}}
# variant -> (regulariser, number of regularised stages, counted from the last).
VARIANTS = {
    "task only": ("none", 0),
    "+ Omega_I (1 layer)": ("feature_matching", 1),
    "+ Omega_I (3 layers)": ("feature_matching", 3),
    "+ Omega_P (1 layer)": ("ot", 1),
    "+ Omega_P (3 layers)": ("ot", 3),
}


def input_shape(model_name: str) -> tuple:
  return INPUTS.get(model_name, (32, 32, 3))


def last_stages(model_name: str, count: int) -> tuple:
  """The model's last ``count`` top-level stages, e.g. resnet50, 3 ->
  ("stage2", "stage3", "stage4"); from an abstract forward pass (no FLOPs)."""
  if count == 0:
    return ()
  model = create_model(model_name, 10)
  sample = jax.ShapeDtypeStruct((1, *input_shape(model_name)), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                             sample)
  stages = sorted((p for p in available_layers(model, variables, sample)
                   if re.fullmatch(r"stage\d+", p)), key=lambda p: int(p[5:]))
  if len(stages) < count:
    raise ValueError(f"{model_name} has {len(stages)} stages ({stages}); "
                     f"a variant asks for {count}: drop that variant or use "
                     "a deeper model.")
  return tuple(stages[-count:])


def step_seconds(model_name, method, layers, batch, repeats):
  terms = () if method == "none" else (regularizers.make_term(
      method, method, weight=0.1, student_layers=layers),)
  model = create_model(model_name, 10)
  shape = input_shape(model_name)
  sample = jnp.zeros((batch, *shape))
  mesh = parallel.make_mesh()
  teacher_vars = jax.jit(lambda k: model.init(k, sample[:1]))(
      jax.random.PRNGKey(1))
  tx = optim.make_optimizer(1000, learning_rate=0.05)
  state = train.create_train_state(model, model, teacher_vars, terms,
                                   jax.random.PRNGKey(0), sample, tx,
                                   init_variables=teacher_vars)
  step = train.make_train_step(train.make_loss_fn(model, model, terms), tx,
                               mesh)
  rng = np.random.default_rng(0)
  batch_np = {"image": rng.normal(size=(batch, *shape)).astype(np.float32),
              "label": rng.integers(0, 10, batch).astype(np.int32)}
  data = parallel.shard_batch(batch_np, mesh)
  holder = {"state": parallel.replicate(state, mesh)}
  teacher_vars = parallel.replicate(teacher_vars, mesh)

  def call():
    holder["state"], metrics = step(holder["state"], teacher_vars, data)
    return metrics

  for _ in range(3):  # Compile, then let warm-started potentials settle.
    jax.block_until_ready(call())
  return median_seconds(call, repeats)


def bench_model(model_name: str, batch: int, repeats: int,
                variants: Sequence[str] = tuple(VARIANTS),
                deadline: Optional[float] = None) -> list:
  """One row per variant (names of ``VARIANTS``): step_ms, images_per_s,
  overhead_pct (over the task-only step, when measured). A variant not
  started before ``deadline`` (``time.monotonic()``) is recorded as skipped."""
  rows, base = [], None
  for variant in variants:
    method, count = VARIANTS[variant]
    row = {"model": model_name, "variant": variant}
    if deadline is not None and time.monotonic() > deadline:
      rows.append({**row, "skipped": "time budget"})
      continue
    seconds = step_seconds(model_name, method, last_stages(model_name, count),
                           batch, repeats)
    base = base or (seconds if method == "none" else None)
    row.update(step_ms=1e3 * seconds, images_per_s=batch / seconds)
    if base:
      row["overhead_pct"] = 100 * (seconds / base - 1)
    rows.append(row)
    print(row, flush=True)
  return rows


COLUMNS = ("model", "variant", "step_ms", "images_per_s", "overhead_pct")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet56,digits_cnn")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks_out")
  args = parser.parse_args(argv)
  rows = []
  for model_name in args.models.split(","):
    rows += bench_model(model_name, args.batch, args.repeats)
  print(write(args.out, "train_step", rows, COLUMNS,
              {"batch": args.batch, "repeats": args.repeats}))


if __name__ == "__main__":
  main()
