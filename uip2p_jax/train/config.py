"""Experiment configs: loading `FILE.py[:ARGS]`, `--config.key=value` overrides, the command
line of `uip2p train`, and the translation of a ConfigDict into what the code takes
(CycleConfig, LossConfig, LoaderConfig, `build_models` arguments).

Every mistake here is a one-line error naming the file or key and the expected form, raised
before anything is written to the workdir.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys

import ml_collections

from uip2p_jax import storage
from uip2p_jax.cycle import CycleConfig, LossConfig


class ConfigError(ValueError):
  """A config file, argument or key that is wrong (the message says what was expected)."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``FILE.py[:ARGS]`` -> ``get_config(ARGS)``. The file may `import common` (the shared
  schema beside it, experiments/common.py)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"experiment config {path!r} not found (expected FILE.py[:ARGS], e.g. "
                      "experiments/uip2p.py:data=cc3m)")
  folder = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, folder)
  sys.modules.pop("common", None)  # the `common` beside this file, not another folder's
  try:
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"experiment config {path!r} has no get_config(arg) function")
    try:
      config = module.get_config(arg or None)
    except (KeyError, ValueError) as e:
      message = e.args[0] if e.args else str(e)
      raise ConfigError(f"{spec}: {message}") from None
  finally:
    sys.path.remove(folder)
    sys.modules.pop("common", None)
  return config


def _parse_value(text: str, current, key: str):
  """The command-line text of `key` as the type of its current value."""
  try:
    if isinstance(current, bool):
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0"):
        raise ValueError
      return lowered in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__} "
                      f"(the current value is {current!r})") from None


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """``"a.b=value"`` sets config.a.b, parsed as the type it has; unknown keys are an error."""
  key, sep, text = assignment.partition("=")
  if not sep:
    raise ConfigError(f"--config.{assignment}: expected --config.KEY=VALUE")
  node = config
  *parents, leaf = key.split(".")
  for depth, name in enumerate(parents):
    if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
      where = ".".join(parents[:depth]) or "config"
      sections = sorted(k for k in node if isinstance(node[k], ml_collections.ConfigDict))
      raise ConfigError(f"--config.{key}: {where} has no section {name!r} (sections: {sections})")
    node = node[name]
  if leaf not in node:
    where = ".".join(parents) or "config"
    raise ConfigError(f"--config.{key}: {where} has no key {leaf!r} (keys: {sorted(node.keys())})")
  with node.unlocked():
    node[leaf] = _parse_value(text, node[leaf], key)


@dataclasses.dataclass
class Command:
  """`uip2p train`'s arguments."""
  config: ml_collections.ConfigDict
  config_spec: str
  workdir: str


USAGE = ("usage: uip2p train --config FILE.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...] "
         "[--config.checkpoint.strict_resume=true]")


def parse_command_line(argv: list[str]) -> Command:
  """`--config FILE.py[:ARGS] --workdir DIR [--config.key=value ...]` (also `--flag=value`).
  Checks the config file, every key and the workdir before anything is created."""
  spec = workdir = None
  overrides = []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, sep, value = arg.partition("=")
    if name in ("--config", "--workdir") and not sep:
      if not args:
        raise ConfigError(f"{name} needs a value; {USAGE}")
      value = args.pop(0)
    if name == "--config":
      spec = value
    elif name == "--workdir":
      workdir = value
    elif name.startswith("--config."):
      if not sep:
        if not args:
          raise ConfigError(f"{name} needs a value; {USAGE}")
        value = args.pop(0)
      overrides.append(f"{name[len('--config.'):]}={value}")
    else:
      raise ConfigError(f"unknown argument {arg!r}; {USAGE}")
  if not spec or not workdir:
    raise ConfigError(f"--config and --workdir are required; {USAGE}")
  _check_url(workdir, "--workdir")
  # (a bucket is not asked here: no request before the config is known to be right)
  if not storage.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir!r} is a file; expected a folder (created if missing)")
  config = load_config(spec)
  for assignment in overrides:
    apply_override(config, assignment)
  check(config)
  run_data_dir(config, workdir)  # (its errors too, before the run starts)
  return Command(config, spec, workdir)


def check(config) -> None:
  """Every value the run will read, checked before the workdir, the data or the weights are
  touched (what needs the devices or the model folder is checked as soon as they are known)."""
  from uip2p_jax.model_set import dtype_of
  from uip2p_jax.models.partitioning import REMAT_POLICIES
  check_objective_data(config)
  try:
    cycle_config(config)
    loss_config(config)
    pretrain_config(config)
    loader_config(config, data_dir=config.data.dir or "unset")
    for name in ("compute_dtype", "frozen_dtype"):
      dtype_of(config.model[name])
    dtype_of(config.optim.mu_dtype)
    dtype_of(config.ema_dtype)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None
  from uip2p_jax.schedules import PREDICTION_TYPES
  prediction_type = config.model.prediction_type
  if prediction_type != "auto" and prediction_type not in PREDICTION_TYPES:
    raise ConfigError(f"config.model.prediction_type={prediction_type!r}; expected 'auto' (the "
                      f"initial model's scheduler config) or one of {PREDICTION_TYPES}")
  if config.model.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat={config.model.remat!r}; expected one of "
                      f"{REMAT_POLICIES}")
  if config.optim.name not in ("adamw", "adafactor"):
    raise ConfigError(f"config.optim.name={config.optim.name!r}; expected 'adamw' or "
                      "'adafactor'")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ConfigError(f"config.ema_decay={config.ema_decay}; expected 0 (no EMA) <= decay < 1")
  if config.data.get("cache_latents", False):
    from uip2p_jax.train.latent_cache import check_cacheable
    problem = check_cacheable(config)
    if problem:
      raise ConfigError(f"config.data.cache_latents=True: {problem}")
  from uip2p_jax.train.step import LR_SCHEDULES
  if config.optim.schedule not in LR_SCHEDULES:
    raise ConfigError(f"config.optim.schedule={config.optim.schedule!r}; expected one of "
                      f"{LR_SCHEDULES}")
  if config.optim.schedule == "wsd" and not (
      config.optim.warmup_steps <= config.optim.decay_start < config.total_steps
      and config.optim.decay_steps > 0):
    raise ConfigError(
        f"config.optim.schedule='wsd' with decay_start={config.optim.decay_start}, decay_steps="
        f"{config.optim.decay_steps}; expected warmup_steps ({config.optim.warmup_steps}) <= "
        f"decay_start < total_steps ({config.total_steps}) and decay_steps > 0 (the lr is held "
        "until decay_start, then decays over decay_steps)")
  if not 0.0 <= config.ip2p.conditioning_dropout <= 1.0 / 3.0:
    raise ConfigError(f"config.ip2p.conditioning_dropout={config.ip2p.conditioning_dropout}; "
                      "expected a probability in [0, 1/3] (text, both and image each dropped "
                      "with it)")
  from uip2p_jax.cycle import IP2P_LOSS_WEIGHTINGS
  if config.ip2p.loss_weighting not in IP2P_LOSS_WEIGHTINGS:
    raise ConfigError(f"config.ip2p.loss_weighting={config.ip2p.loss_weighting!r}; expected one "
                      f"of {IP2P_LOSS_WEIGHTINGS}")
  if config.objective == "ip2p" and prediction_type != "auto":  # ("auto": once the model is read)
    from uip2p_jax.cycle import check_ip2p_loss_weighting
    try:
      check_ip2p_loss_weighting(config.ip2p.loss_weighting, prediction_type)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  multiplier = config.optim.get("image_channels_lr_multiplier", 1.0)
  if multiplier <= 0:
    raise ConfigError(f"config.optim.image_channels_lr_multiplier={multiplier}; expected > 0 "
                      "(1: conv_in's image channels learn as every weight)")
  if multiplier != 1.0 and config.objective not in ("ip2p", "cec"):
    raise ConfigError(f"config.optim.image_channels_lr_multiplier={multiplier} with objective "
                      f"{config.objective!r}: only an edit UNet (ip2p, cec) has image channels")
  if config.ip2p.edit_region_weight < 0:
    raise ConfigError(f"config.ip2p.edit_region_weight={config.ip2p.edit_region_weight}; "
                      "expected >= 0 (0: IP2P's loss, every position alike)")
  if config.ip2p.noise_offset < 0:
    raise ConfigError(f"config.ip2p.noise_offset={config.ip2p.noise_offset}; expected >= 0 (the "
                      "std of the per-channel constant added to the noise)")
  for key, low in (("batch_size", 1), ("total_steps", 0), ("log_every", 1),
                   ("optim.accumulate", 1), ("checkpoint.every", 1), ("checkpoint.keep", 1)):
    section, _, leaf = key.rpartition(".")
    value = (config[section] if section else config)[leaf]
    if value < low:
      raise ConfigError(f"config.{key}={value}; expected >= {low}")
  if lora_config(config) and not config.model.pretrained and (
      config.model.preset not in LORA_RANDOM_BASE_PRESETS):
    raise ConfigError(
        f"config.lora.rank={config.lora.rank} with no config.model.pretrained: the base UNet "
        f"would be the {config.model.preset!r} preset's random weights, and LoRA trains "
        "adapters on a frozen base. Give the model to adapt (config.model.pretrained=FOLDER or "
        "Hub id, e.g. timbrooks/instruct-pix2pix), or set config.lora.rank=0 to train the "
        f"whole UNet (random bases are for the test presets {LORA_RANDOM_BASE_PRESETS})")
  if config.export_every < 0 or (config.export_every and not config.export):
    raise ConfigError(f"config.export_every={config.export_every} with config.export="
                      f"{config.export}; expected 0 (only the final export) or N > 0 with "
                      "export True (a snapshot export at every Nth step too)")
  if config.final_edit and config.objective not in ("cec", "ip2p"):
    raise ConfigError(f"config.final_edit=True edits an image; objective {config.objective!r} "
                      "trains no edit model (set it False)")
  if config.sample.count < 0 or (config.final_edit and config.sample.count < 1):
    raise ConfigError(f"config.sample.count={config.sample.count}: the records held out for "
                      "samples; expected >= 0, and >= 1 with config.final_edit (it edits one)")
  if (config.sample.every > 0 and config.sample.count < 1
      and config.objective in SAMPLE_OBJECTIVES):
    raise ConfigError(f"config.sample.count={config.sample.count} with config.sample.every="
                      f"{config.sample.every}: the sample grids are drawn from the held-out "
                      "records; expected sample.count >= 1, or sample.every=0 (no grids)")
  profile_range(config.profile_steps)
  _check_url(config.data.dir, "config.data.dir")


def _check_url(path: str, what: str) -> None:
  """A URL (gs://BUCKET/run) is read and written through etils.epath: refused by name when its
  scheme is unknown or its filesystem library (gcsfs for gs://) is not installed."""
  problem = storage.url_problem(path)
  if problem:
    raise ConfigError(f"{what}={path!r}: {problem}")


def _check_local(path: str, what: str) -> None:
  """Files read by libraries that open local paths only (safetensors): a URL is refused by name
  (opened as a local path it would be ./gs:/b/...)."""
  if storage.is_remote(path):
    raise ConfigError(f"{what}={path!r}: a URL is not read here; copy the file to a local "
                      "folder (or a mounted bucket) and give that path")


def profile_range(spec: str) -> tuple[int, int] | None:
  """config.profile_steps "START,COUNT" -> (START, START + COUNT); "" -> None."""
  if not spec:
    return None
  try:
    start, count = (int(part) for part in spec.split(","))
  except ValueError:
    raise ConfigError(f"config.profile_steps={spec!r}: expected 'START,COUNT' (e.g. '10,5')"
                      ) from None
  if start < 0 or count < 1:
    raise ConfigError(f"config.profile_steps={spec!r}: need START >= 0 and COUNT >= 1")
  return start, start + count


# ---------------------------------------------------------------------------------------------
# ConfigDict -> what the code takes

def _dataclass_from(cls, section: ml_collections.ConfigDict, name: str):
  fields = {f.name for f in dataclasses.fields(cls)}
  values = section.to_dict()
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"config.{name} has keys {unknown} that {cls.__name__} does not take "
                      f"(it takes {sorted(fields)})")
  return cls(**values)


def cycle_config(config) -> CycleConfig:
  return _dataclass_from(CycleConfig, config.cycle, "cycle")


def loss_config(config) -> LossConfig:
  return _dataclass_from(LossConfig, config.loss, "loss")


def pretrain_config(config):
  from uip2p_jax.pretraining import PretrainConfig
  return _dataclass_from(PretrainConfig, config.pretrain, "pretrain")


# The objectives whose trained module is a UNet, which LoRA can adapt.
LORA_OBJECTIVES = ("cec", "ip2p", "t2i")
# Presets whose random UNet LoRA may adapt without config.model.pretrained: the smoke / test
# preset (sd15 and the ShapesWorld preset are real models, adapted only once trained). Checked
# by `check`, not `lora_config`: planning (plan.planned_config) drops the checkpoint on purpose.
LORA_RANDOM_BASE_PRESETS = ("tiny",)


def lora_config(config):
  """config.lora -> a `models.lora.LoRAConfig`, or None when lora.rank is 0 (full
  fine-tuning). Raises ConfigError naming the key for a value the run cannot use."""
  from uip2p_jax.models.lora import LoRAConfig
  lora = config.lora
  if lora.rank == 0:
    if lora.init_from:
      raise ConfigError(f"config.lora.init_from={lora.init_from!r} needs config.lora.rank > 0")
    return None
  if config.objective not in LORA_OBJECTIVES:
    raise ConfigError(f"config.lora.rank={lora.rank}: LoRA adapts the UNet; objective "
                      f"{config.objective!r} trains no UNet (expected one of {LORA_OBJECTIVES})")
  if config.model.init_from_sd:
    raise ConfigError("config.lora.rank > 0 with config.model.init_from_sd: LoRA freezes the "
                      "base UNet, and init_from_sd's image channels start at zero, so they would "
                      "stay zero. Start LoRA from an edit UNet (config.model.pretrained)")
  targets = tuple(t.strip() for t in lora.targets.split(",") if t.strip())
  result = LoRAConfig(rank=lora.rank, alpha=float(lora.alpha), dropout=float(lora.dropout),
                      targets=targets)
  try:
    result.validate()
  except ValueError as e:
    raise ConfigError(f"config.lora: {e}") from None
  if lora.init_from:
    _check_local(lora.init_from, "config.lora.init_from")
    if not os.path.exists(lora.init_from):
      raise ConfigError(f"config.lora.init_from={lora.init_from!r}: no such file (expected a "
                        "pytorch_lora_weights.safetensors or the folder holding one)")
  return result


def model_kwargs(config, abstract: bool = False) -> dict:
  """`model_set.build_models` arguments of a run (float32 master weights for the UNet)."""
  m = config.model
  return dict(preset=m.preset, pretrained=m.pretrained, init_from_sd=m.init_from_sd,
              clip=m.clip, with_clip=config.objective in ("cec", "clip"), seed=m.seed,
              compute_dtype=m.compute_dtype, unet_param_dtype="float32",
              frozen_dtype=m.frozen_dtype, attention_backend=m.attention_backend,
              remat=m.remat, abstract=abstract, vae=m.vae, text_encoder=m.text_encoder,
              unet_in_channels=4 if config.objective == "t2i" else None,
              with_probe=config.objective == "probe",
              lora=lora_config(config), lora_init=config.lora.init_from,
              prediction_type=m.prediction_type)


# The objectives that draw sample grids (and, cec / ip2p, the final edit) from held-out records.
SAMPLE_OBJECTIVES = ("cec", "ip2p", "t2i", "vae")


def sample_holdout(config) -> int:
  """The records held out of training for the sample grids: config.sample.count, whether or
  not samples are drawn this time (so the training stream does not depend on sample.every)."""
  return config.sample.count if config.objective in SAMPLE_OBJECTIVES else 0


def run_data_dir(config, workdir: str) -> str:
  """Where a run reads its dataset from: config.data.dir, or for "sample" workdir/data (built
  there by the training loop); "" for a rendered world. Builds nothing."""
  if config.data.kind == "world":
    return ""  # rendered on the fly
  if config.data.dir != "sample":
    if not config.data.dir:
      raise ConfigError("config.data.dir is empty: give a built dataset folder "
                        "(uip2p data build ... --out DIR) or 'sample'")
    return config.data.dir
  if storage.is_remote(workdir):  # every host of a pod would build it into the bucket at once
    raise ConfigError(f"config.data.dir='sample' builds the sample photos into the workdir, and "
                      f"--workdir {workdir} is a URL (shared by every host): build them once "
                      "(`uip2p data build sample --out DIR`, DIR on storage every host reads) "
                      "and give --config.data.dir=DIR")
  return os.path.join(workdir, "data")


def loader_config(config, data_dir: str, processes: int = 1):
  """The run's LoaderConfig: this process's share of the global batch, without the records
  held out for samples."""
  from uip2p_jax.data.loader import LoaderConfig
  d = config.data
  return LoaderConfig(
      data_dir, kind=d.kind, resolution=d.resolution, batch_size=config.batch_size // processes,
      seed=config.seed, num_workers=d.num_workers, min_scale=d.min_scale,
      max_scale=d.max_scale, flip=d.flip, strict=d.strict,
      tokenizer=config.model.pretrained or config.model.init_from_sd or None,
      require_reverse=config.objective == "cec", holdout=sample_holdout(config))


# The data each objective trains on: "world" is ShapesWorld rendered on the fly (no folder).
OBJECTIVE_DATA = {"cec": ("captions", "ip2p"), "ip2p": ("ip2p",), "t2i": ("world", "captions"),
                  "vae": ("world", "captions"), "clip": ("world", "captions"), "probe": ("world",)}


def check_objective_data(config) -> None:
  """The objective's data kind: supervised IP2P needs edited images (ip2p pairs), the probe
  attribute labels (the rendered world)."""
  if config.objective not in OBJECTIVE_DATA:
    raise ConfigError(f"config.objective={config.objective!r}; expected one of "
                      f"{sorted(OBJECTIVE_DATA)}")
  kinds = OBJECTIVE_DATA[config.objective]
  if config.data.kind not in kinds:
    raise ConfigError(f"config.objective={config.objective!r} trains on config.data.kind "
                      f"{' or '.join(map(repr, kinds))}, got {config.data.kind!r}")
