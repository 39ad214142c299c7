"""What several commands share: argument types, exit statuses, loading the edit pipeline."""

from __future__ import annotations

import argparse
import os
import sys

# Exit statuses of every command that works through records (edit, data build, eval).
OK = 0            # every record done
USAGE_ERROR = 2   # a usage error, or nothing could be done
SOME_SKIPPED = 3  # some records were skipped (each reported); the rest are done
INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal with its work so far saved; run it again

EXIT_STATUS_HELP = ("Exit status: 0 all records done; 3 some records skipped (each reported "
                    "with its line or id, the rest done); 2 nothing could be done, or a usage "
                    "error.")
EMBEDDED_MODEL = "embedded tiny random model"
TINY_MODEL = "tiny-random"          # --model name of the embedded tiny random model
DEFAULT_EDIT_MODEL = "shapes-cec"   # edit / app / eval shapes with no --model
# The editors' help: what --model takes.
MODEL_HELP = ("diffusers IP2P folder, Hub repo id, a shipped ShapesWorld model (shapes-cec, "
              "shapes-ip2p, shapes-ip2p-recolour), or tiny-random (the embedded tiny random "
              "model: the path runs, its edits are noise)")
# ShapesWorld editors' working size and guidance, where the command's defaults are for photos.
SHAPES_TEXT_SCALE = 4.0


def edit_model(model: str | None, command: str) -> str:
  """--model, or with none given the shipped ShapesWorld CEC model, said on stderr."""
  if model is not None:
    return model
  print(f"{command}: no --model given: using {DEFAULT_EDIT_MODEL}, the ShapesWorld editor this "
        "repository trained with CEC and ships (64 px scenes of coloured shapes; --model "
        "for yours)", file=sys.stderr)
  return DEFAULT_EDIT_MODEL


def editor_defaults(args: argparse.Namespace, command: str) -> bool:
  """Fills in `edit`'s and `app`'s --model (shapes-cec when none is given), --resolution and
  --text-scale (a ShapesWorld editor's 64 px and 4.0, as `eval shapes`; else 512 and 7.5, the
  photo models'); True for a ShapesWorld editor (or `app --shapes`)."""
  from uip2p_jax import shapes_models
  from uip2p_jax.data import shapes as shapes_world
  args.model = edit_model(args.model, command)
  world = args.model in shapes_models.EDIT_MODELS or getattr(args, "shapes", False)
  if args.resolution is None:
    args.resolution = shapes_world.RESOLUTION if world else 512
  if args.text_scale is None:
    args.text_scale = SHAPES_TEXT_SCALE if world else 7.5
  return world


def int_at_least(minimum: int, what: str = "a whole number"):
  """An argparse `type=`: an int >= minimum, else an error naming the bound."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value}: expected {what} of at least {minimum}")
    return value
  return parse


def fraction(text: str) -> float:
  """An argparse `type=`: a number in [0, 1]."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"{value}: expected a fraction in [0, 1]")
  return value


def positive_fraction(text: str) -> float:
  """An argparse `type=`: a number in (0, 1]."""
  value = fraction(text)
  if value == 0.0:
    raise argparse.ArgumentTypeError(f"{value}: expected a fraction in (0, 1]")
  return value


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
# The working size's longest side: one multiple of 64 at least (SD's VAE x UNet factor).
resolution = int_at_least(64, "a resolution in pixels")


DTYPES = ("auto", "float32", "bfloat16")
DTYPE_HELP = ("compute and weight dtype of the edit models; auto (default): bfloat16 on a GPU or "
              "TPU, float32 on a CPU")


def output_location(text: str) -> str:
  """An output folder or file: a local path, or a URL whose filesystem library is installed
  (refused here, before any work, rather than at the first write)."""
  from uip2p_jax import storage
  problem = storage.url_problem(text)
  if problem:
    raise argparse.ArgumentTypeError(problem)
  return text


def local_location(text: str) -> str:
  """An output that this command writes with local file operations only: URLs are refused (not
  written into a folder named `gs:` here)."""
  from uip2p_jax import storage
  if storage.is_remote(text):
    raise argparse.ArgumentTypeError(f"{text!r}: this output must be a local path (write it "
                                     "locally, then copy it to the bucket)")
  return text


def compute_dtype(text: str, platform: str | None = None) -> str:
  """An argparse `type=` for `--dtype`: "float32", "bfloat16", or "auto", which is bfloat16 on a
  GPU or TPU (their matrix units' native precision; softmax and norms stay float32) and float32
  on a CPU (no fast bfloat16 there). `platform` defaults to JAX's default backend."""
  if text not in DTYPES:
    raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(DTYPES)}")
  if text != "auto":
    return text
  if platform is None:
    import jax
    platform = jax.default_backend()
  return "bfloat16" if platform in ("gpu", "tpu") else "float32"


def mesh_shape(text: str) -> tuple[int, int]:
  """`data=N,fsdp=M` -> (N, M): an argparse `type=`."""
  expected = "expected data=N,fsdp=M with whole numbers >= 1, e.g. data=2,fsdp=4"
  parts = dict(item.partition("=")[::2] for item in text.split(","))
  if sorted(parts) != ["data", "fsdp"]:
    raise argparse.ArgumentTypeError(f"{text!r}: {expected}")
  try:
    data, fsdp = int(parts["data"]), int(parts["fsdp"])
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: {expected}") from None
  if data < 1 or fsdp < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: {expected}")
  return data, fsdp


def model_folder(model: str, world: str | None = None) -> str:
  """A ShapesWorld model's name (shapes-ip2p, ...) -> its folder, shipped or in the runs folder
  `world` (refused if absent); anything else is returned unchanged."""
  from uip2p_jax import shapes_models
  if model not in shapes_models.NAMES:
    return model
  folder = shapes_models.paths(world)[shapes_models.NAMES[model]]
  if not os.path.isfile(os.path.join(folder, "unet", "config.json")):
    where = f"the runs folder {world}" if world else "this checkout (shipped models)"
    raise FileNotFoundError(f"--model {model}: no such model in {where}: expected {folder}/unet "
                            "(launch/shapes.sh trains the world's models; give the export folder)")
  return folder


def load_pipeline(model: str | None, dtype: str = "float32", seed: int = 0,
                  command: str = "uip2p"):
  """An `EditPipeline` from a diffusers IP2P folder, a Hub repo id or a shipped model's name
  (shapes-ip2p, shapes-cec); `tiny-random` the embedded tiny random model (its edits are noise);
  with no model (eval magicbrush, ip2p-curve) the same, said on stderr."""
  from uip2p_jax.model_set import dtype_of
  from uip2p_jax.pipeline import EditPipeline
  if model == TINY_MODEL:
    return EditPipeline.tiny_random(seed)
  if model is not None:
    model = model_folder(model)
  if model is None:
    print(f"{command}: no --model given: using the {EMBEDDED_MODEL} (no download; its edits "
          "are noise, it shows the path runs)", file=sys.stderr)
    return EditPipeline.tiny_random(seed)
  return EditPipeline.from_pretrained(model, dtype=dtype_of(dtype))


def model_id(model: str | None, seed: int = 0) -> str:
  """What made a set of edits: an absolute folder with a fingerprint of its UNet weights (a
  re-export into the same folder is another model), a Hub repo id, or the embedded model."""
  if model is None or model == TINY_MODEL:
    return f"{EMBEDDED_MODEL} (seed {seed})"
  model = model_folder(model)
  if not os.path.isdir(model):
    return model
  import glob
  import hashlib
  files = sorted(glob.glob(os.path.join(model, "unet", "*.safetensors")))
  stamp = "|".join(f"{os.path.basename(f)}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}"
                   for f in files)
  return f"{os.path.abspath(model)} (unet {hashlib.sha256(stamp.encode()).hexdigest()[:12]})"
