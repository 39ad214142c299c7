"""`uip2p eval magicbrush | ip2p-curve | compare | shapes | shapes-compare | shapes-plot`.

Everything a run needs besides the edits (the data, --expected, the CLIP and DINO metric
models, the output folder's record of earlier edits) is checked before the first edit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

from PIL import Image

from uip2p_jax import model_card, storage
from uip2p_jax.cli import common
# eval.magicbrush, eval.curve and eval.metrics import JAX: each command imports what it uses,
# so that importing `uip2p_jax.cli` (which a spawned `data build` worker re-imports) stays light.


def make_edit(pipe, steps: int, resolution: int, batch_size: int,
              sampler: str = "euler_ancestral"):
  """(images, instructions, seeds, text_scale, image_scale) -> edited PIL images, by
  `EditPipeline.edit` (its working sizes, one fixed-size batch per size: one compile each)."""

  def edit(images: list[Image.Image], instructions: list[str], seeds: list[int],
           text_scale: float, image_scale: float) -> list[Image.Image]:
    return pipe.edit(list(images), list(instructions), steps=steps, text_scale=text_scale,
                     image_scale=image_scale, seeds=list(seeds), sampler=sampler,
                     resolution=resolution, pad_to=batch_size)
  return edit


def metric_models(clip: str | None, dino: str | None):
  """The CLIP (CLIP-I, CLIP-T, direction) and DINO models, loaded (so a bad name fails here):
  an `eval.metrics.MetricModels`."""
  from uip2p_jax import weights
  from uip2p_jax.eval.metrics import MetricModels
  from uip2p_jax.tokenizer import default_tokenizer, load_tokenizer
  clip_model = weights.load_clip(clip) if clip else None
  tokenizer = None
  if clip:
    folder = weights.resolve_folder(clip)
    has_tokenizer = os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(
        os.path.join(folder, "tokenizer.json"))
    tokenizer = load_tokenizer(clip, subfolder=None) if has_tokenizer else default_tokenizer()
  return MetricModels(clip_model, weights.load_vit(dino) if dino else None, tokenizer)


def expected_row(spec: str | None) -> dict | None:
  """The config's expected MagicBrush single-turn row (`--expected FILE.py[:ARGS]`)."""
  if not spec:
    return None
  from uip2p_jax.train.config import load_config
  config = load_config(spec)
  if "expected" not in config:
    raise ValueError(f"--expected {spec}: the config has no 'expected' field (expected "
                     "config.expected.magicbrush_single_turn = {l1: ..., ...})")
  return dict(config.expected.get("magicbrush_single_turn", {}))


def edit_settings(args: argparse.Namespace) -> dict:
  """What decides the edits of a run (recorded in OUT/edits.json, compared on resume)."""
  return {"model": common.model_id(args.model, args.seed), "dtype": args.dtype,
          "steps": args.steps, "text_scale": args.text_scale, "image_scale": args.image_scale,
          "resolution": args.resolution, "sampler": "euler_ancestral", "seed": args.seed}


def eval_magicbrush(args: argparse.Namespace) -> int:
  """Edits every MagicBrush test turn (resumable) and scores L1, L2, CLIP-I, DINO, CLIP-T."""
  from uip2p_jax.eval import magicbrush
  turns = magicbrush.load_turns(args.data, args.limit)
  if not turns:
    raise ValueError(f"{args.data}: no MagicBrush turns to evaluate")
  # Everything but the edits first: a typo must not cost an evaluation's worth of edits.
  expected = expected_row(args.expected)
  models = metric_models(args.clip, args.dino)
  settings = edit_settings(args)
  magicbrush.check_edit_settings(args.out, settings)
  pipe = common.load_pipeline(args.model, args.dtype, args.seed, command="uip2p eval")
  edit = make_edit(pipe, args.steps, args.resolution, args.batch_size)
  label = args.label or (args.model or common.EMBEDDED_MODEL)
  modes = ["single", "multi"] if args.turns == "both" else [args.turns]
  magicbrush.record_edit_settings(args.out, settings)
  skipped: dict[str, set[str]] = {}
  for mode in modes:
    report = magicbrush.run_edits(
        turns, lambda ims, ins, seeds: edit(ims, ins, seeds, args.text_scale, args.image_scale),
        args.out, mode, args.batch_size, args.seed)
    for turn_id, why in report.skipped:
      print(f"skipped {turn_id} ({mode}-turn): {why}", file=sys.stderr)
    skipped[mode] = {turn_id for turn_id, _ in report.skipped}
    print(f"uip2p eval magicbrush: {mode}-turn: {report.made} edits made, "
          f"{report.on_disk} already on disk"
          + (f", {len(report.skipped)} skipped (see above)" if report.skipped else ""))
  rows = {}
  for mode in modes:
    rows[mode] = magicbrush.score([t for t in turns if t["id"] not in skipped[mode]], args.out,
                                  mode, models)
    magicbrush.write_csv(rows[mode], os.path.join(args.out, f"{mode}_turn.csv"))
  summary = magicbrush.summarise(rows)
  magicbrush.write_summary(summary, args.out, label, expected)
  print(magicbrush.markdown_table(summary, label, expected))
  return common.SOME_SKIPPED if any(skipped.values()) else common.OK


def eval_curve(args: argparse.Namespace) -> int:
  """CLIP direction vs image similarity over guidance scales (InstructPix2Pix's curve)."""
  from uip2p_jax.eval import curve, magicbrush
  parse = lambda text: [float(v) for v in text.split(",") if v]
  text_scales, image_scales = parse(args.text_scales), parse(args.image_scales)
  models = args.model or [None]
  labels = args.label or [m or common.EMBEDDED_MODEL for m in models]
  if len(labels) != len(models):
    raise ValueError(f"{len(models)} --model but {len(labels)} --label")
  records = curve.load_records(args.data, args.kind, args.split, args.limit)
  clip = metric_models(args.clip, None)
  rows = []
  for model, label in zip(models, labels):
    pipe = common.load_pipeline(model, args.dtype, command="uip2p eval")
    edit = make_edit(pipe, args.steps, args.resolution, args.batch_size)
    rows += curve.curve_points(label, edit, records, clip, text_scales, image_scales,
                               args.batch_size)
  storage.makedirs(args.out)
  magicbrush.write_csv(rows, os.path.join(args.out, "ip2p_curve.csv"), curve.FIELDS)
  curve.plot(rows, os.path.join(args.out, "ip2p_curve.png"))
  for r in rows:
    print(f"{r['model']}: text {r['text_scale']:g} image {r['image_scale']:g} -> direction "
          f"{r['direction_similarity']:.4f}, image similarity {r['image_similarity']:.4f}")
  print(f"uip2p eval ip2p-curve: {args.out}/ip2p_curve.csv and ip2p_curve.png")
  return common.OK


def eval_compare(args: argparse.Namespace) -> int:
  """Two `eval magicbrush` runs' summaries side by side, with B - A."""
  from uip2p_jax.eval import magicbrush
  print(magicbrush.compare(args.run_a, args.run_b), end="")
  return common.OK


def eval_shapes(args: argparse.Namespace) -> int:
  """Edits the ShapesWorld test turns and scores edit accuracy and preservation (read by the
  world's attribute probe), L1 / L2 to the true edit, CLIP-I / CLIP-T (the world's CLIP)."""
  from uip2p_jax import shapes_models
  from uip2p_jax.eval import shapes as shapes_eval
  world_paths = shapes_models.paths(args.world)
  for need in ("probe", "clip"):
    if not os.path.isfile(os.path.join(world_paths[need], "config.json")):
      raise FileNotFoundError(f"the world's {need} is not at {world_paths[need]} (train it: "
                              "launch/shapes.sh, or give --world RUNS_DIR)")
  turns = shapes_eval.load_test(args.data, args.limit)
  if not turns:
    raise ValueError(f"{args.data}: no ShapesWorld test turns")
  world = shapes_eval.World(world_paths["probe"], world_paths["clip"])
  model = args.model
  folder = None if model == "identity" else common.model_folder(model, args.world)
  if folder is not None and not os.path.isdir(folder):
    raise FileNotFoundError(f"--model {model}: no model folder at {folder}")
  settings = {"model": model if model == "identity" else common.model_id(folder),
              "steps": args.steps, "seed": args.seed}
  if model != "identity":
    settings["sampler"] = args.sampler
  training = folder and os.path.join(folder, model_card.TRAINING_FILE)
  if training and storage.isfile(training):  # a run's export: the step it was taken at
    settings["train_step"] = json.loads(storage.read_text(training))["step"]
  seeds = lambda chunk: [(args.seed + zlib.crc32(t["id"].encode())) % 2 ** 31 for t in chunk]
  roundtrip = None
  if model == "identity":
    edit = lambda images, chunk: images
  elif model == "shapes-sdedit":
    edit, roundtrip = _sdedit(folder, args, seeds)
    settings.update(text_scale=args.text_scale, strength=args.sdedit_strength)
  else:
    pipe = common.load_pipeline(folder, "float32", command="uip2p eval shapes")
    roundtrip = _roundtrip(pipe.vae)
    settings.update(text_scale=args.text_scale, image_scale=args.image_scale)
    if args.strength < 1.0:  # (absent at 1: earlier output folders stay resumable)
      settings["strength"] = args.strength
    edit = lambda images, chunk: pipe.edit(
        images, [t["instruction"] for t in chunk], steps=args.steps, text_scale=args.text_scale,
        image_scale=args.image_scale, seeds=seeds(chunk), pad_to=args.batch_size,
        sampler=args.sampler, strength=args.strength)
  storage.makedirs(args.out)
  summary = shapes_eval.evaluate(turns, edit, world, args.out, args.label or model, settings,
                                 args.batch_size, roundtrip)
  print(shapes_eval.markdown(summary), end="")
  if args.grounding:
    result = shapes_eval.grounding(turns, edit, world, args.batch_size)
    storage.write_text_atomic(os.path.join(args.out, "grounding.json"),
                              json.dumps(result, indent=2))
    for kind, row in result.items():
      print(f"grounding, {kind}: {row['edits']} edits; the named object edited "
            f"{row['named']:.3f}, each other object {row['others']:.3f}")
  print(f"uip2p eval shapes: {len(turns)} test edits -> {args.out}/summary.json, scores.csv, "
        "grid.png" + (", grounding.json" if args.grounding else ""))
  return common.OK


def _sdedit(folder: str, args: argparse.Namespace, seeds):
  """Caption-only editing with the world's text-to-image prior: the input noised to
  `--sdedit-strength` of the schedule, denoised with the true edited caption."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from uip2p_jax.model_set import build_models
  from uip2p_jax.pipeline import generate_latents
  from uip2p_jax.schedules import make_sampler
  from uip2p_jax.tokenizer import tokenize
  models = build_models(pretrained=folder)
  if models.unet.config.in_channels != models.vae.config.latent_channels:
    raise ValueError(f"--model shapes-sdedit: {folder} holds a {models.unet.config.in_channels}-"
                     "channel UNet; SDEdit needs the text-to-image prior (4 channels)")
  sampler = make_sampler(args.sampler, models.schedule, args.steps)
  start = int(round(args.steps * (1 - args.sdedit_strength)))
  empty = tokenize(models.tokenizer, [""])

  def edit(images, chunk):
    count = len(chunk)
    ids = tokenize(models.tokenizer, [t["edited_caption"] for t in chunk])
    chunk_seeds = seeds(chunk)
    if count < args.batch_size:  # one compiled batch size
      extra = args.batch_size - count
      images = np.concatenate([images, np.repeat(images[:1], extra, 0)])
      ids = np.concatenate([ids, np.repeat(ids[:1], extra, 0)])
      chunk_seeds = chunk_seeds + chunk_seeds[:1] * extra
    keys = jax.vmap(jax.random.key)(jnp.asarray(chunk_seeds, jnp.uint32))
    return np.asarray(generate_latents(models.unet, models.vae, models.text_encoder, ids, empty,
                                       sampler, jnp.float32(args.text_scale), keys,
                                       images=images, start_step=start))[:count]
  return edit, _roundtrip(models.vae)


def _roundtrip(vae):
  """images -> decode(encode(images)) with the VAE's posterior mode."""
  from flax import nnx
  run = nnx.jit(lambda m, x: m.decode(m.encode(x).mode()))  # compiled once per batch shape
  return lambda images: run(vae, images)


def eval_shapes_compare(args: argparse.Namespace) -> int:
  """Several `eval shapes` runs (their folders or summary.json files) in one Markdown table; runs
  with the same --label (e.g. one per seed) make one row of mean ± standard deviation."""
  from uip2p_jax.eval import shapes as shapes_eval
  table = shapes_eval.compare(args.runs)
  print(table, end="")
  if args.out:
    storage.write_text_atomic(args.out, table)
  return common.OK


def eval_shapes_plot(args: argparse.Namespace) -> int:
  """Several `eval shapes` runs as one plot: --y against --x, one line per --label, seeds (runs
  of one label at one x) as mean and sd; e.g. edit accuracy over training (--x train_step, the
  snapshots of `export_every`) or preservation vs edit accuracy over guidance scales."""
  from uip2p_jax.eval import shapes as shapes_eval
  shapes_eval.plot(args.runs, args.x, args.y, args.out, group=args.group,
                   annotate=args.annotate, title=args.title)
  print(f"uip2p eval shapes-plot: {len(args.runs)} runs -> {args.out}")
  return common.OK


def scales(text: str) -> str:
  """An argparse `type=` for comma-separated guidance scales (kept as text)."""
  try:
    values = [float(v) for v in text.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, "
                                     "e.g. 3,5,7.5") from None
  if not values:
    raise argparse.ArgumentTypeError(f"{text!r}: expected at least one scale")
  return text


def add_parser(commands) -> None:
  evaluation = commands.add_parser("eval", help="evaluation").add_subparsers(
      dest="eval_command", required=True)
  common_args = argparse.ArgumentParser(add_help=False)
  common_args.add_argument("--data", required=True, metavar="DATA_DIR")
  common_args.add_argument("--out", required=True, metavar="DIR", type=common.output_location)
  common_args.add_argument("--steps", type=common.positive_int, default=20)
  common_args.add_argument("--resolution", type=common.resolution, default=512)
  common_args.add_argument("--batch-size", type=common.positive_int, default=4)
  common_args.add_argument("--limit", type=common.positive_int, default=None)
  common_args.add_argument("--dtype", type=common.compute_dtype, default="auto",
                           metavar="{" + ",".join(common.DTYPES) + "}", help=common.DTYPE_HELP)

  p = evaluation.add_parser(
      "magicbrush", parents=[common_args], help="the MagicBrush test protocol",
      description=eval_magicbrush.__doc__ + " Exit status: 0 every turn scored; 3 some "
      "multi-turn turns skipped (their chain broke; each reported); 2 a usage error.")
  p.add_argument("--model", default=None,
                 help="diffusers IP2P folder or Hub repo (default: embedded tiny random model)")
  p.add_argument("--turns", default="both", choices=["single", "multi", "both"])
  p.add_argument("--text-scale", type=float, default=7.5)
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--seed", type=common.non_negative_int, default=0)
  p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-I/CLIP-T")
  p.add_argument("--dino", default="facebook/dino-vits16", help="ViT for the DINO metric")
  p.add_argument("--label", default=None, help="row name in the summary")
  p.add_argument("--expected", default=None, metavar="experiments/FILE.py[:ARGS]",
                 help="add the config's expected MagicBrush row to the summary")
  p.set_defaults(run=eval_magicbrush)

  p = evaluation.add_parser("ip2p-curve", parents=[common_args], description=eval_curve.__doc__,
                            help="CLIP direction vs image similarity over guidance scales")
  p.add_argument("--model", action="append", help="repeat for several models on one plot")
  p.add_argument("--label", action="append", help="one per --model")
  p.add_argument("--kind", default="ip2p", choices=["ip2p", "captions"])
  p.add_argument("--split", default=None)
  p.add_argument("--text-scales", type=scales, default="3,5,7.5,10,12.5")
  p.add_argument("--image-scales", type=scales, default="1.0,1.5,2.0")
  p.add_argument("--clip", default="openai/clip-vit-large-patch14")
  p.set_defaults(run=eval_curve)

  p = evaluation.add_parser(
      "shapes", description=eval_shapes.__doc__, help="ShapesWorld: edit accuracy, preservation")
  p.add_argument("--data", required=True, metavar="DATA_DIR",
                 help="a `uip2p data build shapes` folder (its scenes_test.jsonl)")
  p.add_argument("--out", required=True, metavar="DIR", type=common.output_location)
  p.add_argument("--model", default=common.DEFAULT_EDIT_MODEL,
                 help="an IP2P folder, or identity | shapes-sdedit | shapes-cec | shapes-ip2p | "
                      "shapes-ip2p-recolour (the shipped models, or --world's; default "
                      f"{common.DEFAULT_EDIT_MODEL})")
  p.add_argument("--world", default=None, metavar="RUNS_DIR",
                 help="the launch/shapes.sh runs folder whose probe, CLIP and models to use "
                      "(default: the shipped ones)")
  p.add_argument("--limit", type=common.positive_int, default=None)
  p.add_argument("--steps", type=common.positive_int, default=20)
  p.add_argument("--batch-size", type=common.positive_int, default=50)
  p.add_argument("--text-scale", type=float, default=common.SHAPES_TEXT_SCALE)
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--strength", type=common.positive_fraction, default=1.0,
                 help="edit models: 1 samples from pure noise (IP2P's); s < 1 starts from the "
                      "input noised to step round(steps x (1 - s)) and runs the rest")
  p.add_argument("--sdedit-strength", type=common.fraction, default=0.6,
                 help="shapes-sdedit: the fraction of the schedule the input is noised to")
  p.add_argument("--seed", type=common.non_negative_int, default=0)
  p.add_argument("--sampler", default="euler_ancestral",
                 choices=["euler_ancestral", "euler", "ddim", "ddpm"])
  p.add_argument("--label", default=None, help="row name in the summary")
  p.add_argument("--grounding", action="store_true",
                 help="also edit each one-object test edit and the same edit of another object "
                      "of its scene: how often the named object is the one edited, and how "
                      "often each other object is (OUT/grounding.json)")
  p.set_defaults(run=eval_shapes)

  p = evaluation.add_parser("shapes-compare", description=eval_shapes_compare.__doc__,
                            help="several ShapesWorld evaluations in one table")
  p.add_argument("runs", nargs="+", metavar="RUN", help="`eval shapes` output folders")
  p.add_argument("--out", default=None, type=common.output_location,
                 help="also write the table to this file")
  p.set_defaults(run=eval_shapes_compare)

  p = evaluation.add_parser("shapes-plot", description=eval_shapes_plot.__doc__,
                            help="several ShapesWorld evaluations in one plot")
  p.add_argument("runs", nargs="+", metavar="RUN", help="`eval shapes` output folders")
  p.add_argument("--out", required=True, type=common.output_location, help="a .png or .svg")
  p.add_argument("--x", default="train_step",
                 help="a metric (edit_accuracy, preservation, l1, ...) or a setting "
                      "(train_step, image_scale, text_scale, steps, ...)")
  p.add_argument("--y", default="edit_accuracy", help="as --x")
  p.add_argument("--group", default="all",
                 help="the metrics of one group: kind:recolour, held_out_phrasing, ...")
  p.add_argument("--annotate", default=None, help="label each point with this setting")
  p.add_argument("--title", default=None)
  p.set_defaults(run=eval_shapes_plot)

  p = evaluation.add_parser("compare", description=eval_compare.__doc__,
                            help="two MagicBrush runs side by side")
  p.add_argument("run_a")
  p.add_argument("run_b")
  p.set_defaults(run=eval_compare)
