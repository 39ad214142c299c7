"""`uip2p eval magicbrush | ip2p-curve | compare`."""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from uip2p_jax.eval import curve, magicbrush
from uip2p_jax.eval.metrics import MetricModels


def load_pipeline(model: str | None, dtype: str = "float32"):
  """A diffusers IP2P folder / Hub repo id, or the embedded tiny random model when None."""
  import jax.numpy as jnp
  from uip2p_jax.pipeline import EditPipeline
  if model is None:
    return EditPipeline.tiny_random()
  return EditPipeline.from_pretrained(model, dtype=jnp.bfloat16 if dtype == "bfloat16"
                                      else jnp.float32)


def make_edit(pipe, steps: int, resolution: int, sampler: str = "euler_ancestral"):
  """(images, instructions, seeds, text_scale, image_scale) -> edited PIL images; images of
  different working sizes are edited in separate batches (one compile per size)."""
  from uip2p_jax.pipeline import prepare_image, to_pil

  def edit(images: list[Image.Image], instructions: list[str], seeds: list[int],
           text_scale: float, image_scale: float) -> list[Image.Image]:
    prepared = [prepare_image(im, resolution, pipe.size_multiple) for im in images]
    out: list[Image.Image | None] = [None] * len(images)
    for shape in dict.fromkeys(p.shape for p in prepared):
      index = [i for i, p in enumerate(prepared) if p.shape == shape]
      edited = pipe.edit(np.stack([prepared[i] for i in index]), [instructions[i] for i in index],
                         steps=steps, text_scale=text_scale, image_scale=image_scale,
                         seeds=[seeds[i] for i in index], sampler=sampler)
      for i, e in zip(index, edited):
        out[i] = to_pil(e)
    return out
  return edit


def metric_models(clip: str | None, dino: str | None) -> MetricModels:
  from uip2p_jax import weights
  from uip2p_jax.tokenizer import default_tokenizer, load_tokenizer
  clip_model = weights.load_clip(clip) if clip else None
  tokenizer = None
  if clip:
    folder = weights.resolve_folder(clip)
    has_tokenizer = os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(
        os.path.join(folder, "tokenizer.json"))
    tokenizer = load_tokenizer(clip, subfolder=None) if has_tokenizer else default_tokenizer()
  return MetricModels(clip_model, weights.load_vit(dino) if dino else None, tokenizer)


def _expected(spec: str | None) -> dict | None:
  if not spec:
    return None
  from uip2p_jax.plan import load_config
  config = load_config(spec)
  return dict(config.expected.get("magicbrush_single_turn", {}))


def eval_magicbrush(args: argparse.Namespace) -> int:
  """Edits every MagicBrush test turn (resumable) and scores L1, L2, CLIP-I, DINO, CLIP-T."""
  turns = magicbrush.load_turns(args.data, args.limit)
  if not turns:
    raise ValueError(f"{args.data}: no MagicBrush turns to evaluate")
  pipe = load_pipeline(args.model, args.dtype)
  edit = make_edit(pipe, args.steps, args.resolution)
  label = args.label or (args.model or "embedded tiny random model")
  modes = ["single", "multi"] if args.turns == "both" else [args.turns]
  os.makedirs(args.out, exist_ok=True)
  for mode in modes:
    made = magicbrush.run_edits(
        turns, lambda ims, ins, seeds: edit(ims, ins, seeds, args.text_scale, args.image_scale),
        args.out, mode, args.batch_size, args.seed)
    print(f"uip2p eval magicbrush: {mode}-turn: {made} edits made, "
          f"{len(turns) - made} already on disk")
  models = metric_models(args.clip, args.dino)
  rows = {}
  for mode in modes:
    rows[mode] = magicbrush.score(turns, args.out, mode, models)
    magicbrush.write_csv(rows[mode], os.path.join(args.out, f"{mode}_turn.csv"))
  summary = magicbrush.summarise(rows)
  expected = _expected(args.expected)
  magicbrush.write_summary(summary, args.out, label, expected)
  print(magicbrush.markdown_table(summary, label, expected))
  return 0


def eval_curve(args: argparse.Namespace) -> int:
  """CLIP direction vs image similarity over guidance scales (InstructPix2Pix's curve)."""
  parse = lambda text: [float(v) for v in text.split(",") if v]
  text_scales, image_scales = parse(args.text_scales), parse(args.image_scales)
  records = curve.load_records(args.data, args.kind, args.split, args.limit)
  clip = metric_models(args.clip, None)
  models = args.model or [None]
  labels = args.label or [m or "embedded tiny random model" for m in models]
  if len(labels) != len(models):
    raise ValueError(f"{len(models)} --model but {len(labels)} --label")
  rows = []
  for model, label in zip(models, labels):
    edit = make_edit(load_pipeline(model, args.dtype), args.steps, args.resolution)
    rows += curve.curve_points(label, edit, records, clip, text_scales, image_scales,
                               args.batch_size)
  os.makedirs(args.out, exist_ok=True)
  curve.write_csv(rows, os.path.join(args.out, "ip2p_curve.csv"))
  curve.plot(rows, os.path.join(args.out, "ip2p_curve.png"))
  for r in rows:
    print(f"{r['model']}: text {r['text_scale']:g} image {r['image_scale']:g} -> direction "
          f"{r['direction_similarity']:.4f}, image similarity {r['image_similarity']:.4f}")
  print(f"uip2p eval ip2p-curve: {args.out}/ip2p_curve.csv and ip2p_curve.png")
  return 0


def eval_compare(args: argparse.Namespace) -> int:
  """Two `eval magicbrush` runs' summaries side by side, with B - A."""
  print(magicbrush.compare(args.run_a, args.run_b), end="")
  return 0


def add_parsers(commands) -> None:
  evaluation = commands.add_parser("eval", help="evaluation").add_subparsers(
      dest="eval_command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--data", required=True, metavar="DATA_DIR")
  common.add_argument("--out", required=True, metavar="DIR")
  common.add_argument("--steps", type=int, default=20)
  common.add_argument("--resolution", type=int, default=512)
  common.add_argument("--batch-size", type=int, default=4)
  common.add_argument("--limit", type=int, default=None)
  common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

  p = evaluation.add_parser("magicbrush", parents=[common], description=eval_magicbrush.__doc__,
                            help="the MagicBrush test protocol")
  p.add_argument("--model", default=None,
                 help="diffusers IP2P folder or Hub repo (default: embedded tiny random model)")
  p.add_argument("--turns", default="both", choices=["single", "multi", "both"])
  p.add_argument("--text-scale", type=float, default=7.5)
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-I/CLIP-T")
  p.add_argument("--dino", default="facebook/dino-vits16", help="ViT for the DINO metric")
  p.add_argument("--label", default=None, help="row name in the summary")
  p.add_argument("--expected", default=None, metavar="experiments/FILE.py[:ARGS]",
                 help="add the config's expected MagicBrush row to the summary")
  p.set_defaults(run=eval_magicbrush)

  p = evaluation.add_parser("ip2p-curve", parents=[common], description=eval_curve.__doc__,
                            help="CLIP direction vs image similarity over guidance scales")
  p.add_argument("--model", action="append", help="repeat for several models on one plot")
  p.add_argument("--label", action="append", help="one per --model")
  p.add_argument("--kind", default="ip2p", choices=["ip2p", "captions"])
  p.add_argument("--split", default=None)
  p.add_argument("--text-scales", default="3,5,7.5,10,12.5")
  p.add_argument("--image-scales", default="1.0,1.5,2.0")
  p.add_argument("--clip", default="openai/clip-vit-large-patch14")
  p.set_defaults(run=eval_curve)

  p = evaluation.add_parser("compare", description=eval_compare.__doc__,
                            help="two MagicBrush runs side by side")
  p.add_argument("run_a")
  p.add_argument("run_b")
  p.set_defaults(run=eval_compare)
