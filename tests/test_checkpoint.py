"""Checkpoints: checksums, fallback to the newest intact step, fit checks,
and the inference API (restore -> predict, test split, the docs' restore snippet)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import data, loop
from ot_transfer_jax import checkpoint

import doc_support
from digits_job import REPO, tiny_config


@pytest.fixture(scope="module")
def run_dir(teacher_dir, tmp_path_factory):
  """A finished tiny digits_transfer run (checkpoints at steps 10 and 20)."""
  path = tmp_path_factory.mktemp("run")
  loop.train_and_evaluate(tiny_config(teacher_dir), str(path))
  return path


def _copy(run_dir, dst):
  shutil.copytree(run_dir, dst)
  return dst


def _flip(path, offset=None):
  data = bytearray(path.read_bytes())
  data[len(data) // 2 if offset is None else offset] ^= 0x01
  path.write_bytes(bytes(data))


def _data_files(step_dir):
  return sorted(f.relative_to(step_dir) for f in step_dir.rglob("*")
                if f.is_file() and f.parent.name == "d")


def _final(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


def test_one_flipped_byte_in_any_read_array_file_is_detected(run_dir,
                                                             tmp_path):
  """Every file of the OCDBT stores, at its middle and (array data) at 8
  more offsets: a flipped byte is an error naming the step, and the array
  when the file still decodes; or the byte is never read (orbax leaves
  superseded b-tree nodes behind) and the restored arrays are intact."""
  step_dir = run_dir / "checkpoints" / "20"
  reference = checkpoint.restore(str(run_dir))
  named, trials = set(), 0
  for rel in _data_files(step_dir):
    size = (step_dir / rel).stat().st_size
    offsets = {size // 2} | ({size * k // 9 for k in range(1, 9)}
                             if size > 8192 else set())
    for offset in sorted(offsets):
      trials += 1
      work = _copy(run_dir, tmp_path / f"flip{trials}")
      _flip(work / "checkpoints" / "20" / rel, offset)
      try:
        checkpoint.restore(str(work))
      except checkpoint.DamagedCheckpointError as e:
        assert "step 20" in str(e), e
        named.update(re.findall(r"array (\S+) does not match", str(e)))
        continue
      # Undetected: then the flipped byte is one orbax never reads (a
      # superseded b-tree node or chunk), and what it restores is intact.
      restored = checkpoint.restore(str(work))
      jax.tree_util.tree_map(np.testing.assert_array_equal,
                             restored.variables, reference.variables)
  assert any(n.startswith("params.") for n in named), named
  assert any(n.startswith("opt_state.") for n in named), named


def test_resume_falls_back_to_the_newest_intact_step(teacher_dir, run_dir,
                                                     tmp_path, caplog):
  work = _copy(run_dir, tmp_path / "run")
  step_dir = work / "checkpoints" / "20"
  largest = max((f for f in step_dir.rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  _flip(largest)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 20 .* (damaged: array (params|opt_state)\.\S+ "
                     r"does not|cannot be read)"):  # Checksum, or no decode.
    checkpoint.restore(str(work))
  os.remove(work / "final_metrics.json")

  with caplog.at_level(logging.WARNING):
    final = loop.train_and_evaluate(tiny_config(teacher_dir), str(work))
  assert "Moved it to" in caplog.text and "20.corrupt-1" in caplog.text
  assert (work / "checkpoints" / "20.corrupt-1").is_dir()  # Kept, renamed.
  assert final == _final(run_dir)  # Steps 10-20 retrained exactly.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         checkpoint.restore(str(work)).variables,
                         checkpoint.restore(str(run_dir)).variables)


def test_a_teacher_whose_only_step_is_damaged_is_retrained(teacher_dir,
                                                           tmp_path):
  """Every step damaged: the run starts over, keeping the damaged step."""
  teacher = _copy(teacher_dir, tmp_path / "teacher")
  (step,) = checkpoint.make_manager(str(teacher), reading=True).all_steps()
  for f in (teacher / "checkpoints" / str(step) / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\0garbage")
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"step {step} .* cannot be read.*newest intact"):
    checkpoint.restore(str(teacher))
  config = tiny_config(teacher, num_steps=2, eval_every=2, checkpoint_every=2)
  assert loop.train_and_evaluate(config, str(tmp_path / "student"))["step"] == 2
  assert (teacher / "checkpoints" / f"{step}.corrupt-1").is_dir()
  jax.tree_util.tree_map(np.testing.assert_array_equal,  # Retrained exactly.
                         checkpoint.restore(str(teacher)).variables,
                         checkpoint.restore(str(teacher_dir)).variables)


def test_a_checkpoint_of_other_shapes_names_the_first_differing_path(
    run_dir):
  manager = checkpoint.make_manager(str(run_dir), reading=True)
  saved = manager.item_metadata(20)["state"].tree
  wanted = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  checkpoint.check_compatible(saved, wanted, 20, "here")  # Fits itself.
  wanted["params"]["stage2"]["conv"]["kernel"] = jax.ShapeDtypeStruct(
      (3, 3, 16, 16), np.float32)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"params\.stage2\.conv\.kernel is float32"
                     r"\(3, 3, 16, 32\) in the checkpoint and float32"
                     r"\(3, 3, 16, 16\) in this run"):
    checkpoint.check_compatible(saved, wanted, 20, "here")
  del wanted["bad_steps"]
  with pytest.raises(checkpoint.CheckpointError,
                     match="bad_steps is saved but this run has no such"):
    checkpoint.check_compatible(saved, wanted, 20, "here")


def test_predict_returns_dataset_class_ids_from_normalised_images(run_dir):
  restored = checkpoint.restore(str(run_dir))
  np.testing.assert_array_equal(restored.class_ids, [5, 6, 7, 8, 9])
  images, class_ids = next(data.test_batches(restored, batch_size=64))
  assert images.dtype == np.uint8 and images.shape == (64, 8, 8, 1)
  assert set(np.unique(class_ids)) <= {5, 6, 7, 8, 9}
  logits = restored.logits(images)
  assert logits.shape == (64, 5)
  predicted = restored.predict(images)
  np.testing.assert_array_equal(predicted,
                                restored.class_ids[logits.argmax(-1)])
  # Floats in [0, 1] are the same images; the batch size is only a chunking.
  np.testing.assert_array_equal(
      restored.predict(images.astype(np.float32) / 255, batch_size=7),
      predicted)
  # Unnormalised inputs (the old docstring's mistake) predict differently.
  raw = restored.model.apply(restored.variables, images / 255.0, train=False)
  assert np.mean(restored.class_ids[np.argmax(raw, -1)] == class_ids) < (
      np.mean(predicted == class_ids))
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    restored.predict(images[0])


def test_docs_restore_snippet_reproduces_the_test_accuracy(
    run_dir, tmp_path, monkeypatch):
  page = doc_support.page_with("Restore a trained student")
  above = page.read_text().split("Restore a trained student", 1)[0]
  command = [block for block in re.findall(r"```bash\n(.*?)```", above, re.S)
             if "experiments.main" in block][-1]
  workdir = re.search(r"--workdir (\S+)", command).group(1)
  snippet = doc_support.python_block("Restore a trained student")
  assert f'checkpoint.restore("{workdir}")' in snippet  # The command's path.
  shutil.copytree(run_dir, tmp_path / workdir)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(snippet, page.name, "exec"), namespace)
  assert namespace["correct"] / namespace["total"] == _final(run_dir)[
      "test_accuracy"]


def test_restore_and_predict_without_the_experiment_stack(run_dir):
  script = f"""
import sys
for name in ("ml_collections", "tensorflow_datasets", "grain", "tensorflow"):
  sys.modules[name] = None  # import fails
from ot_transfer_jax import checkpoint
import numpy as np
restored = checkpoint.restore({str(run_dir)!r})
images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
print(restored.config.data.classes, restored.predict(images).tolist())
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  restored = checkpoint.restore(str(run_dir))
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
  assert proc.stdout.split() == (
      str(list(restored.config.data.classes)).split()
      + str(restored.predict(images).tolist()).split())
