"""docs/transformers.md's language-model example runs as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "transformers.md"


def _python_block(after_heading: str) -> str:
  section = DOC.read_text().split(after_heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # Compiles two transformers and Sinkhorn: ~15-30 s on CPU.
def test_language_model_example_lowers_omega_between_hidden_states():
  namespace = {}
  exec(compile(_python_block("## A language model"), str(DOC), "exec"),
       namespace)
  omegas = namespace["omegas"]
  assert len(omegas) == 50
  assert omegas[-1] < 0.9 * omegas[0]
  student, teacher = namespace["student"], namespace["teacher"]
  _, hidden = namespace["hidden_states"](student, namespace["inputs"])
  _, t_hidden = namespace["hidden_states"](teacher, namespace["inputs"])
  assert [h.shape for h in hidden] == [(8, 16, 32)] * 2
  assert [h.shape for h in t_hidden] == [(8, 16, 64)] * 2
