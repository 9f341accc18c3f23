"""The ``loss.terms`` layout of an experiment config, and the terms it builds.

An experiment config lists the teacher-based loss terms under
``config.loss.terms``, one entry per term, every key present::

  loss.terms.ot = {"regularizer": "ot", "weight": 0.1,
                   "student_layers": ("stage2",), "teacher_layers": (),
                   "layer_weights": (), "options": {...every option...}}

:func:`term_config` writes an entry, :func:`terms_from_config` turns
``config.loss.terms`` into the library's
:class:`~ot_transfer_jax.regularizers.Term` s
(:func:`~ot_transfer_jax.regularizers.make_term`). The library itself reads
no config: only ``experiments/`` knows this layout.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple

from ot_transfer_jax import regularizers


def term_config(regularizer: str, *, weight: float,
                student_layers: Sequence[str] = (),
                teacher_layers: Sequence[str] = (),
                layer_weights: Sequence[float] = (), **options) -> dict:
  """One entry of ``config.loss.terms``, every key present.

  ``teacher_layers`` defaults to ``student_layers``, ``layer_weights`` to 1
  per layer; ``options`` are the regulariser's (merged over its defaults, so
  the config lists them all and a command line can override any).
  """
  # Unknown options fail here, when the config is written.
  reg = regularizers.get(regularizer).from_options(**options)
  return {"regularizer": regularizer, "weight": float(weight),
          "student_layers": tuple(student_layers),
          "teacher_layers": tuple(teacher_layers),
          "layer_weights": tuple(float(w) for w in layer_weights),
          "options": reg.options}


def terms_from_config(terms_cfg: Mapping[str, Any]
                      ) -> Tuple[regularizers.Term, ...]:
  """The loss terms of ``config.loss.terms``, layer terms first, then by name
  (:func:`~ot_transfer_jax.regularizers.ordered`).

  Raises:
    ValueError: unknown regulariser or option, layers given to a term that
      does not read features (or missing for one that does), or lists of
      unequal lengths; the message names the term (``loss.terms.<name>``).
  """
  terms = []
  for name in sorted(terms_cfg):
    cfg = terms_cfg[name]
    try:
      terms.append(regularizers.make_term(
          name, cfg["regularizer"], weight=cfg["weight"],
          student_layers=cfg["student_layers"],
          teacher_layers=cfg["teacher_layers"],
          layer_weights=cfg["layer_weights"], **dict(cfg["options"])))
    except ValueError as e:
      raise ValueError(f"loss.terms.{name}: {e}") from None
  return regularizers.ordered(terms)
