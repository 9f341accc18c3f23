"""The README's code runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
  text = README.read_text()
  section = text.split(after_heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_optax_example_trains():
  namespace = {}
  exec(compile(_python_block("## Use the regulariser"), "README.md", "exec"),
       namespace)
  losses = namespace["losses"]
  assert len(losses) == 100
  assert losses[-1] < 0.8 * losses[0]


def test_multi_device_example_matches_one_device():
  namespace = {}
  exec(compile(_python_block("### Several devices"), "README.md", "exec"),
       namespace)
  ref = namespace["grads_ref"]
  for how in ("pmap", "shard"):
    assert abs(float(namespace[f"loss_{how}"]) - float(namespace["loss_ref"])
               ) <= 1e-5 * abs(float(namespace["loss_ref"]))
    for key in ref:
      got, want = np.asarray(namespace[f"grads_{how}"][key]), np.asarray(
          ref[key])
      assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (
          how, key)
