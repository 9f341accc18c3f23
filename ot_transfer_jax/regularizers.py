"""The teacher-based terms of the training loss: one object per method, one registry.

A *regulariser* compares the trainable student with the frozen teacher. It
says what it reads (``reads``):

* ``"features"``: activations of a pair of layers, ``(m, *positions, n)``,
  one call per ``(student_layer, teacher_layer)`` pair;
* ``"logits"``: the two networks' logits, ``(m, k)``;
* ``"params"``: the student's backbone parameters and the teacher's (the
  ``head`` excluded), for penalties in parameter space such as L2-SP.

and implements two pure functions::

    init(rng, student, teacher, context) -> (params, state)
    apply(params, state, student, teacher) -> (value, metrics, new_state)

``init`` receives ``jax.ShapeDtypeStruct`` s (pytrees of them for ``"params"``)
and returns the term's trainable parameters (FitNets' regressor) and its
non-trainable state (Omega_P's Sinkhorn potentials, carried from step to
step). ``apply`` returns a float32 scalar, a dict of scalar metrics and the
next state; the teacher's input is already ``stop_gradient``-ed.

The training loss (:func:`ot_transfer_jax.train.make_loss_fn`) loops over the
configured :class:`Term` s without knowing their names. Add your own::

    from ot_transfer_jax import regularizers

    @regularizers.register("cosine")
    @dataclasses.dataclass(frozen=True)
    class Cosine(regularizers.Regularizer):
      eps: float = 1e-6  # an option: loss.terms.<name>.options.eps

      def apply(self, params, state, student, teacher):
        ...
        return value, {}, state

then ``loss.terms.cosine = regularizers.term_config("cosine", weight=..., ...)``
in an experiment config. A regulariser's options are its dataclass fields;
an option passed on to a library function takes that function's default
(:func:`default_of`), so the two cannot drift. Registering a taken name
raises unless ``replace=True``. ``regularizer`` may also be an import path
``"package.module:Class"`` (a :class:`Regularizer` subclass, registered or
not), so a command line can use a regulariser defined outside this package.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ot_transfer_jax import batched_sinkhorn, delta_weights, losses, ot

PyTree = Any
READS = ("features", "logits", "params")
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class Context:
  """What ``init`` may read beyond shapes (e.g. DELTA's channel weights).

  Attributes:
    student_layer, teacher_layer: the layer pair (``"features"`` terms).
    teacher: the teacher module and ``teacher_vars`` its variables.
    images: ``(N, H, W, C)`` normalised training images, labels ``(N,)``
      (a class-balanced sample; ``None`` when unavailable, e.g. in unit
      tests, or when no term sets ``needs_data``).
    num_classes: the target task's number of classes.
  """

  student_layer: Optional[str] = None
  teacher_layer: Optional[str] = None
  teacher: Optional[nn.Module] = None
  teacher_vars: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  images: Any = None
  labels: Any = None
  num_classes: Optional[int] = None


def default_of(fn: Callable, name: str) -> Any:
  """The default of ``fn``'s parameter ``name``: an option's default is the
  one of the function it is passed to, read, never copied."""
  return inspect.signature(fn).parameters[name].default


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """Base class. A subclass is a frozen dataclass whose fields are its
  options (with their defaults); no trainable parameters unless ``init``
  makes some."""

  reads: ClassVar[str] = "features"
  # Whether ``init`` reads ``Context.images`` / ``labels`` (built only then).
  needs_data: ClassVar[bool] = False

  @classmethod
  def option_defaults(cls) -> dict:
    """``{option: default}``, in field order."""
    return {f.name: f.default for f in dataclasses.fields(cls)}

  @classmethod
  def from_options(cls, **options: Any) -> "Regularizer":
    """``cls(**options)``; an unknown option is a ``ValueError`` listing the
    known ones."""
    unknown = sorted(set(options) - set(cls.option_defaults()))
    if unknown:
      raise ValueError(
          f"{cls.__name__} has no option(s) {unknown}; its options "
          f"(with defaults) are {cls.option_defaults()}.")
    return cls(**options)

  @property
  def options(self) -> dict:
    """``{option: value}`` of this instance."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def init(self, rng: jax.Array, student: Any, teacher: Any,
           context: Context) -> Tuple[PyTree, PyTree]:
    del rng, student, teacher, context
    return {}, {}

  def apply(self, params: PyTree, state: PyTree, student: Any,
            teacher: Any) -> Tuple[jax.Array, dict, PyTree]:
    raise NotImplementedError

  def apply_pairs(self, params: Sequence[PyTree], states: Sequence[PyTree],
                  students: Sequence[Any], teachers: Sequence[Any]
                  ) -> list[Tuple[jax.Array, dict, PyTree]]:
    """``apply`` of all a term's inputs (its layer pairs) at once.

    The default calls ``apply`` on each; a regulariser that can do better
    together (Omega_P: one Sinkhorn loop for all layers) overrides it.
    """
    return [self.apply(*args) for args in zip(params, states, students,
                                              teachers)]


_REGISTRY: dict[str, type] = {}


def register(name: str, *, replace: bool = False) -> Callable[[type], type]:
  """Class decorator: makes ``name`` usable as ``loss.terms.<key>.regularizer``.

  Raises:
    ValueError: ``name`` is taken by another class (unless ``replace=True``;
      the same class statement executed again replaces itself), the class is
      not a dataclass :class:`Regularizer` subclass, or its ``reads`` is not
      one of ``READS``.
  """

  def add(cls: type) -> type:
    _check_class(cls, name)
    # The same class statement run again (a config file loaded twice, as
    # reproduce and sweep do) is no conflict: it replaces itself.
    same = name in _REGISTRY and _source(_REGISTRY[name]) == _source(cls)
    if name in _REGISTRY and not (replace or same):
      taken = _REGISTRY[name]
      raise ValueError(
          f"The regularizer name {name!r} is taken by "
          f"{taken.__module__}.{taken.__qualname__}: choose another name, or "
          f"register({name!r}, replace=True) to replace it.")
    _REGISTRY[name] = cls
    return cls

  return add


def _source(cls: type) -> Optional[tuple]:
  """Where ``cls``'s methods are written (file, line), with its qualified
  name; ``None`` when it defines none in a file."""
  where = frozenset((f.__code__.co_filename, f.__code__.co_firstlineno)
                    for f in vars(cls).values() if inspect.isfunction(f)
                    and not f.__code__.co_filename.startswith("<"))
  return (cls.__qualname__, where) if where else None


def _check_class(cls: Any, name: str) -> None:
  if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
    raise ValueError(f"Regularizer {name!r}: {cls!r} is not a subclass of "
                     "regularizers.Regularizer.")
  if "__dataclass_fields__" not in cls.__dict__:
    raise ValueError(
        f"Regularizer {name!r}: decorate {cls.__name__} with "
        "@dataclasses.dataclass(frozen=True) (below @register): its fields "
        "are its options.")
  if cls.reads not in READS:
    raise ValueError(f"{cls.__name__}.reads={cls.reads!r} is not one of "
                     f"{READS}.")


def names() -> Tuple[str, ...]:
  """The registered regularisers."""
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type:
  """The class registered as ``name``, or imported from ``"module:Class"``."""
  if ":" in name:
    module, _, attr = name.partition(":")
    try:
      cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"Cannot import regularizer {name!r}: {e}. Use "
                       "'package.module:Class' with the package importable "
                       "(e.g. on PYTHONPATH).") from None
    _check_class(cls, name)
    return cls
  if name not in _REGISTRY:
    raise ValueError(f"Unknown regularizer {name!r}; registered: {names()} "
                     "(or give 'package.module:Class').")
  return _REGISTRY[name]


# ---------------------------------------------------------------------------
# Layer regularisers
# ---------------------------------------------------------------------------


_solve = ot.solve_neuron_ot


@register("ot")
@dataclasses.dataclass(frozen=True)
class OmegaP(Regularizer):
  """Omega_P: entropic OT between the two layers' neurons (the method).

  Options: keywords of :func:`ot_transfer_jax.ot.solve_neuron_ot` (with its
  defaults; ``tau`` < 1: unbalanced transport, logged as
  ``transported_mass``), ``warm_start`` (start Sinkhorn from the previous
  step's potentials), and how the term's layer pairs are solved: ``solver``
  ``"per_layer"`` (one ``solve_neuron_ot`` per pair), ``"batched"`` (all
  pairs in one Sinkhorn loop of ``block`` iterations per trip,
  :mod:`ot_transfer_jax.batched_sinkhorn`; envelope gradient only) or
  ``"auto"`` (batched on GPUs and TPUs, per layer on the CPU). State: the
  potentials ``(f (n_s,), g (n_t,))``, zero at step 0 (a valid start,
  without the epsilon scaling of a true cold start).
  """

  relative_epsilon: float = default_of(_solve, "relative_epsilon")
  spatial: str = default_of(_solve, "spatial")
  normalize: str = default_of(_solve, "normalize")
  threshold: float = default_of(_solve, "threshold")
  max_iterations: int = default_of(_solve, "max_iterations")
  grad: str = default_of(_solve, "grad")
  tau: float = default_of(_solve, "tau")
  solver: str = "auto"
  block: int = default_of(batched_sinkhorn.solve_layers, "block")
  warm_start: bool = True

  def __post_init__(self):
    # Checked when the config is written, not at the first step.
    ot.check_tau(self.tau)
    ot._check_choice("solver", self.solver, batched_sinkhorn.SOLVERS)
    batched_sinkhorn.check_block(self.block)
    if self.solver == "batched" and self.grad != "envelope":
      raise ValueError(
          f"solver='batched' solves with the envelope gradient only, not "
          f"grad={self.grad!r}: use solver='per_layer' (or 'auto' on a CPU).")

  def _solve_options(self) -> dict:
    return {k: v for k, v in self.options.items()
            if k not in ("warm_start", "solver", "block")}

  @staticmethod
  def _outputs(res: ot.NeuronTransport, unbalanced: bool):
    metrics = {"matched_fraction": res.matched_fraction,
               "sinkhorn_iters": res.n_iters,
               "sinkhorn_converged": res.converged.astype(jnp.float32)}
    if unbalanced:  # How much mass was matched.
      metrics["transported_mass"] = res.mass
    return res.value, metrics, res.potentials

  def init(self, rng, student, teacher, context):
    del rng, context
    ot.check_activation_shapes(student.shape, teacher.shape, self.spatial)
    return {}, (jnp.zeros((student.shape[-1],), jnp.float32),
                jnp.zeros((teacher.shape[-1],), jnp.float32))

  def apply(self, params, state, student, teacher):
    res = ot.solve_neuron_ot(
        student, teacher, init=state if self.warm_start else None,
        **self._solve_options())
    return self._outputs(res, self.tau != 1.0)

  def apply_pairs(self, params, states, students, teachers):
    # With the envelope gradient only: "auto" on an accelerator with
    # grad="unroll" stays per layer.
    if (batched_sinkhorn.resolve_solver(self.solver) == "per_layer"
        or self.grad != "envelope"):
      return super().apply_pairs(params, states, students, teachers)
    results = batched_sinkhorn.solve_layers(
        students, teachers, inits=states if self.warm_start else None,
        block=self.block, **self._solve_options())
    return [self._outputs(res, self.tau != 1.0) for res in results]


@register("feature_matching")
@dataclasses.dataclass(frozen=True)
class OmegaI(Regularizer):
  """Omega_I: the identity coupling (plain feature matching); equal widths."""

  spatial: str = default_of(losses.feature_matching, "spatial")
  normalize: str = default_of(losses.feature_matching, "normalize")

  def apply(self, params, state, student, teacher):
    return losses.feature_matching(student, teacher, **self.options), {}, state


@register("delta")
@dataclasses.dataclass(frozen=True)
class Delta(Regularizer):
  """DELTA (Li et al. 2019): channel-weighted feature matching; equal widths.

  The weights are the teacher's behaviour-based attention on the *target*
  task (:mod:`ot_transfer_jax.delta_weights`): ``init`` fits a linear head
  for the target labels on the teacher's frozen features of the training
  images in ``context``, zeroes each channel of the teacher layer in turn,
  and turns the cross-entropy increases into ``softmax(z / temperature)``
  (``z`` standardised). State: those weights, ``(n,)``, constant.
  Uniform weights would make this Omega_I (``feature_matching``).
  """

  needs_data: ClassVar[bool] = True
  temperature: float = default_of(delta_weights.channel_weights, "temperature")
  head_steps: int = default_of(delta_weights.channel_weights, "head_steps")
  spatial: str = default_of(losses.delta, "spatial")
  normalize: str = default_of(losses.delta, "normalize")

  def init(self, rng, student, teacher, context):
    del rng
    if context.teacher is None or context.images is None or context.labels is None:
      raise ValueError(
          "delta computes its channel weights from the teacher and labelled "
          "training images of the target task, and none were given (Context."
          "teacher / images / labels). Use feature_matching for uniform weights.")
    labels = jnp.asarray(context.labels)
    # The task's classes, not the sample's: a sample may miss a class.
    num_classes = context.num_classes or int(jnp.max(labels)) + 1
    model = context.teacher.clone(num_classes=num_classes)
    layer = context.teacher_layer
    compute = jax.jit(lambda v, x, y: delta_weights.channel_weights(
        model, v, x, y, (layer,), num_classes,
        temperature=self.temperature, head_steps=self.head_steps)[layer])
    weights = compute(context.teacher_vars, jnp.asarray(context.images), labels)
    if weights.shape != (student.shape[-1],):
      raise ValueError(
          f"delta pairs channel j of the student with channel j of the teacher: "
          f"the teacher layer {layer!r} has {weights.shape[0]} channels, the "
          f"student's {student.shape[-1]}. Use ot for layers of other widths.")
    return {}, {"channel_weights": weights}

  def apply(self, params, state, student, teacher):
    value = losses.delta(student, teacher, state["channel_weights"],
                         spatial=self.spatial, normalize=self.normalize)
    return value, {}, state


@register("attention")
@dataclasses.dataclass(frozen=True)
class AttentionTransfer(Regularizer):
  """AT: distance of normalised spatial attention maps (conv layers)."""

  p: float = default_of(losses.attention_transfer, "p")

  def apply(self, params, state, student, teacher):
    return losses.attention_transfer(student, teacher, **self.options), {}, state


class HintRegressor(nn.Module):
  """FitNets regressor: a 1x1 convolution (dense on the neuron axis).

  ``(m, *positions, n_s) -> (m, *positions, n_t)``.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=False)(x.astype(jnp.float32))


@register("fitnets")
@dataclasses.dataclass(frozen=True)
class FitNets(Regularizer):
  """FitNets: L2 between the teacher and the student through a learned regressor."""

  def init(self, rng, student, teacher, context):
    del context
    ot.check_activation_shapes(student.shape, teacher.shape, "flatten")
    params = HintRegressor(teacher.shape[-1]).init(
        rng, jnp.zeros(student.shape, jnp.float32))["params"]
    return params, {}

  def apply(self, params, state, student, teacher):
    projected = HintRegressor(teacher.shape[-1]).apply({"params": params},
                                                       student)
    return losses.fitnets_hint(projected, teacher), {}, state


# ---------------------------------------------------------------------------
# Logit and parameter regularisers
# ---------------------------------------------------------------------------


@register("kd")
@dataclasses.dataclass(frozen=True)
class KnowledgeDistillation(Regularizer):
  """KD: temperature-softened KL between the logits (same label space)."""

  reads: ClassVar[str] = "logits"
  temperature: float = default_of(losses.kd_loss, "temperature")

  def apply(self, params, state, student, teacher):
    return losses.kd_loss(student, teacher, self.temperature), {}, state


@register("l2_sp")
@dataclasses.dataclass(frozen=True)
class L2SP(Regularizer):
  """L2-SP: ``||theta_backbone - theta_teacher||^2 / 2`` (the weight is alpha)."""

  reads: ClassVar[str] = "params"

  def apply(self, params, state, student, teacher):
    return losses.l2_sp(student, teacher, alpha=1.0), {}, state


# ---------------------------------------------------------------------------
# Terms: a configured regulariser with its weight and layers
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Term:
  """``weight * sum_l layer_weight_l * R(student_l, teacher_l)`` in the loss.

  ``pairs`` is ``((student_layer, teacher_layer, layer_weight), ...)`` for a
  ``"features"`` regulariser and ``()`` otherwise.
  """

  name: str
  regularizer: Regularizer
  weight: float
  pairs: Tuple[Tuple[str, str, float], ...] = ()

  @property
  def reads(self) -> str:
    return self.regularizer.reads


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
  reg = get(regularizer).from_options(**options)
  return {"regularizer": regularizer, "weight": float(weight),
          "student_layers": tuple(student_layers),
          "teacher_layers": tuple(teacher_layers),
          "layer_weights": tuple(float(w) for w in layer_weights),
          "options": reg.options}


def terms_from_config(terms_cfg: Mapping[str, Any]) -> Tuple[Term, ...]:
  """The loss terms of ``config.loss.terms``, layer terms first, then by name.

  Raises:
    ValueError: unknown regulariser or option, layers given to a term that
      does not read features (or missing for one that does), or lists of
      unequal lengths; the message names the term.
  """
  out = []
  for name in sorted(terms_cfg):
    cfg = terms_cfg[name]
    where = f"loss.terms.{name}"
    try:
      reg = get(cfg["regularizer"]).from_options(**dict(cfg["options"]))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    s_layers = tuple(cfg["student_layers"])
    t_layers = tuple(cfg["teacher_layers"]) or s_layers
    weights = tuple(cfg["layer_weights"]) or (1.0,) * len(s_layers)
    if reg.reads != "features":
      if s_layers or cfg["teacher_layers"] or cfg["layer_weights"]:
        raise ValueError(f"{where}: {cfg['regularizer']!r} reads "
                         f"{reg.reads}, not layers; remove its student_layers, "
                         "teacher_layers and layer_weights.")
      pairs = ()
    else:
      if not s_layers or not len(s_layers) == len(t_layers) == len(weights):
        raise ValueError(
            f"{where}: student_layers, teacher_layers and layer_weights must "
            f"be non-empty and of equal length; got {s_layers}, {t_layers}, "
            f"{weights}.")
      pairs = tuple(zip(s_layers, t_layers, (float(w) for w in weights)))
    out.append(Term(name, reg, float(cfg["weight"]), pairs))
  order = {reads: i for i, reads in enumerate(READS)}
  return tuple(sorted(out, key=lambda t: order[t.reads]))


def pair_key(student_layer: str, teacher_layer: str) -> str:
  return f"{student_layer}->{teacher_layer}"


def captured_layers(terms: Sequence[Term]) -> Tuple[Tuple[str, ...],
                                                    Tuple[str, ...]]:
  """The distinct student and teacher layers the terms read, in order."""
  pairs = [p for t in terms for p in t.pairs]
  return (tuple(dict.fromkeys(p[0] for p in pairs)),
          tuple(dict.fromkeys(p[1] for p in pairs)))


def split_head(params: Mapping[str, Any]) -> Tuple[dict, dict]:
  """``(backbone, head)`` parameters: the ``head`` module and the rest."""
  params = dict(params)
  head = params.pop(HEAD, {})
  return params, head


def _inputs(term: Term, views: Mapping[str, Any]):
  """``[(key, student, teacher)]``: what ``term`` reads from ``views``.

  ``views`` holds ``"features": (student_feats, teacher_feats)``,
  ``"logits": (s, t)`` and ``"params": (s_backbone, t_backbone)``.
  """
  if term.reads == "features":
    s_feats, t_feats = views["features"]
    return [(pair_key(s, t), s_feats[s], t_feats[t]) for s, t, _ in term.pairs]
  s, t = views[term.reads]
  return [(term.reads, s, t)]


def init_terms(terms: Sequence[Term], rng: jax.Array,
               views: Mapping[str, Any],
               context: Context = Context()) -> Tuple[dict, dict]:
  """``(params, state)``: ``{term: {key: ...}}`` for every term and input.

  ``views`` as in :func:`apply_terms`, of ``jax.ShapeDtypeStruct`` s. Each
  term's ``apply`` is then traced with ``jax.eval_shape``, so a pair of
  layers it cannot compare fails here, naming the term and the layers.
  """
  params, state = {}, {}
  for i, term in enumerate(terms):
    params[term.name], state[term.name] = {}, {}
    for j, (key, s, t) in enumerate(_inputs(term, views)):
      layers = dict(zip(("student_layer", "teacher_layer"), key.split("->")))
      ctx = dataclasses.replace(context, **layers) if term.pairs else context
      try:
        p, st = term.regularizer.init(
            jax.random.fold_in(jax.random.fold_in(rng, i), j), s, t, ctx)
        jax.eval_shape(term.regularizer.apply, p, st, s, t)
      except (ValueError, TypeError) as e:
        raise ValueError(f"loss.terms.{term.name} "
                         f"({type(term.regularizer).__name__}) on {key}: "
                         f"{e}") from None
      params[term.name][key], state[term.name][key] = p, st
  return params, state


def apply_terms(terms: Sequence[Term], params: Mapping, state: Mapping,
                views: Mapping[str, Any]) -> Tuple[dict, dict]:
  """Every term's value, and what to log.

  Args:
    views: ``{"features": (student_feats, teacher_feats), "logits":
      (student_logits, teacher_logits), "params": (student_backbone,
      teacher_backbone)}``, the teacher's side constant; only the views the
      terms read need be present.

  Returns:
    ``(metrics, new_state)``. ``metrics["reg/<term>"]`` is the term's value
    ``sum_l layer_weight_l * R_l`` *before* the term's weight (the loss adds
    ``weight * value``); ``reg/<term>/<key>`` the value per layer pair (or
    ``logits`` / ``params``); ``<metric>/<term>/<key>`` the regulariser's own
    metrics (e.g. ``matched_fraction/ot/stage2->stage2``).
  """
  metrics, new_state = {}, {}
  for term in terms:
    value = jnp.zeros((), jnp.float32)
    new_state[term.name] = {}
    weights = [w for _, _, w in term.pairs] or [1.0]
    keys, students, teachers = zip(*_inputs(term, views))
    outputs = term.regularizer.apply_pairs(
        [params[term.name][k] for k in keys],
        [state[term.name][k] for k in keys], students, teachers)
    for key, (v, m, new_state[term.name][key]), w in zip(keys, outputs,
                                                          weights):
      value = value + w * v
      metrics[f"reg/{term.name}/{key}"] = v
      metrics.update({f"{k}/{term.name}/{key}": x for k, x in m.items()})
    metrics[f"reg/{term.name}"] = value
  return metrics, new_state
