"""Checkpoints: checksums, fallback to the newest intact step, fit checks,
and the inference API (restore -> predict, test split, the docs' restore snippet)."""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import data, loop
from ot_transfer_jax import checkpoint, inference

import doc_support
from digits_job import REPO, main_command, tiny_config


@pytest.fixture
def run_dir(digits_run):
  """A finished tiny digits transfer run (checkpoints at steps 10 and 20),
  the session's (conftest.py): read here, copied before any change."""
  return digits_run


def _mlp_state():
  from ot_transfer_jax.models import create_model
  model = create_model("digits_mlp", 3)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)))
  return model, variables, {"params": variables["params"],
                            "step": jax.numpy.asarray(7)}


def _check_predictions(restored, model, variables):
  np.testing.assert_array_equal(restored.class_ids, [7, 5, 6])
  np.testing.assert_array_equal(restored.mean, [0.25])
  images = np.full((2, 8, 8, 1), 0.25 + 0.5 * 0.1, np.float32)
  np.testing.assert_allclose(
      restored.logits(images),
      model.apply(variables, np.full((2, 8, 8, 1), 0.1, np.float32)),
      rtol=1e-5, atol=1e-6)


def test_run_meta_is_saved_with_the_state_and_restored(tmp_path):
  """Without training (fast): a state and its RunMeta round-trip through
  save / restore_latest / restore, which rebuilds the model from the meta's
  explicit fields and maps outputs to its class ids."""
  model, variables, state = _mlp_state()
  meta = checkpoint.RunMeta(
      config={"opaque": "the library never reads the config"},
      num_classes=3, mean=(0.25,), std=(0.5,),
      history={"best_step": 5, "best_val_accuracy": 0.5},
      model="digits_mlp", model_kwargs={}, class_ids=(7, 5, 6))
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, 7, state, meta)
  seen = []
  _, restored_meta = checkpoint.restore_latest(
      manager, str(tmp_path), state, check_meta=lambda *a: seen.append(a))
  assert restored_meta == meta and seen == [(7, meta)]
  with open(tmp_path / "checkpoints" / "7" / "meta" / "metadata") as f:
    assert json.load(f) == {"config": meta.config, "num_classes": 3,
                            "mean": [0.25], "std": [0.5],
                            "history": meta.history, "model": "digits_mlp",
                            "model_kwargs": {}, "class_ids": [7, 5, 6]}
  # The input shape, which predict checks images against, when known.
  shaped = dataclasses.replace(meta, image_shape=(8, 8, 1))
  assert shaped.to_json()["image_shape"] == [8, 8, 1]
  assert checkpoint.RunMeta.from_json(shaped.to_json()) == shaped
  restored = inference.restore(str(tmp_path))
  assert restored.meta == meta and restored.step == 7
  assert restored.image_shape is None
  _check_predictions(restored, model, variables)


def test_checkpoints_whose_meta_holds_only_the_config_still_restore(
    tmp_path):
  # The meta item as checkpoints written before RunMeta's explicit fields
  # have it: model, classes and input size only in the run's config.
  model, variables, state = _mlp_state()
  old = {"config": {"model": {"name": "digits_mlp", "kwargs": {}},
                    "data": {"classes": [7, 5, 6], "image_size": 8}},
         "num_classes": 3, "mean": [0.25], "std": [0.5],
         "history": {"best_step": 5}}
  manager = checkpoint.make_manager(str(tmp_path))
  manager.save(7, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(old),
      checksums=ocp.args.JsonSave(checkpoint.checksums(state, old))))
  manager.wait_until_finished()
  _, meta = checkpoint.restore_latest(manager, str(tmp_path), state)
  assert (meta.model, meta.model_kwargs, meta.class_ids, meta.image_shape) \
      == ("digits_mlp", {}, (7, 5, 6), (8, 8, 1))
  restored = inference.restore(str(tmp_path))
  assert restored.image_shape == (8, 8, 1) and restored.meta == meta
  _check_predictions(restored, model, variables)
  # Without data.classes: every class, in order.
  del old["config"]["data"]
  meta = checkpoint.RunMeta.from_json(old)
  assert meta.class_ids == (0, 1, 2) and meta.image_shape is None


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


@pytest.mark.slow
def test_one_flipped_byte_in_any_read_array_file_is_detected(run_dir,
                                                             tmp_path):
  """Every file of the OCDBT stores, at its middle and (array data) at 8
  more offsets: a flipped byte is an error naming the step, and the array
  when the file still decodes; or the byte is never read (orbax leaves
  superseded b-tree nodes behind) and the restored arrays are intact."""
  step_dir = run_dir / "checkpoints" / "20"
  reference = inference.restore(str(run_dir))
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
        inference.restore(str(work))
      except checkpoint.DamagedCheckpointError as e:
        assert "step 20" in str(e), e
        named.update(re.findall(r"array (\S+) does not match", str(e)))
        continue
      # Undetected: then the flipped byte is one orbax never reads (a
      # superseded b-tree node or chunk), and what it restores is intact.
      restored = inference.restore(str(work))
      jax.tree_util.tree_map(np.testing.assert_array_equal,
                             restored.variables, reference.variables)
  assert any(n.startswith("params.") for n in named), named
  assert any(n.startswith("opt_state.") for n in named), named


@pytest.mark.slow
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
    inference.restore(str(work))
  os.remove(work / "final_metrics.json")

  with caplog.at_level(logging.WARNING):
    final = loop.train_and_evaluate(tiny_config(teacher_dir), str(work))
  assert "Moved it to" in caplog.text and "20.corrupt-1" in caplog.text
  assert (work / "checkpoints" / "20.corrupt-1").is_dir()  # Kept, renamed.
  assert final == _final(run_dir)  # Steps 10-20 retrained exactly.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         inference.restore(str(work)).variables,
                         inference.restore(str(run_dir)).variables)


def _truncate_arrays(step_dir):
  """Every array data file of a step cut to 10 bytes (a partial copy)."""
  for f in step_dir.rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])


@pytest.mark.slow
def test_damaged_steps_give_one_line_each_and_no_traceback(run_dir,
                                                           teacher_dir,
                                                           tmp_path):
  work = _copy(run_dir, tmp_path / "run")
  for step in ("10", "20"):
    _truncate_arrays(work / "checkpoints" / step)
  # Restoring: one error per damaged step, however often it is tried; none
  # of orbax's "Event loop is closed" tracebacks in between or at exit.
  script = f"""
import sys
from ot_transfer_jax import checkpoint, inference
for attempt in range(4):
  for step in (10, 20):
    try:
      inference.restore({str(work)!r}, step=step)
    except checkpoint.DamagedCheckpointError as e:
      print(e, file=sys.stderr)
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 8 and all(
      re.match(r"The checkpoint of step (10|20) in .* cannot be read "
               r"\([A-Z_]+: .*\)\. Rerunning the training command", line)
      for line in lines), proc.stderr[-3000:]

  # Resuming from the command line: one warning line for the damaged step,
  # then the run resumes from the intact one and finishes.
  step_dir = work / "checkpoints"
  shutil.rmtree(step_dir / "10")
  shutil.copytree(run_dir / "checkpoints" / "10", step_dir / "10")
  proc = subprocess.run(main_command(work, teacher_dir), cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("Traceback", "never retrieved", "Event loop", "'driver'"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  damaged = [l for l in proc.stderr.splitlines() if "cannot be read" in l]
  assert len(damaged) == 1 and "step 20" in damaged[0] and \
      "Moved it to" in damaged[0], proc.stderr[-3000:]
  assert (step_dir / "20.corrupt-1").is_dir()
  assert _final(work)["test_accuracy"] == _final(run_dir)["test_accuracy"]


@pytest.mark.slow
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
    inference.restore(str(teacher))
  config = tiny_config(teacher, num_steps=2, eval_every=2, checkpoint_every=2)
  assert loop.train_and_evaluate(config, str(tmp_path / "student"))["step"] == 2
  assert (teacher / "checkpoints" / f"{step}.corrupt-1").is_dir()
  jax.tree_util.tree_map(np.testing.assert_array_equal,  # Retrained exactly.
                         inference.restore(str(teacher)).variables,
                         inference.restore(str(teacher_dir)).variables)


@pytest.mark.slow
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


@pytest.mark.slow
def test_predict_returns_dataset_class_ids_from_normalised_images(run_dir):
  restored = inference.restore(str(run_dir))
  np.testing.assert_array_equal(restored.class_ids, [5, 6, 7, 8, 9])
  # The loop saves what restore needs as explicit fields (the config is
  # only passed on).
  with open(run_dir / "checkpoints" / str(restored.step) / "meta" /
            "metadata") as f:
    saved = json.load(f)
  assert (saved["model"], saved["model_kwargs"], saved["class_ids"],
          saved["image_shape"]) == (restored.config.model.name,
                                    restored.config.model.kwargs.to_dict(),
                                    [5, 6, 7, 8, 9], [8, 8, 1])
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


@pytest.mark.slow
def test_predict_checks_images_against_what_the_model_trained_on(run_dir):
  restored = inference.restore(str(run_dir))
  assert restored.image_shape == (8, 8, 1)
  images, _ = next(data.test_batches(restored, batch_size=16))
  predicted = restored.predict(images)
  # Integer pixels of another dtype (np.array of ints) are uint8's values.
  np.testing.assert_array_equal(restored.predict(images.astype(np.int64)),
                                predicted)
  cases = [
      (images.astype(np.float32), r"these reach 2\d\d.*\(0\.\.255 pixels\?\)"
       r".*Divide them by 255 \(images / 255\)"),
      (restored.normalize(images), r"go down to -.*already normalised.*Pass "
       r"the raw \[0, 1\] or uint8 images"),
      (np.zeros((4, 28, 28, 1), np.uint8), r"trained on 8x8x1 images "
       r"\(H x W x C\); got 28x28x1.*Resize or crop them to 8x8x1"),
      (images[..., 0], r"got shape \(16, 8, 8\): one-channel images without "
       r"their channel axis\? images\[\.\.\., None\]"),
      (images[0], r"one image\? add the batch axis: images\[None\]"),
      (images.astype(np.int64) * 2, r"values 0\.\.255.*got int64 values in "
       r"\[\d+, 5\d\d\]"),
      (np.where(images > 0, np.nan, 0.0), "NaN or inf"),
  ]
  for bad, message in cases:
    for fn in (restored.predict, restored.logits):
      with pytest.raises(ValueError, match=message):
        fn(bad)


@pytest.mark.slow
def test_docs_restore_snippets_run_as_saved_scripts_from_another_folder(
    run_dir, tmp_path):
  """docs/experiments.md's two restore scripts, saved to a file and run from
  a folder that is not the checkout (no PYTHONPATH), their path lines set to
  a finished run: the library alone on images of one's own, and the test
  split through the checkout's experiments package."""
  from experiments import cli
  default = cli.default_workdir(
      "experiments/configs/transfer.py:data=digits,method=ot", "ot")
  own = doc_support.python_block("Restore a trained student")
  split = doc_support.python_block(
      "this prints `final_metrics.json`'s `test_accuracy` exactly")
  # The documented paths are the default workdir of the command above them.
  assert f'WORKDIR = "{default}"' in own
  assert f'os.path.join(CHECKOUT, "{default}")' in split
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

  def run(snippet, **values):
    for name, value in values.items():
      snippet, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", snippet,
                           flags=re.M)
      assert n == 1, name
    script = elsewhere / "restore.py"
    script.write_text(snippet)
    proc = subprocess.run([sys.executable, str(script)], cwd=elsewhere,
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]

  restored = inference.restore(str(run_dir))
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), np.uint8)
  assert run(own, WORKDIR=str(run_dir)) == str(restored.predict(images))
  assert float(run(split, CHECKOUT=str(REPO), WORKDIR=str(run_dir))) == (
      _final(run_dir)["test_accuracy"])


@pytest.mark.slow
def test_restore_and_predict_without_the_experiment_stack(run_dir):
  script = f"""
import sys
for name in ("ml_collections", "tensorflow_datasets", "grain", "tensorflow"):
  sys.modules[name] = None  # import fails
from ot_transfer_jax import inference
import numpy as np
restored = inference.restore({str(run_dir)!r})
images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
print(restored.config.data.classes, restored.predict(images).tolist())
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  restored = inference.restore(str(run_dir))
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), np.uint8)
  assert proc.stdout.split() == (
      str(list(restored.config.data.classes)).split()
      + str(restored.predict(images).tolist()).split())


def test_restoring_a_run_killed_before_its_first_checkpoint_says_rerun(
    tmp_path):
  # What a run killed before its first checkpoint leaves: an empty manager.
  checkpoint.make_manager(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError) as err:
    inference.restore(str(tmp_path))
  message = str(err.value)
  assert "stopped (or is still running) before its first checkpoint" in \
      message and "Rerun its training command" in message
  assert f"--workdir {tmp_path}" in message
