"""UIP2P on ShapesWorld: Cycle Edit Consistency with no edited image (issue 15).

Arguments: init=prior|recolour|cec (the 8-channel UNet from the world's text-to-image prior, image
channels zero: strictly unsupervised; or from an IP2P model supervised on recolour edits only,
runs/ip2p_recolour/export of experiments/shapes/ip2p.py:kinds=recolour, a v-prediction model
unless trained with prediction=eps: the CEC edits read the UNet's output as the init's scheduler
config says, `model.prediction_type` "auto"; or from a CEC run's export, to continue it: the
shipped shapes-cec with models=shipped, launch/quickstart.sh),
losses=base|sim|full (the paper's chain), seed=N, steps=N, lr=X (peak, cosine to a tenth),
warmup=N (steps), ema=X (EMA decay), runs=DIR, models=runs|shipped (the
prior, CLIP and recolour editor from DIR's exports or the package's shapes-sdedit, CLIP and
shapes-ip2p-recolour).

  uip2p train --config experiments/shapes/cec.py:init=prior,losses=full \
      --workdir runs/shapes/cec

Experiment 2 (shipped as shapes-cec; ~55 min on a 2-core Intel Xeon at 1.8-2.5 s/step):
  uip2p train --config experiments/shapes/cec.py:init=recolour,models=shipped,steps=1500 \
      --workdir runs/shapes/cec_recolour --config.export_every=250
expected on the 500 test turns: edit accuracy 0.154, preservation 0.472 (from 0.094 / 0.546;
background 0.145, reshape 0.080, remove 0.072, add 0, recolour 0.439).

At 4x the lr (~25 min; the ablation chain's setting, launch/shapes_ablation.sh):
  uip2p train --config experiments/shapes/cec.py:init=recolour,models=shipped,steps=600,lr=4e-4,warmup=60,ema=0.995 \
      --workdir runs/shapes/cec_recolour_lr4e-4 --config.export_every=200
expected on the first 200 test turns: 0.120 / 0.515 (step 200: 0.065, step 400: 0.095).

The ablation chain at that setting, losses=base|sim|full x seed=0|1 (`bash
launch/shapes_ablation.sh`, ~35 min per run): expected on the first 200 test turns, the mean
of the two seeds, base 0.153 / 0.160, sim 0.135 / 0.472, full 0.138 / 0.490.

Trains on the `captions` records of `uip2p data build shapes` (image, caption, instruction,
edited caption, reverse instruction; no edited image) with the world's CLIP in the losses.
Numbers: RESULTS.md ("CEC on ShapesWorld").
"""

import common

_LOSSES = {"base": dict(clip=1.0, sim=0.0, attn=0.0, recon=1.0),
           "sim": dict(clip=1.0, sim=1.0, attn=0.0, recon=1.0),
           "full": dict(clip=1.0, sim=1.0, attn=1.0, recon=1.0)}


def get_config(arg=None):
  args = common.parse_arg(arg, init="prior", losses="full", seed="0", steps="1000",
                          runs=common.RUNS, models="runs", lr="1e-4", warmup="200", ema="0.999")
  losses = common.choice(args, "losses", _LOSSES)
  init = common.choice(args, "init", ("prior", "recolour", "cec"))
  paths = common.paths(args["runs"], common.choice(args, "models", ("runs", "shipped")))
  c = common.shapes_config("cec", steps=int(args["steps"]), batch=16, lr=float(args["lr"]),
                           warmup=int(args["warmup"]))
  c.ema_decay = float(args["ema"])
  c.seed = int(args["seed"])
  c.loss = common.override(c.loss, _LOSSES[losses])
  c.model.clip = paths["clip"]
  if init == "prior":
    c.model.init_from_sd = paths["prior"]
  else:
    c.model.pretrained = paths["cec" if init == "cec" else f"ip2p_{init}"]
  c.data.dir, c.data.kind = paths["data"], "captions"
  # As the IP2P baseline (experiments/shapes/ip2p.py): the edits start from noised latents whose
  # channel means would otherwise give the input's colours away at every t.
  c.cycle.noise_offset = 0.1
  return c
