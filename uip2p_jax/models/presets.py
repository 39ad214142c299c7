"""Architecture presets: the real Stable Diffusion 1.5 / CLIP shapes and tiny stand-ins.

`sd15` matches `timbrooks/instruct-pix2pix` (8-channel UNet), SD 1.5's VAE and text encoder,
and CLIP ViT-L/14 / ViT-B/32; use it for FLOP and memory planning on abstract shapes.
`tiny` keeps every structural feature (4 VAE levels = downsampling 8, cross-attention, the real
49,408-token vocabulary so real token ids work) at a size that runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses

from uip2p_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from uip2p_jax.models.unet import UNetConfig
from uip2p_jax.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class ModelPreset:
  unet: UNetConfig
  vae: VAEConfig
  text_encoder: CLIPTextConfig
  clip: CLIPConfig  # the CLIP whose embeddings the CEC losses use


_VIT_L14_TEXT = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, projection_dim=768)
VIT_L14 = CLIPConfig(
    text=_VIT_L14_TEXT,
    vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=224, patch_size=14),
    projection_dim=768)
VIT_B32 = CLIPConfig(
    text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, projection_dim=512),
    vision=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=32),
    projection_dim=512)

SD15 = ModelPreset(unet=UNetConfig(in_channels=8), vae=VAEConfig(), text_encoder=_VIT_L14_TEXT,
                   clip=VIT_L14)

_TINY_TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32)
TINY = ModelPreset(
    unet=UNetConfig(in_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                    cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                  sample_size=64),
    text_encoder=_TINY_TEXT,
    clip=CLIPConfig(text=_TINY_TEXT,
                    vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            image_size=32, patch_size=8),
                    projection_dim=32))

# ShapesWorld's own models (64 px scenes): a VAE of factor 4 (16x16x4 latents), a small CLIP on
# 64 px images whose text tower is also the UNet's text encoder (SD shares it the same way), and
# a UNet sized to train from scratch on a CPU (its image channels: 8 for editing, 4 for the
# text-to-image prior, set per run).
_SHAPES_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=4, projection_dim=64)
SHAPES = ModelPreset(
    unet=UNetConfig(in_channels=8, block_out_channels=(32, 64, 128), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8,
                    sample_size=16),
    vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                  sample_size=64),
    text_encoder=_SHAPES_TEXT,
    clip=CLIPConfig(text=_SHAPES_TEXT,
                    vision=CLIPVisionConfig(hidden_size=128, intermediate_size=512,
                                            num_hidden_layers=4, num_attention_heads=4,
                                            image_size=64, patch_size=8),
                    projection_dim=64))

PRESETS = {"sd15": SD15, "tiny": TINY, "shapes": SHAPES}


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """One kind of attention call in a preset's models, as `attention.select_backend` sees it."""
  layer: str  # "unet.<level>.attn1|attn2" (level 0 = full latent size, "mid"), "vae.mid", ...
  q_len: int
  kv_len: int
  heads: int
  head_dim: int
  causal: bool = False


def attention_shapes(p: ModelPreset, resolution: int) -> tuple[AttentionShape, ...]:
  """Every distinct attention shape of a preset's UNet, VAE, text encoder and loss CLIP for
  square `resolution`-pixel images (a UNet level's down and up blocks share their shapes)."""
  unet, vae = p.unet, p.vae
  latent = resolution // 2 ** (len(vae.block_out_channels) - 1)
  text_len = p.text_encoder.max_position_embeddings
  cross_levels = [i for i, t in enumerate(unet.down_block_types) if t == "CrossAttnDownBlock2D"]
  cross_levels += [len(unet.up_block_types) - 1 - i for i, t in enumerate(unet.up_block_types)
                   if t == "CrossAttnUpBlock2D"]
  levels = [(str(i), i) for i in sorted(set(cross_levels))]
  levels.append(("mid", len(unet.block_out_channels) - 1))
  shapes = []
  for name, level in levels:
    tokens = (latent // 2 ** level) ** 2
    heads = unet.heads[level]
    head_dim = unet.block_out_channels[level] // heads
    shapes += [AttentionShape(f"unet.{name}.attn1", tokens, tokens, heads, head_dim),
               AttentionShape(f"unet.{name}.attn2", tokens, text_len, heads, head_dim)]
  shapes.append(AttentionShape("vae.mid", latent ** 2, latent ** 2, 1, vae.block_out_channels[-1]))
  for name, text in (("text_encoder", p.text_encoder), ("clip.text", p.clip.text)):
    shapes.append(AttentionShape(name, text_len, text_len, text.num_attention_heads,
                                 text.hidden_size // text.num_attention_heads, causal=True))
  vision = p.clip.vision
  patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + the class token
  shapes.append(AttentionShape("clip.vision", patches, patches, vision.num_attention_heads,
                               vision.hidden_size // vision.num_attention_heads))
  return tuple(dict.fromkeys(shapes))


def preset(name: str) -> ModelPreset:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name]
