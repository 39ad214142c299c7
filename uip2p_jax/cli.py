"""The `uip2p` command (also `python -m uip2p_jax`)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def parameter_count(module: nnx.Module) -> int:
  return sum(int(np.prod(v.get_value().shape))
             for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _timed(label: str, fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  print(f"  {label:<34s} {time.perf_counter() - start:7.2f} s (compile + run)")
  return out


def demo(args: argparse.Namespace) -> int:
  """Every model once on random weights, then a full edit: the InstructPix2Pix data path."""
  from uip2p_jax.models import (AttentionCapture, AutoencoderKL, CLIPModel, CLIPTextTransformer,
                                UNet2DConditionModel)
  from uip2p_jax.models.random_init import random_init
  from uip2p_jax.models.presets import preset
  from uip2p_jax.tokenizer import default_tokenizer, tokenize

  configs = preset(args.preset)
  print(f"uip2p demo: preset {args.preset!r}, random weights, {args.resolution} px, "
        f"backend {jax.default_backend()} ({jax.device_count()} device(s))")
  rngs = lambda: nnx.Rngs(0)
  unet = random_init(lambda: UNet2DConditionModel(configs.unet, rngs=rngs()), args.seed)
  vae = random_init(lambda: AutoencoderKL(configs.vae, rngs=rngs()), args.seed + 1)
  text_encoder = random_init(lambda: CLIPTextTransformer(configs.text_encoder, rngs=rngs()),
                             args.seed + 2)
  clip = random_init(lambda: CLIPModel(configs.clip, rngs=rngs()), args.seed + 3)
  for name, module in (("unet", unet), ("vae", vae), ("text encoder", text_encoder),
                       ("clip", clip)):
    print(f"  {name:<14s} {parameter_count(module) / 1e6:9.2f} M parameters")

  instruction = args.instruction
  token_ids = tokenize(default_tokenizer(), [instruction, ""])
  print(f"  tokens of {instruction!r}: {token_ids[0][:token_ids[0].argmax() + 1].tolist()}")

  size = args.resolution
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  image = jnp.asarray(np.stack([xx, yy, xx * yy], -1)[None], jnp.float32)

  encode_text = nnx.jit(lambda m, ids: m(ids)[0])
  encode_image = nnx.jit(lambda m, x: m.encode(x).mode())
  factor = vae.downsample_factor
  capture = AttentionCapture(resolutions=(size // factor // 2,))
  predict = nnx.jit(lambda m, x, t, c: m(x, t, c, capture=capture))
  decode = nnx.jit(lambda m, z: m.decode(z))
  clip_similarity = nnx.jit(lambda m, x, ids: jnp.sum(m.embed_images(x) * m.embed_texts(ids), -1))

  text_embeddings = _timed("text encoder (2 x 77 tokens)", encode_text, text_encoder, token_ids)
  image_latent = _timed(f"vae encode ({size}x{size})", encode_image, vae, image)
  noisy = jax.random.normal(jax.random.key(args.seed), image_latent.shape)
  unet_input = jnp.concatenate([noisy, image_latent], axis=-1)
  noise_pred, maps = _timed("unet + cross-attention capture", predict, unet, unet_input,
                            jnp.array([500]), text_embeddings[:1])
  decoded = _timed("vae decode", decode, vae, image_latent)
  similarity = _timed("clip image-text similarity", clip_similarity, clip, decoded,
                      token_ids[:1])
  print(f"  image latent {tuple(image_latent.shape)}, noise prediction "
        f"{tuple(noise_pred.shape)} (std {float(noise_pred.std()):.3f}), decoded "
        f"{tuple(decoded.shape)}")
  for layer, probs in maps.items():
    print(f"  captured {layer}: {tuple(probs.shape)}, rows sum to "
          f"{float(probs.sum(-1).mean()):.4f}")
  print(f"  clip similarity (random weights): {float(similarity[0]):+.4f}")

  # The whole edit path (what `uip2p edit` runs), on the same random models.
  import os

  from uip2p_jax.pipeline import EditPipeline, to_pil
  pipe = EditPipeline(unet, vae, text_encoder, default_tokenizer())
  edited = _timed(f"edit, {args.steps} Euler ancestral steps", lambda: pipe.edit(
      np.asarray(image), [instruction], steps=args.steps, seeds=[args.seed]))
  os.makedirs(args.out_dir, exist_ok=True)
  to_pil(np.asarray(image[0])).save(os.path.join(args.out_dir, "input.png"))
  to_pil(edited[0]).save(os.path.join(args.out_dir, "edited.png"))
  print(f"  wrote {args.out_dir}/input.png and {args.out_dir}/edited.png")
  print("demo finished: every model ran on this machine with no download.")
  return 0


def _load_pipeline(args: argparse.Namespace):
  from uip2p_jax.pipeline import EditPipeline
  if args.model is None:
    print("uip2p edit: no --model given: using the embedded tiny random model (no download; "
          "its edits are noise, it shows the path runs)", file=sys.stderr)
    return EditPipeline.tiny_random(args.seed)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  return EditPipeline.from_pretrained(args.model, dtype=dtype)


def _edit_records(args: argparse.Namespace) -> list[dict]:
  """[{image, instruction, out, index}] from --image/--instruction/--out or a --batch JSONL."""
  import json
  import os
  if args.batch is None:
    if not (args.image and args.out and args.instruction is not None):
      raise ValueError("give --image, --instruction and --out (or --batch RECORDS.jsonl)")
    return [{"image": args.image, "instruction": args.instruction, "out": args.out,
             "where": "--image"}]
  base = os.path.dirname(os.path.abspath(args.batch))
  records = []
  with open(args.batch) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        record = {"error": f"invalid JSON ({e})"}
      for key in ("image", "out"):
        if isinstance(record.get(key), str):
          record[key] = os.path.join(base, record[key])
      record["where"] = f"{args.batch}:{line_number}"
      records.append(record)
  return records


def edit(args: argparse.Namespace) -> int:
  """Edit one image, or every record of a JSONL file, with an InstructPix2Pix-style model."""
  import os

  from tqdm import tqdm

  from uip2p_jax.pipeline import load_image, prepare_image, to_pil
  records = _edit_records(args)
  pipe = _load_pipeline(args)
  multiple = max(64, pipe.size_multiple)
  ready, skipped = [], 0
  for index, record in enumerate(records):
    try:
      if "error" in record:
        raise ValueError(record["error"])
      instruction = record.get("instruction")
      if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"empty or missing instruction {instruction!r}")
      if not isinstance(record.get("out"), str):
        raise ValueError("missing 'out' path")
      if not isinstance(record.get("image"), str):
        raise ValueError("missing 'image' path")
      image = prepare_image(load_image(record["image"]), args.resolution, multiple)
    except (ValueError, FileNotFoundError) as e:
      if args.batch is None:
        raise
      print(f"skipped {record['where']}: {e}", file=sys.stderr)
      skipped += 1
      continue
    ready.append((index, image, instruction, record["out"]))

  # Same-size images run together in fixed-size batches (the last one padded), so each
  # working size compiles once.
  by_size: dict[tuple, list] = {}
  for item in ready:
    by_size.setdefault(item[1].shape, []).append(item)
  progress = tqdm(total=len(ready), desc="editing", unit="image", disable=len(ready) < 2)
  for items in by_size.values():
    for start in range(0, len(items), args.batch_size):
      chunk = items[start:start + args.batch_size]
      padded = chunk + [chunk[0]] * (args.batch_size - len(chunk))
      edited = pipe.edit(np.stack([item[1] for item in padded]), [item[2] for item in padded],
                         steps=args.steps, text_scale=args.text_scale,
                         image_scale=args.image_scale, sampler=args.sampler,
                         seeds=[args.seed + item[0] for item in padded])
      for (_, _, _, out), image in zip(chunk, edited):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        to_pil(image).save(out)
      progress.update(len(chunk))
  progress.close()
  print(f"edited {len(ready)} image(s)" + (f", skipped {skipped} bad record(s)" if skipped
                                          else ""), file=sys.stderr)
  return 3 if skipped else 0


def data_build(args: argparse.Namespace) -> int:
  """Builds a TFDS (array_record) dataset; prints written/skipped counts and skipped ids."""
  from uip2p_jax.data import builders
  kind, source = args.kind, None
  metadata = {}
  if kind == "sample":
    report = builders.build_sample(args.out, overwrite=args.overwrite)
    kind = "captions"
  else:
    if kind == "captions":
      if bool(args.manifest) == bool(args.webdataset):
        raise ValueError("captions: give exactly one of --manifest or --webdataset")
      if args.webdataset and not args.instructions:
        raise ValueError("captions --webdataset needs --instructions FILE.jsonl")
      if args.manifest:
        source = lambda: builders.manifest_records(args.manifest, args.max_side)
        metadata["source"] = os.path.abspath(args.manifest)
      else:
        source = lambda: builders.webdataset_records(args.webdataset, args.instructions,
                                                     args.max_side)
        metadata["source"] = args.webdataset
    else:
      if not args.parquet:
        raise ValueError(f"{kind} needs --parquet 'DIR/*.parquet'")
      if kind == "ip2p":
        source = lambda: builders.ip2p_records(args.parquet, args.reverse_instructions,
                                               args.max_side)
        metadata["has_reverse"] = bool(args.reverse_instructions)
      else:
        source = lambda: builders.magicbrush_records(args.parquet, args.descriptions,
                                                     args.max_side)
        metadata["has_captions"] = bool(args.descriptions)
      metadata["source"] = args.parquet
    report = builders.build(kind, source, args.out, split=args.split, metadata=metadata,
                            overwrite=args.overwrite)
  print(f"uip2p data build {args.kind}: {report.summary()}")
  print(f"  dataset: {builders.dataset_dir(args.out, kind)}")
  return 0


def plan(args: argparse.Namespace) -> int:
  """AOT-compiles a config's full train step on abstract shapes: per-device memory and FLOPs."""
  mesh = dict(item.split("=") for item in args.mesh.split(","))
  if set(mesh) != {"data", "fsdp"}:
    raise ValueError(f"--mesh {args.mesh!r}: expected data=N,fsdp=M")
  data, fsdp = int(mesh["data"]), int(mesh["fsdp"])
  flags = os.environ.get("XLA_FLAGS", "")
  # Plan on the CPU (when it is the backend, or the accelerators are fewer than the mesh):
  # simulate the mesh's devices, skip LLVM optimisation (buffer assignment, hence memory, is
  # decided before code generation) and schedule for memory as accelerator compilers do:
  # XLA:CPU's default schedule runs rematerialised forward passes early for parallelism, which
  # at SD 1.5 size triples the peak (46.6 vs 14.6 GiB). Flags must be set before JAX starts.
  cpu_flags = (f"--xla_force_host_platform_device_count={data * fsdp}",
               "--xla_backend_optimization_level=0",
               "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
  on_cpu = jax.default_backend() == "cpu" or jax.device_count() < data * fsdp
  if on_cpu and not all(flag in flags.split() for flag in cpu_flags):  # run again with them
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([flags, *cpu_flags]))
    os.execve(sys.executable, [sys.executable, "-m", "uip2p_jax"] + sys.argv[1:], env)
  from uip2p_jax.plan import load_config, plan_train_step
  config = load_config(args.config)
  start = time.perf_counter()
  # On a CPU, building the executable of an SD 1.5-size step takes far longer than assigning
  # its buffers; read the assignment and leave (unless --wait-for-executable).
  early = on_cpu and not args.wait_for_executable
  dump_dir = tempfile.mkdtemp(prefix="uip2p_plan_") if early else None
  try:
    result = plan_train_step(config, data, fsdp, args.global_batch, args.resolution, args.preset,
                             dump_dir=dump_dir)
    how = ("memory from XLA's buffer assignment, FLOPs before optimisation"
           if result.source == "buffer-assignment" else "compiled")
    print(f"uip2p plan: {args.config} | preset {args.preset} | mesh data={data},fsdp={fsdp} "
          f"({jax.default_backend()}) | global batch {args.global_batch} | {args.resolution} px "
          f"| objective {config.objective} | remat {config.model.remat} "
          f"| {how} in {time.perf_counter() - start:.0f} s")
    print(f"per-device memory: {result.per_device_gib:.2f} GiB "
          f"(arguments {result.argument_bytes / 2 ** 30:.2f} GiB, temporaries "
          f"{result.temp_bytes / 2 ** 30:.2f} GiB)")
    print(f"flops per step: {result.flops_per_device * result.devices / 1e12:.4g} TFLOP "
          f"({result.flops_per_device / 1e12:.4g} TFLOP per device)")
  finally:
    if dump_dir:
      shutil.rmtree(dump_dir, ignore_errors=True)
  if early:  # the compile still runs in a background thread: do not wait for it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="uip2p", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("demo", help="every model and a full edit on random weights")
  p.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--instruction", default="make it snowy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=4, help="sampling steps of the demo edit")
  p.add_argument("--out-dir", default="demo_out", help="where the demo edit's images go")
  p.set_defaults(run=demo)

  p = commands.add_parser("edit", help="edit images by instruction (one, or a JSONL batch)",
                          description=edit.__doc__ + " Exit status 3 when bad batch records "
                          "were skipped (the others are edited).")
  p.add_argument("--model", default=None,
                 help="diffusers IP2P folder or Hub repo id (default: embedded tiny random model)")
  p.add_argument("--image", help="input image file")
  p.add_argument("--instruction", help="the edit instruction")
  p.add_argument("--out", help="output image file")
  p.add_argument("--batch", metavar="RECORDS.jsonl",
                 help='JSONL of {"image": ..., "instruction": ..., "out": ...}; paths relative '
                      "to the JSONL file")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--text-scale", type=float, default=7.5)
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--seed", type=int, default=0, help="record i uses seed + i")
  p.add_argument("--sampler", default="euler_ancestral",
                 choices=["euler_ancestral", "euler", "ddim", "ddpm"])
  p.add_argument("--resolution", type=int, default=512, help="longest side of the working size")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--batch-size", type=int, default=1)
  p.set_defaults(run=edit)

  commands.add_parser(
      "train", help="train an experiment: uip2p train --config experiments/FILE.py[:ARGS] "
                    "--workdir DIR [--config.key=value ...] (absl flags; see uip2p_jax/train.py)")
  p = commands.add_parser("plan", help="per-device memory and FLOPs of a config's train step",
                          description=plan.__doc__)
  p.add_argument("--config", required=True, help="experiments/FILE.py[:ARGS]")
  p.add_argument("--mesh", default="data=1,fsdp=1", help="data=N,fsdp=M")
  p.add_argument("--global-batch", type=int, required=True)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--preset", default="sd15", choices=["sd15", "tiny"],
                 help="model size to plan (sd15: the real SD 1.5 / CLIP ViT-L/14 shapes)")
  p.add_argument("--wait-for-executable", action="store_true",
                 help="on a CPU, finish the compile (FLOPs after optimisation; can take an hour "
                      "at SD 1.5 size) instead of reading memory from the buffer assignment")
  p.set_defaults(run=plan)

  from uip2p_jax.eval.commands import add_parsers as add_eval_parsers
  add_eval_parsers(commands)

  data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command",
                                                                     required=True)
  p = data.add_parser("build", help="build a TFDS array_record dataset",
                      description=data_build.__doc__)
  p.add_argument("kind", choices=["captions", "ip2p", "magicbrush", "sample"],
                 help="captions: cycle-edit records; ip2p: InstructPix2Pix pairs; magicbrush: "
                      "its test turns; sample: the bundled CC0 photos as captions records")
  p.add_argument("--out", required=True, metavar="DATA_DIR")
  p.add_argument("--manifest", help="captions: JSONL manifest (image paths relative to it)")
  p.add_argument("--webdataset", help="captions: img2dataset shards, e.g. 'shards/{00000..00099}.tar'")
  p.add_argument("--instructions", help="captions --webdataset: JSONL of generated instructions, "
                                        "joined by 'key'")
  p.add_argument("--parquet", help="ip2p / magicbrush: parquet files, e.g. 'DIR/*.parquet'")
  p.add_argument("--reverse-instructions", help="ip2p: JSONL of reverse instructions")
  p.add_argument("--descriptions", help="magicbrush: global_descriptions.json (captions for CLIP-T)")
  p.add_argument("--split", default=None, help="split name (default: train; magicbrush: test)")
  p.add_argument("--max-side", type=int, default=0,
                 help="downscale images whose longest side exceeds this (0: keep)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing built dataset")
  p.set_defaults(run=data_build)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # absl/ml_collections flags: --config FILE.py:ARGS --config.key=v
    from uip2p_jax.train import main as train_main
    return train_main(argv[1:])
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"uip2p {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
