"""A full instruction edit, ours (one jitted call) vs diffusers' IP2P pipeline, on this CPU.

`python bench/edit_cpu.py [--steps 20 --resolution 256 --repeats 3]`. Same random weights in
both (a small SD-shaped model saved by diffusers and loaded by uip2p_jax), Euler sampler
(deterministic), 3-branch guidance, float32, batch 1. Compile time is reported separately.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from uip2p_jax.image_io import prepare_image
from uip2p_jax.pipeline import EditPipeline

UNET = dict(in_channels=8, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
            cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)
VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_reference(folder):
  from diffusers import (AutoencoderKL, EulerDiscreteScheduler,
                         StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel

  from uip2p_jax.tokenizer import default_tokenizer
  torch.manual_seed(0)
  pipe = StableDiffusionInstructPix2PixPipeline(
      vae=AutoencoderKL(**VAE), unet=UNet2DConditionModel(**UNET),
      text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024,
                                                num_hidden_layers=4, num_attention_heads=4)),
      tokenizer=default_tokenizer(),
      scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  return pipe


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  folder = tempfile.mkdtemp()
  reference = build_reference(folder)
  ours = EditPipeline.from_pretrained(folder)

  size = args.resolution
  yy, xx = np.meshgrid(np.linspace(0, 255, size), np.linspace(0, 255, size), indexing="ij")
  pil = Image.fromarray(np.stack([yy, xx, 255 - yy], -1).astype(np.uint8))
  image = prepare_image(pil, size)[None]
  latent = size // 8
  noise = np.random.default_rng(0).standard_normal((1, latent, latent, 4)).astype(np.float32)
  noise_torch = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

  run_ours = lambda: ours.edit(image, ["make it snowy"], steps=args.steps, sampler="euler",
                               initial_noise=noise)
  run_torch = lambda: reference("make it snowy", image=pil, num_inference_steps=args.steps,
                                output_type="np", latents=noise_torch).images
  start = time.perf_counter()
  ours_out = run_ours()
  first_call = time.perf_counter() - start
  with torch.inference_mode():
    torch_out = run_torch()
    times = {"ours": [], "torch": []}
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
      for name, fn in (("ours", run_ours), ("torch", run_torch)):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  ours_s, torch_s = (statistics.median(times[k]) for k in ("ours", "torch"))
  diff = np.abs((ours_out[0] + 1) / 2 - torch_out[0]).max()
  print(f"edit: UNet {UNET['block_out_channels']}, {size} px, {args.steps} Euler steps, "
        f"3-branch guidance, batch 1, float32, {os.cpu_count()} CPU cores")
  print(f"  max abs difference of the [0,1] images: {diff:.2e}")
  print(f"  uip2p_jax: {ours_s:7.2f} s median of {args.repeats} (first call {first_call:.1f} s "
        f"= compile {first_call - ours_s:.1f} s + run)")
  print(f"  diffusers: {torch_s:7.2f} s median of {args.repeats}")
  print(f"  ratio ours/diffusers: {ours_s / torch_s:.2f}")


if __name__ == "__main__":
  main()
