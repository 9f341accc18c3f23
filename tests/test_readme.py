"""The documentation's code runs as written: README.md and docs/*.md.

Blocks are found by the text before them on whichever page holds it
(``doc_support``), so they stay tested when a section moves between pages.
"""

import re

import numpy as np
import pytest

from doc_support import README, REPO, bash_block, page_with, pages, run_block

# The pages the README links to, in its order.
DOC_PAGES = ("usage", "training", "experiments", "results", "transformers",
             "performance", "reliability")


def test_optax_example_trains():
  assert page_with("## Use the regulariser") == README
  namespace = run_block("## Use the regulariser")
  losses = namespace["losses"]
  assert len(losses) == 100
  assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_multi_device_example_matches_one_device():
  namespace = run_block("### Several devices")
  ref = namespace["grads_ref"]
  for how in ("pmap", "shard"):
    assert abs(float(namespace[f"loss_{how}"]) - float(namespace["loss_ref"])
               ) <= 1e-5 * abs(float(namespace["loss_ref"]))
    for key in ref:
      got, want = np.asarray(namespace[f"grads_{how}"][key]), np.asarray(
          ref[key])
      assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (
          how, key)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_nnx_example_trains_with_the_reference_gradient():
  namespace = run_block("### Flax NNX")
  losses = namespace["losses"]
  assert len(losses) == 100
  assert losses[-1] < 0.8 * losses[0]

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from ot_transfer_jax import solve_neuron_ot

  model, x, y = namespace["model"], namespace["x"], namespace["y"]
  teacher = namespace["teacher_feats"]
  grads = nnx.jit(nnx.grad(namespace["loss_fn"]))(model)

  # Reference: the same network in plain JAX, with Omega_P's gradient in
  # closed form (envelope theorem, plan held fixed):
  # dOmega/da_j = (2/D) sum_k P_jk (a_j - t_k), i.e. for feats (D, n_s):
  # (2/D) (feats * rowsum(P) - teacher @ P^T).
  params = nnx.state(model, nnx.Param)
  p = {(layer, name): jnp.asarray(params[layer][name][...])
       for layer in ("hidden", "head") for name in ("kernel", "bias")}

  def forward(p):
    feats = jax.nn.relu(x @ p["hidden", "kernel"] + p["hidden", "bias"])
    return feats, feats @ p["head", "kernel"] + p["head", "bias"]

  feats, _ = forward(p)
  plan = solve_neuron_ot(feats, teacher).plan
  d_omega = (2 / feats.shape[0]) * (feats * plan.sum(1) - teacher @ plan.T)

  def surrogate(p):
    feats, logits = forward(p)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.1 * jnp.sum(jax.lax.stop_gradient(d_omega) * feats)

  reference = jax.grad(surrogate)(p)
  assert float(jnp.abs(d_omega).max()) > 0  # The regulariser is active.
  for (layer, name), ref in reference.items():
    got = np.asarray(grads[layer][name][...])
    np.testing.assert_allclose(got, ref, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=f"{layer}/{name}")


@pytest.mark.slow  # Compiles two transformers and Sinkhorn: ~15-30 s on CPU.
def test_language_model_example_lowers_omega_between_hidden_states():
  namespace = run_block("## A language model")
  omegas = namespace["omegas"]
  assert len(omegas) == 50
  assert omegas[-1] < 0.9 * omegas[0]
  hidden_states, inputs = namespace["hidden_states"], namespace["inputs"]
  _, hidden = hidden_states(namespace["student"], inputs)
  _, t_hidden = hidden_states(namespace["teacher"], inputs)
  assert [h.shape for h in hidden] == [(8, 16, 32)] * 2  # (batch, seq, d_model)
  assert [h.shape for h in t_hidden] == [(8, 16, 64)] * 2


def test_ci_runs_the_readme_install_and_test_commands():
  # CI (.ci/run) must run what the README tells a new user to run.
  assert page_with("Install the test extra") == README
  install, test = bash_block("Install the test extra").split(" && ")
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
  # `pip ...` and `python ...` there are `python3 -m pip ...` and `python3 ...` here.
  expected = ["python3 -m " + c if c.startswith("pip ") else
              c.replace("python ", "python3 ", 1) for c in (install, test)]
  assert commands == expected
  assert "-c constraints.txt" in install
  assert (README.parent / "constraints.txt").exists()


def test_readme_is_a_front_door_linking_every_docs_page():
  text = README.read_text()
  assert len(text.splitlines()) <= 200
  listed = text.split("## Documentation", 1)[1]
  assert tuple(re.findall(r"\]\(docs/(\w+)\.md\)", listed)) == DOC_PAGES
  assert [p.stem for p in pages()[1:]] == sorted(DOC_PAGES)


def _slug(heading: str) -> str:
  """GitHub's anchor for a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_image_resolves():
  checked = 0
  for page in pages():
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if re.match(r"[a-z]+://", target):
        continue
      path, _, anchor = target.partition("#")
      file = (page.parent / path).resolve() if path else page
      assert file.exists(), f"{page.name}: {target} does not exist"
      if anchor:
        headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
        assert anchor in map(_slug, headings), f"{page.name}: {target}"
      checked += 1
  assert checked >= 15  # The pages link to each other and show figures.


def test_the_readme_map_names_files_that_exist():
  # The "Map of the tree" block: a name at indent 0 is a top-level folder,
  # at indent 2 an entry inside it; deeper lines continue a description.
  tree = re.search(r"## Map of the tree\n\n```\n(.*?)```", README.read_text(),
                   re.S).group(1)
  named, folder = [], None
  for line in tree.splitlines():
    indent = len(line) - len(line.lstrip())
    if indent > 2 or not line.strip():
      continue
    names = re.split(r"\s{2,}", line.strip())[0].split(", ")
    if indent == 0:
      folder = names[0]
      named.append(REPO / folder)
    else:
      named += [REPO / folder / name for name in names]
  assert len(named) >= 20
  missing = [str(p.relative_to(REPO)) for p in named if not p.exists()]
  assert not missing, f"the README's map names missing paths: {missing}"


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_nnx_shard_map_recipe_runs_on_one_device():
  # tests/axis_name_check.py runs it on 2 devices (test_multidevice.py).
  namespace = run_block("### NNX modules under `shard_map`")
  assert abs(float(namespace["loss_shard"]) - float(namespace["loss_ref"])
             ) <= 1e-5 * abs(float(namespace["loss_ref"]))
  losses = namespace["losses"]
  assert len(losses) == 20 and losses[-1] < 0.9 * losses[0]


def test_when_does_omega_p_help_table_quotes_its_results():
  """Every cell of the README's regime table is the pair row it names in the
  results.md its row links: a linked row reads the page's first value
  section, each "the same, ..." row below it the next one; column 1 is
  Omega_P against the start without a term, column 2 against ot_uniform;
  both reads' mean, s.e. and seeds won, as curve wrote them."""
  section = README.read_text().split("## When does Ω_P help?")[1]
  section = section.split("\n## ")[0]
  cell = re.compile(r"([+−-]\d+\.\d\d) \((\d+\.\d\d)\) (\d+/\d+) \\\| "
                    r"([+−-]\d+\.\d\d) \((\d+\.\d\d)\) (\d+/\d+)")
  # The no-term start of each study, then the control.
  pairs = (r"\| (ot|ot_kd) − (none|scratch|finetune|student|kd) \|",
           r"\| (ot|ot_kd) − ot_uniform(_kd)? \|")
  rows, values = 0, []
  for line in section.splitlines():
    if not line.startswith("| ") or line.startswith("| regime"):
      continue
    link = re.search(r"\]\((docs/regimes/\w+/results\.md)\)", line)
    if link:  # The page's value sections, in order ("## key = value").
      page = (REPO / link.group(1)).read_text()
      values = [v for v in re.split(r"\n## ", page)[1:]
                if re.match(r"[\w.]+ = ", v)]
    cells = cell.findall(line)
    assert values and len(cells) == 2, line
    lines = values.pop(0).splitlines()
    for c, pair in zip(cells, pairs):
      # results.md writes "-" and "+0.00" where the README writes "−", "−0.00".
      quoted = " | ".join(x.replace("−", "-") for x in c).replace(
          "-0.00 ", "+0.00 ")
      found = [l for l in lines if re.match(pair, l)
               and l.replace("-0.00 ", "+0.00 ").endswith(f"| {quoted} |")]
      assert len(found) == 1, (line, pair, quoted)
    rows += 1
  assert rows >= 8
