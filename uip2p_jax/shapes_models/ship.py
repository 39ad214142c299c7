"""Copies a ShapesWorld runs folder's exports into the package, in float16, sharing parts:

  python -m uip2p_jax.shapes_models.ship RUNS_DIR [--models prior,ip2p,cec]

writes uip2p_jax/shapes_models/{vae, clip, probe, tokenizer, scheduler} once and, per edit or
text-to-image model, only its `unet/` plus a `components.json` pointing at the shared parts (the
pipelines' VAE is the world VAE, their text encoder the CLIP's text tower: checked, not assumed).
MODELS.md beside them records, per model, the training runs' commands and commits
(provenance.jsonl) and the steps trained.

  python -m uip2p_jax.shapes_models.ship RUNS_DIR --add STAGE

ships one more model (RUNS_DIR/STAGE/export, e.g. ip2p_recolour, cec) beside those already in
the package, without the runs that made them: its VAE and text encoder must be the shipped ones
(a run initialised from a shipped model has them), and its row in MODELS.md and its numbers in
expected.json are added or replaced, the others' kept.

  python -m uip2p_jax.shapes_models.ship --check

ships nothing: evaluates every shipped model on the test turns expected.json covers and exits 1
unless each reproduces its recorded numbers within EXPECTED_TOLERANCE (what an installation on
another machine can run to see that it edits as ours did).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np

from uip2p_jax import weights
from uip2p_jax.shapes_models import ROOT

SHARED = {"vae": "../vae", "text_encoder": "../clip", "tokenizer": "../tokenizer",
          "scheduler": "../scheduler"}
LIMIT_BYTES = 40 * 1024 * 1024


def _same(a, b, in_float16: bool = False) -> bool:
  """Whether modules a and b hold the same tensors (`in_float16`: once rounded to float16, as
  shipping rounds them: a run started from a shipped model shares its parts)."""
  ta, tb = weights.module_tensors(a), weights.module_tensors(b)
  if in_float16:
    ta, tb = ({k: v.astype(np.float16) for k, v in t.items()} for t in (ta, tb))
  return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def _provenance(run: str) -> list[dict]:
  path = os.path.join(run, "provenance.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _steps(run: str) -> int | None:
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return lines[-1]["step"] if lines else None


def _schedule(pipeline: str):
  """The export's noise schedule as the preset's with its prediction type; ValueError if it
  differs from the preset in anything else."""
  import dataclasses

  from uip2p_jax.schedules import PRESET_SCHEDULE, NoiseSchedule
  exported = NoiseSchedule.from_folder(os.path.join(pipeline, "scheduler"))
  schedule = dataclasses.replace(PRESET_SCHEDULE, prediction_type=exported.prediction_type)
  differs = {k: v for k, v in dataclasses.asdict(exported).items()
             if k != "clip_sample" and v != getattr(schedule, k)}
  if differs:  # (clip_sample: early exports lack it; the shipped one is always false)
    raise ValueError(f"{pipeline}/scheduler differs from the ShapesWorld preset's schedule in "
                     f"{differs}: cannot ship it")
  return schedule


def ship(runs: str, models: list[str], out: str = ROOT) -> list[str]:
  """Writes the shared parts and `models` (stage names with a pipeline export) into `out`.
  Everything is checked and written to a scratch folder first; `out` changes only if all of it
  fits the budget."""
  import tempfile
  stale = sorted(name for name in (os.listdir(out) if os.path.isdir(out) else [])
                 if os.path.isfile(os.path.join(out, name, weights.COMPONENTS_FILE))
                 and name not in models)
  if stale:
    raise ValueError(f"{out} holds {', '.join(stale)}, which would be left pointing at the new "
                     "shared parts: ship it too (--models) or delete it first")
  half = dict(param_dtype=jnp.float16, dtype=jnp.float32)
  vae = weights.load_vae(f"{runs}/vae/export/vae", subfolder=None)
  clip = weights.load_clip(f"{runs}/clip/export/clip")
  for name in models:
    _check_shares(f"{runs}/{name}/export", vae, clip.text_model, runs, shipped=True)
  os.makedirs(out, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".ship-", dir=out)
  try:
    weights.save_vae(weights.load_vae(f"{runs}/vae/export/vae", subfolder=None, **half),
                     os.path.join(scratch, "vae"))
    weights.save_clip(weights.load_clip(f"{runs}/clip/export/clip", **half),
                      os.path.join(scratch, "clip"))
    weights.save_probe(weights.load_probe(f"{runs}/probe/export/probe",
                                          param_dtype=jnp.float16), os.path.join(scratch, "probe"))
    # The world's tokenizer is the offline CLIP default: shipped as vocab.json + merges.txt
    # (1.5 MB; transformers' tokenizer.json of the same is 3.6 MB) and its config.
    from uip2p_jax.schedules import PRESET_SCHEDULE
    from uip2p_jax.tokenizer import default_tokenizer, derive_vocab_files
    tokenizer_dir = os.path.join(scratch, "tokenizer")
    default_tokenizer().save_pretrained(tokenizer_dir)
    for name in os.listdir(tokenizer_dir):
      if name != "tokenizer_config.json":
        os.remove(os.path.join(tokenizer_dir, name))
    derive_vocab_files(tokenizer_dir)
    # (what runs built from the shapes preset write: train/samples.write_pipeline_parts)
    PRESET_SCHEDULE.save(os.path.join(scratch, "scheduler"))
    for name in models:
      _write_pipeline(f"{runs}/{name}/export", os.path.join(scratch, name))
    total = _size(scratch)
    if total > LIMIT_BYTES:
      raise ValueError(f"the ShapesWorld models would take {total / 2**20:.1f} MiB; the budget "
                       f"is {LIMIT_BYTES / 2**20:.0f} MiB")
    _write_record(runs, ["vae", "clip", "probe"] + models, scratch, total)
    for name in os.listdir(scratch):
      target = os.path.join(out, name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      elif os.path.exists(target):
        os.remove(target)
      os.replace(os.path.join(scratch, name), target)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return models


RECORD_FILE = "MODELS.md"


def _header(total: int) -> list[str]:
  return ["# The shipped ShapesWorld models", "",
          "Written by `python -m uip2p_jax.shapes_models.ship` from the runs below (float16; "
          "the pipelines share `vae/`, the CLIP's text tower as text encoder, `tokenizer/` and "
          "`scheduler/` through `components.json`). Reproduce them with `bash launch/shapes.sh`; "
          f"total {total / 2**20:.1f} MiB.", "",
          "| model | steps | started / resumed by | commit |", "|---|---|---|---|"]


def _row(run: str, stage: str) -> str:
  """MODELS.md's line for `stage`, trained in the folder `run`."""
  starts = _provenance(run)
  commands = "<br>".join(
      f"{p['time']}: step {p['step']}: `{' '.join(['uip2p'] + p['argv'][1:])}`"
      + (f" ({p['note']})" if p.get("note") else "")
      for p in starts) or "(not recorded: run started before provenance.jsonl existed)"
  commits = "<br>".join(sorted({(p["commit"] or "?")[:12] + (" + uncommitted changes" if
                                                           p["uncommitted_changes"] else "")
                                for p in starts})) or "?"
  return f"| {stage} | {_steps(run)} | {commands} | {commits} |"


def _write_record(runs: str, stages: list[str], out: str, total: int) -> None:
  lines = _header(total) + [_row(f"{runs}/{stage}", stage) for stage in stages]
  with open(os.path.join(out, RECORD_FILE), "w") as f:
    f.write("\n".join(lines) + "\n")


def _size(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
             for f in files)


def _write_pipeline(export: str, folder: str) -> None:
  """`export`'s UNet in float16 into `folder`/unet, its components.json (the shared parts) and,
  where its prediction type is not the preset's, its own scheduler/."""
  from uip2p_jax.schedules import PRESET_SCHEDULE
  unet = weights.load_unet(export, param_dtype=jnp.float16)
  weights.save_unet(unet, os.path.join(folder, "unet"))
  components = dict(SHARED)
  # The shared scheduler is the preset's (epsilon); a v-prediction UNet sampled with it
  # would be read as predicting noise: such a model ships the preset schedule with its own
  # prediction type, and nothing else may differ.
  schedule = _schedule(export)
  if schedule != PRESET_SCHEDULE:
    schedule.save(os.path.join(folder, "scheduler"))
    del components["scheduler"]
  with open(os.path.join(folder, weights.COMPONENTS_FILE), "w") as f:
    json.dump(components, f, indent=2)


def _check_shares(pipeline: str, vae, text_encoder, where: str, shipped: bool = False) -> None:
  if not _same(weights.load_vae(pipeline), vae, shipped):
    raise ValueError(f"{pipeline}/vae is not {where}'s VAE: cannot share it")
  if not _same(weights.load_text_encoder(pipeline), text_encoder, shipped):
    raise ValueError(f"{pipeline}/text_encoder is not the text tower of {where}'s CLIP: cannot "
                     "share it")


def add(runs: str, stage: str, out: str = ROOT) -> int:
  """Ships `runs`/`stage`/export beside the models already in `out` (their shared parts must be
  its own: checked) and adds or replaces its MODELS.md row; returns the package's new size.
  Nothing in `out` changes unless all of it fits the budget."""
  import tempfile

  from uip2p_jax.shapes_models import PIPELINE_STAGES
  if stage not in PIPELINE_STAGES:
    raise ValueError(f"--add {stage}: not a ShapesWorld pipeline stage (expected one of "
                     f"{', '.join(PIPELINE_STAGES)})")
  record = os.path.join(out, RECORD_FILE)
  if not (os.path.isfile(record) and os.path.isdir(os.path.join(out, "vae"))):
    raise ValueError(f"{out} holds no shipped ShapesWorld models to add {stage} to (ship the "
                     "world's runs first)")
  export = f"{runs}/{stage}/export"
  _check_shares(export, weights.load_vae(os.path.join(out, "vae"), subfolder=None),
                weights.load_clip(os.path.join(out, "clip")).text_model, f"the package {out}",
                shipped=True)
  scratch = tempfile.mkdtemp(prefix=".ship-", dir=out)
  try:
    _write_pipeline(export, os.path.join(scratch, stage))
    target = os.path.join(out, stage)
    # The models' folders, as ship() counts them (not the package's code or records).
    total = _size(os.path.join(scratch, stage)) + sum(
        _size(os.path.join(out, name)) for name in os.listdir(out)
        if os.path.isdir(os.path.join(out, name)) and name != stage
        and not name.startswith((".", "__")))
    if total > LIMIT_BYTES:
      raise ValueError(f"the ShapesWorld models would take {total / 2**20:.1f} MiB with {stage}; "
                       f"the budget is {LIMIT_BYTES / 2**20:.0f} MiB")
    with open(record) as f:  # the table's rows (not its header or separator), but stage's
      rows = [line for line in f.read().splitlines() if line.startswith("| ")
              and not line.startswith(("| model |", f"| {stage} |"))]
    rows.append(_row(f"{runs}/{stage}", stage))
    with open(os.path.join(scratch, RECORD_FILE), "w") as f:
      f.write("\n".join(_header(total) + rows) + "\n")
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(os.path.join(scratch, stage), target)
    os.replace(os.path.join(scratch, RECORD_FILE), record)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return total


EXPECTED_FILE = "expected.json"
EXPECTED_TURNS = 20   # the first test turns of `data build shapes --seed 0` the record covers
EXPECTED_METRICS = ("edit_accuracy", "preservation", "l1", "l2", "clip_i", "clip_t")


def _expected_so_far(out: str) -> dict:
  """expected.json as recorded, refused unless it covers the turns recorded now."""
  path = os.path.join(out, EXPECTED_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable ({e}): record every model again (ship without --add)")
  if record.get("data") != {"seed": 0, "turns": EXPECTED_TURNS} or "models" not in record:
    raise ValueError(f"{path} covers {record.get('data')}, not the first {EXPECTED_TURNS} test "
                     "turns of seed 0: record every model again (ship without --add)")
  return record


def _evaluate_shipped(names: list[str], turns: int) -> dict[str, dict[str, float]]:
  """`uip2p eval shapes --model NAME` (defaults) on the first `turns` test turns of `data build
  shapes --seed 0`, rendered here: {name: {metric: mean}} for EXPECTED_METRICS."""
  import tempfile

  from uip2p_jax.cli import main as cli
  from uip2p_jax.data import shapes
  numbers = {}
  with tempfile.TemporaryDirectory() as scratch:
    data_dir = os.path.join(scratch, "data")
    os.makedirs(data_dir)
    with open(shapes.scenes_path(data_dir, "test"), "w") as f:
      for example in shapes.examples("test", turns, 0):
        f.write(json.dumps(example.to_json()) + "\n")
    for name in names:
      folder = os.path.join(scratch, name)
      if cli(["eval", "shapes", "--data", data_dir, "--out", folder, "--model", name,
              "--batch-size", str(turns)]) != 0:
        raise ValueError(f"eval shapes --model {name} failed")
      with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
      numbers[name] = {m: summary[m] for m in EXPECTED_METRICS}
  return numbers


def record_expected(out: str = ROOT, only: list[str] | None = None) -> dict:
  """Evaluates the shipped models (`uip2p eval shapes`, defaults, on the first EXPECTED_TURNS
  test turns of `data build shapes --seed 0`) and writes their numbers to expected.json: what
  `--check` (and tests/eval/test_shipped_shapes.py through it) reproduces from the package alone.
  `only`: these models' numbers, the others' kept."""
  from uip2p_jax.shapes_models import NAMES, paths
  record = {"data": {"seed": 0, "turns": EXPECTED_TURNS}, "models": {}}
  # identity: the shipped probe and CLIP alone (edit accuracy 0 by construction).
  shipped = ["identity"] + [name for name, stage in NAMES.items()
                            if os.path.isfile(os.path.join(paths()[stage], "unet", "config.json"))]
  if only is not None:
    record, shipped = _expected_so_far(out), only
  record["models"].update(_evaluate_shipped(shipped, EXPECTED_TURNS))
  with open(os.path.join(out, EXPECTED_FILE), "w") as f:
    json.dump(record, f, indent=2)
  return record


# How far a reproduction may drift from expected.json (another CPU or XLA version rounds a few
# pixels differently, which can flip a borderline turn: 1 of 20 turns is 0.05).
EXPECTED_TOLERANCE = {"edit_accuracy": 0.051, "preservation": 0.051, "l1": 0.005, "l2": 0.003,
                      "clip_i": 0.01, "clip_t": 0.01}


def compare_expected(expected: dict[str, dict[str, float]],
                     got: dict[str, dict[str, float]]) -> list[str]:
  """The (model, metric) numbers of `got` off `expected` by more than EXPECTED_TOLERANCE, as
  lines that say both (empty: reproduced). A model or metric missing from `got` is off."""
  off = []
  for name, metrics in expected.items():
    for metric, value in metrics.items():
      reproduced = got.get(name, {}).get(metric)
      if reproduced is None or not abs(reproduced - value) <= EXPECTED_TOLERANCE[metric]:
        off.append(f"{name} {metric}: recorded {value:.4f}, reproduced "
                   f"{'nothing' if reproduced is None else f'{reproduced:.4f}'} "
                   f"(tolerance {EXPECTED_TOLERANCE[metric]})")
  return off


def check_expected(out: str = ROOT) -> list[str]:
  """Evaluates every model expected.json records on its turns; compare_expected's lines."""
  record = _expected_so_far(out)
  if not record["models"]:
    raise ValueError(f"{os.path.join(out, EXPECTED_FILE)} records no model")
  return compare_expected(record["models"], _evaluate_shipped(sorted(record["models"]),
                                                              EXPECTED_TURNS))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m uip2p_jax.shapes_models.ship",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="?", help="a launch/shapes.sh runs folder")
  parser.add_argument("--models", default="prior,ip2p",
                      help="pipeline stages to ship (comma-separated; '' for the shared parts "
                           "only)")
  parser.add_argument("--add", metavar="STAGE",
                      help="ship only RUNS/STAGE/export, beside the models already shipped")
  parser.add_argument("--check", action="store_true",
                      help="ship nothing: evaluate the shipped models on the turns expected.json "
                           "covers and exit 1 unless they reproduce its numbers")
  args = parser.parse_args(argv)
  if args.check:
    try:
      off = check_expected()
    except (ValueError, FileNotFoundError, weights.CheckpointError) as e:
      print(f"ship --check: error: {e}", file=sys.stderr)
      return 2
    for line in off:
      print(f"ship --check: {line}", file=sys.stderr)
    print(f"ship --check: {'FAILED' if off else 'reproduced'}: the shipped models on the first "
          f"{EXPECTED_TURNS} test turns vs {EXPECTED_FILE}")
    return 1 if off else 0
  if args.runs is None:
    parser.error("RUNS is required unless --check")
  from uip2p_jax.shapes_models import NAMES
  try:
    if args.add:
      names = [n for n, stage in NAMES.items() if stage == args.add]
      if not names:
        raise ValueError(f"--add {args.add}: no model name is given to that stage (shapes_models."
                         f"NAMES: {', '.join(sorted(set(NAMES.values())))})")
      _expected_so_far(ROOT)  # before the package changes: --add keeps the others' numbers
      total = add(args.runs, args.add)
      try:
        record_expected(only=names)
      except ValueError as e:
        raise ValueError(f"{args.add} is shipped but its numbers are not recorded ({e}): "
                         f"tests/eval/test_shipped_shapes.py fails until they are") from None
      print(f"ship: {args.add} -> {ROOT} as {names[0]} (package {total / 2**20:.1f} MiB); "
            f"recorded it on the first {EXPECTED_TURNS} test turns in {EXPECTED_FILE}")
      return 0
    shipped = ship(args.runs, [m for m in args.models.split(",") if m])
    record = record_expected()
    print(f"ship: recorded {sorted(record['models'])} on the first {EXPECTED_TURNS} test turns "
          f"in {EXPECTED_FILE}")
  except (ValueError, FileNotFoundError, weights.CheckpointError) as e:
    print(f"ship: error: {e}", file=sys.stderr)
    return 2
  print(f"ship: {', '.join(['vae', 'clip', 'probe'] + shipped)} -> {ROOT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
