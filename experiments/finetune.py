r"""Fine-tuning an edit model on your own pairs on one 24 GB GPU: LoRA or lean full fine-tuning.

Arguments (comma-separated, all optional):
  method=lora|full    lora (default): rank-16 LoRA on the UNet's attention projections, base
                      frozen; full: every UNet weight, with the lean optimizer and EMA below
  objective=ip2p|cec  ip2p (default): supervised noise MSE on the edited images; cec: UIP2P's
                      cycle losses (needs reverse instructions and captions in the pairs)
  optim=adafactor|adamw  method=full's optimizer: adafactor (default, the lean one) or AdamW
                      with bfloat16 first moments (the paper's optimizer; fits 24 GB at batch 2
                      with little to spare)
  data=DIR            the pairs built by `uip2p data build pairs ... --out DIR` (default
                      data/pairs)
  init=ID_OR_DIR      the edit pipeline to start from (default timbrooks/instruct-pix2pix, a
                      Hub id or a diffusers folder, e.g. an earlier run's export)

Commands:

  uip2p data build pairs --manifest my_pairs/pairs.jsonl --out data/pairs
  bash launch/local.sh train \
      --config experiments/finetune.py:data=data/pairs,init=timbrooks/instruct-pix2pix \
      --workdir runs/finetune_lora
  bash launch/local.sh train --config experiments/finetune.py:method=full,data=data/pairs \
      --workdir runs/finetune_full
  # the planned memory (no GPU, no weights: SD 1.5 shapes compiled on the CPU, 1-4 min each)
  uip2p plan --config experiments/finetune.py:method=lora --mesh data=1,fsdp=1 \
      --global-batch 8 --resolution 256
  uip2p plan --config experiments/finetune.py:method=full --mesh data=1,fsdp=1 \
      --global-batch 2 --resolution 256
  uip2p plan --config experiments/finetune.py:method=lora,objective=cec --mesh data=1,fsdp=1 \
      --global-batch 2 --resolution 256

Hardware: one GPU with 24 GB (RTX 3090/4090, A10, L4) at 256 px. Planned per-device memory
(`uip2p plan ... --mesh data=1,fsdp=1`; XLA:CPU's buffer assignment, an estimate for a GPU;
BENCHMARKS.md, "One device: fine-tuning memory"), the issue's targets first:
  method=lora                       batch 8, 256 px:   6.08 GiB (the default batch)
  method=full                       batch 2, 256 px:  11.52 GiB (and at the default 8: 11.52)
  method=lora,objective=cec         batch 2, 256 px:   9.73 GiB (and at the default 4: 11.55)
  method=lora,objective=cec         batch 2, 512 px:  17.42 GiB (--config.data.resolution=512
                                                       --config.batch_size=2)
  method=full,optim=adamw           batch 2, 256 px:  20.61 GiB (the default batch; fits, with
                                                       little to spare)
  method=full,objective=cec         batch 2, 256 px:  12.40 GiB (the default batch)
Full fine-tuning's peak is the optimizer update (float32 weights, gradients and the update of
859 M parameters), not the activations: batch 2 to 8 plan the same; batch 16 12.18 GiB.

Lean settings (docs/method.md section 8 has the arithmetic):
- Everything: bf16 compute over float32 master weights, bf16 frozen models (VAE, text encoder,
  CLIP), remat "full" (each UNet block's activations recomputed in the backward pass).
- lora: only the factors (3.2 M parameters at rank 16 on the attention projections) are
  trained, so their AdamW moments and EMA are a few MB; the frozen base UNet stays float32
  (3.2 GiB) so that the export's merged UNet is the base + the LoRA delta exactly. lr 1e-4, as
  LoRA fine-tunes usually take.
- full: 859.5 M trained parameters. float32 weights + gradients are 6.4 GiB; AdamW would add 6.4
  GiB of moments (4.8 GiB with a bfloat16 first moment) and an EMA 3.2 GiB: Adafactor's
  factored second moments (a few MB) replace AdamW, and the EMA is kept in bfloat16 (1.6 GiB).
  lr 3e-5.
- Steps: 3000; raise `--config.total_steps` for large sets. Samples every 250 steps from
  held-out pairs, checkpoints every 500.
"""

import common

# Global batch by (method, objective): each planned within 24 GB at 256 px (docstring).
_BATCH = {("lora", "ip2p"): 8, ("full", "ip2p"): 8, ("lora", "cec"): 4, ("full", "cec"): 2}


def get_config(arg=None):
  args = common.parse_arg(arg, method="lora", objective="ip2p", data="data/pairs",
                          init="timbrooks/instruct-pix2pix", optim="")
  method = common.choice(args, "method", ("lora", "full"))
  objective = common.choice(args, "objective", ("ip2p", "cec"))
  if method == "lora" and args["optim"]:
    raise ValueError("config argument optim= chooses method=full's optimizer; LoRA trains its "
                     "factors with AdamW")
  optim = common.choice(dict(optim=args["optim"] or "adafactor"), "optim", ("adafactor", "adamw"))
  values = {
      "objective": objective, "total_steps": 3000,
      "batch_size": 2 if optim == "adamw" else _BATCH[method, objective],
      "model": dict(pretrained=args["init"],
                    clip="openai/clip-vit-large-patch14" if objective == "cec" else ""),
      "data": dict(dir=args["data"], kind="ip2p"),
      "checkpoint": dict(every=500, keep=2),
      "sample": dict(every=250),
  }
  if method == "lora":
    values.update(lora=dict(rank=16, alpha=16.0, targets="attn"),
                  optim=dict(lr=1e-4, warmup_steps=100))
  else:
    values.update(ema_dtype="bfloat16", optim=dict(name=optim, mu_dtype="bfloat16", lr=3e-5,
                                                   warmup_steps=100))
  return common.override(common.base_config(), values)
