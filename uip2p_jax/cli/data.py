"""`uip2p data build`: TFDS (array_record) datasets from the raw formats; `uip2p data instruct`:
the instructions of those records written by an LLM (uip2p_jax/data/instruct.py)."""

from __future__ import annotations

import argparse
import os
import sys

from uip2p_jax.cli import common

DESCRIPTION = ("Builds a TFDS (array_record) dataset, one output file per input shard (tar, "
               "parquet file, or block of JSONL lines), read by --workers processes; prints "
               "the records written and every record skipped with its id and reason (also in "
               "skipped.jsonl beside the data), the same whatever --workers is. A killed build "
               "run again with the same inputs and settings resumes at the first shard not yet "
               "committed. Inputs and --out may be gs:// URLs where etils.epath's filesystem "
               "library (gcsfs, or TensorFlow) is installed. " + common.EXIT_STATUS_HELP
               + " 75: interrupted by Ctrl-C (run it again to resume).")


def add_parser(commands) -> None:
  data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command",
                                                                     required=True)
  p = data.add_parser("build", help="build a TFDS array_record dataset", description=DESCRIPTION)
  p.add_argument("kind", choices=["captions", "ip2p", "pairs", "magicbrush", "sample", "shapes"],
                 help="captions: cycle-edit records; ip2p: InstructPix2Pix pairs (the "
                      "clip-filtered parquet); pairs: your own pairs (--manifest JSONL or "
                      "--parquet, any column names with --columns), written as ip2p records; "
                      "magicbrush: its test turns; sample: the bundled CC0 photos as captions "
                      "records; "
                      "shapes: ShapesWorld, rendered (captions + ip2p train records and "
                      "magicbrush test turns under one --out, scenes_{train,test}.jsonl beside)")
  p.add_argument("--out", required=True, metavar="DATA_DIR")
  p.add_argument("--manifest", help="captions, pairs: JSONL manifest (image paths relative to "
                                    "it)")
  p.add_argument("--webdataset",
                 help="captions: img2dataset shards, e.g. 'shards/{00000..00099}.tar'")
  p.add_argument("--instructions", help="captions --webdataset: JSONL of generated instructions, "
                                        "joined by 'key'")
  p.add_argument("--parquet", help="ip2p / pairs / magicbrush: parquet files, e.g. "
                                   "'DIR/*.parquet'")
  p.add_argument("--columns", metavar="FIELD=NAME[,...]",
                 help="pairs: the input's names of the fields input_image, edited_image, "
                      "instruction (required), input_caption, edited_caption, "
                      "reverse_instruction, id (optional), e.g. 'input_image=original_image,"
                      "instruction=edit_prompt' (default: the field names)")
  p.add_argument("--reverse-instructions", help="ip2p: JSONL of reverse instructions")
  p.add_argument("--descriptions",
                 help="magicbrush: global_descriptions.json (captions for CLIP-T)")
  p.add_argument("--split", default=None, help="split name (default: train; magicbrush: test)")
  p.add_argument("--max-side", type=common.non_negative_int, default=0,
                 help="downscale images whose longest side exceeds this (0: keep)")
  p.add_argument("--train", type=common.positive_int,
                 help="shapes: number of train records (captions and ip2p)")
  p.add_argument("--test", type=common.positive_int,
                 help="shapes: number of test turns (magicbrush layout)")
  p.add_argument("--seed", type=common.non_negative_int,
                 help="shapes: the world's seed (default 0); the same seed gives the same records")
  p.add_argument("--edit-kinds", default=None, metavar="KIND[,KIND...]",
                 help="shapes: train records of these edit kinds only (of recolour, reshape, "
                      "background, add, remove; default all); the test set keeps every kind")
  p.add_argument("--workers", type=common.positive_int, default=1,
                 help="processes building shards in parallel (default 1; captions, ip2p, pairs, "
                      "magicbrush)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace a finished dataset (an unfinished build of the same inputs is "
                      "resumed without it)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
  _add_instruct_parser(data)


def _source(args: argparse.Namespace, metadata: dict):
  """The record source of a `kind` (a callable the builder iterates), filling `metadata`."""
  from uip2p_jax import storage
  from uip2p_jax.data import sources
  kind = args.kind
  if kind == "captions":
    if bool(args.manifest) == bool(args.webdataset):
      raise ValueError("captions: give exactly one of --manifest or --webdataset")
    if args.webdataset and not args.instructions:
      raise ValueError("captions --webdataset needs --instructions FILE.jsonl")
    if args.manifest:
      metadata["source"] = storage.absolute(args.manifest)
      return lambda: sources.manifest_records(args.manifest, args.max_side)
    metadata["source"] = args.webdataset
    return lambda: sources.webdataset_records(args.webdataset, args.instructions, args.max_side)
  if kind == "pairs":
    if bool(args.manifest) == bool(args.parquet):
      raise ValueError("pairs: give exactly one of --manifest PAIRS.jsonl or --parquet "
                       "'DIR/*.parquet'")
    columns = sources.parse_columns(args.columns)
    # CEC needs a reverse instruction and both captions on every pair: the records decide.
    metadata.update(source=storage.absolute(args.manifest) if args.manifest else args.parquet,
                    has_reverse=None, has_captions=None)
    if args.manifest:
      return lambda: sources.pairs_jsonl_records(args.manifest, columns, args.max_side)
    return lambda: sources.pairs_parquet_records(args.parquet, columns, args.max_side)
  if not args.parquet:
    raise ValueError(f"{kind} needs --parquet 'DIR/*.parquet'")
  metadata["source"] = args.parquet
  if kind == "ip2p":
    metadata["has_reverse"] = bool(args.reverse_instructions)
    return lambda: sources.ip2p_records(args.parquet, args.reverse_instructions, args.max_side)
  metadata["has_captions"] = bool(args.descriptions)
  return lambda: sources.magicbrush_records(args.parquet, args.descriptions, args.max_side)


def _run_shapes(args: argparse.Namespace) -> int:
  from uip2p_jax.data import builders, shapes
  if args.train is None or args.test is None:
    raise ValueError("shapes needs --train N --test M (numbers of records)")
  if args.split:
    raise ValueError("shapes writes fixed splits (captions, ip2p: train; magicbrush: test); "
                     "drop --split")
  seed = 0 if args.seed is None else args.seed
  kinds = shapes.EDIT_KINDS if args.edit_kinds is None else tuple(
      k for k in args.edit_kinds.split(",") if k)
  reports = shapes.build(args.out, args.train, args.test, seed, overwrite=args.overwrite,
                         edit_kinds=kinds)
  for kind, report in reports.items():
    print(f"uip2p data build shapes ({kind}): {report.summary()}")
    print(f"  dataset: {builders.dataset_dir(args.out, kind)}")
  print(f"  scene graphs: {shapes.scenes_path(args.out, 'train')}, "
        f"{shapes.scenes_path(args.out, 'test')}")
  skipped = any(report.num_skipped for report in reports.values())
  return common.SOME_SKIPPED if skipped else common.OK


def run(args: argparse.Namespace) -> int:
  """Builds the dataset; exit 3 when records were skipped, 2 when none could be written."""
  from uip2p_jax.data import builders, sources
  if args.columns and args.kind != "pairs":  # every other kind would ignore it
    raise ValueError(f"--columns is for `data build pairs` only, not {args.kind}")
  if args.workers > 1 and args.kind in ("sample", "shapes"):
    raise ValueError(f"--workers is for captions, ip2p, pairs and magicbrush builds; {args.kind} "
                     "builds in one process")
  if args.kind == "shapes":
    return _run_shapes(args)
  if (args.train is not None or args.test is not None or args.seed is not None
      or args.edit_kinds is not None):
    raise ValueError("--train, --test, --seed and --edit-kinds are for `data build shapes` only")
  if args.kind == "sample":
    report = builders.build_sample(args.out, overwrite=args.overwrite)
    kind = "captions"
  else:
    metadata = {}
    source = _source(args, metadata)
    kind = "ip2p" if args.kind == "pairs" else args.kind
    try:
      report = builders.build(kind, source, args.out, split=args.split, metadata=metadata,
                              overwrite=args.overwrite, workers=args.workers,
                              progress=not args.no_progress)
    except KeyboardInterrupt:  # the shards committed so far stay: a rerun resumes after them
      print(f"uip2p data build {args.kind}: interrupted (Ctrl-C): run the same command again to "
            "resume", file=sys.stderr)
      return common.INTERRUPTED
  print(f"uip2p data build {args.kind}: {report.summary()}")
  print(f"  dataset: {builders.dataset_dir(args.out, kind)}")
  if args.kind == "pairs":
    _, info = builders.open_split(args.out, kind, args.split)
    cec = info.metadata.get("has_reverse") and info.metadata.get("has_captions")
    print("  objectives: ip2p" + (" and cec" if cec else " (cec needs a reverse_instruction, "
                                  "input_caption and edited_caption on every pair)"))
  # (A build that writes nothing raises builders.NothingWritten: status 2.)
  return common.SOME_SKIPPED if report.num_skipped else common.OK


INSTRUCT_DESCRIPTION = (
    "Writes the texts of training records with an LLM. captions: caption -> instruction, edited "
    "caption, reverse instruction (OUT/instructions.jsonl, joined by key by `data build captions "
    "--webdataset --instructions`); reverse: an IP2P triple -> reverse instruction "
    "(OUT/reverse_instructions.jsonl, for `data build ip2p --reverse-instructions`). Answers "
    "that fail validation go to OUT/rejected.jsonl with the reason and the raw answer. A rerun "
    "skips keys already kept or rejected. Backends: openai (an endpoint, --base-url) or jax "
    "(Gemma 2 in this process on this host's devices, --model FOLDER_OR_REPO). Exit status: 0 "
    "every input key kept or rejected; 3 some keys not answered after the retries or input "
    "records skipped (each counted; run again to retry); 2 a usage error, the server refuses "
    "every request (key, model, URL) or the jax model cannot be loaded; 75 interrupted by "
    "Ctrl-C (the lines written are whole: run again to continue).")


def _add_instruct_parser(data) -> None:
  p = data.add_parser("instruct", help="write instructions with an LLM",
                      description=INSTRUCT_DESCRIPTION)
  p.add_argument("mode", choices=["captions", "reverse"],
                 help="captions: CC3M/CC12M-style captions; reverse: IP2P parquet triples")
  p.add_argument("--out", required=True, metavar="OUT", type=common.local_location,
                 help="local folder of the output JSONL files (appended to line by line, "
                      "which a bucket object cannot be)")
  p.add_argument("--input", metavar="PATTERN",
                 help="captions: JSONL lines {\"key\", \"caption\"} or parquet files (with "
                      "--caption-column); reverse: the IP2P parquet files, e.g. "
                      "'ip2p/data/*.parquet'")
  p.add_argument("--webdataset", metavar="PATTERN",
                 help="captions: img2dataset shards, e.g. 'cc3m/{00000..00331}.tar' (their "
                      ".txt captions; img2dataset's per-shard .parquet files with "
                      "--input ... --caption-column caption --key-column key read faster)")
  p.add_argument("--caption-column", help="captions, parquet input: the caption column")
  p.add_argument("--key-column", help="captions, parquet input: the key column (default: "
                                      "'<file stem>-<row, 6 digits>')")
  p.add_argument("--backend", choices=["openai", "jax"], default="openai",
                 help="openai: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, "
                      "TGI, Ollama, a hosted API); jax: Gemma 2 in this process on this host's "
                      "devices, no server (--model FOLDER or a Hub repo id)")
  p.add_argument("--model", required=True,
                 help="openai: the model name the endpoint serves; jax: a Gemma 2 folder "
                      "(config.json, safetensors, tokenizer.json) or Hugging Face repo id, e.g. "
                      "google/gemma-2-2b-it")
  openai = p.add_argument_group("backend openai")
  openai.add_argument("--base-url", help="the endpoint's base, e.g. http://localhost:8000/v1")
  openai.add_argument("--api-key-env", metavar="VAR",
                      help="environment variable holding the API key (default: OPENAI_API_KEY "
                           "if set; none is sent otherwise)")
  openai.add_argument("--concurrency", type=common.positive_int,
                      help=f"requests in flight (default {OPENAI_DEFAULTS['concurrency']})")
  openai.add_argument("--timeout", type=_positive_float,
                      help="seconds per request before it is retried (default "
                           f"{OPENAI_DEFAULTS['timeout']:g})")
  openai.add_argument("--max-retries", type=common.non_negative_int,
                      help="retries of a request after 429 / 408 / 5xx / a timeout / a dropped "
                           "connection, with exponential backoff and jitter (default "
                           f"{OPENAI_DEFAULTS['max_retries']})")
  openai.add_argument("--retry-delay", type=_positive_float,
                      help="the first backoff in seconds, doubled per retry (default "
                           f"{OPENAI_DEFAULTS['retry_delay']:g}; a 429's Retry-After wins)")
  jax_options = p.add_argument_group("backend jax")
  jax_options.add_argument("--batch-size", type=common.positive_int,
                           help=f"prompts generated together (default {JAX_DEFAULTS['batch_size']}"
                                "), split over the host's devices (rounded up to a multiple of "
                                "their number)")
  jax_options.add_argument("--dtype", type=common.compute_dtype,
                           help=common.DTYPE_HELP.replace("the edit models", "Gemma"))
  p.add_argument("--temperature", type=float, default=0.7,
                 help="sampling temperature (default 0.7: varied edits, mostly valid JSON)")
  p.add_argument("--seed", type=int, default=0,
                 help="openai: sent with every request; jax: with each input's key, the key "
                      "its sampling draws from; recorded either way")
  p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens",
                 type=common.positive_int, default=256,
                 help="answer length limit in tokens (default 256)")
  p.add_argument("--prompt", metavar="FILE",
                 help="a prompt file instead of the packaged one (captions_v1.txt / "
                      "reverse_v1.txt); its sha256 is recorded")
  p.add_argument("--retry-rejected", action="store_true",
                 help="send keys rejected by an earlier run again")
  p.add_argument("--num-shards", type=common.positive_int, default=1,
                 help="split the input by a stable hash of the key (one process or host per "
                      "shard; each writes *-SSSSS-of-NNNNN.jsonl in OUT)")
  p.add_argument("--shard", type=common.non_negative_int, default=0,
                 help="this process's shard, 0..num-shards-1")
  p.add_argument("--limit", type=common.positive_int,
                 help="send at most this many keys (to try a prompt or a server)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(run=run_instruct)


OPENAI_DEFAULTS = {"concurrency": 32, "timeout": 60.0, "max_retries": 5, "retry_delay": 1.0}
JAX_DEFAULTS = {"batch_size": 32, "dtype": "auto"}


def _backend_options(args: argparse.Namespace) -> None:
  """Fills in the chosen backend's defaults; refuses the other backend's options."""
  mine, other = ((OPENAI_DEFAULTS, JAX_DEFAULTS) if args.backend == "openai"
                 else (JAX_DEFAULTS, {**OPENAI_DEFAULTS, "base_url": None, "api_key_env": None}))
  given = [name for name in other if getattr(args, name) is not None]
  if given:
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    raise ValueError(f"{flags}: not an option of --backend {args.backend}")
  for name, default in mine.items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  if args.backend == "openai" and not args.base_url:
    raise ValueError("--backend openai needs --base-url, e.g. http://localhost:8000/v1")
  if args.backend == "jax":
    args.dtype = common.compute_dtype(args.dtype)


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"{value}: expected a number above 0")
  return value


def run_instruct(args: argparse.Namespace) -> int:
  """Writes the instructions; exit 3 when keys were left unanswered or inputs skipped."""
  from uip2p_jax.data import instruct, llm_client
  if args.shard >= args.num_shards:
    raise ValueError(f"--shard {args.shard} is not in 0..{args.num_shards - 1}")
  if args.mode == "captions":
    items, total = instruct.caption_items(args.input, args.webdataset, args.caption_column,
                                          args.key_column)
  else:
    if not args.input or args.webdataset or args.caption_column or args.key_column:
      raise ValueError("reverse reads --input 'DIR/*.parquet' (the IP2P parquet files) only")
    items, total = instruct.reverse_items(args.input)
  _backend_options(args)
  if args.temperature < 0:
    raise ValueError(f"--temperature {args.temperature}: expected 0 (greedy) or more")
  if args.backend == "jax":
    config = instruct.JaxConfig(model=args.model, batch_size=args.batch_size,
                                max_new_tokens=args.max_tokens, temperature=args.temperature,
                                seed=args.seed, dtype=args.dtype)
  else:
    if args.api_key_env and args.api_key_env not in os.environ:
      raise ValueError(f"--api-key-env {args.api_key_env}: no such environment variable")
    config = llm_client.ClientConfig(
        base_url=args.base_url, model=args.model,
        api_key=os.environ.get(args.api_key_env or "OPENAI_API_KEY") or None,
        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
        retry_delay=args.retry_delay, temperature=args.temperature, seed=args.seed,
        max_tokens=args.max_tokens)
  prompt = instruct.load_prompt(args.mode, args.prompt)
  try:
    summary = instruct.generate(args.mode, items, args.out, config, prompt=prompt, total=total,
                                retry_rejected=args.retry_rejected, num_shards=args.num_shards,
                                shard=args.shard, limit=args.limit,
                                progress=not args.no_progress)
  except llm_client.ServerError as e:
    print(f"uip2p data instruct: error: {e}", file=sys.stderr)
    return common.USAGE_ERROR
  kept_path, rejected_path = instruct.output_paths(args.out, args.mode, args.num_shards,
                                                   args.shard)
  print(f"uip2p data instruct {args.mode}: {summary.text()}")
  print(f"  kept: {kept_path}\n  rejected: {rejected_path}")
  if summary.interrupted:
    return common.INTERRUPTED
  if summary.failed:
    print(f"uip2p data instruct: keys not answered after {args.max_retries} retries: "
          f"{len(summary.failed)} (run the same command again to retry them)", file=sys.stderr)
  return common.SOME_SKIPPED if summary.failed or summary.bad_inputs else common.OK
