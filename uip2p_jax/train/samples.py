"""What a run shows and leaves behind besides checkpoints: sample grids (input | forward edit |
reconstruction, edited with the EMA UNet and the InstructPix2Pix sampler), the exported
diffusers UNet (a full pipeline folder for runs from a pretrained one) and one final edit."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uip2p_jax import sharding as shd
from uip2p_jax.image_io import sample_grid, to_pil
from uip2p_jax.schedules import NoiseSchedule
from uip2p_jax.train.step import TrainState


def evaluated_params(state: TrainState):
  """The UNet parameters samples, export and the final edit use: the EMA when the run keeps
  one (float32 for the models), else the trained parameters."""
  if state.ema_params is None:
    return state.params
  return jax.tree.map(lambda e: e.astype(jnp.float32), state.ema_params)


def host_tree(tree):
  """Global (possibly sharded, multi-host) arrays -> numpy on every process."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


@dataclasses.dataclass
class RunContext:
  """What samples, export and the final edit need besides the state."""
  config: Any
  workdir: str
  graphs: dict
  frozen: Any          # placed frozen parameters
  tokenizer: Any
  schedule: NoiseSchedule
  mesh: Any

  def texts(self, ids: np.ndarray) -> list[str]:
    return [self.tokenizer.decode([int(i) for i in row], skip_special_tokens=True) for row in ids]

  def replicated(self, x: np.ndarray) -> jax.Array:
    return shd.place(np.asarray(x), shd.replicated(self.mesh))


def sample_edits(run: RunContext, params, images, forward_ids, reverse_ids=None):
  """(forward edit, reconstruction) of `images` (B, H, W, 3) in [-1, 1] with UNet `params`:
  the InstructPix2Pix sampler with guidance (config.sample), forward then reverse instruction
  (no reverse edit, and None for it, without `reverse_ids`)."""
  from uip2p_jax.pipeline import edit_latents
  from uip2p_jax.schedules import make_sampler
  from uip2p_jax.tokenizer import tokenize
  config = run.config
  unet = nnx.merge(run.graphs["unet"], params)
  vae = nnx.merge(run.graphs["vae"], run.frozen["vae"])
  text_encoder = nnx.merge(run.graphs["text_encoder"], run.frozen["text_encoder"])
  sampler = make_sampler("euler_ancestral", run.schedule, config.sample.steps)
  empty_ids = tokenize(run.tokenizer, [""])
  keys = jax.vmap(jax.random.key)(jnp.arange(images.shape[0], dtype=jnp.uint32) + config.seed)
  edit = lambda x, ids: edit_latents(unet, vae, text_encoder, x, ids, empty_ids, sampler,
                                     jnp.float32(config.sample.text_scale),
                                     jnp.float32(config.sample.image_scale), keys)
  edited = edit(images, forward_ids)
  return edited, None if reverse_ids is None else edit(edited, reverse_ids)


def write_samples(run: RunContext, state: TrainState, sample_batch, step: int, writer) -> None:
  """workdir/samples/step_N.png (and TensorBoard): input | forward edit | reconstruction."""
  images = sample_batch["image"]
  edited, reconstructed = host_tree(sample_edits(
      run, evaluated_params(state), run.replicated(images),
      run.replicated(sample_batch["instruction_ids"]),
      run.replicated(sample_batch["reverse_instruction_ids"])))
  if jax.process_index() != 0:
    return
  captions = [f"fwd: {f}\nrev: {r}" for f, r in zip(
      run.texts(sample_batch["instruction_ids"]),
      run.texts(sample_batch["reverse_instruction_ids"]))]
  grid = sample_grid(list(zip(images, np.asarray(edited), np.asarray(reconstructed))), captions)
  os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
  grid.save(os.path.join(run.workdir, "samples", f"step_{step:07d}.png"))
  writer.image("samples", np.asarray(grid), step)


def export(run: RunContext, state: TrainState) -> str:
  """The EMA UNet in diffusers' format at workdir/export/unet; for runs from a pretrained
  pipeline, the base pipeline's other parts are copied beside it, so workdir/export is a full
  InstructPix2Pix folder (`uip2p edit --model`, `uip2p eval`, diffusers' `from_pretrained`)."""
  from uip2p_jax import weights
  ema = host_tree(evaluated_params(state))
  out = os.path.join(run.workdir, "export")
  if jax.process_index() == 0:
    pretrained = run.config.model.pretrained  # (an init_from_sd base is no IP2P pipeline)
    if pretrained:
      root = weights.resolve_folder(pretrained)
      for name in os.listdir(root):
        source = os.path.join(root, name)
        if name == "unet" or name.startswith("."):
          continue
        if os.path.isdir(source):
          shutil.copytree(source, os.path.join(out, name), dirs_exist_ok=True)
        else:
          os.makedirs(out, exist_ok=True)
          shutil.copyfile(source, os.path.join(out, name))
    weights.save_unet(nnx.merge(run.graphs["unet"], jax.tree.map(np.asarray, ema)),
                      os.path.join(out, "unet"))
    which = "EMA UNet" if state.ema_params is not None else "UNet (no EMA kept)"
    print(f"train: exported the {which} (diffusers format) to {out}/unet"
          + (" with the base pipeline's other parts" if pretrained else ""), flush=True)
  return out


def final_edit(run: RunContext, state: TrainState, sample_batch) -> None:
  """Edits the first sample image with the trained (EMA) UNet: workdir/final_edit.png."""
  ids = sample_batch["instruction_ids"][:1]
  edited, _ = sample_edits(run, evaluated_params(state), run.replicated(sample_batch["image"][:1]),
                           run.replicated(ids))
  edited = host_tree(edited)
  if jax.process_index() == 0:
    path = os.path.join(run.workdir, "final_edit.png")
    to_pil(np.asarray(edited[0])).save(path)
    print(f"train: edited a sample image ({run.texts(ids)[0]!r}) -> {path}", flush=True)
