"""The one place that builds a set of models: from an architecture preset (random weights, or
abstract shapes for planning) or from a pretrained diffusers / transformers folder or Hub id.

Training, planning, the edit pipeline (its embedded tiny model too), the demo and the benchmarks
all call `build_models`; nothing else constructs a UNet + VAE + text encoder (+ loss CLIP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models import AutoencoderKL, CLIPModel, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.models.partitioning import set_remat
from uip2p_jax.schedules import PREDICTION_TYPES, PRESET_SCHEDULE, NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name_or_dtype) -> Any:
  """'float32' | 'bfloat16' (a config value) or a jnp dtype -> the jnp dtype."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name_or_dtype]
  return name_or_dtype


@dataclasses.dataclass
class ModelSet:
  """The modules of a run or an edit: the UNet (trained or edited with), the frozen VAE and
  text encoder, the CLIP of the CEC losses (None when not asked for), tokenizer, schedule."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  clip: CLIPModel | None
  tokenizer: Any
  schedule: NoiseSchedule
  probe: Any = None  # models.probe.AttributeProbe when asked for (ShapesWorld's evaluator)


def _subfolder(path: str, name: str) -> str | None:
  """A component given as its own folder (config.json inside) or as a pipeline's `name`/."""
  import os
  return None if os.path.isfile(os.path.join(path, "config.json")) else name


def build_models(*, preset: str = "tiny", pretrained: str = "", init_from_sd: str = "",
                 clip: str = "", with_clip: bool = False, seed: int = 0,
                 compute_dtype="float32", unet_param_dtype="float32", frozen_dtype="float32",
                 frozen_param_dtype=None, attention_backend: str = "auto", remat: str = "none",
                 abstract: bool = False, vae: str = "", text_encoder: str = "",
                 unet_in_channels: int | None = None, with_probe: bool = False,
                 lora=None, lora_init: str = "", prediction_type: str = "auto") -> ModelSet:
  """Builds every model of a run.

  - `pretrained`: a diffusers InstructPix2Pix folder or Hub id (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/). `init_from_sd`: an SD 1.x folder or id whose 4-channel UNet becomes
    an 8-channel edit UNet (InstructPix2Pix's initialisation: image channels zero).
  - Otherwise the architecture `preset` ("tiny", "sd15") with random weights drawn on the host
    (seeds seed, seed+1, seed+2, seed+3 for UNet, VAE, text encoder, CLIP), or with
    `abstract=True` shapes only (no weights: for planning; the preset replaces any checkpoint).
  - `with_clip`: also build the loss CLIP: the checkpoint `clip` (required for pretrained runs),
    else the preset's CLIP.
  - `vae`, `text_encoder`: folders whose VAE / text encoder (a diffusers `vae/`, a transformers
    CLIPTextModel or the text tower of a CLIPModel) replace the preset's random ones: how a world
    trained from nothing assembles its Stable Diffusion (ShapesWorld: its VAE, its CLIP's text
    tower). `unet_in_channels`: the preset UNet's input channels (4: a text-to-image UNet).
  - `with_probe`: also build the preset's ShapesWorld attribute probe (random weights).
  - `lora`: a `models.lora.LoRAConfig`: LoRA layers on the UNet's targeted layers (A drawn
    from seed + 5, B zero: the UNet computes what its base does); `lora_init`: a LoRA file
    whose factors replace those (it must name exactly the targeted layers, at `lora.rank`).
  - `prediction_type`: what the UNet is to output, set on the returned schedule (which training,
    its samples and its export all read): "auto" keeps the checkpoint's scheduler config (a
    preset: epsilon); "epsilon" | "v_prediction" override it (fine-tuning an epsilon model
    into a v model is how a v model is made).
  Dtypes: the UNet computes in `compute_dtype` and stores `unet_param_dtype` (float32 master
  weights for training); the frozen models compute in `frozen_dtype` and store
  `frozen_param_dtype` (default: `frozen_dtype`).
  """
  from uip2p_jax import weights
  from uip2p_jax.models.presets import preset as preset_shapes
  from uip2p_jax.models.random_init import random_init
  from uip2p_jax.tokenizer import default_tokenizer, load_tokenizer

  compute, unet_param = dtype_of(compute_dtype), dtype_of(unet_param_dtype)
  frozen = dtype_of(frozen_dtype)
  frozen_param = dtype_of(frozen_param_dtype) if frozen_param_dtype is not None else frozen
  if prediction_type != "auto" and prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type {prediction_type!r}; expected 'auto' or one of "
                     f"{PREDICTION_TYPES}")
  if pretrained and init_from_sd and not abstract:
    raise ValueError(f"give one of pretrained ({pretrained!r}) and init_from_sd "
                     f"({init_from_sd!r}), not both")
  source = pretrained or init_from_sd
  frozen_kwargs = dict(dtype=frozen, param_dtype=frozen_param)
  if abstract or not source:
    shapes = preset_shapes(preset)
    rngs = lambda: nnx.Rngs(0)
    make = (lambda factory, _: nnx.eval_shape(factory)) if abstract else random_init
    unet_config = shapes.unet if unet_in_channels is None else dataclasses.replace(
        shapes.unet, in_channels=unet_in_channels)
    unet = make(lambda: UNet2DConditionModel(unet_config, rngs=rngs(), dtype=compute,
                                             param_dtype=unet_param, backend=attention_backend),
                seed)
    vae_module = (weights.load_vae(vae, _subfolder(vae, "vae"), **frozen_kwargs)
                  if vae and not abstract else
                  make(lambda: AutoencoderKL(shapes.vae, rngs=rngs(), **frozen_kwargs), seed + 1))
    text_module = (weights.load_text_encoder(text_encoder,
                                             _subfolder(text_encoder, "text_encoder"),
                                             **frozen_kwargs)
                   if text_encoder and not abstract else
                   make(lambda: CLIPTextTransformer(shapes.text_encoder, rngs=rngs(),
                                                    **frozen_kwargs), seed + 2))
    loss_clip = None
    if with_clip:
      loss_clip = (weights.load_clip(clip, **frozen_kwargs) if clip and not abstract else
                   make(lambda: CLIPModel(shapes.clip, rngs=rngs(), **frozen_kwargs), seed + 3))
    tokenizer, schedule = default_tokenizer(), PRESET_SCHEDULE
    vae, text_encoder = vae_module, text_module
  else:
    if vae or text_encoder or unet_in_channels is not None:
      raise ValueError("model.vae / model.text_encoder (and the t2i objective's 4-channel UNet) "
                       f"assemble a preset's models; a pretrained pipeline ({source!r}) brings "
                       "its own")
    unet = weights.load_unet(source, dtype=compute, param_dtype=unet_param,
                             backend=attention_backend)
    if init_from_sd:
      unet = weights.init_ip2p_from_sd(unet)
    vae = weights.load_vae(source, **frozen_kwargs)
    text_encoder = weights.load_text_encoder(source, **frozen_kwargs)
    tokenizer = load_tokenizer(source)
    schedule = NoiseSchedule.from_folder(weights.resolve_folder(source, "scheduler"))
    loss_clip = None
    if with_clip:
      if not clip:
        raise ValueError("model.clip must name the CLIP checkpoint the CEC losses use (e.g. "
                         "openai/clip-vit-large-patch14)")
      loss_clip = weights.load_clip(clip, **frozen_kwargs)
  if lora is not None:
    from uip2p_jax.models.lora import add_lora
    unet = add_lora(unet, lora, seed + 5)
    if lora_init and not abstract:
      unet = weights.load_lora(unet, lora_init)
  elif lora_init:
    raise ValueError(f"lora_init={lora_init!r} needs a LoRA config (lora rank > 0)")
  probe = None
  if with_probe:
    from uip2p_jax.data.shapes import LABEL_CLASSES
    from uip2p_jax.models.probe import AttributeProbe, ProbeConfig
    probe_config = ProbeConfig(classes=LABEL_CLASSES)
    make_probe = (lambda factory, _: nnx.eval_shape(factory)) if abstract else random_init
    probe = make_probe(lambda: AttributeProbe(probe_config, rngs=nnx.Rngs(0)), seed + 4)
  if remat != "none":
    for module in (unet, vae, loss_clip):
      if module is not None:
        set_remat(module, remat)
  if prediction_type != "auto":
    schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
  return ModelSet(unet, vae, text_encoder, loss_clip, tokenizer, schedule, probe)
