"""The shared experiment schema and argument parser; each experiment file overrides it.

An experiment file's `get_config(arg)` starts from `base_config()` and changes what differs
with `override(config, {...})`: a key the schema lacks is an error, as on the command line
(`--config.key=value`). `parse_arg("data=cc3m,losses=full", data="ip2p", losses="full")` reads
the `FILE.py:ARGS` part (big_vision's habit). The method and its defaults: docs/method.md.
"""

import ml_collections


def parse_arg(arg, **defaults) -> dict:
  """"a=1,b=x" -> {"a": "1", "b": "x"} over `defaults`; unknown names are an error."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in values:
      raise ValueError(f"config argument {item!r}: expected NAME=VALUE with NAME one of "
                       f"{sorted(values)}")
    values[key] = value
  return values


def choice(args: dict, name: str, options) -> str:
  """args[name], which must be one of `options`."""
  if args[name] not in options:
    raise ValueError(f"config argument {name}={args[name]!r}; expected one of {sorted(options)}")
  return args[name]


def override(config: ml_collections.ConfigDict, values: dict, where: str = "config"):
  """Sets nested `values` on `config`; a key `config` does not have is an error."""
  for key, value in values.items():
    if key not in config:
      raise KeyError(f"{where}.{key} is not a config key; {where} has {sorted(config.keys())}")
    if isinstance(value, dict) and len(config[key]):  # an empty section (expected) is free-form
      override(config[key], value, f"{where}.{key}")
    else:
      config[key] = value
  return config


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with the project's defaults (docs/method.md gives the reasons)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # cec (UIP2P) | ip2p (supervised InstructPix2Pix); a world's own models (ShapesWorld):
  # t2i (text-to-image UNet) | vae | clip | probe (uip2p_jax/pretraining.py)
  c.objective = "cec"
  c.total_steps = 20_000
  c.batch_size = 64                    # global, per update
  c.ema_decay = 0.9999                 # 0: no EMA kept (samples and export use the weights)
  c.ema_dtype = "float32"              # bfloat16 halves the EMA's memory
  c.log_every = 50
  c.export = True                      # the EMA UNet in diffusers' format at the end
  c.export_every = 0                   # N > 0: also a snapshot export at every Nth step, in
                                       # workdir/exports/step_N (evaluate a run as it trains)
  c.final_edit = False                 # edit one sample image with it
  c.profile_steps = ""                 # "START,COUNT": a jax.profiler trace in workdir/profile

  # vae / text_encoder: folders replacing the preset's random VAE / text encoder (a world's own).
  # prediction_type: what the UNet outputs, for training, samples and the export's scheduler:
  # "auto" (the initial model's scheduler config; a preset's: epsilon) | "epsilon" |
  # "v_prediction" (an epsilon model fine-tuned into a v model; docs/method.md, "Loss weighting").
  c.model = dict(preset="sd15", pretrained="", init_from_sd="", clip="", vae="", text_encoder="",
                 seed=0, prediction_type="auto",
                 attention_backend="auto", compute_dtype="bfloat16", frozen_dtype="bfloat16",
                 remat="full")
  # cache_latents: the frozen VAE encodes each training image once, not at every step (objectives
  # ip2p and t2i on a built dataset, with no augmentation: flip False, scales 1; train.latent_cache).
  c.data = dict(dir="", kind="captions", resolution=256, num_workers=8, min_scale=1.0,
                max_scale=1.125, flip=True, strict=False, cache_latents=False)
  # attention_select="level": L_attn reads the UNet level attention_level (0 = the latent's own
  # size), the same blocks at 256 and 512 px (level 1 = 16x16 at 256 px for SD 1.5);
  # "resolution" picks blocks by the absolute side attention_resolution instead.
  c.cycle = dict(start="noised_input", num_steps_min=1, num_steps_max=1, same_k=True,
                 timestep_min=0, timestep_max=1000, share_noise=True, reencode=False,
                 clamp_decoded=True, attention_select="level", attention_level=1,
                 attention_resolution=16, conditioning_dropout=0.0, noise_offset=0.0)
  # keep > 0: the forward edit's latent L1 to its input (not the paper's; docs/method.md), over
  # the keep_fraction of positions that changed least. clip_reference="null_edit" (ours): L_clip's
  # image direction starts at the same edit made with the empty instruction, not at the input;
  # clip_floor > 0 (ours): a floor on that direction's norm (losses.clip_direction_similarity).
  c.loss = dict(clip=1.0, sim=1.0, attn=1.0, recon=1.0, keep=0.0, keep_fraction=1.0,
                clip_reference="input", clip_floor=0.0, sim_kind="reconstruction",
                recon_kind="l1")
  # loss_weighting: "epsilon" (IP2P's noise MSE) | "v" (the v-prediction loss; docs/method.md);
  # a v_prediction model trains on "v" only (its plain MSE to v).
  # edit_region_weight > 0: each position's error weighted up where the edit changes the latent
  # (not IP2P's; cycle.ip2p_losses). 0 = IP2P's loss.
  c.ip2p = dict(conditioning_dropout=0.05, noise_offset=0.0, loss_weighting="epsilon",
                edit_region_weight=0.0)
  c.pretrain = dict(vae_kl=1e-6, vae_l2=1.0, caption_dropout=0.1,  # objectives vae, t2i, probe
                    probe_degrade=0.5)
  # name: adamw | adafactor; mu_dtype: AdamW's first moment (bfloat16 halves it).
  # image_channels_lr_multiplier: the updates of conv_in's image-condition input channels (an
  # edit UNet's second half, zero at init_ip2p_from_sd) scaled by it (1: as every weight).
  # schedule: constant | cosine (over decay_steps) | wsd (held until decay_start, then linear
  # over decay_steps), each after the warm-up, to end_lr_factor x lr.
  c.optim = dict(name="adamw", mu_dtype="float32", lr=5e-5, warmup_steps=500,
                 schedule="constant", decay_steps=0, decay_start=0, end_lr_factor=0.0, b1=0.9,
                 b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0, accumulate=1,
                 image_channels_lr_multiplier=1.0)
  # LoRA on the UNet (objectives cec, ip2p, t2i): rank 0 = off (full fine-tuning). alpha: the
  # branch is scaled by alpha / rank (0: alpha = rank); dropout on the branch's input; targets:
  # comma-separated groups attn (attention projections), ff (feed-forward), conv (ResNet 3x3
  # convolutions); init_from: a LoRA file to start from. Only the factors are trained, held in
  # the optimizer and the EMA; the export holds the merged UNet and export/lora/ the factors.
  c.lora = dict(rank=0, alpha=0.0, dropout=0.0, targets="attn", init_from="")
  c.mesh = dict(data=1, fsdp=-1)       # -1: every remaining device
  # Keep the last `keep` checkpoints plus the best by training loss; `strict_resume`: refuse a
  # damaged latest checkpoint instead of setting it aside and resuming from the one before.
  c.checkpoint = dict(every=1000, keep=3, use_async=True, strict_resume=False)
  c.sample = dict(every=1000, count=4, steps=20, text_scale=7.5, image_scale=1.5)
  c.expected = dict()                  # reference numbers for `uip2p eval --expected`
  return c
