"""ShapesWorld's shared settings, on top of the project schema (experiments/common.py).

Every stage reads and writes under one runs folder (the config argument `runs=DIR`, default
runs/shapes): the built data in DIR/data, each stage's run in DIR/<stage>, its export in
DIR/<stage>/export. launch/shapes.sh runs the stages in order; each resumes where it stopped.
`models=shipped` (ip2p.py, cec.py) starts from the models shipped in the package instead of the
runs folder's exports (the data is still DIR/data): the only way with no world trained here.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "experiments_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                       "common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
base_config, override, parse_arg, choice = (_common.base_config, _common.override,
                                            _common.parse_arg, _common.choice)

RUNS = "runs/shapes"


def paths(runs: str, models: str = "runs") -> dict:
  """Where each stage's export lands (the folders later stages load): in the runs folder, or
  (`models="shipped"`) the package's ShapesWorld models; the data is the runs folder's."""
  if models == "shipped":
    from uip2p_jax import shapes_models
    return {"data": f"{runs}/data", "vae": os.path.join(shapes_models.ROOT, "vae"),
            **shapes_models.paths()}
  if models != "runs":
    raise ValueError(f"models={models!r}: expected runs or shipped")
  return {"data": f"{runs}/data", "vae": f"{runs}/vae/export/vae",
          "clip": f"{runs}/clip/export/clip", "prior": f"{runs}/prior/export",
          "probe": f"{runs}/probe/export/probe", "ip2p": f"{runs}/ip2p/export",
          "ip2p_recolour": f"{runs}/ip2p_recolour/export", "cec": f"{runs}/cec/export"}


def shapes_config(objective: str, *, steps: int, batch: int, lr: float, warmup: int = 200):
  """A ShapesWorld run on this CPU: the `shapes` preset in float32, 64 px scenes (no flips or
  crops: captions name left and right), checkpoints every 250 steps, EMA 0.999."""
  c = base_config()
  return override(c, dict(
      objective=objective, total_steps=steps, batch_size=batch, ema_decay=0.999, log_every=50,
      model=dict(preset="shapes", compute_dtype="float32", frozen_dtype="float32", remat="none"),
      data=dict(kind="world", resolution=64, num_workers=1, min_scale=1.0, max_scale=1.0,
                flip=False),
      optim=dict(lr=lr, warmup_steps=warmup, schedule="cosine", decay_steps=steps - warmup,
                 end_lr_factor=0.1, weight_decay=0.0),
      mesh=dict(data=-1, fsdp=1),
      checkpoint=dict(every=250, keep=2, use_async=False),
      sample=dict(every=500, count=8, steps=20, text_scale=4.0, image_scale=1.5)))
