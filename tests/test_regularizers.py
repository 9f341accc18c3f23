"""The regulariser registry: options, registration, terms, init/apply on shapes, errors."""

import dataclasses
import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax import (batched_sinkhorn, delta_weights, losses, ot,
                             regularizers)

# Each option passed on to a library function, and that function: the
# option's default must be the function's (read, never copied).
CALLED = {
    "ot": {**{name: ot.solve_neuron_ot for name in (
        "relative_epsilon", "spatial", "normalize", "threshold",
        "max_iterations", "grad", "tau")},
           "block": batched_sinkhorn.solve_layers},
    "feature_matching": {"spatial": losses.feature_matching,
                         "normalize": losses.feature_matching},
    "delta": {"temperature": delta_weights.channel_weights,
              "head_steps": delta_weights.channel_weights,
              "spatial": losses.delta, "normalize": losses.delta},
    "attention": {"p": losses.attention_transfer},
    "kd": {"temperature": losses.kd_loss},
}
# Options of the regulariser's own (not passed on).
OWN = {"ot": {"solver": "auto", "warm_start": True}}


@pytest.fixture
def registry(monkeypatch):
  """A copy of the registry, so that a test's registrations do not leak."""
  monkeypatch.setattr(regularizers, "_REGISTRY",
                      dict(regularizers._REGISTRY))


@pytest.mark.parametrize("name", ["ot", "feature_matching", "delta",
                                  "attention", "fitnets", "kd", "l2_sp"])
def test_option_defaults_are_those_of_the_called_function(name):
  cls = regularizers.get(name)
  expected = {opt: inspect.signature(fn).parameters[opt].default
              for opt, fn in CALLED.get(name, {}).items()}
  expected.update(OWN.get(name, {}))
  assert cls.option_defaults() == expected
  # Typed fields: each option has an annotation.
  assert {f.name for f in dataclasses.fields(cls)} == set(expected)
  assert cls().options == expected


def test_term_config_lists_every_option_and_refuses_unknown_ones():
  cfg = regularizers.term_config("ot", weight=0.5, student_layers=("a",),
                                 relative_epsilon=0.1)
  assert cfg["options"] == {**regularizers.get("ot").option_defaults(),
                            "relative_epsilon": 0.1}
  assert list(cfg["options"]) == list(regularizers.get("ot").option_defaults())
  assert cfg["weight"] == 0.5 and cfg["teacher_layers"] == ()
  with pytest.raises(ValueError, match=r"^OmegaP has no option\(s\) "
                     r"\['epsilonn'\]; its options \(with defaults\) are "
                     r"\{'relative_epsilon': 0.01, .*'warm_start': True\}\.$"):
    regularizers.term_config("ot", weight=1.0, epsilonn=0.1)


def test_registering_a_taken_name_raises_unless_replace(registry):
  with pytest.raises(ValueError, match=r"The regularizer name 'ot' is taken "
                     r"by ot_transfer_jax.regularizers.OmegaP: choose another "
                     r"name, or register\('ot', replace=True\) to replace it"):

    @regularizers.register("ot")
    @dataclasses.dataclass(frozen=True)
    class Other(regularizers.Regularizer):
      pass

  @regularizers.register("ot", replace=True)
  @dataclasses.dataclass(frozen=True)
  class Replacement(regularizers.Regularizer):
    pass

  assert regularizers.get("ot") is Replacement
  assert "ot" in regularizers.names()


def test_the_same_class_statement_run_twice_registers_once(registry, tmp_path):
  """A config file that registers a regulariser may be loaded twice (by
  config_flags, then by reproduce / sweep): not a conflict."""
  path = tmp_path / "my_config.py"
  path.write_text(textwrap.dedent("""
      import dataclasses
      from ot_transfer_jax import regularizers

      @regularizers.register("twice")
      @dataclasses.dataclass(frozen=True)
      class Twice(regularizers.Regularizer):
        def apply(self, params, state, student, teacher):
          return 0.0, {}, state
  """))
  code = compile(path.read_text(), str(path), "exec")
  first, second = {}, {}
  exec(code, first)
  exec(code, second)
  assert regularizers.get("twice") is second["Twice"]
  # Another class statement of the same name elsewhere is a conflict.
  with pytest.raises(ValueError, match="'twice' is taken"):
    exec(compile(path.read_text(), str(tmp_path / "other.py"), "exec"), {})


def test_register_refuses_what_is_not_a_dataclass_regularizer(registry):
  with pytest.raises(ValueError, match=r"decorate Plain with "
                     r"@dataclasses.dataclass\(frozen=True\) \(below "
                     r"@register\): its fields are its options"):

    @regularizers.register("plain")
    class Plain(regularizers.Regularizer):
      scale = 1.0

  with pytest.raises(ValueError, match="is not a subclass of "
                     "regularizers.Regularizer"):
    regularizers.register("other")(dict)
  with pytest.raises(ValueError, match=r"Bad.reads='pixels' is not one of "
                     r"\('features', 'logits', 'params'\)"):

    @regularizers.register("bad")
    @dataclasses.dataclass(frozen=True)
    class Bad(regularizers.Regularizer):
      reads = "pixels"

  assert not {"plain", "other", "bad"} & set(regularizers.names())


def test_unknown_name_lists_the_registered_ones():
  with pytest.raises(ValueError, match=r"Unknown regularizer 'delta_plus'; "
                     r"registered: \(.*'ot'.*\) \(or give "
                     r"'package.module:Class'\)"):
    regularizers.get("delta_plus")


def test_a_module_class_path_imports_an_unregistered_regularizer(
    tmp_path, monkeypatch):
  (tmp_path / "my_terms.py").write_text(textwrap.dedent("""
      import dataclasses
      import jax.numpy as jnp
      from ot_transfer_jax import regularizers

      @dataclasses.dataclass(frozen=True)
      class Gap(regularizers.Regularizer):
        scale: float = 2.0

        def apply(self, params, state, student, teacher):
          return self.scale * jnp.mean(student - teacher) ** 2, {}, state

      class NotOne:
        pass
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = regularizers.term_config("my_terms:Gap", weight=1.0,
                                 student_layers=("a",), scale=3.0)
  (term,) = regularizers.terms_from_config({"gap": cfg})
  assert type(term.regularizer).__name__ == "Gap"
  assert term.regularizer.scale == 3.0
  assert "my_terms:Gap" not in regularizers.names()
  with pytest.raises(ValueError, match=r"Cannot import regularizer "
                     r"'no_such_module:Gap': No module named "
                     r"'no_such_module'\. Use 'package.module:Class'"):
    regularizers.get("no_such_module:Gap")
  with pytest.raises(ValueError, match=r"Cannot import regularizer "
                     r"'my_terms:Missing'.*has no attribute 'Missing'"):
    regularizers.get("my_terms:Missing")
  with pytest.raises(ValueError, match=r"'my_terms:NotOne'.*is not a "
                     r"subclass of regularizers.Regularizer"):
    regularizers.get("my_terms:NotOne")


def _terms(**cfgs):
  return regularizers.terms_from_config(cfgs)


def test_terms_are_ordered_features_then_logits_then_params_then_by_name():
  terms = _terms(
      z_sp=regularizers.term_config("l2_sp", weight=0.1),
      b_kd=regularizers.term_config("kd", weight=1.0),
      c_ot=regularizers.term_config("ot", weight=0.1, student_layers=("s",)),
      a_fm=regularizers.term_config("feature_matching", weight=0.1,
                                    student_layers=("s", "t"),
                                    teacher_layers=("u", "v"),
                                    layer_weights=(1.0, 2.0)))
  assert [t.name for t in terms] == ["a_fm", "c_ot", "b_kd", "z_sp"]
  assert terms[0].pairs == (("s", "u", 1.0), ("t", "v", 2.0))
  assert terms[1].pairs == (("s", "s", 1.0),)  # teacher layers default
  assert terms[2].pairs == terms[3].pairs == ()
  assert regularizers.captured_layers(terms) == (("s", "t"), ("u", "v", "s"))


def test_term_errors_name_the_term():
  ot_cfg = regularizers.term_config("ot", weight=0.1, student_layers=("s",))
  with pytest.raises(ValueError, match=r"^loss.terms.x: Unknown regularizer "
                     r"'nope'"):
    _terms(x={**ot_cfg, "regularizer": "nope"})
  with pytest.raises(ValueError, match=r"^loss.terms.x: OmegaP has no "
                     r"option\(s\) \['eps'\]"):
    _terms(x={**ot_cfg, "options": {"eps": 1.0}})
  kd = regularizers.term_config("kd", weight=1.0)
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


def _features(seed, m, n_s, n_t, positions=(3, 3)):
  """Student and teacher activations (numpy: no compilation)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(m, *positions, n_s)).astype(np.float32),
          rng.normal(size=(m, *positions, n_t)).astype(np.float32))


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def test_init_and_apply_on_shapes():
  terms = _terms(
      ot=regularizers.term_config("ot", weight=0.1, student_layers=("c",)),
      fm=regularizers.term_config("feature_matching", weight=1.0,
                                  student_layers=("a", "b"),
                                  layer_weights=(1.0, 0.5)),
      fitnets=regularizers.term_config("fitnets", weight=1.0,
                                       student_layers=("c",)),
      kd=regularizers.term_config("kd", weight=1.0),
      l2_sp=regularizers.term_config("l2_sp", weight=0.1))
  a_s, a_t = _features(0, 8, 5, 5)
  b_s, b_t = _features(1, 8, 5, 5)
  c_s, c_t = _features(2, 8, 4, 6)
  s_logits, t_logits = _features(3, 8, 3, 3, ())
  views = {"features": ({"a": a_s, "b": b_s, "c": c_s},
                        {"a": a_t, "b": b_t, "c": c_t}),
           "logits": (s_logits, t_logits),
           "params": ({"w": jnp.ones((2, 2))}, {"w": jnp.zeros((2, 2))})}
  params, state = regularizers.init_terms(terms, jax.random.PRNGKey(4),
                                          _abstract(views))
  # Omega_P: zero potentials (n_s,), (n_t,) per pair; FitNets: n_s -> n_t.
  f, g = state["ot"]["c->c"]
  assert f.shape == (4,) and g.shape == (6,) and not f.any()
  assert params["fitnets"]["c->c"]["Dense_0"]["kernel"].shape == (4, 6)
  assert set(state["fm"]) == {"a->a", "b->b"}
  assert set(params["kd"]) == {"logits"} and set(params["l2_sp"]) == {"params"}
  # Compiled: eager, the solver's loop dispatches op by op (slower).
  metrics, new_state = jax.jit(regularizers.apply_terms, static_argnums=0)(
      terms, params, state, views)
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(
      metrics["reg/fm"], metrics["reg/fm/a->a"] + 0.5 * metrics["reg/fm/b->b"],
      rtol=1e-6)
  np.testing.assert_allclose(metrics["reg/fm/a->a"], losses.feature_matching(
      a_s, a_t), rtol=1e-6)
  assert metrics["reg/l2_sp"] == pytest.approx(2.0)  # ||1||^2 / 2 over 4
  assert metrics["reg/kd"] == pytest.approx(float(losses.kd_loss(
      s_logits, t_logits, 4.0)), rel=1e-6)
  # Unequal widths (4 vs 6) have no matched fraction.
  assert np.isnan(metrics.pop("matched_fraction/ot/c->c"))
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  # The next state is the solver's potentials, same shapes.
  assert [x.shape for x in new_state["ot"]["c->c"]] == [(4,), (6,)]
  assert float(jnp.abs(new_state["ot"]["c->c"][0]).sum()) > 0


def test_init_errors_name_the_term_and_the_layer_pair():
  terms = _terms(fm=regularizers.term_config(
      "feature_matching", weight=1.0, student_layers=("a",)))
  s, t = _features(0, 4, 3, 5)
  views = {"features": ({"a": s}, {"a": t})}
  with pytest.raises(ValueError, match=r"^loss.terms.fm \(OmegaI\) on a->a: "
                     r".*widths must be equal"):
    regularizers.init_terms(terms, jax.random.PRNGKey(0), _abstract(views))
  terms = _terms(ot=regularizers.term_config("ot", weight=1.0,
                                             student_layers=("a",)))
  views = {"features": ({"a": s[:, 0]}, {"a": t})}  # ranks differ
  with pytest.raises(ValueError, match=r"^loss.terms.ot \(OmegaP\) on a->a: "):
    regularizers.init_terms(terms, jax.random.PRNGKey(0), _abstract(views))
  terms = _terms(delta=regularizers.term_config("delta", weight=1.0,
                                                student_layers=("a",)))
  views = {"features": ({"a": s}, {"a": s})}
  with pytest.raises(ValueError, match=r"^loss.terms.delta \(Delta\) on a->a: "
                     r"delta computes its channel weights from the teacher "
                     r"and labelled training images"):
    regularizers.init_terms(terms, jax.random.PRNGKey(0), _abstract(views))


def test_split_head():
  backbone, head = regularizers.split_head({"stage1": 1, "head": 2})
  assert backbone == {"stage1": 1} and head == 2
  assert regularizers.split_head({"stage1": 1})[1] == {}
