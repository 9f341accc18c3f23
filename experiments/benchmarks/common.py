"""Timing helpers shared by the benchmarks (wall clock, after compilation)."""

import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np


# The training-cost table's columns (train_cost, accelerator).
# step_ms is the median step; a run pays the mean (mean_ms); step_iters_* are
# Sinkhorn iterations per step, all layers together.
TRAIN_COST_COLUMNS = ("setting", "variant", "steps", "step_ms", "mean_ms",
                      "p90_ms", "over_task", "over_ref", "over_ref_mean",
                      "step_iters_median", "step_iters_mean",
                      "step_iters_p90", "iters_max", "unconverged_pct",
                      "skipped")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls; results are
  blocked on, so asynchronous dispatch is timed to completion."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine() -> dict:
  """What the numbers were measured on."""
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()]}


def relu_activations(rng: np.random.Generator, batch: int,
                     widths: Sequence[int], latent: int = 32):
  """Correlated ReLU activations ``(batch, n)`` per width, one mini-batch."""
  z = rng.normal(size=(batch, latent))
  return [np.maximum(z @ rng.normal(size=(latent, n)) + 0.5 *
                     rng.normal(size=(batch, n)), 0).astype(np.float32)
          for n in widths]


def markdown_table(rows: list, columns: Sequence[str]) -> str:
  """Rows (dicts) as a markdown table; missing cells are left empty."""
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---:|" * len(columns)]
  for row in rows:
    cells = []
    for c in columns:
      v = row.get(c)
      cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float)
                   else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write(out_dir: str, name: str, rows: list, columns: Sequence[str],
          extra: dict) -> str:
  """Writes ``name.json`` and ``name.md``; returns the markdown table."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump({"machine": machine(), **extra, "rows": rows}, f, indent=2)
  table = markdown_table(rows, columns)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  return table
