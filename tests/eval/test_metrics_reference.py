"""Our MagicBrush metrics against an independent reference: MagicBrush's evaluation
(OSU-NLP-Group/MagicBrush `evaluation/image_eval.py`) rebuilt here with PIL, numpy and torch.

MagicBrush scores CLIP-I / CLIP-T with OpenAI CLIP's preprocess (Resize(224, bicubic), CenterCrop
224, RGB, ToTensor, Normalize(CLIP mean/std)) and DINO with torchvision's Resize(256, bicubic),
CenterCrop(224), ToTensor, Normalize(ImageNet); each metric is the cosine of two feature vectors,
CLIP-T between the edited image and the target caption tokenized by OpenAI's `clip.tokenize`.
torchvision is not installed, so its two transforms are written out below exactly as
torchvision does them for PIL images: the shorter side goes to `size` and the longer to
`int(size * long / short)` (truncated), and the crop offsets are `int(round((h - crop) / 2.0))`.
The reference models are tiny random transformers models at the protocol's 224 x 224 input.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from reference import cosine, openai_tokenize, photo, projected, tiny_metric_models
from uip2p_jax.eval.metrics import (IMAGENET_MEAN, IMAGENET_STD, clip_pixels, dino_pixels,
                                    magicbrush_metrics)
from uip2p_jax.models.clip import CLIP_MEAN, CLIP_STD

# (width, height) of the test images; each makes a rounding choice visible:
# 48x40 -> 268.8 long side (int 268, round 269); 227x224 -> no resize, crop offset 1.5 (round
# 2, floor 1); 259x256 -> both for DINO's 256; 37x61 portrait; 300x199 downscaling.
SIZES = [(48, 40), (227, 224), (259, 256), (37, 61), (300, 199), (64, 64)]
CAPTIONS = ["a red dog wearing a hat", "a snowy road at night", ""]


# ---------------------------------------------------------------------------------------------
# torchvision's transforms on PIL images, written out

def tv_resize(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
  """transforms.Resize(size, interpolation=BICUBIC) with an int size, on a PIL image."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return image
  return image.resize((new_w, new_h), PIL.Image.BICUBIC)


def tv_center_crop(image: PIL.Image.Image, crop: int) -> PIL.Image.Image:
  w, h = image.size
  assert w >= crop and h >= crop  # the padding branch is never reached after the resize
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return image.crop((left, top, left + crop, top + crop))


def tv_to_tensor_normalize(image: PIL.Image.Image, mean, std) -> torch.Tensor:
  """ToTensor (uint8 HWC -> float CHW / 255) then Normalize, in float32 torch: (3, H, W)."""
  tensor = torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1).float() / 255
  return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_reference_pixels(image: PIL.Image.Image) -> torch.Tensor:
  """OpenAI CLIP's `_transform(224)` (MagicBrush already converts to RGB when loading)."""
  return tv_to_tensor_normalize(tv_center_crop(tv_resize(image, 224), 224).convert("RGB"),
                                CLIP_MEAN, CLIP_STD)


def dino_reference_pixels(image: PIL.Image.Image) -> torch.Tensor:
  return tv_to_tensor_normalize(tv_center_crop(tv_resize(image, 256), 224),
                                IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(torch CLIP, torch DINO ViT, our MetricModels on the same weights), all at 224 x 224."""
  return tiny_metric_models(tmp_path_factory.mktemp("reference_metric_models"))


def test_preprocessing_matches_clip_and_torchvision_transforms():
  for seed, size in enumerate(SIZES):
    image = photo(seed, size)
    np.testing.assert_allclose(clip_pixels(image), clip_reference_pixels(image).numpy()
                               .transpose(1, 2, 0), atol=1e-5, err_msg=f"CLIP, {size}")
    np.testing.assert_allclose(dino_pixels(image), dino_reference_pixels(image).numpy()
                               .transpose(1, 2, 0), atol=1e-5, err_msg=f"DINO, {size}")


def test_clip_i_clip_t_dino_l1_l2_match_magicbrush(models):
  clip, dino, ours = models
  edited = [photo(10 + i, size) for i, size in enumerate(SIZES[:3])]
  targets = [photo(20 + i, size) for i, size in enumerate(SIZES[3:])]
  scores = magicbrush_metrics(ours, edited, targets, CAPTIONS)

  with torch.no_grad():
    clip_features = lambda images: projected(clip.get_image_features(
        pixel_values=torch.stack([clip_reference_pixels(im) for im in images])))
    dino_features = lambda images: dino(
        pixel_values=torch.stack([dino_reference_pixels(im) for im in images])
    ).last_hidden_state[:, 0]  # DINO's hub model returns the normalised CLS token
    edited_clip = clip_features(edited)
    text = projected(clip.get_text_features(input_ids=openai_tokenize(CAPTIONS[:2])))
    reference = {"clip_i": cosine(edited_clip, clip_features(targets)),
                 "clip_t": cosine(edited_clip[:2], text),
                 "dino": cosine(dino_features(edited), dino_features(targets))}
  # L1/L2: the edit resized (PIL's default, bicubic) to the target's size, ToTensor, L1/MSELoss.
  pairs = [(tv_to_tensor_normalize(e.resize(t.size), (0,) * 3, (1,) * 3),
            tv_to_tensor_normalize(t, (0,) * 3, (1,) * 3)) for e, t in zip(edited, targets)]
  reference["l1"] = [torch.nn.L1Loss()(e, t).item() for e, t in pairs]
  reference["l2"] = [torch.nn.MSELoss()(e, t).item() for e, t in pairs]

  for metric in ("clip_i", "dino", "l1", "l2"):
    np.testing.assert_allclose(scores[metric], reference[metric], atol=1e-4, rtol=0,
                               err_msg=metric)
  np.testing.assert_allclose(scores["clip_t"][:2], reference["clip_t"], atol=1e-4, rtol=0)
  assert np.isnan(scores["clip_t"][2])  # no caption: no CLIP-T
  # The pairs differ, so a metric that ignored its inputs would not pass by chance.
  assert np.ptp(reference["clip_i"]) > 1e-3 and np.ptp(reference["dino"]) > 1e-3
