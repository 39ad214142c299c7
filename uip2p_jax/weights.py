"""Checkpoint I/O: Hugging Face folders (diffusers / transformers layout) <-> Flax NNX modules.

Weights are read from `*.safetensors` with safetensors' numpy API (no torch at run time) from a
local folder or a Hugging Face repo id (through `huggingface_hub`, so `HF_HUB_OFFLINE=1` and the
local cache are honoured). Our module tree mirrors the checkpoint's, so a checkpoint key is the
parameter path joined by dots; the only differences are leaf names and layouts, in `_LEAF_RULES`.

Loading never leaves a parameter at a random value: modules are built abstractly
(`nnx.eval_shape`) and every parameter must come from the checkpoint. Missing keys, unexpected
keys and shape mismatches are refused with a `CheckpointError` that lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from uip2p_jax import storage
from uip2p_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextTransformer
from uip2p_jax.models.gemma import Gemma2Config, Gemma2ForCausalLM
from uip2p_jax.models.random_init import nest
from uip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from uip2p_jax.models.vae import AutoencoderKL, VAEConfig
from uip2p_jax.models.vit import ViTConfig, ViTModel

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"

# (flax leaf name, ndim) -> (checkpoint leaf name, checkpoint->flax layout, flax->checkpoint).
_LEAF_RULES: dict[tuple[str, int], tuple[str, Callable, Callable]] = {
    ("kernel", 4): ("weight", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    ("kernel", 2): ("weight", lambda w: w.T, lambda w: w.T),  # Linear: (out, in) <-> (in, out)
    ("scale", 1): ("weight", lambda w: w, lambda w: w),  # norms
    ("embedding", 2): ("weight", lambda w: w, lambda w: w),
}
_IDENTITY = (lambda w: w, lambda w: w)

# Buffers that checkpoints carry but that are not parameters (recomputed here).
_IGNORED_KEYS = (re.compile(r"(^|\.)position_ids$"),)


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message says what and where."""


def _checkpoint_key(path: tuple, ndim: int) -> tuple[str, Callable, Callable]:
  """(checkpoint key, checkpoint->flax layout, flax->checkpoint layout) of a parameter path."""
  leaf = str(path[-1])
  name, to_flax, to_ckpt = _LEAF_RULES.get((leaf, ndim), (leaf, *_IDENTITY))
  return ".".join([*(str(p) for p in path[:-1]), name]), to_flax, to_ckpt


# --------------------------------------------------------------------------------------------
# Finding and reading files
# --------------------------------------------------------------------------------------------

def resolve_folder(path_or_repo: str | os.PathLike, subfolder: str | None = None,
                   revision: str | None = None) -> str:
  """A local folder holding the component: `path/subfolder`, or a Hub snapshot of it."""
  path_or_repo = os.fspath(path_or_repo)
  if os.path.isdir(path_or_repo):
    folder = os.path.join(path_or_repo, subfolder) if subfolder else path_or_repo
    if subfolder and not os.path.isdir(folder):
      folder = _shared_component(path_or_repo, subfolder) or folder
    if not os.path.isdir(folder):
      raise CheckpointError(f"{path_or_repo}: no subfolder {subfolder!r} (expected a diffusers "
                            f"pipeline folder with {subfolder}/config.json)")
    return folder
  if (path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") > 1
      or os.path.exists(path_or_repo)):
    raise CheckpointError(f"{path_or_repo}: no such folder (and not a Hugging Face repo id)")
  from huggingface_hub import snapshot_download
  patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.txt"]
  try:
    root = snapshot_download(path_or_repo, allow_patterns=patterns, revision=revision)
  except Exception as e:  # network, auth, offline-miss: all mean "cannot get it"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
    raise CheckpointError(f"cannot fetch {path_or_repo!r} from the Hugging Face Hub{hint}: "
                          f"{type(e).__name__}: {e}") from e
  folder = os.path.join(root, subfolder) if subfolder else root
  if not os.path.isdir(folder):
    raise CheckpointError(f"Hub repo {path_or_repo!r} has no subfolder {subfolder!r}")
  return folder


COMPONENTS_FILE = "components.json"


def shared_components(pipeline: str) -> dict[str, str]:
  """A pipeline folder may name where parts it shares with others live:
  `components.json` = {"vae": "../vae", "text_encoder": "../clip", ...}, paths relative to the
  pipeline folder (the shipped ShapesWorld models share one VAE, text encoder and tokenizer).
  Returns part -> folder ({} without the file)."""
  path = os.path.join(pipeline, COMPONENTS_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      components = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not JSON ({e})") from None
  folders = {}
  for name, relative in components.items():
    folders[name] = os.path.normpath(os.path.join(pipeline, relative))
    if not os.path.isdir(folders[name]):
      raise CheckpointError(f"{path}: {name} -> {relative!r}, which is not a folder")
  return folders


def _shared_component(pipeline: str, name: str) -> str | None:
  return shared_components(pipeline).get(name)


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{folder}: no config.json") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def weight_files(folder: str, base: str, variant: str | None = None) -> list[str]:
  """The safetensors files of `base` (single file or sharded with an index) in `folder`."""
  suffix = f".{variant}.safetensors" if variant else ".safetensors"
  single = os.path.join(folder, base + suffix)
  index = single + ".index.json"
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, KeyError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{index}: unreadable shard index ({e})") from e
    return [os.path.join(folder, s) for s in shards]
  present = sorted(os.listdir(folder))
  if any(name.endswith((".bin", ".ckpt", ".pt")) for name in present):
    raise CheckpointError(f"{folder}: only PyTorch pickle weights found ({present}); "
                          f"expected {base + suffix} (convert with safetensors first)")
  raise CheckpointError(f"{folder}: no {base + suffix} (found {present})")


def read_tensors(files: Iterable[str]) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except FileNotFoundError:
      raise CheckpointError(f"{path}: missing weight file") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers/data
      raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") \
          from e
  return tensors


# --------------------------------------------------------------------------------------------
# Checkpoint tensors <-> module state
# --------------------------------------------------------------------------------------------

def load_state(factory: Callable[[], nnx.Module], tensors: dict[str, np.ndarray], *,
               source: str, prefix: str = "", param_dtype=None) -> nnx.Module:
  """Build `factory()`'s module with every parameter taken from `tensors`.

  prefix: a key prefix (e.g. "text_model.") that checkpoint keys carry and our tree does not.
  param_dtype: cast weights to this dtype (default: the module's declared parameter dtype).
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(factory))
  flat: dict[tuple, Any] = {}
  missing, mismatched, used = [], [], set()
  for path, variable in nnx.to_flat_state(abstract):
    expected = variable.get_value() if hasattr(variable, "get_value") else variable.value
    key, to_flax, to_ckpt = _checkpoint_key(path, len(expected.shape))
    key = prefix + key
    if key not in tensors:
      missing.append(key)
      continue
    used.add(key)
    value = to_flax(tensors[key])
    if tuple(value.shape) != tuple(expected.shape):
      expected_ckpt = to_ckpt(np.empty(expected.shape, np.int8)).shape
      mismatched.append(f"{key}: expected {tuple(expected_ckpt)}, "
                        f"found {tuple(tensors[key].shape)}")
      continue
    flat[path] = jnp.asarray(value, dtype=param_dtype or expected.dtype)
  unexpected = sorted(k for k in tensors if k not in used and k.startswith(prefix)
                      and not any(p.search(k) for p in _IGNORED_KEYS))
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
  if problems:
    raise CheckpointError(f"{source}: checkpoint does not match the model config; "
                          + "; ".join(problems))
  abstract.replace_by_pure_dict(nest(flat))
  return nnx.merge(graphdef, abstract)


def module_tensors(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's parameters as checkpoint-layout numpy arrays keyed like the checkpoint."""
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    value = np.asarray(jax.device_get(variable.get_value()))
    key, _, to_ckpt = _checkpoint_key(path, value.ndim)
    value = to_ckpt(value)
    # (ascontiguousarray makes a 0-d array 1-d: CLIP's logit_scale is a scalar)
    tensors[key] = np.ascontiguousarray(value).reshape(value.shape)
  return tensors


def _listing(items: list[str], limit: int = 20) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def load_unet(path_or_repo: str | os.PathLike, subfolder: str | None = "unet", *,
              dtype=jnp.float32, param_dtype=jnp.float32, backend: str = "auto",
              variant: str | None = None, revision: str | None = None) -> UNet2DConditionModel:
  """Load a diffusers `UNet2DConditionModel` folder (or `repo/unet`) as our Flax UNet.

  dtype: compute dtype (bfloat16 for speed); param_dtype: storage dtype of the weights.
  """
  folder = resolve_folder(path_or_repo, subfolder, revision)
  config = _parse(UNetConfig.from_diffusers, read_config(folder), folder)
  tensors = read_tensors(weight_files(folder, DIFFUSERS_WEIGHTS, variant))
  return load_state(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                 param_dtype=param_dtype, backend=backend),
                    tensors, source=folder, param_dtype=param_dtype)


def load_vae(path_or_repo: str | os.PathLike, subfolder: str | None = "vae", *,
             dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
             revision: str | None = None) -> AutoencoderKL:
  """Load a diffusers `AutoencoderKL` folder (or `repo/vae`)."""
  folder = resolve_folder(path_or_repo, subfolder, revision)
  config = _parse(VAEConfig.from_diffusers, read_config(folder), folder)
  tensors = read_tensors(weight_files(folder, DIFFUSERS_WEIGHTS, variant))
  return load_state(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype,
                                          param_dtype=param_dtype),
                    tensors, source=folder, param_dtype=param_dtype)


def load_text_encoder(path_or_repo: str | os.PathLike, subfolder: str | None = "text_encoder", *,
                      dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
                      revision: str | None = None) -> CLIPTextTransformer:
  """Load a transformers `CLIPTextModel` (SD's text encoder) or the text tower of a `CLIPModel`."""
  folder = resolve_folder(path_or_repo, subfolder, revision)
  raw = read_config(folder)
  text_raw = raw["text_config"] if raw.get("model_type") == "clip" else raw
  config = _parse(CLIPTextConfig.from_transformers, text_raw, folder)
  tensors = read_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS, variant))
  # transformers < 5 saved CLIPTextModel keys under "text_model."; 5.x saves them bare.
  prefix = "text_model." if any(k.startswith("text_model.") for k in tensors) else ""
  return load_state(lambda: CLIPTextTransformer(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                param_dtype=param_dtype),
                    tensors, source=folder, prefix=prefix, param_dtype=param_dtype)


def load_clip(path_or_repo: str | os.PathLike, subfolder: str | None = None, *,
              dtype=jnp.float32, param_dtype=jnp.float32, revision: str | None = None
              ) -> CLIPModel:
  """Load a transformers `CLIPModel` (e.g. openai/clip-vit-large-patch14) folder or repo id."""
  folder = resolve_folder(path_or_repo, subfolder, revision)
  raw = read_config(folder)
  if raw.get("model_type") != "clip":
    raise CheckpointError(f"{folder}: model_type is {raw.get('model_type')!r}, expected 'clip' "
                          "(a full CLIPModel with vision tower)")
  config = _parse(CLIPConfig.from_transformers, raw, folder)
  tensors = read_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS))
  return load_state(lambda: CLIPModel(config, rngs=nnx.Rngs(0), dtype=dtype,
                                      param_dtype=param_dtype),
                    tensors, source=folder, param_dtype=param_dtype)


def load_vit(path_or_repo: str | os.PathLike, subfolder: str | None = None, *,
             dtype=jnp.float32, param_dtype=jnp.float32, revision: str | None = None
             ) -> ViTModel:
  """Load a transformers `ViTModel` folder or repo id (e.g. facebook/dino-vits16).

  A pooler (which DINO checkpoints lack and the DINO metric does not use) is not loaded; keys
  of a `ViTFor...` model ("vit." prefix) load too, without its task head.
  """
  folder = resolve_folder(path_or_repo, subfolder, revision)
  config = _parse(ViTConfig.from_transformers, read_config(folder), folder)
  tensors = read_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS))
  prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
  tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix + "pooler.")}
  return load_state(lambda: ViTModel(config, rngs=nnx.Rngs(0), dtype=dtype,
                                     param_dtype=param_dtype),
                    tensors, source=folder, prefix=prefix, param_dtype=param_dtype)


def load_gemma2(path_or_repo: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                revision: str | None = None) -> Gemma2ForCausalLM:
  """Load a transformers `Gemma2ForCausalLM` folder or repo id (e.g. google/gemma-2-2b-it).

  The output projection is the embedding table (tied), so a saved `lm_head.weight` is not
  read. param_dtype defaults to dtype: bfloat16 halves the memory of float32 checkpoints.
  """
  folder = resolve_folder(path_or_repo, None, revision)
  config = _parse(Gemma2Config.from_transformers, read_config(folder), folder)
  tensors = read_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS))
  tensors.pop("lm_head.weight", None)
  param_dtype = param_dtype or dtype
  return load_state(lambda: Gemma2ForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype,
                                              param_dtype=param_dtype),
                    tensors, source=folder, param_dtype=param_dtype)


def _save(module: nnx.Module, config: dict, out_dir: str | os.PathLike, weights_base: str) -> str:
  """`config.json` + `{weights_base}.safetensors` in out_dir, each written to a temporary name and
  renamed, so an interrupted save never looks complete (a bucket's: written locally, uploaded)."""
  out_dir = os.fspath(out_dir)
  tensors = module_tensors(module)
  with storage.local_folder(out_dir) as folder:
    os.makedirs(folder, exist_ok=True)
    weights_path = os.path.join(folder, weights_base + ".safetensors")
    save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    with open(config_path + ".tmp", "w") as f:
      json.dump(config, f, indent=2)
    os.replace(weights_path + ".tmp", weights_path)
    os.replace(config_path + ".tmp", config_path)
  return out_dir


def save_unet(unet: UNet2DConditionModel, out_dir: str | os.PathLike) -> str:
  """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers loads."""
  from uip2p_jax.models.lora import has_lora
  if has_lora(unet):
    raise ValueError("the UNet has LoRA layers: save `models.lora.merge_lora(unet)` (and the "
                     "factors with `save_lora`)")
  return _save(unet, unet.config.to_diffusers(), out_dir, DIFFUSERS_WEIGHTS)


def save_vae(vae: AutoencoderKL, out_dir: str | os.PathLike, scaling_factor: float | None = None
             ) -> str:
  """A diffusers `AutoencoderKL` folder; `scaling_factor` replaces the config's (a VAE trained
  here records 1 / the std of its latents, as SD's 0.18215 was measured)."""
  config = vae.config if scaling_factor is None else dataclasses.replace(
      vae.config, scaling_factor=float(scaling_factor))
  return _save(vae, config.to_diffusers(), out_dir, DIFFUSERS_WEIGHTS)


def save_text_encoder(text_encoder: CLIPTextTransformer, out_dir: str | os.PathLike) -> str:
  """A transformers `CLIPTextModel` folder (SD's text_encoder/)."""
  return _save(text_encoder, text_encoder.config.to_transformers(), out_dir, TRANSFORMERS_WEIGHTS)


def save_clip(clip: CLIPModel, out_dir: str | os.PathLike) -> str:
  """A transformers `CLIPModel` folder (both towers, projections, logit scale)."""
  return _save(clip, clip.config.to_transformers(), out_dir, TRANSFORMERS_WEIGHTS)


def save_probe(probe, out_dir: str | os.PathLike) -> str:
  """The ShapesWorld attribute probe: its config + `model.safetensors`."""
  return _save(probe, probe.config.to_json(), out_dir, TRANSFORMERS_WEIGHTS)


def load_probe(path_or_repo: str | os.PathLike, subfolder: str | None = None, *,
               param_dtype=jnp.float32):
  from uip2p_jax.models.probe import AttributeProbe, ProbeConfig
  folder = resolve_folder(path_or_repo, subfolder)
  config = _parse(ProbeConfig.from_json, read_config(folder), folder)
  tensors = read_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS))
  return load_state(lambda: AttributeProbe(config, rngs=nnx.Rngs(0), param_dtype=param_dtype),
                    tensors, source=folder, param_dtype=param_dtype)


def init_ip2p_from_sd(sd_unet: UNet2DConditionModel) -> UNet2DConditionModel:
  """InstructPix2Pix's initialisation: a 4-channel SD UNet -> 8 channels.

  conv_in keeps the pretrained kernel for channels 0-3 (the noisy latent) and gets zeros for
  channels 4-7 (the image condition), so the new UNet starts as exactly the SD UNet.
  """
  config = sd_unet.config
  if config.in_channels != 4:
    raise ValueError(f"init_ip2p_from_sd expects a 4-channel SD UNet, got in_channels="
                     f"{config.in_channels}")
  new_config = dataclasses.replace(config, in_channels=8)
  kernel = sd_unet.conv_in.kernel[...]
  graphdef, state = nnx.split(sd_unet)
  new_graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: UNet2DConditionModel(new_config, rngs=nnx.Rngs(0), dtype=sd_unet.dtype,
                                   param_dtype=kernel.dtype, backend=sd_unet.backend)))
  del graphdef
  pure = state.to_pure_dict()
  pure["conv_in"]["kernel"] = jnp.concatenate([kernel, jnp.zeros_like(kernel)], axis=2)
  abstract.replace_by_pure_dict(pure)
  return nnx.merge(new_graphdef, abstract)


def _parse(parser, raw: dict, folder: str):
  try:
    return parser(raw)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{folder}/config.json: {e}") from e


# --------------------------------------------------------------------------------------------
# LoRA files (diffusers' `load_lora_weights` format)
# --------------------------------------------------------------------------------------------

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` reads
LORA_METADATA_KEY = "uip2p_lora"  # our LoRA config, in the safetensors header (diffusers skips it)
_LORA_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def _lora_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Our (in, r) / (r, out) or (kh, kw, in, r) / (1, 1, r, out) factors -> torch's lora_A /
  lora_B weights (r, in) / (out, r) or (r, in, kh, kw) / (out, r, 1, 1); and back, the same
  transposes inverted, by `_our_layout`."""
  if a.ndim == 2:
    return a.T, b.T
  return a.transpose(3, 2, 0, 1), b.transpose(3, 2, 0, 1)


def _our_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if a.ndim == 2:
    return a.T, b.T
  return a.transpose(2, 3, 1, 0), b.transpose(2, 3, 1, 0)


def lora_tensors(unet: UNet2DConditionModel) -> dict[str, np.ndarray]:
  """The UNet's LoRA factors keyed as diffusers / peft name them
  (`unet.<module>.lora_A.weight`, `...lora_B.weight`), float32, B multiplied by alpha / rank:
  peft files carry no alpha and diffusers applies them at scale 1."""
  from uip2p_jax.models.lora import lora_layers
  tensors = {}
  for name, layer in lora_layers(unet).items():
    a = np.asarray(jax.device_get(layer.lora_a.get_value()), np.float32)
    b = np.asarray(jax.device_get(layer.lora_b.get_value()), np.float32) * layer.lora_scale
    a, b = _lora_layout(a, b)
    tensors[f"unet.{name}.lora_A.weight"] = np.ascontiguousarray(a)
    tensors[f"unet.{name}.lora_B.weight"] = np.ascontiguousarray(b)
  return tensors


def save_lora(unet: UNet2DConditionModel, out_dir: str | os.PathLike, config=None) -> str:
  """`out_dir/pytorch_lora_weights.safetensors`: the UNet's LoRA in the format diffusers'
  `StableDiffusionInstructPix2PixPipeline.load_lora_weights(out_dir)` reads (peft keys, alpha
  folded into B). `config` (a `LoRAConfig`) is recorded in the header, so `load_lora` gives
  back the same factors. Returns the file's path."""
  tensors = lora_tensors(unet)
  if not tensors:
    raise ValueError("the UNet has no LoRA layers to save")
  out_dir = os.fspath(out_dir)
  metadata = {"format": "pt"}
  if config is not None:
    metadata[LORA_METADATA_KEY] = json.dumps({"rank": config.rank, "alpha": config.alpha,
                                              "targets": list(config.targets)})
  with storage.local_folder(out_dir) as folder:  # a bucket's: written locally, uploaded
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA_WEIGHTS)
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
  return os.path.join(out_dir, LORA_WEIGHTS)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                 dict | None]:
  """A LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) ->
  ({module: (A, B) in our layout, B as stored}, our recorded config or None).
  Keys that are not UNet LoRA factors, and factors without their partner, are refused by name."""
  from safetensors import safe_open
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, LORA_WEIGHTS)
  tensors = read_tensors([path])  # a missing or corrupt file is refused here
  with safe_open(path, "np") as f:
    header = f.metadata() or {}
  recorded = None
  if LORA_METADATA_KEY in header:
    try:
      recorded = json.loads(header[LORA_METADATA_KEY])
    except ValueError as e:
      raise CheckpointError(f"{path}: the header's {LORA_METADATA_KEY!r} field (our LoRA rank "
                            f"and alpha) is not JSON ({e}): {header[LORA_METADATA_KEY][:80]!r}"
                            ) from None
    if not isinstance(recorded, dict):
      raise CheckpointError(f"{path}: the header's {LORA_METADATA_KEY!r} field is "
                            f"{type(recorded).__name__} {recorded!r}; expected an object "
                            '{"rank": ..., "alpha": ..., "targets": [...]}')
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for key in sorted(tensors):
    match = _LORA_KEY.match(key)
    if not match:
      raise CheckpointError(f"{path}: key {key!r} is not a UNet LoRA factor (expected "
                            "unet.<module>.lora_A.weight / unet.<module>.lora_B.weight; text "
                            "encoder LoRAs and kohya / network-alpha files are not supported)")
    pairs.setdefault(match["module"], {})[match["factor"]] = tensors[key]
  factors = {}
  for module, pair in pairs.items():
    for factor, other in (("A", "B"), ("B", "A")):
      if factor not in pair:
        raise CheckpointError(f"{path}: key 'unet.{module}.lora_{other}.weight' has no partner "
                              f"'unet.{module}.lora_{factor}.weight'")
    a, b = pair["A"], pair["B"]
    if a.ndim != b.ndim or a.ndim not in (2, 4) or a.shape[0] != b.shape[1] or (
        a.ndim == 4 and b.shape[2:] != (1, 1)):
      raise CheckpointError(f"{path}: key 'unet.{module}.lora_A.weight' {a.shape} and its "
                            f"lora_B {b.shape} are not a LoRA pair (expected (r, in) and "
                            "(out, r), or (r, in, kh, kw) and (out, r, 1, 1))")
    factors[module] = _our_layout(a, b)
  return factors, recorded


def load_lora(unet: UNet2DConditionModel, path: str | os.PathLike,
              factor_dtype=None) -> UNet2DConditionModel:
  """Applies the LoRA file `path` to `unet` (in place, and returned).

  A UNet without LoRA layers gets one on every module the file names, with the file's ranks
  (alpha: the one our files record, else the rank: scale 1, as diffusers applies peft files),
  its factors in `factor_dtype` (default: each layer's kernel dtype; float32 keeps the file's
  values, for `merge_lora` into a lower-precision UNet).
  A UNet that has LoRA layers (a run's, from `config.lora`) takes the file's factors into them:
  the file must name exactly those layers. Either way a key for a module the UNet lacks or that
  is not a linear / convolution layer, a missing key and a shape that does not fit the layer
  are refused with a `CheckpointError` naming the key.
  """
  from uip2p_jax.models.lora import adaptable_layers, factor_shapes, lora_layers, wrap_layers
  factors, recorded = read_lora(path)
  source = os.fspath(path)
  existing = lora_layers(unet)
  layers = existing or adaptable_layers(unet)
  problems = []
  if existing:
    missing = sorted(set(existing) - set(factors))
    if missing:
      problems.append(f"{len(missing)} missing keys: "
                      + _listing([f"unet.{m}.lora_A.weight" for m in missing]))
  unexpected = sorted(set(factors) - set(layers))
  if unexpected:
    what = ("LoRA layers of this run (config.lora.targets)" if existing
            else "linear or convolution layers of the UNet")
    problems.append(f"{len(unexpected)} keys name no {what}: "
                    + _listing([f"unet.{m}.lora_A.weight" for m in unexpected]))
  mismatched = []
  for module, (a, b) in factors.items():
    if module not in layers:
      continue
    rank = existing[module].lora_rank if existing else a.shape[-1]
    (*a_dims, _), (*b_lead, _, out) = factor_shapes(layers[module])
    want_a, want_b = _lora_layout(np.empty((*a_dims, rank), np.int8),
                                  np.empty((*b_lead, rank, out), np.int8))
    have_a, have_b = _lora_layout(a, b)
    for factor, have, want in (("A", have_a, want_a), ("B", have_b, want_b)):
      if have.shape != want.shape:
        mismatched.append(f"unet.{module}.lora_{factor}.weight: expected {want.shape}, found "
                          f"{have.shape}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
  if problems:
    raise CheckpointError(f"{source}: LoRA file does not match the UNet; " + "; ".join(problems))
  if existing:
    for module, (a, b) in factors.items():
      layer = existing[module]
      layer.lora_a.set_value(jnp.asarray(a, layer.lora_a.get_value().dtype))
      layer.lora_b.set_value(jnp.asarray(b / layer.lora_scale, layer.lora_b.get_value().dtype))
    return unet
  scales = {}
  for module, (a, _) in factors.items():
    rank = a.shape[-1]
    alpha = (recorded or {}).get("alpha") or rank
    scales[module] = alpha / rank if recorded and recorded.get("rank") == rank else 1.0
  dtype = lambda m: factor_dtype or layers[m].kernel.get_value().dtype
  return wrap_layers(unet, {m: (jnp.asarray(a, dtype(m)), jnp.asarray(b / scales[m], dtype(m)))
                            for m, (a, b) in factors.items()}, scales=scales)
