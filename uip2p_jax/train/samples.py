"""What a run shows and leaves behind besides checkpoints: sample grids (edit objectives: input |
forward edit | reconstruction, edited with the EMA UNet and the InstructPix2Pix sampler; vae:
input | reconstruction; t2i: generated from the caption | the real scene; clip and probe log
accuracies instead), the export (the trained module, in a full pipeline folder for UNets) and
one final edit."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uip2p_jax import model_card, sharding as shd, storage
from uip2p_jax.image_io import sample_grid, save_image_atomic, to_pil
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
  unet = _module(run, "unet", params)
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


def _module(run: RunContext, name: str, params=None):
  """A frozen module, or the trained one with `params` (a LoRA UNet: its factors, merged with
  the frozen base)."""
  from uip2p_jax.train.step import merge_module
  return merge_module(run.graphs[name], params, run.frozen.get(name))


def write_samples(run: RunContext, state: TrainState, sample_batch, step: int, writer) -> None:
  """workdir/samples/step_N.png (and TensorBoard), by objective (see the module's docstring)."""
  from uip2p_jax.train.step import trained_module
  objective = run.config.objective
  if objective in ("clip", "probe"):
    return
  images = sample_batch["image"]
  if objective in ("cec", "ip2p"):
    edited, reconstructed = host_tree(sample_edits(
        run, evaluated_params(state), run.replicated(images),
        run.replicated(sample_batch["instruction_ids"]),
        run.replicated(sample_batch["reverse_instruction_ids"])))
    columns = list(zip(images, np.asarray(edited), np.asarray(reconstructed)))
    captions = [f"fwd: {f}\nrev: {r}" for f, r in zip(
        run.texts(sample_batch["instruction_ids"]),
        run.texts(sample_batch["reverse_instruction_ids"]))]
  elif objective == "vae":
    out = _reconstruct(_module(run, trained_module(objective), evaluated_params(state)),
                       run.replicated(images))
    columns = list(zip(images, np.asarray(host_tree(out))))
    captions = ["input | reconstruction"] * len(columns)
  else:  # t2i
    columns = list(zip(np.asarray(host_tree(generate(
        run, evaluated_params(state), run.replicated(sample_batch["input_caption_ids"])))),
        images))
    captions = run.texts(sample_batch["input_caption_ids"])
  if jax.process_index() != 0:
    return
  grid = sample_grid(columns, captions)
  save_image_atomic(grid, os.path.join(run.workdir, "samples", f"step_{step:07d}.png"))
  writer.image("samples", np.asarray(grid), step)


@nnx.jit
def _reconstruct(vae, images):
  return jnp.clip(vae.decode(vae.encode(images).mode()), -1, 1)


def generate(run: RunContext, params, caption_ids):
  """Text-to-image samples of a t2i run's UNet `params` (config.sample: steps, text_scale)."""
  from uip2p_jax.pipeline import generate_latents
  from uip2p_jax.schedules import make_sampler
  from uip2p_jax.tokenizer import tokenize
  config = run.config
  unet, vae = _module(run, "unet", params), _module(run, "vae")
  text_encoder = _module(run, "text_encoder")
  sampler = make_sampler("euler_ancestral", run.schedule, config.sample.steps)
  keys = jax.vmap(jax.random.key)(jnp.arange(caption_ids.shape[0], dtype=jnp.uint32)
                                  + config.seed)
  return generate_latents(unet, vae, text_encoder, caption_ids, tokenize(run.tokenizer, [""]),
                          sampler, jnp.float32(config.sample.text_scale), keys)


VAE_SCALE_IMAGES = 256  # images whose latents' std sets an exported VAE's scaling factor


def export(run: RunContext, state: TrainState, scale_images=None, out: str | None = None) -> str:
  """The trained module (EMA when kept) under `out` (default workdir/export):
  - a UNet: `unet/` in diffusers' format, in a full pipeline folder (`uip2p edit --model`,
    `uip2p eval`, diffusers' `from_pretrained`): the base pipeline's other parts are copied
    beside it (`pretrained` or `init_from_sd`); a run built from a preset (or a world's own
    parts) writes its VAE, text encoder, tokenizer and scheduler;
  - a VAE: `vae/`, its scaling factor 1 / std of the latents of `scale_images()` (a fixed set:
    the first VAE_SCALE_IMAGES of a fresh loader, so an interrupted export measures the same);
  - a CLIP: `clip/` (transformers CLIPModel); the probe: `probe/`.
  An edit model (cec, ip2p) also gets its model card, README.md (`uip2p_jax.model_card`).
  A LoRA run's `unet/` is the merged UNet (base + scale * A B) and `lora/` holds the factors as
  `pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` applies to the run's
  base pipeline (`model.pretrained`).
  A workdir in a bucket: the files are written to a local temporary folder and uploaded."""
  from uip2p_jax.train.step import trained_module
  trained = trained_module(run.config.objective)
  params = host_tree(evaluated_params(state))
  step = int(host_tree(state.step))
  out = out or os.path.join(run.workdir, "export")
  lora = run.config.lora.rank > 0
  base = host_tree(run.frozen[trained]) if lora else None  # a LoRA UNet's frozen base
  if jax.process_index() != 0:
    return out
  from uip2p_jax.train.step import merge_module
  module = merge_module(run.graphs[trained], jax.tree.map(np.asarray, params),
                        None if base is None else jax.tree.map(np.asarray, base))
  which = "EMA " if state.ema_params is not None else ""
  with storage.local_folder(out) as folder:
    _write_export(run, module, trained, folder, out, which, lora, scale_images)
  if run.config.objective in model_card.EDIT_OBJECTIVES:  # (their trained module is the UNet)
    model_card.write_training_record(out, run.config, step, run.workdir)
    print(f"train: model card {model_card.write_card(out)} (after `uip2p eval`, `uip2p export "
          f"card {out}` adds its table; --push-to-hub OWNER/NAME uploads the export)",
          flush=True)
  return out


def copy_base_parts(base: str, out: str) -> None:
  """Everything of the pipeline folder `base` but its UNet into `out`; parts it shares through
  `components.json` (the shipped ShapesWorld models) are copied in whole, so the export stands
  alone wherever it is moved."""
  from uip2p_jax import weights
  shared = weights.shared_components(base)
  os.makedirs(out, exist_ok=True)
  for name in sorted(set(os.listdir(base)) | set(shared)):
    if name in ("unet", weights.COMPONENTS_FILE) or name.startswith("."):
      continue
    source = os.path.join(base, name)
    if not os.path.exists(source):
      source = shared[name]
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(out, name), dirs_exist_ok=True)
    else:
      shutil.copyfile(source, os.path.join(out, name))


def _write_export(run: RunContext, module, trained: str, out: str, shown: str, which: str,
                  lora: bool, scale_images) -> None:
  """export's files in the local folder `out` (`shown`: where they end up, for messages)."""
  from uip2p_jax import weights
  if trained == "vae":
    if scale_images is None:
      raise ValueError("exporting a VAE measures its latents' scale: pass scale_images")
    encode = jax.jit(lambda x: module.encode(x).mean)
    latents = np.concatenate([np.asarray(encode(batch)) for batch in scale_images()])
    std = float(latents.std())
    weights.save_vae(module, os.path.join(out, "vae"), scaling_factor=1.0 / std)
    print(f"train: exported the {which}VAE to {shown}/vae (scaling factor 1/{std:.4f}, from "
          f"{len(latents)} images)", flush=True)
    return
  if trained in ("clip", "probe"):
    save = weights.save_clip if trained == "clip" else weights.save_probe
    save(module, os.path.join(out, trained))
    print(f"train: exported the {which}{trained} to {shown}/{trained}", flush=True)
    return
  base_pipeline = run.config.model.pretrained or run.config.model.init_from_sd
  if base_pipeline:
    copy_base_parts(weights.resolve_folder(base_pipeline), out)
    # The UNet may have been trained to another output than the base's (model.prediction_type).
    run.schedule.write_prediction_type(os.path.join(out, "scheduler"))
  else:
    write_pipeline_parts(out, _module(run, "vae"), _module(run, "text_encoder"), run.tokenizer,
                         run.schedule)
  if lora:
    from uip2p_jax.models.lora import merge_lora
    from uip2p_jax.train.config import lora_config
    weights.save_lora(module, os.path.join(out, "lora"), lora_config(run.config))
    print(f"train: exported the {which}LoRA factors to {shown}/lora/{weights.LORA_WEIGHTS} "
          "(diffusers' load_lora_weights format, for the run's base UNet)", flush=True)
    module = merge_lora(module)
  weights.save_unet(module, os.path.join(out, "unet"))
  merged = "LoRA-merged " if lora else ""
  print(f"train: exported the {which}{merged}UNet (diffusers format) to {shown}/unet"
        + (" with the base pipeline's other parts" if base_pipeline else
           " with the run's VAE, text encoder, tokenizer and scheduler"), flush=True)


def write_pipeline_parts(out: str, vae, text_encoder, tokenizer, schedule: NoiseSchedule) -> None:
  """vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers pipeline folder (the UNet's
  sampler: Euler ancestral, InstructPix2Pix's)."""
  from uip2p_jax import weights
  weights.save_vae(vae, os.path.join(out, "vae"))
  weights.save_text_encoder(text_encoder, os.path.join(out, "text_encoder"))
  tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
  schedule.save(os.path.join(out, "scheduler"))


def final_edit(run: RunContext, state: TrainState, sample_batch) -> None:
  """Edits the first sample image with the trained (EMA) UNet: workdir/final_edit.png."""
  ids = sample_batch["instruction_ids"][:1]
  edited, _ = sample_edits(run, evaluated_params(state), run.replicated(sample_batch["image"][:1]),
                           run.replicated(ids))
  edited = host_tree(edited)
  if jax.process_index() == 0:
    path = os.path.join(run.workdir, "final_edit.png")
    save_image_atomic(to_pil(np.asarray(edited[0])), path)
    print(f"train: edited a sample image ({run.texts(ids)[0]!r}) -> {path}", flush=True)
