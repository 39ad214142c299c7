"""A world's own models through the one trainer: objectives vae, clip, probe and t2i take steps
on ShapesWorld scenes rendered on the fly, export folders that the loaders (and diffusers /
transformers) read, and chain: the prior loads the VAE and the CLIP's text tower, the
supervised IP2P starts from the prior, and `uip2p eval shapes` scores it with the probe."""

import json
import os

import jax
import numpy as np
import pytest

from tests.trainer_setup import ROOT
from uip2p_jax import weights
from uip2p_jax.train import config as run_config
from uip2p_jax.train.loop import train

STEPS = 2


def stage_config(name: str, runs: str, **overrides):
  config = run_config.load_config(os.path.join(ROOT, "experiments", "shapes", f"{name}.py")
                                  + f":steps={STEPS}" + (f",runs={runs}" if name in (
                                      "prior", "ip2p") else ""))
  config.batch_size = 4
  config.model.preset = "tiny"  # the structure of the shapes preset, smaller: faster compiles
  config.data.num_workers = 0
  config.log_every = 1
  config.optim.warmup_steps = 1
  config.sample.every = STEPS if name == "prior" else 0  # t2i sampling; edits are eval's
  config.sample.count = 2
  config.sample.steps = 2
  for key, value in overrides.items():
    run_config.apply_override(config, f"{key}={value}")
  return config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A runs folder with every stage trained for two steps (and 16 + 6 built records)."""
  from uip2p_jax.data import shapes
  runs = str(tmp_path_factory.mktemp("shapes_runs"))
  shapes.build(os.path.join(runs, "data"), train=16, test=6, seed=0)
  results = {}
  for name in ("vae", "clip", "probe", "prior", "ip2p"):
    results[name] = train(stage_config(name, runs), os.path.join(runs, name))
  return runs, results


def test_each_objective_steps_and_logs_its_metrics(world):
  _, results = world
  expect = {"vae": ("loss_l1", "kl", "psnr"), "clip": ("accuracy_image_to_text", "logit_scale"),
            "probe": ("accuracy_label", "accuracy_scene"), "prior": ("loss_t2i",),
            "ip2p": ("loss_ip2p",)}
  for name, keys in expect.items():
    metrics = results[name].metrics
    assert np.isfinite(metrics["loss"]) and metrics["skipped_updates"] == 0, (name, metrics)
    assert set(keys) <= set(metrics), (name, sorted(metrics))


def test_exports_load_here_and_in_the_reference_libraries(world):
  import torch
  from diffusers import AutoencoderKL
  from transformers import CLIPModel
  runs, _ = world
  vae_dir, clip_dir = f"{runs}/vae/export/vae", f"{runs}/clip/export/clip"
  # The VAE records its measured latent scale; ours and diffusers' decode alike.
  config = json.load(open(os.path.join(vae_dir, "config.json")))
  assert config["scaling_factor"] != 0.18215 and config["block_out_channels"] == [16, 16, 32, 32]
  ours = weights.load_vae(vae_dir, subfolder=None)
  theirs = AutoencoderKL.from_pretrained(vae_dir).eval()
  latents = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    reference = theirs.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
  np.testing.assert_allclose(np.asarray(ours.decode(latents)),
                             reference.numpy().transpose(0, 2, 3, 1), atol=2e-4)
  # The CLIP is a transformers CLIPModel folder: text features agree.
  clip = weights.load_clip(clip_dir)
  reference_clip = CLIPModel.from_pretrained(clip_dir).eval()
  ids = np.asarray([[49406, 320, 1449, 49407] + [49407] * 73], np.int32)
  with torch.no_grad():
    reference_text = reference_clip.get_text_features(input_ids=torch.from_numpy(ids).long())
  reference_text = getattr(reference_text, "pooler_output", reference_text).numpy()
  np.testing.assert_allclose(np.asarray(clip.get_text_features(ids)), reference_text, atol=2e-4)
  # The prior is a full SD pipeline whose text encoder is the CLIP's text tower.
  prior = f"{runs}/prior/export"
  assert sorted(os.listdir(prior)) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
  text_encoder = weights.load_text_encoder(prior)
  np.testing.assert_array_equal(
      np.asarray(text_encoder.embeddings.token_embedding.embedding[...]),
      np.asarray(clip.text_model.embeddings.token_embedding.embedding[...]))
  assert weights.load_unet(prior).config.in_channels == 4
  assert weights.load_unet(f"{runs}/ip2p/export").config.in_channels == 8
  assert os.path.isfile(f"{runs}/prior/samples/step_{STEPS:07d}.png")
  assert weights.load_probe(f"{runs}/probe/export/probe").config.classes


def test_eval_shapes_scores_the_chain_and_the_baselines(world, tmp_path, capsys):
  from uip2p_jax.cli import main
  runs, _ = world
  samplers = {"shapes-ip2p": "ddim", "shapes-sdedit": "euler"}  # one compile each either way
  for model in ("identity", "shapes-ip2p", "shapes-sdedit"):
    out = tmp_path / model
    sampler = ["--sampler", samplers[model]] if model in samplers else []
    assert main(["eval", "shapes", "--data", f"{runs}/data", "--out", str(out), "--model", model,
                 "--world", runs, "--steps", "2", "--batch-size", "6", *sampler]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["settings"].get("sampler") == samplers.get(model), summary["settings"]
    if model == "shapes-ip2p":  # a run's export: the step it was taken at, for shapes-plot
      trained = json.load(open(f"{runs}/ip2p/export/uip2p_training.json"))["step"]
      assert summary["settings"]["train_step"] == trained > 0
    for key in ("edit_accuracy", "preservation", "l1", "l2", "clip_i", "clip_t"):
      assert np.isfinite(summary[key]), (model, key)
    assert summary["count"] == 6 and len(os.listdir(out / "edits")) == 6
    assert (out / "grid.png").is_file() and (out / "scores.csv").is_file()
  identity = json.load(open(tmp_path / "identity" / "summary.json"))
  assert identity["l1"] > 0 and identity["clip_i"] <= 1.0 + 1e-5
  assert main(["eval", "shapes-compare", str(tmp_path / "identity"),
               str(tmp_path / "shapes-ip2p")]) == 0
  assert "| identity |" in capsys.readouterr().out


def test_objective_data_kinds_are_checked():
  config = stage_config("probe", "unused")
  config.data.kind = "captions"
  with pytest.raises(run_config.ConfigError, match="probe.*'world'"):
    run_config.check(config)
  config = stage_config("vae", "unused", final_edit=True)
  with pytest.raises(run_config.ConfigError, match="final_edit"):
    run_config.check(config)


def test_ship_shares_parts_in_float16_and_loads_as_pipelines(world, tmp_path):
  from uip2p_jax.pipeline import EditPipeline
  from uip2p_jax.shapes_models import ship
  runs, _ = world
  out = str(tmp_path / "shipped")
  ship.ship(runs, ["prior", "ip2p"], out=out)
  assert sorted(os.listdir(out)) == ["MODELS.md", "clip", "ip2p", "prior", "probe", "scheduler",
                                     "tokenizer", "vae"]
  pipe = EditPipeline.from_pretrained(os.path.join(out, "ip2p"))
  # Each model samples with its own prediction type: a v-prediction UNet gets its own
  # scheduler/ (the shared one is the preset's epsilon schedule).
  from uip2p_jax.schedules import NoiseSchedule
  exported = NoiseSchedule.from_folder(f"{runs}/ip2p/export/scheduler")
  assert pipe.schedule.prediction_type == exported.prediction_type
  assert sorted(os.listdir(os.path.join(out, "ip2p"))) == sorted(
      ["components.json", "unet"] + (["scheduler"] if exported.prediction_type == "v_prediction"
                                     else []))
  assert pipe.schedule.clip_sample is False
  original = weights.load_unet(f"{runs}/ip2p/export")
  shipped, reference = weights.module_tensors(pipe.unet), weights.module_tensors(original)
  for key, value in reference.items():
    np.testing.assert_allclose(shipped[key], value.astype(np.float16).astype(np.float32))
  assert "| ip2p | 2 |" in open(os.path.join(out, "MODELS.md")).read()
  # A pipeline whose parts are not the world's is refused, nothing written.
  other = str(tmp_path / "other")
  import shutil
  for stage in ("clip", "probe", "ip2p"):
    shutil.copytree(f"{runs}/{stage}/export", f"{other}/{stage}/export")
  shutil.copytree(f"{runs}/prior/export/vae", f"{other}/vae/export/vae")  # untrained: not shared
  config = json.load(open(f"{other}/vae/export/vae/config.json"))
  config["scaling_factor"] = 1.0
  json.dump(config, open(f"{other}/vae/export/vae/config.json", "w"))
  tensors = weights.read_tensors([f"{other}/vae/export/vae/diffusion_pytorch_model.safetensors"])
  from safetensors.numpy import save_file
  save_file({k: v + 1 for k, v in tensors.items()},
            f"{other}/vae/export/vae/diffusion_pytorch_model.safetensors")
  with pytest.raises(ValueError, match="cannot share"):
    ship.ship(other, ["ip2p"], out=str(tmp_path / "refused"))
  assert not os.path.exists(tmp_path / "refused")
  # Shipping a subset would leave the others pointing at new shared parts: refused.
  with pytest.raises(ValueError, match="holds prior"):
    ship.ship(runs, ["ip2p"], out=out)

  # One more model beside the shipped ones, from its run alone (here the IP2P run, as cec).
  shutil.copytree(f"{runs}/ip2p/export", f"{other}/cec/export")
  shutil.copy(f"{runs}/ip2p/metrics.jsonl", f"{other}/cec/metrics.jsonl")
  total = ship.add(other, "cec", out=out)
  assert total == sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out)
                      for f in files if d != out)  # the models' folders
  record = open(os.path.join(out, "MODELS.md")).read()
  assert all(f"| {stage} | 2 |" in record for stage in ("vae", "clip", "probe", "prior", "ip2p"))
  assert record.count("| cec | 2 |") == 1
  assert f"total {total / 2**20:.1f} MiB" in record
  shipped_cec = EditPipeline.from_pretrained(os.path.join(out, "cec"))
  assert shipped_cec.schedule.prediction_type == exported.prediction_type
  assert ship.add(other, "cec", out=out) == total  # again: replaced, not added twice
  assert open(os.path.join(out, "MODELS.md")).read().count("| cec |") == 1
  # Refused, the package unchanged: over the budget; a VAE that is not the package's.
  before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(out) for f in files}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ship, "LIMIT_BYTES", total - 1)
    with pytest.raises(ValueError, match="would take"):
      ship.add(other, "cec", out=out)
  shutil.rmtree(f"{other}/cec/export/vae")
  shutil.copytree(f"{other}/vae/export/vae", f"{other}/cec/export/vae")
  with pytest.raises(ValueError, match="cannot share"):
    ship.add(other, "cec", out=out)
  with pytest.raises(ValueError, match="not a ShapesWorld pipeline stage"):
    ship.add(other, "clip", out=out)
  assert {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(out) for f in files} == before


def test_latent_cache_serves_the_encoders_posterior_and_is_reused(world):
  """The IP2P stage (data.cache_latents on) saved its posteriors; building again reads them;
  they are the VAE's encoding of the loader's images (what `cycle.image_posterior` then
  samples, as it samples the encoder's)."""
  from uip2p_jax.data.loader import Loader
  from uip2p_jax.model_set import build_models
  from uip2p_jax.train import latent_cache
  from uip2p_jax.train.step import split_models
  runs, _ = world
  config = stage_config("ip2p", runs)
  assert config.data.cache_latents
  models = build_models(**run_config.model_kwargs(config))
  graphs, _, frozen = split_models(models, "ip2p")
  loader_config = run_config.loader_config(config, os.path.join(runs, "data"))
  lines = []
  cache = latent_cache.build(loader_config, "ip2p", graphs["vae"], frozen["vae"],
                             os.path.join(runs, "ip2p", "latent_cache"), log=lines.append)
  assert "read from" in lines[0] and len(cache) == 16, lines
  # Other scenes under the same record ids (another seed) are another cache, never this one.
  from uip2p_jax.data import builders, shapes
  other = os.path.join(runs, "data_seed1")
  shapes.build(other, train=16, test=2, seed=1)
  fingerprints = set()
  for data_dir in (os.path.join(runs, "data"), other):
    source, _ = builders.open_split(data_dir, "ip2p")
    ids, digest = latent_cache._scan(source, ("image", "edited_image"), 64)
    fingerprints.add(latent_cache._fingerprint(digest, frozen["vae"]))
  assert len(fingerprints) == 2
  # Benchmarks' synthetic batches take the run's fields and shapes too.
  from uip2p_jax import sharding as shd
  from uip2p_jax.train.step import latent_shape, run_batch_fields, synthetic_batch
  synthetic = synthetic_batch(config, 4, shd.batch_sharding(shd.make_mesh(1, 1)),
                              latents=latent_shape(graphs, frozen, 64))
  assert set(synthetic) == set(run_batch_fields(config))
  assert synthetic["image_latent_mean"].shape == (4, 8, 8, 4)
  batch = next(Loader(loader_config))
  cached = cache.replace_images(batch)
  assert "image" not in cached and cached["edited_image_latent_logvar"].shape == (4, 8, 8, 4)
  vae = models.vae
  for field in ("image", "edited_image"):
    posterior = vae.encode(batch[field])
    np.testing.assert_allclose(cached[f"{field}_latent_mean"], posterior.mean, atol=1e-5)
    np.testing.assert_allclose(cached[f"{field}_latent_logvar"], posterior.logvar, atol=1e-5)


def test_latent_cache_refuses_what_it_cannot_serve(world):
  from uip2p_jax.model_set import build_models
  from uip2p_jax.train import latent_cache
  from uip2p_jax.train.step import split_models
  runs, _ = world
  with pytest.raises(run_config.ConfigError, match="data.flip=True"):
    run_config.check(stage_config("ip2p", runs, **{"data.flip": True}))
  with pytest.raises(run_config.ConfigError, match="rendered world"):
    run_config.check(stage_config("prior", runs, **{"data.cache_latents": True}))
  config = stage_config("ip2p", runs, **{"data.resolution": 32})  # the records are 64 px
  graphs, _, frozen = split_models(build_models(**run_config.model_kwargs(config)), "ip2p")
  with pytest.raises(ValueError, match="record shapes-train-.*'s image is 64x64; .* 32x32"):
    latent_cache.build(run_config.loader_config(config, os.path.join(runs, "data")), "ip2p",
                       graphs["vae"], frozen["vae"], os.path.join(runs, "unused"))


def test_shapes_configs_start_from_the_shipped_models_when_asked():
  from uip2p_jax import shapes_models
  shipped = shapes_models.paths()
  load = lambda name, arg: run_config.load_config(  # noqa: E731
      os.path.join(ROOT, "experiments", "shapes", f"{name}.py") + ":" + arg)
  cec = load("cec", "init=prior,models=shipped,runs=R")
  assert (cec.model.init_from_sd, cec.model.clip, cec.data.dir) == (
      shipped["prior"], shipped["clip"], "R/data")
  assert load("cec", "init=recolour,models=shipped").model.pretrained == shipped["ip2p_recolour"]
  ip2p = load("ip2p", "kinds=recolour,models=shipped,runs=R")
  assert (ip2p.model.init_from_sd, ip2p.data.dir) == (shipped["prior"], "R/data_recolour")
  for folder in (shipped["prior"], shipped["ip2p"]):
    assert os.path.isfile(os.path.join(folder, "unet", "config.json")), folder
  assert load("cec", "runs=R").model.init_from_sd == "R/prior/export"  # the default: runs
  with pytest.raises(Exception, match="models='hub'"):
    load("cec", "models=hub")


def test_an_export_from_a_shipped_model_stands_alone(tmp_path):
  """A run started from a shipped model (models=shipped) exports whole parts, not the package's
  components.json, whose relative paths would point nowhere from the run's folder."""
  from uip2p_jax.schedules import NoiseSchedule
  from uip2p_jax.shapes_models import paths
  from uip2p_jax.train.samples import copy_base_parts
  for stage, prediction in (("prior", "epsilon"), ("ip2p", "v_prediction")):
    out = str(tmp_path / stage)
    copy_base_parts(paths()[stage], out)
    assert sorted(os.listdir(out)) == ["scheduler", "text_encoder", "tokenizer", "vae"], stage
    assert NoiseSchedule.from_folder(os.path.join(out, "scheduler")).prediction_type == prediction
    shipped_vae = weights.load_vae(paths()[stage])
    exported_vae = weights.load_vae(out)
    for key, value in weights.module_tensors(shipped_vae).items():
      np.testing.assert_array_equal(weights.module_tensors(exported_vae)[key], value)
    assert weights.load_text_encoder(out).config.hidden_size > 0
