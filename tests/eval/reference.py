"""Shared pieces of the independent metric references (tests/eval/test_metrics_reference.py,
tests/eval/test_curve.py): OpenAI's CLIP tokenizer, tiny random torch models at 224 x 224 with
our models loaded from the same weights, and test photos."""

import functools
import importlib.util
import os

import numpy as np
import PIL.Image
import torch

from conftest import seeded


@functools.lru_cache(maxsize=1)
def _openai_tokenizer():
  # Loaded by file: the clip package's __init__ needs torchvision and pkg_resources.
  folder = importlib.util.find_spec("clip").submodule_search_locations[0]
  spec = importlib.util.spec_from_file_location(
      "openai_simple_tokenizer", os.path.join(folder, "simple_tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def openai_tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
  """`clip.tokenize(texts, truncate=True)`: OpenAI's own BPE, [SOT] + tokens + [EOT],
  zero-padded; a long text keeps its first 76 tokens and ends in EOT."""
  tokenizer = _openai_tokenizer()
  sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
  ids = torch.zeros(len(texts), context_length, dtype=torch.long)
  for i, text in enumerate(texts):
    tokens = [sot] + tokenizer.encode(text) + [eot]
    if len(tokens) > context_length:
      tokens = tokens[:context_length - 1] + [eot]
    ids[i, :len(tokens)] = torch.tensor(tokens)
  return ids


def projected(output) -> torch.Tensor:
  """CLIPModel.get_*_features: a tensor in transformers 4, `pooler_output` of an output in 5."""
  return output if torch.is_tensor(output) else output.pooler_output


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
  """`1 - scipy.spatial.distance.cosine` / `F.cosine_similarity`, per row, in float64."""
  a, b = a.double().numpy(), b.double().numpy()
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def photo(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
  """Smooth random colours plus noise, (width, height): resampling differences show up in
  every pixel."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
  waves = np.stack([np.sin(x * rng.uniform(3, 9) + y * rng.uniform(3, 9) + rng.uniform(0, 6))
                    for _ in range(3)], -1)
  pixels = 127.5 + 90 * waves + rng.normal(0, 20, waves.shape)
  return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def tiny_torch_metric_models(image_size: int, patch_size: int, layer_norm_eps: float = 1e-12):
  """(torch CLIPModel, torch DINO ViTModel), tiny and random (seed the caller's torch first);
  CLIP has the real 49,408-token vocabulary so real captions tokenize."""
  from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
  clip = CLIPModel(CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=77),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, image_size=image_size, patch_size=patch_size),
      projection_dim=16)).eval()
  dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, image_size=image_size, patch_size=patch_size,
                            layer_norm_eps=layer_norm_eps), add_pooling_layer=False).eval()
  return clip, dino


def tiny_metric_models(folder):
  """(torch CLIPModel, torch DINO ViTModel, our MetricModels loaded from their saved weights).

  Both take the protocols' 224 x 224 input (patch 32 keeps them fast); CLIP has the real
  49,408-token vocabulary so real captions tokenize.
  """
  from uip2p_jax import weights
  from uip2p_jax.eval.metrics import MetricModels
  from uip2p_jax.tokenizer import default_tokenizer
  seeded(11)
  clip, dino = tiny_torch_metric_models(224, 32, layer_norm_eps=1e-6)
  clip.save_pretrained(os.path.join(folder, "clip"))
  dino.save_pretrained(os.path.join(folder, "dino"))
  ours = MetricModels(weights.load_clip(os.path.join(folder, "clip")),
                      weights.load_vit(os.path.join(folder, "dino")), default_tokenizer())
  return clip, dino, ours
