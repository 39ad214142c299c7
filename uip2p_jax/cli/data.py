"""`uip2p data build`: TFDS (array_record) datasets from the raw formats."""

from __future__ import annotations

import argparse
import os

from uip2p_jax.cli import common

DESCRIPTION = ("Builds a TFDS (array_record) dataset; prints the records written and every "
               "record skipped with its id and reason (also in skipped.jsonl beside the data). "
               + common.EXIT_STATUS_HELP)


def add_parser(commands) -> None:
  data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command",
                                                                     required=True)
  p = data.add_parser("build", help="build a TFDS array_record dataset", description=DESCRIPTION)
  p.add_argument("kind", choices=["captions", "ip2p", "magicbrush", "sample"],
                 help="captions: cycle-edit records; ip2p: InstructPix2Pix pairs; magicbrush: "
                      "its test turns; sample: the bundled CC0 photos as captions records")
  p.add_argument("--out", required=True, metavar="DATA_DIR")
  p.add_argument("--manifest", help="captions: JSONL manifest (image paths relative to it)")
  p.add_argument("--webdataset",
                 help="captions: img2dataset shards, e.g. 'shards/{00000..00099}.tar'")
  p.add_argument("--instructions", help="captions --webdataset: JSONL of generated instructions, "
                                        "joined by 'key'")
  p.add_argument("--parquet", help="ip2p / magicbrush: parquet files, e.g. 'DIR/*.parquet'")
  p.add_argument("--reverse-instructions", help="ip2p: JSONL of reverse instructions")
  p.add_argument("--descriptions",
                 help="magicbrush: global_descriptions.json (captions for CLIP-T)")
  p.add_argument("--split", default=None, help="split name (default: train; magicbrush: test)")
  p.add_argument("--max-side", type=common.non_negative_int, default=0,
                 help="downscale images whose longest side exceeds this (0: keep)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing built dataset")
  p.set_defaults(run=run)


def _source(args: argparse.Namespace, metadata: dict):
  """The record source of a `kind` (a callable the builder iterates), filling `metadata`."""
  from uip2p_jax.data import builders, sources
  kind = args.kind
  if kind == "captions":
    if bool(args.manifest) == bool(args.webdataset):
      raise ValueError("captions: give exactly one of --manifest or --webdataset")
    if args.webdataset and not args.instructions:
      raise ValueError("captions --webdataset needs --instructions FILE.jsonl")
    if args.manifest:
      metadata["source"] = os.path.abspath(args.manifest)
      return lambda: sources.manifest_records(args.manifest, args.max_side)
    metadata["source"] = args.webdataset
    return lambda: sources.webdataset_records(args.webdataset, args.instructions, args.max_side)
  if not args.parquet:
    raise ValueError(f"{kind} needs --parquet 'DIR/*.parquet'")
  metadata["source"] = args.parquet
  if kind == "ip2p":
    metadata["has_reverse"] = bool(args.reverse_instructions)
    return lambda: sources.ip2p_records(args.parquet, args.reverse_instructions, args.max_side)
  metadata["has_captions"] = bool(args.descriptions)
  return lambda: sources.magicbrush_records(args.parquet, args.descriptions, args.max_side)


def run(args: argparse.Namespace) -> int:
  """Builds the dataset; exit 3 when records were skipped, 2 when none could be written."""
  from uip2p_jax.data import builders, sources
  if args.kind == "sample":
    report = builders.build_sample(args.out, overwrite=args.overwrite)
    kind = "captions"
  else:
    metadata = {}
    source = _source(args, metadata)
    kind = args.kind
    report = builders.build(kind, source, args.out, split=args.split, metadata=metadata,
                            overwrite=args.overwrite)
  print(f"uip2p data build {args.kind}: {report.summary()}")
  print(f"  dataset: {builders.dataset_dir(args.out, kind)}")
  # (A build that writes nothing raises builders.NothingWritten: status 2.)
  return common.SOME_SKIPPED if report.num_skipped else common.OK
