"""Image I/O at the edge: files and PIL images <-> NHWC float32 in [-1, 1].

    image = prepare_image(load_image("in.jpg"), 512)   # (H, W, 3) float32, sides multiples of 64
    save_image_atomic(to_pil(edited[0]), "out.png")    # never leaves a half-written file

Everything inside JAX sees (H, W, 3) / (B, H, W, 3) arrays in [-1, 1]; PIL lives only here.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from uip2p_jax import storage

# Inputs whose shorter side is below this are upscaled a lot: the edit works, but on a blur.
MIN_INPUT_SIDE = 64
# Output extensions an edit can be written to, and the PIL format each one means.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
                  ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def working_size(width: int, height: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
  """(width, height) with aspect kept, the longest side at most `resolution`, both sides
  multiples of `multiple` (at least one multiple)."""
  if resolution < multiple:
    raise ValueError(f"resolution {resolution} is smaller than the size multiple {multiple}")
  scale = (resolution // multiple * multiple) / max(width, height)
  fit = lambda side: max(multiple, int(side * scale / multiple + 0.5) * multiple)
  return fit(width), fit(height)


def load_image(path: str | os.PathLike) -> Image.Image:
  """Open an image file as RGB, honouring EXIF orientation; alpha is composited on white.

  The file name is kept in `image.info["path"]` (for messages about this image later)."""
  try:
    with Image.open(path) as opened:
      image = ImageOps.exif_transpose(opened)
      image.load()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such image file") from None
  except IsADirectoryError:
    raise ValueError(f"{path}: is a folder, not an image file") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: unreadable image ({e})") from e
  image = to_rgb(image)
  image.info["path"] = os.fspath(path)
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB, with any alpha composited on white (what a transparent area looks like in a viewer)."""
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image if image.mode == "RGB" else image.convert("RGB")


def prepare_image(image: Image.Image, resolution: int, multiple: int = 64) -> np.ndarray:
  """PIL RGB -> (H, W, 3) float32 in [-1, 1] at the working size (see `working_size`).

  Warns on stderr (one line) when an image whose shorter side is below MIN_INPUT_SIDE is
  upscaled."""
  size = working_size(*image.size, resolution, multiple)
  if min(image.size) < MIN_INPUT_SIDE and size[0] > image.size[0]:
    name = image.info.get("path", "input image")
    print(f"warning: {name}: {image.size[0]}x{image.size[1]} px is below the "
          f"{MIN_INPUT_SIDE} px minimum side; upscaled to {size[0]}x{size[1]} (expect a blurred "
          "edit)", file=sys.stderr)
  if image.size != size:
    image = image.resize(size, Image.Resampling.LANCZOS)
  return np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0


def to_pil(image: np.ndarray) -> Image.Image:
  """(H, W, 3) in [-1, 1] -> PIL RGB."""
  return Image.fromarray(np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8))


def output_format(path: str | os.PathLike) -> str:
  """The PIL format an output path's extension asks for (ValueError for an unknown one)."""
  extension = os.path.splitext(os.fspath(path))[1].lower()
  if extension not in OUTPUT_FORMATS:
    raise ValueError(f"{path}: unknown image extension {extension or '(none)'!r}; expected one "
                     f"of {', '.join(OUTPUT_FORMATS)}")
  return OUTPUT_FORMATS[extension]


def check_output_path(path: str | os.PathLike) -> None:
  """Raises ValueError naming the problem unless an image can be written at `path`: a known
  extension, not a folder, a parent folder that exists (it is created) and takes new files."""
  path = os.fspath(path)
  output_format(path)
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a folder; expected an image file path")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    # The one sure test of "writable" (permissions, read-only mounts, /proc): make a file there.
    descriptor, probe = tempfile.mkstemp(dir=parent, prefix=".uip2p-probe-")
    os.close(descriptor)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{path}: cannot write a file in {parent} ({e.strerror or e})") from None


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> None:
  """Writes `image` to a temporary file in the same folder, then renames it over `path`:
  a killed run never leaves a half-written image. A URL (gs://) is one upload, whole or not at
  all."""
  path = os.fspath(path)
  image_format = output_format(path)
  if storage.is_remote(path):
    encoded = io.BytesIO()
    image.save(encoded, format=image_format)
    storage.write_bytes(path, encoded.getvalue())
    return
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.",
                                           suffix=".tmp")
  try:
    with os.fdopen(descriptor, "wb") as f:
      image.save(f, format=image_format)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def sample_grid(rows: list[tuple[np.ndarray, ...]], captions: list[str]) -> Image.Image:
  """PIL grid: one row per example (e.g. input | forward edit | reconstruction), captioned.

  rows: per example, a tuple of (H, W, 3) images in [-1, 1] (square, one size); captions: one
  per row (its first two lines are drawn above it)."""
  size = rows[0][0].shape[0]
  band = 28
  grid = Image.new("RGB", (len(rows[0]) * size, len(rows) * (size + band)), "white")
  draw = ImageDraw.Draw(grid)
  for r, (row, caption) in enumerate(zip(rows, captions)):
    top = r * (size + band)
    for line, text in enumerate(caption.split("\n")[:2]):
      draw.text((2, top + 1 + 13 * line), text[:120], fill="black")
    for c, image in enumerate(row):
      grid.paste(to_pil(image), (c * size, top + band))
  return grid


__all__ = ["MIN_INPUT_SIDE", "OUTPUT_FORMATS", "check_output_path", "load_image",
           "output_format", "prepare_image", "sample_grid", "save_image_atomic", "to_pil",
           "to_rgb", "working_size"]
