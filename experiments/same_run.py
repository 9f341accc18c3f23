"""When two configs describe the same run: one table of keys, one diff.

A run's config is saved with it: in its checkpoints (``RunMeta.config``) and
in every record ``experiments.curve``, ``experiments.reproduce`` and
``experiments.sweep`` keep in their ``--out``. Two questions compare a saved
config with the one a command builds now, and both read :data:`KEYS`:

* **May this checkpoint be resumed?** (:func:`resume_differences`, used by
  ``experiments.loop.resume`` and by a student's check of its cached
  teacher.) Keys marked :data:`RESUMABLE` or :data:`RESULT_NEUTRAL` may
  differ.
* **Is this record the run the command asks for?** (:func:`record_differences`,
  used by curve, reproduce and sweep before they reuse a kept record,
  :func:`experiments.runs.load_record`.) Only
  :data:`RESULT_NEUTRAL` keys may differ: a record made with another
  ``num_steps`` or ``eval_every`` is another result.

Every other key makes another run. An entry covers the key and every key
under it (``analysis`` covers ``analysis.layers``). A key that a run reads
only for some values of another key (:data:`READ_ONLY_WHERE`) may differ
where neither config reads it.

**A key on one side only** (a config saved before an option existed, or
after one was retired) is compared as follows (:func:`differences`):

1. a key of :func:`experiments.configs.common.base_config` counts, on the side
   that lacks it, as its default there: an option added with the earlier
   behaviour as its default leaves every older run the same run;
2. inside a loss term both sides have (``loss.terms.<name>.``, same
   regulariser), an option counts as the regulariser's default
   (``option_defaults()``); any other key there is ignored, because
   ``term_config`` writes every field and option of a term into the config,
   so a key there on one side only was added or retired by a code change
   (with the earlier behaviour as its default), not chosen by the run;
3. anything else on one side only is a difference, reported once at the
   root of what is missing: a term present on one side, a model kwarg
   (``model.kwargs.width``) that one side sets and the other leaves to the
   model's default -- nothing writes those defaults into the config, so
   absence cannot be read as "the default".

The teacher a config trains (``teacher.job``) is compared key by key with the
same rules; what a student reads of it is the teacher's final weights, so every
key of the job that does not change them (its resumable and result-neutral
keys, but ``num_steps``: a longer job trains the cached teacher on) is
result-neutral for the student.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional

#: A resume may change the key (its value from the resume on is the new one),
#: but a record made with another value is another result.
RESUMABLE = "resumable"
#: The key does not change a run's result: records and checkpoints that
#: differ only there are the same run.
RESULT_NEUTRAL = "result_neutral"

#: Keys no config has any more that older records and checkpoints hold: the
#: suite metadata (a results table's method order, its baseline) that configs
#: wrote until the suite moved to the config file's ``get_methods``
#: (``experiments.runs.load_config_module``). Result-neutral in :data:`KEYS`,
#: so that every committed record and every existing checkpoint stays the
#: same run, whatever they say.
RETIRED = ("method_order", "baseline_method")

#: Every key (or subtree) that two configs of the same run may differ in.
KEYS: Mapping[str, str] = {
    # Where things are: paths and the machine.
    "teacher.workdir": RESULT_NEUTRAL,
    "data.data_dir": RESULT_NEUTRAL,
    # Data-parallel width: documented (common.base_config) to change float
    # rounding only, never the batches, steps or data.
    "max_devices": RESULT_NEUTRAL,
    "eval_batch_size": RESULT_NEUTRAL,  # Padded and masked: same accuracy.
    # Cadence of what a run writes, not of what it computes; log_every also
    # paces the divergence check, which only decides when a diverging run
    # stops.
    "log_every": RESULT_NEUTRAL,
    "checkpoint_every": RESULT_NEUTRAL,
    "max_to_keep": RESULT_NEUTRAL,
    # Test evaluated at every evaluation or only where a read needs it (a new
    # best validation accuracy, the last step): both reads are the same.
    "test_every_eval": RESULT_NEUTRAL,
    # What a resume is allowed to do, not what it computes.
    "allow_resume_with_changes": RESULT_NEUTRAL,
    # Read by experiments.runs.seeded only, whose effect is data.seed (which
    # is compared).
    "vary_data_seed": RESULT_NEUTRAL,
    # Retired suite metadata (:data:`RETIRED`): on the saved side only.
    **dict.fromkeys(RETIRED, RESULT_NEUTRAL),
    # A resume may train on, evaluate at another cadence, analyse other
    # layers or tolerate more non-finite steps; a record of another value is
    # another result.
    "num_steps": RESUMABLE,
    "eval_every": RESUMABLE,
    "analysis": RESUMABLE,
    "loss.max_bad_steps": RESUMABLE,
}

#: ``{key: (switch, values)}``: ``key`` is read only where ``switch`` has
#: one of ``values``; where neither config reads it, it may differ (for a
#: resume and for a record alike).
READ_ONLY_WHERE: Mapping[str, tuple] = {
    # experiments.job.load_teacher builds the teacher's network from
    # teacher.name only for these sources; a trained teacher's is
    # teacher.job.model. Configs of trained teachers wrote teacher.name until
    # it was retired there: their records and checkpoints hold it, whatever
    # it says.
    "teacher.name": ("teacher.source", ("torchvision", "random")),
}

_TEACHER_JOB = "teacher.job."
_TERMS = "loss.terms."
# How a value on the side that lacks it is shown.
_ABSENT = "(absent)"


def kind(key: str) -> Optional[str]:
  """:data:`RESUMABLE`, :data:`RESULT_NEUTRAL` or None (another run) for a
  dotted config key, by :data:`KEYS` and the rule for ``teacher.job``."""
  if key.startswith(_TEACHER_JOB):
    inner = key[len(_TEACHER_JOB):]
    if _covers("num_steps", inner):  # The teacher trains on: another one.
      return None
    return RESULT_NEUTRAL if kind(inner) else None
  for prefix, k in KEYS.items():
    if _covers(prefix, key):
      return k
  return None


def resume_differences(saved: dict, now: dict) -> list[str]:
  """``["key: saved -> now", ...]``: what makes a checkpoint saved with
  ``saved`` (JSON config) not resumable by a run of ``now``."""
  return differences(saved, now, ignore=(RESUMABLE, RESULT_NEUTRAL))


def record_differences(saved: dict, now: dict) -> list[str]:
  """``["key: saved -> now", ...]``: what makes a record made with ``saved``
  another result than a run of ``now`` (only result-neutral keys may
  differ)."""
  return differences(saved, now, ignore=(RESULT_NEUTRAL,))


def differences(saved: dict, now: dict,
                ignore: Iterable[str] = (RESUMABLE, RESULT_NEUTRAL)
                ) -> list[str]:
  """``["key: saved -> now", ...]`` between two JSON configs (nested dicts),
  sorted by key, over every key whose :func:`kind` is not in ``ignore``; keys
  on one side only by the rule of this module's docstring."""
  ignore = tuple(ignore)
  flat = {"saved": flatten(saved), "now": flatten(now)}
  out, roots = [], set()
  for key in sorted(flat["saved"].keys() | flat["now"].keys()):
    if kind(key) in ignore or _unread(key, flat):
      continue
    sides = [flat[s].get(key, _ABSENT) for s in ("saved", "now")]
    if _ABSENT not in sides:
      if sides[0] != sides[1]:
        out.append(f"{key}: {sides[0]!r} -> {sides[1]!r}")
      continue
    missing = "saved" if sides[0] is _ABSENT else "now"
    if _is_node(flat[missing], key):
      continue  # {} on one side, filled on the other: its keys compare.
    default = _default(key, flat, missing)
    if default is _IGNORED:
      continue
    if default is not _UNKNOWN:
      sides = [default if s is _ABSENT else s for s in sides]
      if sides[0] != sides[1]:
        out.append(f"{key}: {sides[0]!r} -> {sides[1]!r}")
      continue
    root = _missing_root(key, flat[missing])
    if root not in roots:
      roots.add(root)
      present = "now" if missing == "saved" else "saved"
      shown = _subtree(flat[present], root)
      out.append(f"{root}: {shown} -> {_ABSENT}" if missing == "now"
                 else f"{root}: {_ABSENT} -> {shown}")
  return out


def _unread(key: str, flat: dict) -> bool:
  """Whether neither config reads ``key`` (:data:`READ_ONLY_WHERE`), inside
  ``teacher.job`` too; a switch absent on a side counts as its default."""
  inner = key[len(_TEACHER_JOB):] if key.startswith(_TEACHER_JOB) else key
  scope = key[:len(key) - len(inner)]
  for prefix, (switch, values) in READ_ONLY_WHERE.items():
    if _covers(prefix, inner):
      default = _base_defaults().get(switch)
      return all(f.get(scope + switch, default) not in values
                 for f in flat.values())
  return False


def flatten(tree: Any, prefix: str = "") -> dict:
  """``{"a.b": leaf}`` for a nested dict; an empty dict is a leaf (``{}``)."""
  if isinstance(tree, Mapping) and tree:
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


# ---------------------------------------------------------------------------
# Keys on one side only
# ---------------------------------------------------------------------------

_IGNORED, _UNKNOWN = object(), object()


def _default(key: str, flat: dict, missing: str):
  """The value ``key`` counts as on the side ``missing`` lacks it: a default
  (rules 1 and 2), ``_IGNORED`` (rule 2) or ``_UNKNOWN`` (rule 3)."""
  inner = key[len(_TEACHER_JOB):] if key.startswith(_TEACHER_JOB) else key
  base = _base_defaults()
  if inner in base:
    return base[inner]
  scope = key[:len(key) - len(inner)]  # "" or "teacher.job."
  if inner.startswith(_TERMS):
    name, _, rest = inner[len(_TERMS):].partition(".")
    term = f"{scope}{_TERMS}{name}"
    regularizer = {f.get(f"{term}.regularizer") for f in flat.values()}
    if len(regularizer) == 1 and None not in regularizer:
      # The term is on both sides, with one regulariser.
      option = rest.removeprefix("options.")
      if rest.startswith("options.") and "." not in option:
        defaults = _option_defaults(regularizer.pop())
        if option in defaults:
          return _jsonable(defaults[option])
      return _IGNORED
  return _UNKNOWN


@functools.lru_cache(maxsize=1)
def _base_defaults() -> dict:
  # Imported here: the configs import experiments.job, which imports this.
  from experiments.configs import common
  from ot_transfer_jax import checkpoint
  return flatten(checkpoint.config_to_json(common.base_config()))


def _option_defaults(regularizer: str) -> dict:
  from ot_transfer_jax import regularizers
  try:
    return regularizers.get(regularizer).option_defaults()
  except ValueError:  # A regulariser this code does not have.
    return {}


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def _covers(prefix: str, key: str) -> bool:
  return key == prefix or key.startswith(prefix + ".")


def _is_node(flat: dict, key: str) -> bool:
  return any(k.startswith(key + ".") for k in flat)


def _missing_root(key: str, flat: dict) -> str:
  """The shortest prefix of ``key`` that ``flat`` has neither as a key nor
  as a node."""
  parts = key.split(".")
  for i in range(1, len(parts) + 1):
    prefix = ".".join(parts[:i])
    if prefix not in flat and not _is_node(flat, prefix):
      return prefix
  return key


def _subtree(flat: dict, root: str) -> str:
  """What ``flat`` holds under ``root``, shown in at most 60 characters."""
  if root in flat:
    return repr(flat[root])
  text = repr({k[len(root) + 1:]: v for k, v in flat.items()
               if k.startswith(root + ".")})
  return text if len(text) <= 60 else text[:56] + " ...}"
