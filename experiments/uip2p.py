r"""UIP2P: Cycle Edit Consistency fine-tuning of InstructPix2Pix (docs/method.md).

Arguments (comma-separated): data=ip2p|cc3m|cc12m, losses=base|sim|full (the paper's ablation
chain: base = L_recon + L_clip; sim = + L_sim; full = + L_attn).

Commands (after `uip2p data build ...` into data/<data>; see README "Datasets"):

  # one GPU host (8 x H100): pure FSDP over the 8 GPUs
  bash launch/local.sh train --config experiments/uip2p.py:data=cc3m,losses=full \
      --workdir runs/uip2p_cc3m_full
  # a TPU v5e-32 pod slice (8 hosts x 4 chips): the workdir and the data must be on storage
  # every host reads: a bucket (gs://, read and written through etils.epath and gcsfs) or a
  # shared mount. Only the committed checkout is copied to the workers, so a relative data/
  # folder is not there: build the dataset once into the bucket and give its absolute URL.
  bash launch/tpu_pod.sh uip2p-v5e us-west4-a v5litepod-32 -- \
      train --config experiments/uip2p.py:data=cc3m,losses=full \
      --workdir gs://BUCKET/runs/uip2p_cc3m --config.data.dir=gs://BUCKET/data/cc3m
  # the ablation chain
  for l in base sim full; do bash launch/local.sh train \
      --config experiments/uip2p.py:data=ip2p,losses=$l --workdir runs/uip2p_ip2p_$l; done

Hardware: sized for 8 H100 (80 GB) or 32 TPU v5e chips at 256 px, global batch 64; the planned
per-device memory (`uip2p plan`) is in BENCHMARKS.md. Steps: 20k (a guess: the paper's schedule
is not public to us).

Expected (MagicBrush test, single turn; `uip2p eval magicbrush`): the numbers in
`config.expected`, as the paper reports them. Every choice the paper leaves open is a config
value (docs/method.md lists them with their defaults).
"""

import common

# MagicBrush single-turn (L1, L2, CLIP-I, DINO, CLIP-T) as the paper reports them.
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


def get_config(arg=None):
  args = common.parse_arg(arg, data="ip2p", losses="full")
  data = common.choice(args, "data", _FULL)
  losses = common.choice(args, "losses", _LOSSES)
  reference = _FULL[data] if losses == "full" else _ABLATION[losses]
  return common.override(common.base_config(), {
      "model": dict(pretrained="timbrooks/instruct-pix2pix",
                    clip="openai/clip-vit-large-patch14"),
      "data": dict(dir=f"data/{data}", kind="ip2p" if data == "ip2p" else "captions"),
      "loss": _LOSSES[losses],
      "checkpoint": dict(keep=3),
      "expected": dict(magicbrush_single_turn=dict(zip(("l1", "l2", "clip_i", "dino", "clip_t"),
                                                       reference))),
  })
