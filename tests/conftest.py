"""Shared fixtures: tiny random PyTorch reference models saved with `save_pretrained`.

Each fixture is session-scoped so a model is built, saved and loaded once per test run.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of small programs and run each for milliseconds: LLVM's optimisation
# passes are a large part of every compile on this 2-core CPU and change no result (XLA's CPU
# code has no fast-math), so the suite generates unoptimised code. Tests that start processes
# with more devices add their flag to these (os.environ["XLA_FLAGS"] + " --xla_force_...").
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import numpy as np
import pytest

import torch  # the PyTorch references are required: tests must not skip silently

# One config per UNet flavour the issue names; kept tiny so the suite stays fast.
UNET_CONFIGS = {
    # InstructPix2Pix-like: 8 input channels, conv projections, int head count.
    "ip2p_conv": dict(in_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    # SD2-like: 4 channels, linear projections, per-block head counts, 3 levels.
    "sd_linear": dict(in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=24, attention_head_dim=(2, 4, 8), norm_num_groups=8,
                      use_linear_projection=True),
}


def seeded(seed=0):
  torch.manual_seed(seed)
  return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def torch_unets(tmp_path_factory):
  """{name: (torch UNet, folder)} for every UNET_CONFIGS entry."""
  from diffusers import UNet2DConditionModel
  out = {}
  for name, config in UNET_CONFIGS.items():
    seeded(1)
    model = UNet2DConditionModel(sample_size=8, **config).eval()
    # diffusers zero-initialises nothing here, but make every weight clearly non-trivial.
    with torch.no_grad():
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp(f"unet_{name}")
    model.save_pretrained(folder)
    out[name] = (model, str(folder))
  return out


@pytest.fixture(scope="session")
def torch_vae(tmp_path_factory):
  from diffusers import AutoencoderKL
  seeded(2)
  model = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
  folder = tmp_path_factory.mktemp("vae")
  model.save_pretrained(folder)
  return model, str(folder)


@pytest.fixture(scope="session")
def ip2p_folder(tmp_path_factory):
  """A tiny random IP2P pipeline saved in the diffusers layout, with our offline tokenizer
  (the pipeline tests and the LoRA export's parity test)."""
  from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler,
                         StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel

  from uip2p_jax.models.presets import TINY
  from uip2p_jax.tokenizer import default_tokenizer
  seeded(7)
  unet = UNet2DConditionModel(**{k: v for k, v in TINY.unet.to_diffusers().items()
                                 if not k.startswith("_")})
  vae = AutoencoderKL(**{k: v for k, v in TINY.vae.to_diffusers().items()
                         if not k.startswith("_")})
  text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4))
  with torch.no_grad():  # random-init UNets are nearly silent; make every branch matter
    for p in unet.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                              beta_schedule="scaled_linear", steps_offset=1)
  pipe = StableDiffusionInstructPix2PixPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=default_tokenizer(), unet=unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  folder = tmp_path_factory.mktemp("ip2p")
  pipe.save_pretrained(folder)
  return pipe, str(folder)


TEXT_CONFIG = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=77, eos_token_id=999,
                   bos_token_id=998, pad_token_id=999)


@pytest.fixture(scope="session")
def torch_text_encoder(tmp_path_factory):
  from transformers import CLIPTextConfig, CLIPTextModel
  seeded(3)
  model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
  folder = tmp_path_factory.mktemp("text_encoder")
  model.save_pretrained(folder)
  return model, str(folder)


@pytest.fixture(scope="session", params=["vit_b32_like", "vit_l14_like"])
def torch_clip(request, tmp_path_factory):
  """Full CLIP models with the two vision geometries we use (patch 32 and patch 14)."""
  from transformers import CLIPConfig, CLIPModel
  vision = {
      "vit_b32_like": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=32),
      "vit_l14_like": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=6, image_size=56, patch_size=14,
                           hidden_act="gelu"),
  }[request.param]
  seeded(4)
  model = CLIPModel(CLIPConfig(text_config=TEXT_CONFIG, vision_config=vision,
                               projection_dim=16)).eval()
  folder = tmp_path_factory.mktemp(f"clip_{request.param}")
  model.save_pretrained(folder)
  return model, str(folder)


# A Gemma-2-shaped decoder: 2 layers (sliding, global), GQA 4:2, every soft-cap on.
GEMMA_CONFIG = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    query_pre_attn_scalar=8, sliding_window=8, max_position_embeddings=2048,
                    eos_token_id=[1, 6])


def tiny_gemma_tokenizer(vocab_size: int):
  """transformers' GemmaTokenizer (tokenizer.json: byte-fallback BPE, spaces as "▁") with
  merges learned from the instruct prompts; ids as Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3,
  <mask> 4, then <start_of_turn> 5, <end_of_turn> 6 and the 256 byte tokens."""
  import json

  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
  from transformers import GemmaTokenizer

  from uip2p_jax.data import instruct
  special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
  bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  bpe.normalizer = normalizers.Replace(" ", "\u2581")
  bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_previous")
  bpe.train_from_iterator(
      [instruct.load_prompt(mode).text for mode in instruct.MODES],
      trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                          special_tokens=special + [f"<0x{i:02X}>" for i in range(256)]))
  learned = json.loads(bpe.to_str())["model"]
  tokenizer = GemmaTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]])
  tokenizer.add_special_tokens({"additional_special_tokens": special[5:]})
  assert len(tokenizer) <= vocab_size and tokenizer.convert_tokens_to_ids(special[6]) == 6
  return tokenizer


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
  """(transformers Gemma2ForCausalLM, its folder with a tiny tokenizer): random weights large
  enough that every layer matters."""
  from transformers import Gemma2Config, Gemma2ForCausalLM
  seeded(11)
  model = Gemma2ForCausalLM(Gemma2Config(**GEMMA_CONFIG, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.5 if "norm" in name else 0.3)
  folder = tmp_path_factory.mktemp("gemma")
  model.save_pretrained(folder)
  tiny_gemma_tokenizer(GEMMA_CONFIG["vocab_size"]).save_pretrained(folder)
  return model, str(folder)


def max_rel_error(ours, reference):
  """Max abs error divided by the reference's max magnitude (the issue's tolerance measure)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))


def nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the session, its subprocesses and every pytest-xdist worker:
  tests that compile the same program (the trainer runs its step several times; both workers
  build `step_setup`) pay for the compile once. JAX writes an entry only once compiled and
  reads a bad one as a miss."""
  import jax
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a folder of the run's
    base = base.parent
  directory = os.path.join(str(base), "jax_cache")
  os.makedirs(directory, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  jax.config.update("jax_compilation_cache_dir", directory)
  yield directory


@pytest.fixture(scope="session")
def step_setup(tmp_path_factory):
  """(step functions on a one-device mesh, initial params, placed frozen params, first sample
  batch) of the tiny trainer config: compiled once for every trainer test."""
  import dataclasses
  import jax
  from trainer_setup import build_step_setup
  functions, params, frozen, batch = build_step_setup(str(tmp_path_factory.mktemp("step_data")))
  # The exception to the unoptimised suite: the tests run this step ~35 times. Optimised, it
  # compiles in ~55 s instead of ~47 s and runs in 0.16 s instead of 2.3 s (2026-11-29).
  step = jax.jit(functions.step, donate_argnums=(0,),
                 compiler_options={"xla_backend_optimization_level": 2})
  return dataclasses.replace(functions, step=step), params, frozen, batch


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
  """The bundled sample photos built as a captions dataset (shared by the data tests)."""
  from uip2p_jax.data import builders
  out = str(tmp_path_factory.mktemp("sample_data"))
  report = builders.build_sample(out)
  assert report.written == 12 and not report.skipped
  return out


# launch/test.sh runs two pytest-xdist workers that take one file at a time, in collection
# order (--no-loadscope-reorder): the slowest files go first, so that neither worker is left
# with a long file at the end while the other idles. These files hold the slowest tests of
# `--durations` runs on the 2-core CPU (2026-11-29; README, Tests), by their file's total;
# order only, every other file runs after them.
SLOWEST_FILES_FIRST = (
    "tests/train/test_pretraining.py",
    "tests/train/test_loop.py",
    "tests/train/test_multiprocess.py",
    "tests/eval/test_shipped_shapes.py",
    "tests/train/test_step_sharded.py",
    "tests/test_pipeline.py",
    "tests/test_cycle_switches.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
