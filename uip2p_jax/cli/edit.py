"""`uip2p edit`: one image, or every record of a JSONL file, edited by instruction.

Every record is checked (instruction, image, output path) before the model is loaded, so a
typo costs seconds, not an edit. Outputs are written atomically; a rerun of a batch keeps the
outputs that exist (`--overwrite` redoes them), so a killed batch resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from uip2p_jax.cli import common

DESCRIPTION = ("Edit one image (--image, --instruction, --out), or every record of a JSONL file "
               "(--batch), with an InstructPix2Pix-style model. A bad batch record (invalid "
               "JSON, empty instruction, unreadable image, output path that cannot be written) "
               "is reported with its line number and skipped; the others are edited. A batch "
               "rerun keeps outputs that already exist (--overwrite redoes them). "
               + common.EXIT_STATUS_HELP)


@dataclasses.dataclass
class EditRecord:
  index: int        # position in the batch: the record's seed is --seed + index
  where: str        # "--image" or "RECORDS.jsonl:LINE", for messages
  image: str
  instruction: str
  out: str
  size: tuple[int, int] = (0, 0)  # the input's (width, height) once read


def add_parser(commands) -> None:
  p = commands.add_parser("edit", help="edit images by instruction (one, or a JSONL batch)",
                          description=DESCRIPTION)
  p.add_argument("--model", default=None,
                 help=common.MODEL_HELP + f" (default: {common.DEFAULT_EDIT_MODEL})")
  p.add_argument("--image", help="input image file")
  p.add_argument("--instruction", help="the edit instruction")
  p.add_argument("--out", help="output image file (.png, .jpg, .webp, ...)")
  p.add_argument("--batch", metavar="RECORDS.jsonl",
                 help='JSONL of {"image": ..., "instruction": ..., "out": ...}; paths relative '
                      "to the JSONL file")
  p.add_argument("--overwrite", action="store_true",
                 help="--batch: redo records whose output exists (default: keep them)")
  p.add_argument("--steps", type=common.positive_int, default=20)
  p.add_argument("--text-scale", type=float, default=None,
                 help=f"text guidance (default 7.5; {common.SHAPES_TEXT_SCALE} for a ShapesWorld "
                      "model, as `eval shapes`)")
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--seed", type=common.non_negative_int, default=0, help="record i uses seed + i")
  p.add_argument("--sampler", default="euler_ancestral",
                 choices=["euler_ancestral", "euler", "ddim", "ddpm"])
  p.add_argument("--strength", type=common.positive_fraction, default=1.0,
                 help="1 samples from pure noise (IP2P's); s < 1 starts from the input noised "
                      "to step round(steps x (1 - s)) and runs the rest")
  p.add_argument("--resolution", type=common.resolution, default=None,
                 help="longest side of the working size (at least 64; default 512, 64 for a "
                      "ShapesWorld model)")
  p.add_argument("--dtype", type=common.compute_dtype, default="auto",
                 metavar="{" + ",".join(common.DTYPES) + "}", help=common.DTYPE_HELP)
  p.add_argument("--batch-size", type=common.positive_int, default=1)
  p.set_defaults(run=run)


class BadRecord(ValueError):
  pass


def _raw_records(args: argparse.Namespace) -> list[tuple[str, dict | None, str]]:
  """(where, fields or None, why not) per record of the single form or the --batch file."""
  if args.batch is None:
    if not (args.image and args.out and args.instruction is not None):
      raise ValueError("give --image, --instruction and --out (or --batch RECORDS.jsonl)")
    return [("--image", {"image": args.image, "instruction": args.instruction,
                         "out": args.out}, "")]
  if args.image or args.out or args.instruction is not None:
    raise ValueError("--batch takes its images, instructions and outputs from the file: drop "
                     "--image, --instruction and --out")
  from uip2p_jax.data.sources import jsonl_error, read_jsonl
  base = os.path.dirname(os.path.abspath(args.batch))
  records = []
  for line_number, fields, raw in read_jsonl(args.batch):
    if fields is not None:
      for key in ("image", "out"):
        if isinstance(fields.get(key), str) and fields[key]:
          fields[key] = os.path.join(base, fields[key])
    records.append((f"{args.batch}:{line_number}", fields, jsonl_error(raw) if fields is None
                    else ""))
  if not records:
    raise ValueError(f"{args.batch}: no records (expected one JSON object per line)")
  return records


def _with_size(record: EditRecord) -> EditRecord:
  """The record with its image's size (the image is read: an unreadable one is a BadRecord)."""
  from uip2p_jax.image_io import load_image
  try:
    record.size = load_image(record.image).size
  except (ValueError, FileNotFoundError) as e:
    raise BadRecord(str(e)) from None
  return record


def _checked(index: int, where: str, fields: dict | None, why_not: str) -> EditRecord:
  """The record with its instruction and paths checked and its output path writable (else
  BadRecord); the image is read later (`_with_size`)."""
  from uip2p_jax.image_io import check_output_path
  if fields is None:
    raise BadRecord(why_not)
  instruction = fields.get("instruction")
  if not isinstance(instruction, str) or not instruction.strip():
    raise BadRecord(f"empty or missing instruction {instruction!r}")
  for key in ("image", "out"):
    if not isinstance(fields.get(key), str) or not fields[key]:
      raise BadRecord(f"missing {key!r} path (expected a string)")
  record = EditRecord(index, where, fields["image"], instruction, fields["out"])
  try:
    check_output_path(record.out)
  except ValueError as e:
    raise BadRecord(str(e)) from None
  return record


def run(args: argparse.Namespace) -> int:
  """Edit one image, or every record of a JSONL file; see DESCRIPTION for the exit status."""
  from tqdm import tqdm

  from uip2p_jax.image_io import (load_image, prepare_image, save_image_atomic, to_pil,
                                  working_size)
  from uip2p_jax.pipeline import batches_by_size
  batch = args.batch is not None
  bad: list[tuple[str, str]] = []
  common.editor_defaults(args, "uip2p edit")

  def report(where: str, why: str) -> None:
    bad.append((where, why))
    print(f"skipped {where}: {why}", file=sys.stderr)

  ready: list[EditRecord] = []
  kept, edited_count, outputs = 0, 0, {}
  for index, (where, fields, why_not) in enumerate(_raw_records(args)):
    out = os.path.abspath(fields["out"]) if fields and isinstance(fields.get("out"), str) \
        else None
    try:
      if out is not None and out in outputs:
        raise BadRecord(f"output {fields['out']} is also the output of {outputs[out]}")
      # A valid record whose output file exists was done by an earlier run (checked first, so
      # a folder or an unusable path is reported, not counted as done).
      record = _checked(index, where, fields, why_not)
      outputs[out] = where
      if batch and not args.overwrite and os.path.isfile(record.out):
        kept += 1
        continue
      ready.append(_with_size(record))
    except BadRecord as e:
      if not batch:
        raise ValueError(str(e)) from None
      report(where, str(e))
  if ready:
    pipe = common.load_pipeline(args.model, args.dtype, args.seed, command="uip2p edit")
    multiple = pipe.working_multiple
    sizes = [working_size(*r.size, args.resolution, multiple) for r in ready]
    progress = tqdm(total=len(ready), desc="editing", unit="image", disable=len(ready) < 2)
    # Same-size images run together in fixed-size batches, so each working size compiles once.
    for chunk in batches_by_size(sizes, args.batch_size):
      records, images = [], []
      for record in (ready[i] for i in chunk):
        try:  # read again here: holding every decoded image of a large batch costs too much
          images.append(prepare_image(load_image(record.image), args.resolution, multiple))
          records.append(record)
        except (ValueError, OSError) as e:
          if not batch:
            raise
          report(record.where, str(e))
      if not records:
        continue
      edited = pipe.edit(images, [r.instruction for r in records], steps=args.steps,
                         text_scale=args.text_scale, image_scale=args.image_scale,
                         sampler=args.sampler, seeds=[args.seed + r.index for r in records],
                         pad_to=args.batch_size, strength=args.strength)
      for record, image in zip(records, edited):
        try:
          save_image_atomic(to_pil(image), record.out)
          edited_count += 1
        except (ValueError, OSError) as e:
          if not batch:
            raise ValueError(f"{record.out}: cannot write the edit ({e})") from None
          report(record.where, f"{record.out}: cannot write the edit ({e})")
      progress.update(len(chunk))
    progress.close()
  summary = f"edited {edited_count} image(s)"
  if kept:
    summary += f", kept {kept} existing output(s) (--overwrite redoes them)"
  if bad:
    summary += f", skipped {len(bad)} bad record(s)"
  print(summary, file=sys.stderr)
  if not bad:
    return common.OK
  return common.SOME_SKIPPED if edited_count + kept else common.USAGE_ERROR
