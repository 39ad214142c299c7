"""The IP2P trade-off curve's similarity values against InstructPix2Pix's own metric
(timbrooks/instruct-pix2pix `metrics/clip_similarity.py`, `ClipSimilarity`), rebuilt in torch:
images in [0, 1] squashed to 224 x 224 by `F.interpolate(mode="bicubic", align_corners=False)`
(no crop, no antialiasing), CLIP-normalised; texts by `clip.tokenize(truncate=True)`; features
L2-normalised; direction = cos(I_edit - I_in, T_out - T_in), image = cos(I_in, I_edit)."""

import csv

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from reference import cosine, openai_tokenize, photo, projected, tiny_metric_models
from uip2p_jax.eval import curve, magicbrush
from uip2p_jax.models.clip import CLIP_MEAN, CLIP_STD

TEXT_SCALES, IMAGE_SCALES = [3.0, 7.5], [1.5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_metric_models(tmp_path_factory.mktemp("curve_models"))


def records():
  """Non-square inputs, one larger than 224 (downsampled) and two smaller (upsampled)."""
  sizes = [(320, 256), (96, 64), (60, 90)]
  return [{"id": f"r{i}", "image": photo(30 + i, size), "instruction": f"make it {i}",
           "input_caption": f"a photo of {i} cats", "edited_caption": f"a painting of {i} dogs"}
          for i, size in enumerate(sizes)]


def fake_edit(images, instructions, seeds, text_scale, image_scale):
  """A deterministic stand-in for the model: a tint that grows with the text scale, noise per
  seed, and a size rounded to multiples of 8 (as the pipeline rounds to 64)."""
  out = []
  for image, seed in zip(images, seeds):
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, np.float32) * (1 - 0.06 * text_scale / image_scale)
    pixels[..., 0] += 12 * text_scale + rng.normal(0, 8, pixels.shape[:2])
    size = (image.width // 8 * 8, image.height // 8 * 8)
    out.append(PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize(size))
  return out


def ip2p_image_features(clip, images) -> torch.Tensor:
  """ClipSimilarity.encode_image (unnormalised; `cosine` normalises)."""
  mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
  features = []
  for image in images:
    tensor = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    tensor = F.interpolate(tensor, size=224, mode="bicubic", align_corners=False)
    features.append(projected(clip.get_image_features(pixel_values=(tensor - mean) / std)))
  return torch.cat(features)


def normalised(x: torch.Tensor) -> torch.Tensor:
  return x / x.norm(dim=1, keepdim=True)


def test_curve_points_match_instruct_pix2pix_clip_similarity(models, tmp_path):
  clip, _, ours = models
  rows = curve.curve_points("fake", fake_edit, records(), ours, TEXT_SCALES, IMAGE_SCALES,
                            batch_size=2, progress=False)
  assert [(r["text_scale"], r["image_scale"], r["n"]) for r in rows] == [(3.0, 1.5, 3),
                                                                        (7.5, 1.5, 3)]
  with torch.no_grad():
    inputs = normalised(ip2p_image_features(clip, [r["image"] for r in records()]))
    in_text = normalised(projected(clip.get_text_features(
        input_ids=openai_tokenize([r["input_caption"] for r in records()]))))
    out_text = normalised(projected(clip.get_text_features(
        input_ids=openai_tokenize([r["edited_caption"] for r in records()]))))
    for row, text_scale in zip(rows, TEXT_SCALES):
      images = [r["image"] for r in records()]
      edited = normalised(ip2p_image_features(
          clip, fake_edit(images, None, [0, 1, 2], text_scale, IMAGE_SCALES[0])))
      direction = cosine(edited - inputs, out_text - in_text).mean()
      similarity = cosine(inputs, edited).mean()
      np.testing.assert_allclose(row["direction_similarity"], direction, atol=1e-4, rtol=0)
      np.testing.assert_allclose(row["image_similarity"], similarity, atol=1e-4, rtol=0)
  # The two scales give different points, so swapped or repeated rows would be caught.
  assert abs(rows[0]["image_similarity"] - rows[1]["image_similarity"]) > 1e-3

  path = str(tmp_path / "curve.csv")
  magicbrush.write_csv(rows, path, curve.FIELDS)
  with open(path, newline="") as f:
    written = list(csv.DictReader(f))
  assert list(written[0]) == list(curve.FIELDS)
  for row, back in zip(rows, written):
    assert float(back["direction_similarity"]) == row["direction_similarity"]
    assert float(back["image_similarity"]) == row["image_similarity"]
