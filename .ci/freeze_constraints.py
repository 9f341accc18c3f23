"""Writes constraints.txt: the exact versions CI tests.

  python .ci/freeze_constraints.py [--extras experiments,test] [--out constraints.txt]

Walks the requirements of pyproject.toml (the core plus the given extras) and,
recursively, of every installed distribution they pull, and pins each one to
the version installed here (`pip freeze`, restricted to what the install
needs). Run it after testing a new set of versions; `.ci/run` and the
README's commands install with `-c constraints.txt`.
"""

import argparse
import importlib.metadata as md
import pathlib
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _applies(req: Requirement, extras) -> bool:
  if req.marker is None:
    return True
  env = default_environment()
  return any(req.marker.evaluate({**env, "extra": e}) for e in extras or [""])


def closure(requirements, extras_of_root=()):
  """{canonical name: installed version} of everything the requirements pull."""
  pins, todo = {}, [(Requirement(r), ()) for r in requirements]
  while todo:
    req, parent_extras = todo.pop()
    if not _applies(req, parent_extras):
      continue
    name = canonicalize_name(req.name)
    try:
      dist = md.distribution(req.name)
    except md.PackageNotFoundError:
      sys.exit(f"Error: {req.name} is required but not installed here; "
               "install the extras first: pip install -e '.[experiments,test]'.")
    key = (name, tuple(sorted(req.extras)))
    if key in pins:
      continue
    pins[key] = dist.version
    for sub in dist.requires or []:
      todo.append((Requirement(sub), tuple(req.extras)))
  return {name: v for (name, _), v in sorted(pins.items())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--extras", default="experiments,test")
  parser.add_argument("--out", default=str(ROOT / "constraints.txt"))
  args = parser.parse_args(argv)
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  requirements = list(project["dependencies"])
  for extra in args.extras.split(","):
    requirements += project["optional-dependencies"][extra]
  pins = closure(requirements)
  header = (f"# Exact versions CI tests (Python {sys.version_info.major}."
            f"{sys.version_info.minor}); made by .ci/freeze_constraints.py "
            f"--extras {args.extras}.\n")
  text = header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
  pathlib.Path(args.out).write_text(text)
  print(text, end="")


if __name__ == "__main__":
  main()
