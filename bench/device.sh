#!/usr/bin/env bash
# Device checks, run as one script on a lent GPU machine (each benchmark under its own timeout,
# 9 minutes of them in all, so that with the installs it fits the device tool's 10-minute call):
#   bash bench/device.sh
# 1. Our jitted edit: SD 1.5-size UNet (random weights), 512 px, 20 steps, bf16, batch 1 and 4.
# 2. The SD 1.5-size CEC train step: 256 px, 8 images, bf16 compute, remat per block, K = 1:
#    step time, images/s, model-FLOP MFU, peak memory (bench/train_step.py).
# 3. Fine-tuning on one GPU (experiments/finetune.py, SD 1.5 shapes, random weights, 256 px):
#    LoRA (batch 8) and full fine-tuning with Adafactor (batch 2): step time and peak memory,
#    each in its own process so that the peak is that step's (bench/lora_step.py).
# 4. diffusers' IP2P pipeline in fp16 on the same card, if torch with CUDA is installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pip install -q -r requirements.txt "jax[cuda12]==0.10.2" >/dev/null 2>&1 || true
python -m pip install -q --no-deps -r requirements-nodeps.txt -e . >/dev/null 2>&1 || true
timeout 130 python bench/gpu_edit.py --preset sd15 --resolution 512 --steps 20 --batches 1 4
timeout 130 python bench/train_step.py --preset sd15 --resolution 256 --batch 8 --steps 10
for method in lora full; do
  timeout 110 python bench/lora_step.py --config "experiments/finetune.py:method=$method" \
      --as-configured --random-weights --rounds 2 --steps 5
done
timeout 60 python - <<'PY' || echo "diffusers comparison skipped: torch with CUDA is not installed here"
import time, torch
assert torch.cuda.is_available()
from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                       StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel
from uip2p_jax.tokenizer import default_tokenizer
pipe = StableDiffusionInstructPix2PixPipeline(
    vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4),
    unet=UNet2DConditionModel(in_channels=8), text_encoder=CLIPTextModel(CLIPTextConfig()),
    tokenizer=default_tokenizer(), scheduler=EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe = pipe.to("cuda", torch.float16)
pipe.set_progress_bar_config(disable=True)
image = torch.zeros(3, 512, 512)
for batch in (1, 4):
  run = lambda: pipe(["make it snowy"] * batch, image=[image] * batch, num_inference_steps=20)
  run(); torch.cuda.synchronize(); t = time.perf_counter()
  for _ in range(3): run()
  torch.cuda.synchronize(); s = (time.perf_counter() - t) / 3
  print(f"diffusers fp16 batch {batch}: {s:.3f} s per call, {batch / s:.2f} images/s")
PY
