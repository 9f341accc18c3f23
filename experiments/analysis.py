"""The paper's Figure 2: OT between the trained student's and the teacher's layers."""

from __future__ import annotations

import jax
import numpy as np

from experiments import data
from ot_transfer_jax import ot
from ot_transfer_jax.features import apply_with_features

# A ResNet-50's last stage would be 4M numbers of JSON.
MAX_SAVED_PLAN = 512 * 512


def layer_analysis(model, variables, teacher, teacher_vars, images, layers,
                   ot_options) -> dict:
  """OT between each student layer and the teacher's layer of the same name.

  Args:
    images: ``(B, H, W, C)`` normalised validation images.
    layers: module paths present in both networks.
    ot_options: keywords of :func:`ot_transfer_jax.ot.solve_neuron_ot`.

  Returns:
    ``{"layers": [...], "matched_fraction": [float | None],
    "row_max_mass": [float], "plan_entropy": [float], "plans": {layer:
    (n_s, n_t) nested lists}}``, layers in the given order; plans only for
    layers of at most ``MAX_SAVED_PLAN`` entries. See :func:`plan_diagnostics`
    for the two permutation-blind measures.
  """
  layers = tuple(layers)
  if teacher is None or not layers:
    return {"layers": [], "matched_fraction": [], "row_max_mass": [],
            "plan_entropy": [], "plans": {}}

  @jax.jit
  def solve(variables, teacher_vars, images):
    _, s_feats, _ = apply_with_features(model, variables, images, layers,
                                        train=False)
    _, t_feats, _ = apply_with_features(teacher, teacher_vars, images, layers,
                                        train=False)
    return {layer: ot.solve_neuron_ot(s_feats[layer], t_feats[layer],
                                      **ot_options) for layer in layers}

  results = jax.device_get(solve(variables, teacher_vars, images))
  out = {"layers": list(layers), "matched_fraction": [], "row_max_mass": [],
         "plan_entropy": [], "plans": {}}
  for layer in layers:
    mf = float(results[layer].matched_fraction)
    out["matched_fraction"].append(None if np.isnan(mf) else mf)
    plan = np.asarray(results[layer].plan)
    for name, value in plan_diagnostics(plan).items():
      out[name].append(value)
    if plan.size <= MAX_SAVED_PLAN:
      out["plans"][layer] = plan.round(6).tolist()
  return out


def plan_diagnostics(plan) -> dict:
  """Two measures of how one-to-one a plan is, blind to neuron order.

  The trace (``matched_fraction``) sees only the identity matching; a student
  that matches the teacher neuron for neuron under another permutation has a
  trace near 0. These two see any matching:

  * ``row_max_mass``: ``sum_j max_k P_jk``, each student neuron's largest
    share, summed: 1 when every student neuron sends all its mass to one
    teacher neuron (any permutation, equal widths; at most ``n_s / n_t``
    for a narrower student, whose neurons each spread over ``n_t / n_s``
    teacher neurons); ``1 / n_t`` for the uniform plan ``u v^T``.
  * ``plan_entropy``: ``(H(P) - log max(n_s, n_t)) / log min(n_s, n_t)``,
    the entropy between its bounds for these marginals: 0 for a
    deterministic (permutation-like) plan, 1 for ``u v^T``.

  Args:
    plan: ``(n_s, n_t)`` transport plan with uniform marginals (sums to 1).

  Returns:
    ``{"row_max_mass": float, "plan_entropy": float}``.
  """
  p = np.asarray(plan, np.float64)
  p = p / max(p.sum(), 1e-30)  # Unbalanced plans: the shape of the mass.
  n_s, n_t = p.shape
  positive = p[p > 0]
  entropy = float(-(positive * np.log(positive)).sum())
  low, span = np.log(max(n_s, n_t)), np.log(min(n_s, n_t))
  return {"row_max_mass": float(p.max(axis=1).sum()),
          "plan_entropy": float((entropy - low) / span) if span > 0 else 0.0}


def run_analysis(job, variables) -> dict:
  """:func:`layer_analysis` of a finished run on its first validation batch
  (test batch without a validation split), as configured in ``analysis``."""
  cfg = job.config.analysis
  # The global first batch: process 0 alone analyses.
  first = next(data.eval_batches(
      job.ds.val if job.has_val else job.ds.test, batch_size=cfg.batch_size,
      image_size=job.config.data.image_size, mean=job.mean, std=job.std))
  return layer_analysis(job.model, variables, job.teacher,
                        jax.device_get(job.teacher_vars),
                        first["image"][first["mask"]], cfg.layers,
                        dict(cfg.ot))
