"""InstructPix2Pix's trade-off curve: CLIP direction similarity vs CLIP image similarity
(ViT-L/14) over guidance scales, for one or several models.

The similarities follow InstructPix2Pix's own metric (`metrics/clip_similarity.py`,
`ClipSimilarity`), not OpenAI CLIP's preprocess: each image in [0, 1] is squashed to the CLIP
input size by torch's `F.interpolate(mode="bicubic", align_corners=False)` (no centre crop, no
antialiasing), then CLIP-normalised. `torch_bicubic_matrix` reproduces that resampling.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from uip2p_jax import storage
from uip2p_jax.eval.metrics import MetricModels, cosine_similarity, direction_similarity
from uip2p_jax.models.clip import CLIP_MEAN, CLIP_STD

FIELDS = ("model", "text_scale", "image_scale", "n", "direction_similarity", "image_similarity")


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of torch's bicubic resize along one axis
  (align_corners=False, no antialias): Keys' kernel with a = -0.75, edge pixels repeated."""
  a = -0.75
  source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(source)
  t = source - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1                # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a           # 1 < |x| < 2
  weights = np.zeros((out_size, in_size), np.float64)
  for offset, coefficient in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
    index = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
    np.add.at(weights, (np.arange(out_size), index), coefficient)
  return weights.astype(np.float32)


def ip2p_clip_pixels(image: Image.Image, size: int) -> np.ndarray:
  """ClipSimilarity.encode_image's input: (size, size, 3) float32, CLIP-normalised."""
  pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
  rows, cols = torch_bicubic_matrix(pixels.shape[0], size), torch_bicubic_matrix(
      pixels.shape[1], size)
  resized = np.einsum("owc,pw->opc", np.tensordot(rows, pixels, axes=1), cols, optimize=True)
  return (resized - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def ip2p_image_features(clip: MetricModels, images: list[Image.Image]) -> np.ndarray:
  """(N, D) CLIP image features of InstructPix2Pix's metric (not normalised)."""
  pixels = np.stack([ip2p_clip_pixels(image, clip.clip_size) for image in images])
  return clip.clip_pixel_features(pixels)


def load_records(data_dir: str, kind: str = "ip2p", split: str | None = None,
                 limit: int | None = None) -> list[dict]:
  """Input image, instruction and both captions of IP2P pairs (or cycle-edit records)."""
  from uip2p_jax.data import builders
  source, _ = builders.open_split(data_dir, kind, split)
  count = len(source) if not limit else min(limit, len(source))
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  records = []
  for i in range(count):
    r = source[i]
    records.append({"id": text(r["id"]), "image": Image.open(io.BytesIO(r["image"])).convert("RGB"),
                    "instruction": text(r["instruction"]),
                    "input_caption": text(r["input_caption"]),
                    "edited_caption": text(r["edited_caption"])})
  return records


def curve_points(label: str, edit, records: list[dict], clip: MetricModels,
                 text_scales: list[float], image_scales: list[float], batch_size: int = 8,
                 progress: bool = True) -> list[dict]:
  """One row per (text scale, image scale): mean direction and image similarity.

  edit(images, instructions, seeds, text_scale, image_scale) -> edited PIL images.
  """
  from tqdm import tqdm
  inputs = ip2p_image_features(clip, [r["image"] for r in records])
  in_text = clip.clip_text_features([r["input_caption"] for r in records])
  out_text = clip.clip_text_features([r["edited_caption"] for r in records])
  rows = []
  grid = [(t, i) for i in image_scales for t in text_scales]
  for text_scale, image_scale in tqdm(grid, desc=f"ip2p-curve {label}", disable=not progress):
    edited = []
    for start in range(0, len(records), batch_size):
      chunk = records[start:start + batch_size]
      edited += edit([r["image"] for r in chunk], [r["instruction"] for r in chunk],
                     list(range(start, start + len(chunk))), text_scale, image_scale)
    features = ip2p_image_features(clip, edited)
    rows.append({"model": label, "text_scale": text_scale, "image_scale": image_scale,
                 "n": len(records),
                 "direction_similarity": float(np.mean(direction_similarity(
                     inputs, features, in_text, out_text))),
                 "image_similarity": float(np.mean(cosine_similarity(inputs, features)))})
  return rows


def plot(rows: list[dict], path: str) -> None:
  """Direction similarity (x) vs image similarity (y); a line per model and image scale, its
  points labelled with the text scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(figsize=(6, 5), dpi=120)
  for model in dict.fromkeys(r["model"] for r in rows):
    for image_scale in sorted({r["image_scale"] for r in rows if r["model"] == model}):
      line = sorted((r for r in rows if r["model"] == model and r["image_scale"] == image_scale),
                    key=lambda r: r["text_scale"])
      xs = [r["direction_similarity"] for r in line]
      ys = [r["image_similarity"] for r in line]
      axes.plot(xs, ys, marker="o", label=f"{model}, image scale {image_scale:g}")
      for r in line:
        axes.annotate(f"{r['text_scale']:g}", (r["direction_similarity"],
                                               r["image_similarity"]), fontsize=7)
  axes.set_xlabel("CLIP text-image direction similarity")
  axes.set_ylabel("CLIP image similarity")
  axes.set_title("InstructPix2Pix trade-off (labels: text scale)")
  save_figure(figure, axes, path)


def save_figure(figure, axes, path: str) -> None:
  """Grid, legend and layout of a one-axes figure; written to `path` (any storage; the format
  from its extension) and closed."""
  import matplotlib.pyplot as plt
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7)
  figure.tight_layout()
  with storage.open_file(path, "wb") as f:  # matplotlib writes local paths only
    figure.savefig(f, format=os.path.splitext(path)[1][1:] or "png")
  plt.close(figure)


__all__ = ["FIELDS", "curve_points", "ip2p_clip_pixels", "ip2p_image_features", "load_records",
           "plot", "save_figure", "torch_bicubic_matrix"]
