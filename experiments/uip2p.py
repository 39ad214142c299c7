r"""UIP2P: Cycle Edit Consistency fine-tuning of InstructPix2Pix (METHOD.md section 2).

Arguments (comma-separated): data=ip2p|cc3m|cc12m, losses=base|sim|full (the paper's ablation
chain: base = L_recon + L_clip; sim = + L_sim; full = + L_attn).

Commands (after `uip2p data build ...` into data/<data>; see README "Datasets"):

  # one GPU host (8 x H100): pure FSDP over the 8 GPUs
  bash launch/local.sh train --config experiments/uip2p.py:data=cc3m,losses=full \
      --workdir runs/uip2p_cc3m_full
  # a TPU v5e-32 pod slice (8 hosts x 4 chips)
  bash launch/tpu_pod.sh uip2p-v5e us-west4-a v5litepod-32 -- \
      train --config experiments/uip2p.py:data=cc3m,losses=full --workdir /gcs/BUCKET/uip2p_cc3m
  # the ablation chain
  for l in base sim full; do bash launch/local.sh train \
      --config experiments/uip2p.py:data=ip2p,losses=$l --workdir runs/uip2p_ip2p_$l; done

Hardware: sized for 8 H100 (80 GB) or 32 TPU v5e chips at 256 px, global batch 64. `uip2p plan`
(BENCHMARKS.md): 14.7 GiB per device with 8 images per device on an 8-way FSDP mesh; at 512 px
10 images per device fit 80 GB. Steps: 20k (a guess: the paper's schedule
is not public to us).

Expected (MagicBrush test, single turn; `uip2p eval magicbrush`): the numbers in
`config.expected`, from the paper via METHOD.md. Every choice METHOD.md marks *default* is a
config value below and may be a guess; see the README's list.
"""

import ml_collections

# MagicBrush single-turn (L1, L2, CLIP-I, DINO, CLIP-T) reported by the paper (METHOD.md).
_FULL = {"ip2p": (0.0722, 0.0193, 0.9243, 0.8876, 0.2944),
         "cc3m": (0.0680, 0.0183, 0.9262, 0.8924, 0.2966),
         "cc12m": (0.0619, 0.0174, 0.9318, 0.9039, 0.2964)}
# The ablation chain (the paper does not say which training data it used).
_ABLATION = {"base": (0.117, 0.032, 0.878, 0.806, 0.309),
             "sim": (0.089, 0.024, 0.906, 0.872, 0.301),
             "full": (0.062, 0.017, 0.932, 0.904, 0.296)}
_LOSSES = {"base": dict(clip=1.0, sim=0.0, attn=0.0, recon=1.0),
           "sim": dict(clip=1.0, sim=1.0, attn=0.0, recon=1.0),
           "full": dict(clip=1.0, sim=1.0, attn=1.0, recon=1.0)}


def _parse(arg: str | None, **defaults) -> dict:
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in values:
      raise ValueError(f"unknown config argument {key!r}; expected {sorted(values)}")
    values[key] = value
  return values


def get_config(arg=None):
  args = _parse(arg, data="ip2p", losses="full")
  if args["data"] not in _FULL:
    raise ValueError(f"data={args['data']!r}; expected one of {sorted(_FULL)}")
  if args["losses"] not in _LOSSES:
    raise ValueError(f"losses={args['losses']!r}; expected one of {sorted(_LOSSES)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "cec"
  c.total_steps = 20_000
  c.batch_size = 64                    # global
  c.ema_decay = 0.9999
  c.log_every = 50
  c.export = True
  c.final_edit = False

  c.model = dict(preset="sd15", pretrained="timbrooks/instruct-pix2pix", init_from_sd="",
                 clip="openai/clip-vit-large-patch14", seed=0, attention_backend="auto",
                 compute_dtype="bfloat16", frozen_dtype="bfloat16", remat="full")
  c.data = dict(dir=f"data/{args['data']}", kind="ip2p" if args["data"] == "ip2p" else "captions",
                resolution=256, num_workers=8, min_scale=1.0, max_scale=1.125, flip=True,
                strict=False)
  c.cycle = dict(start="noised_input", num_steps_min=1, num_steps_max=1, timestep_min=0,
                 timestep_max=1000, share_noise=True, reencode=False, attention_resolution=16,
                 conditioning_dropout=0.0)
  c.loss = dict(**_LOSSES[args["losses"]], sim_kind="reconstruction", recon_kind="l1")
  c.ip2p = dict(conditioning_dropout=0.05)
  c.optim = dict(lr=5e-5, warmup_steps=500, schedule="constant", decay_steps=0,
                 end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                 grad_clip=1.0, accumulate=1)
  c.mesh = dict(data=1, fsdp=-1)       # pure FSDP over every device
  c.checkpoint = dict(every=1000, keep=3, use_async=True)
  c.sample = dict(every=1000, count=4, steps=20, text_scale=7.5, image_scale=1.5)
  reference = _FULL[args["data"]] if args["losses"] == "full" else _ABLATION[args["losses"]]
  c.expected = dict(magicbrush_single_turn=dict(zip(("l1", "l2", "clip_i", "dino", "clip_t"),
                                                    reference)))
  return c
