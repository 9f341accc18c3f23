"""The README's code runs as written."""

import pathlib
import re

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
