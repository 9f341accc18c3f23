"""The ``loss.terms`` layout of experiment configs (experiments/terms.py)."""

import pytest

from experiments import terms as config_terms
from ot_transfer_jax import regularizers


def _terms(**cfgs):
  return config_terms.terms_from_config(cfgs)


def test_term_config_lists_every_option_and_refuses_unknown_ones():
  cfg = config_terms.term_config("ot", weight=0.5, student_layers=("a",),
                                 relative_epsilon=0.1)
  assert cfg["options"] == {**regularizers.get("ot").option_defaults(),
                            "relative_epsilon": 0.1}
  assert list(cfg["options"]) == list(regularizers.get("ot").option_defaults())
  assert cfg["weight"] == 0.5 and cfg["teacher_layers"] == ()
  with pytest.raises(ValueError, match=r"^OmegaP has no option\(s\) "
                     r"\['epsilonn'\]; its options \(with defaults\) are "
                     r"\{'relative_epsilon': 0.01, .*'warm_start': True\}\.$"):
    config_terms.term_config("ot", weight=1.0, epsilonn=0.1)


def test_term_errors_name_the_term():
  ot_cfg = config_terms.term_config("ot", weight=0.1,
                                    student_layers=("s",))
  with pytest.raises(ValueError, match=r"^loss.terms.x: Unknown regularizer "
                     r"'nope'"):
    _terms(x={**ot_cfg, "regularizer": "nope"})
  with pytest.raises(ValueError, match=r"^loss.terms.x: OmegaP has no "
                     r"option\(s\) \['eps'\]"):
    _terms(x={**ot_cfg, "options": {"eps": 1.0}})
  kd = config_terms.term_config("kd", weight=1.0)
  for key, value in (("student_layers", ("s",)), ("teacher_layers", ("s",)),
                     ("layer_weights", (2.0,))):
    with pytest.raises(ValueError, match=r"^loss.terms.k: 'kd' reads logits, "
                       r"not layers; remove its student_layers, "
                       r"teacher_layers and layer_weights\.$"):
      _terms(k={**kd, key: value})
  for bad in ({"student_layers": ()},
              {"teacher_layers": ("a", "b")},
              {"layer_weights": (1.0, 2.0)}):
    with pytest.raises(ValueError, match=r"^loss.terms.x: student_layers, "
                       r"teacher_layers and layer_weights must be non-empty "
                       r"and of equal length; got "):
      _terms(x={**ot_cfg, **bad})


def test_terms_from_config_builds_the_library_terms_in_the_loss_order():
  cfgs = {"z_sp": config_terms.term_config("l2_sp", weight=0.1),
          "c_ot": config_terms.term_config("ot", weight=0.1,
                                           student_layers=("s",), tau=0.9),
          "a_fm": config_terms.term_config(
              "feature_matching", weight=0.1, student_layers=("s", "t"),
              teacher_layers=("u", "v"), layer_weights=(1.0, 2.0))}
  terms = _terms(**cfgs)
  assert [t.name for t in terms] == ["a_fm", "c_ot", "z_sp"]
  assert terms == regularizers.ordered([
      regularizers.make_term(name, cfg["regularizer"], weight=cfg["weight"],
                             student_layers=cfg["student_layers"],
                             teacher_layers=cfg["teacher_layers"],
                             layer_weights=cfg["layer_weights"],
                             **cfg["options"])
      for name, cfg in cfgs.items()])
  assert terms[1].regularizer.tau == 0.9
