"""The model card (README.md) of an exported edit model, and uploading the export to the Hub.

A run's export (`train.samples.export`) writes `uip2p_training.json` (the config, the step, the
data, the source commit) and, from it, `README.md`: YAML front matter the Hugging Face Hub
reads (license, library_name, tags, base_model, pipeline_tag), what was trained (base model,
objective, losses and their weights, data, steps, LoRA settings), the evaluation tables of
`uip2p eval` results found beside the export (`summary.json` + `summary.md` in the export folder
or in a folder next to it, e.g. runs/NAME/eval_magicbrush), and the commands to edit with it.

    uip2p export card runs/NAME/export                        # rewrite the card (new evals)
    uip2p export card runs/NAME/export --push-to-hub USER/NAME  # and upload the folder

The upload uses huggingface_hub's own login (`hf auth login` or HF_TOKEN). Without network (or
with HF_HUB_OFFLINE=1) it fails with a `PushError` saying so; the weights are left as they were,
but README.md has already been rewritten for the repo (its commands name OWNER/NAME): run
`uip2p export card EXPORT` to write the local card again.
"""

from __future__ import annotations

import json
import os
import re

from uip2p_jax import storage

TRAINING_FILE = "uip2p_training.json"
CARD_FILE = "README.md"
# Licenses of the base models the experiments start from (the Hub's license identifiers).
BASE_LICENSES = {"timbrooks/instruct-pix2pix": "mit",
                 "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                 "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m"}
EDIT_OBJECTIVES = ("cec", "ip2p")


class PushError(ValueError):
  """The upload to the Hub failed (no network, no login, no permission): the message says which."""


def is_hub_id(name: str) -> bool:
  """'owner/name' that is not a local path: what the Hub's base_model field takes."""
  return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not os.path.exists(name)


def training_record(config, step: int, workdir: str) -> dict:
  """What the card is written from: the run's config, its step, its data and source commit."""
  record = {"config": json.loads(config.to_json_best_effort()), "step": int(step)}
  provenance = os.path.join(workdir, "provenance.jsonl")
  if storage.isfile(provenance):
    lines = [json.loads(line) for line in storage.read_text(provenance).splitlines()
             if line.strip()]
    if lines:
      record["commit"] = lines[-1].get("commit")
  if config.data.kind != "world":  # a rendered world has no records to count
    from uip2p_jax.data import builders
    from uip2p_jax.train.config import run_data_dir
    try:  # the number of training records, when the dataset the run read is readable here
      _, info = builders.open_split(run_data_dir(config, workdir), config.data.kind)
      record["data"] = {"records": int(sum(s.num_examples for s in info.splits.values())),
                        "source": (info.metadata or {}).get("source")}
    except (FileNotFoundError, ValueError, KeyError):  # moved, another kind, no such split:
      pass  # the card says what the config says
  return record


def write_training_record(export_dir: str, config, step: int, workdir: str) -> str:
  path = os.path.join(export_dir, TRAINING_FILE)
  storage.write_text_atomic(path, json.dumps(training_record(config, step, workdir), indent=2))
  return path


def eval_summaries(export_dir: str) -> list[tuple[str, str]]:
  """[(folder, summary.md text)] of `uip2p eval` results in the export folder or a folder
  beside it (a summary.json with its summary.md), sorted by folder."""
  export_dir = storage.absolute(export_dir)
  parent = os.path.dirname(export_dir)
  beside = storage.listdir(parent) if storage.isdir(parent) else []
  candidates = [export_dir] + sorted(os.path.join(parent, name) for name in beside
                                     if not name.startswith("."))  # as glob's "*"
  found = []
  for folder in candidates:
    markdown = os.path.join(folder, "summary.md")
    if storage.isfile(os.path.join(folder, "summary.json")) and storage.isfile(markdown):
      found.append((folder, storage.read_text(markdown)))
  return found


def _front_matter(fields: dict) -> str:
  lines = ["---"]
  for key, value in fields.items():
    if isinstance(value, list):
      lines.append(f"{key}:")
      lines += [f"- {item}" for item in value]
    else:
      lines.append(f"{key}: {value}")
  return "\n".join(lines + ["---", ""])


def _losses(config: dict) -> str:
  if config["objective"] == "cec":
    loss, cycle = config["loss"], config["cycle"]
    from uip2p_jax.cycle import LOSS_NAMES  # here: the CLI and data workers import no jax
    # .get: exports made before L_keep existed have no "keep" weight
    terms = " + ".join(f"{loss[k]:g} L_{k}" for k in LOSS_NAMES if loss.get(k, 0))
    reference = loss.get("clip_reference", "input")  # absent from older exports: the input
    return (f"Cycle Edit Consistency (UIP2P): {terms} (L_recon {loss['recon_kind']}, L_sim "
            f"{loss['sim_kind']}, L_clip from the {reference.replace('_', ' ')}); "
            f"{cycle['num_steps_min']}-{cycle['num_steps_max']} denoising "
            f"steps per edit, start {cycle['start']}")
  target = ("v-prediction" if config["model"].get("prediction_type") == "v_prediction"
            else "noise-prediction")  # auto: the base's type, not in the record (epsilon so far)
  return (f"supervised InstructPix2Pix: {target} MSE on the edited image, conditioning "
          f"dropout {config['ip2p']['conditioning_dropout']:g}")


def render_card(record: dict, export_dir: str, repo_id: str | None = None,
                license_id: str | None = None) -> str:
  """README.md text of an export from its training record (see the module docstring)."""
  config = record["config"]
  model = config["model"]
  base = model.get("pretrained") or model.get("init_from_sd") or ""
  lora = config["lora"]
  use_lora = lora["rank"] > 0
  objective = config["objective"]
  fields = {"license": license_id or BASE_LICENSES.get(base, "other"),
            "library_name": "diffusers"}
  if is_hub_id(base):
    fields["base_model"] = base
  fields["pipeline_tag"] = "image-to-image"
  fields["tags"] = ["image-editing", "instruct-pix2pix", "uip2p", "jax", "flax"] + (
      ["lora"] if use_lora else [])
  ref = repo_id or storage.absolute(export_dir)
  name = repo_id.split("/")[-1] if repo_id else os.path.basename(
      os.path.dirname(storage.absolute(export_dir)))
  title = {"cec": "UIP2P (Cycle Edit Consistency)", "ip2p": "InstructPix2Pix"}.get(
      objective, objective)
  optim = config["optim"]
  data = record.get("data", {})
  records = f", {data['records']} records" if data.get("records") else ""
  source = f" (built from {data['source']})" if data.get("source") else ""
  rows = [
      ("base model", f"`{base}`" if base else f"random `{model['preset']}` preset (no base)"),
      ("objective", f"`{objective}`: {_losses(config)}"),
      ("data", f"`{config['data']['dir']}` ({config['data']['kind']}{records}){source}, "
               f"{config['data']['resolution']} px"),
      ("steps", f"{record['step']} of {config['total_steps']}, global batch "
                f"{config['batch_size']} x {optim['accumulate']} accumulated"),
      ("optimizer", f"{optim['name']}, lr {optim['lr']:g} ({optim['schedule']}, warm-up "
                    f"{optim['warmup_steps']}), weight decay {optim['weight_decay']:g}"),
      ("EMA", f"decay {config['ema_decay']:g} ({config['ema_dtype']})"
              if config["ema_decay"] else "none (the trained weights)"),
      ("LoRA", f"rank {lora['rank']}, alpha {lora['alpha'] or lora['rank']:g}, targets "
               f"{lora['targets']}, dropout {lora['dropout']:g}; `unet/` is the merged UNet, "
               "`lora/` the factors" if use_lora else "none (full fine-tuning)"),
      ("precision", f"{model['compute_dtype']} compute, float32 master weights, "
                    f"{model['frozen_dtype']} frozen models"),
  ]
  if record.get("commit"):
    rows.append(("source", f"uip2p_jax commit `{record['commit'][:12]}`"))
  lines = [_front_matter(fields), f"# {name}", "",
           f"An instruction-based image editing model ({title}) trained with uip2p_jax (JAX / "
           "Flax NNX). The folder is a diffusers `StableDiffusionInstructPix2PixPipeline`.", "",
           "## Training", "", "| | |", "|---|---|"]
  lines += [f"| {key} | {value} |" for key, value in rows]
  summaries = eval_summaries(export_dir)
  lines += ["", "## Evaluation", ""]
  if summaries:
    for folder, text in summaries:
      lines += [re.sub(r"^#+ ", "### ", text.strip(), flags=re.M), "",
                f"(`uip2p eval` results in `{os.path.basename(folder)}`)", ""]
  else:
    lines += ["Not evaluated yet: `uip2p eval magicbrush --model EXPORT --out "
              "runs/NAME/eval_magicbrush`, then `uip2p export card EXPORT` adds the table.", ""]
  lines += ["## Editing with it", "", "```bash",
            f"uip2p edit --model {ref} --image photo.jpg --instruction \"make it snowy\" "
            "--out edited.png", "```", "", "```python",
            "from uip2p_jax.pipeline import EditPipeline",
            f"pipe = EditPipeline.from_pretrained(\"{ref}\")",
            "edited = pipe.edit(\"photo.jpg\", \"make it snowy\", steps=20)  # a PIL image",
            "```", "", "With diffusers (PyTorch):", "", "```python",
            "from diffusers import StableDiffusionInstructPix2PixPipeline",
            "from PIL import Image"]
  if use_lora and base:
    lines += [f"pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(\"{base}\")",
              f"pipe.load_lora_weights(\"{ref}\", subfolder=\"lora\",",
              "                        weight_name=\"pytorch_lora_weights.safetensors\")"
              f"  # or load {ref} whole (merged)"]
  else:
    lines.append(f"pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(\"{ref}\")")
  lines += ["edited = pipe(\"make it snowy\", image=Image.open(\"photo.jpg\"), "
            "num_inference_steps=20,", "             image_guidance_scale=1.5, "
            "guidance_scale=7.5).images[0]", "```", ""]
  return "\n".join(lines)


def write_card(export_dir: str, repo_id: str | None = None,
               license_id: str | None = None) -> str:
  """(Re)writes export_dir/README.md from its training record; returns its path."""
  path = os.path.join(export_dir, TRAINING_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f"{export_dir}: no {TRAINING_FILE} (expected the export folder of a "
                            "`uip2p train` run of objective cec or ip2p)")
  record = json.loads(storage.read_text(path))
  card = os.path.join(export_dir, CARD_FILE)
  storage.write_text_atomic(card, render_card(record, export_dir, repo_id, license_id))
  return card


def push_to_hub(export_dir: str, repo_id: str, private: bool = False,
                license_id: str | None = None) -> str:
  """Uploads the export folder (its card rewritten for `repo_id`) to the model repo `repo_id`
  (created if missing); returns the repo's URL. Raises PushError naming the cause."""
  from huggingface_hub import HfApi, constants
  from huggingface_hub.errors import HfHubHTTPError
  if not is_hub_id(repo_id):
    raise PushError(f"--push-to-hub {repo_id!r}: expected a Hub repo id OWNER/NAME")
  if storage.is_remote(export_dir):  # huggingface_hub uploads local folders only
    raise PushError(f"--push-to-hub: {export_dir} is in a bucket; copy it to a local folder "
                    "first (gcloud storage cp -r) and push that")
  write_card(export_dir, repo_id, license_id)
  api = HfApi()
  try:
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=export_dir,
                      commit_message="Upload an edit model exported by uip2p_jax")
  except HfHubHTTPError as e:
    status = getattr(e.response, "status_code", None)
    hint = (" (log in with `hf auth login` or set HF_TOKEN, with write access to the repo)"
            if status in (401, 403) else "")
    raise PushError(f"the Hub refused the upload of {export_dir} to {repo_id}: {e}{hint}"
                    ) from None
  except Exception as e:  # no network: OfflineModeIsEnabled, httpx connect / timeout errors
    names = " ".join(cls.__name__ for cls in type(e).__mro__)
    if not re.search(r"Offline|Connect|Timeout|Network|Transport", names):
      raise
    raise PushError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to push "
                    f"{export_dir} to {repo_id} ({type(e).__name__}: {e}); the export and its "
                    "card are complete: push again where the network is reachable") from None
  return str(url)
