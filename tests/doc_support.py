"""Code blocks of the documentation: README.md and the docs/*.md pages.

A block is named by a text that comes before it on its page (usually its
heading): ``python_block("### Flax NNX")`` is the first ```python block after
that text. The text must occur on exactly one page, so a block stays found
when a section moves from one page to another, and a text that is ambiguous
fails loudly instead of picking a page.
"""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def pages() -> list[pathlib.Path]:
  """README.md, then every docs/*.md page (sorted)."""
  return [README, *sorted((REPO / "docs").glob("*.md"))]


def page_with(text: str) -> pathlib.Path:
  """The one documentation page that contains ``text``."""
  found = [page for page in pages() if text in page.read_text()]
  if len(found) != 1:
    raise LookupError(f"{text!r} is on {len(found)} documentation pages "
                      f"({[str(p.relative_to(REPO)) for p in found]}); "
                      "it must be on exactly one")
  return found[0]


def block(after: str, language: str = "python") -> str:
  """The first ```language block after the text ``after``, on its page."""
  section = page_with(after).read_text().split(after, 1)[1]
  match = re.search(rf"```{language}\n(.*?)```", section, re.S)
  if match is None:
    raise LookupError(f"no ```{language} block after {after!r}")
  return match.group(1)


def python_block(after: str) -> str:
  return block(after, "python")


def bash_block(after: str) -> str:
  return block(after, "bash").strip()


def run_block(after: str) -> dict:
  """Executes a python block; returns its global namespace."""
  page = page_with(after)
  namespace = {}
  exec(compile(python_block(after), str(page.relative_to(REPO)), "exec"),
       namespace)
  return namespace
