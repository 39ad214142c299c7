"""LoRA on the UNet: a fresh LoRA UNet is its base, merging equals the LoRA forward, the LoRA
file round-trips and diffusers' IP2P pipeline with our file loaded edits as our merged model;
files that do not fit the UNet are refused naming the key."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from uip2p_jax import weights
from uip2p_jax.models import lora
from uip2p_jax.models.presets import TINY
from uip2p_jax.models.random_init import random_init
from uip2p_jax.models.unet import UNet2DConditionModel

ALL = lora.LoRAConfig(rank=4, alpha=8.0, targets=("attn", "ff", "conv"))
_forward = nnx.jit(lambda unet, x, t, c: unet(x, t, c))


def tiny_unet(seed=0):
  return random_init(lambda: UNet2DConditionModel(TINY.unet, rngs=nnx.Rngs(0)), seed)


def randomise_b(unet, seed=1, std=0.05):
  """Non-zero B factors, so the LoRA branch changes the output."""
  rng = np.random.default_rng(seed)
  for layer in lora.lora_layers(unet).values():
    shape = layer.lora_b.get_value().shape
    layer.lora_b.set_value(jnp.asarray(rng.normal(size=shape) * std, jnp.float32))
  return unet


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.float32), jnp.asarray([10, 500]),
          jnp.asarray(rng.normal(size=(2, 77, 32)), jnp.float32))


def test_fresh_lora_is_the_base_and_merging_equals_the_lora_forward(inputs):
  unet = tiny_unet()
  base_paths = {path for path, _ in nnx.to_flat_state(nnx.state(unet))}
  base_out = _forward(unet, *inputs)
  lora.add_lora(unet, ALL, seed=0)
  layers = lora.lora_layers(unet)
  for group, pattern in lora.TARGETS.items():  # every group adapts some layers
    assert any(pattern.search(name) for name in layers), group
  assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in layers
  assert all(re.search(r"(attn[12]\.to_|ff\.net\.|resnets\.\d+\.conv[12]$)", n) for n in layers)
  _, factors, rest = nnx.split(unet, lora.LoRAParam, ...)
  # The base parameters keep their names (checkpoints and the weight mapping rely on them).
  assert {path for path, _ in nnx.to_flat_state(rest)} == base_paths
  assert {str(path[-1]) for path, _ in nnx.to_flat_state(factors)} == {"lora_a", "lora_b"}
  np.testing.assert_array_equal(_forward(unet, *inputs), base_out)  # B = 0: exactly the base

  randomise_b(unet)
  lora_out = np.asarray(_forward(unet, *inputs))
  assert np.abs(lora_out - base_out).max() > 1e-2
  merged = lora.merge_lora(unet)
  assert type(merged) is UNet2DConditionModel and not lora.has_lora(merged)
  scale = np.abs(lora_out).max()
  np.testing.assert_allclose(_forward(merged, *inputs), lora_out, atol=1e-5 * scale)
  with pytest.raises(ValueError, match="has LoRA layers"):
    weights.save_unet(unet, "unused")


def test_layer_scale_and_dropout():
  """alpha / rank scales the branch; dropout acts only under `dropout_key` and is the same
  for the same key."""
  rng = np.random.default_rng(0)
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((6, 2), (2, 5)))
  expected_base = base(x)
  layer = lora.LoRALinear(base, a, b, scale=4.0, dropout=0.5, name="to_q")
  np.testing.assert_allclose(layer(x), expected_base + 4.0 * (x @ a @ b), rtol=1e-5, atol=1e-5)
  key = jax.random.key(3)
  with lora.dropout_key(key):
    dropped, again = layer(x), layer(x)
  np.testing.assert_array_equal(dropped, again)
  assert np.abs(dropped - layer(x)).max() > 1e-3  # outside the block: no dropout
  kept = (np.asarray(dropped - expected_base) != 0)
  assert kept.any()
  with pytest.raises(ValueError, match=r"lora dropout 1.0; expected 0 <= dropout < 1"):
    lora.LoRAConfig(rank=4, dropout=1.0).validate()
  with pytest.raises(ValueError, match=r"lora targets \['mlp'\] unknown"):
    lora.LoRAConfig(rank=4, targets=("attn", "mlp")).validate()
  with pytest.raises(ValueError, match=r"lora rank 0; expected an integer >= 1"):
    lora.LoRAConfig(rank=0).validate()


def test_lora_file_round_trip(tmp_path, inputs):
  """Save, then load onto a base UNet, into a run's LoRA layers, and as a bare peft file: the
  same branches (one forward pass checks the loaded UNet end to end)."""
  unet = randomise_b(lora.add_lora(tiny_unet(), ALL, seed=0))
  path = weights.save_lora(unet, tmp_path, ALL)
  assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
  tensors = load_file(path)
  prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
  assert tensors[f"{prefix}.attn1.to_q.lora_A.weight"].shape == (4, 32)  # torch's (r, in)
  assert tensors[f"{prefix}.attn2.to_k.lora_A.weight"].shape == (4, 32)
  assert tensors[f"{prefix}.ff.net.0.proj.lora_B.weight"].shape == (256, 4)  # (out, r)
  assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (4, 32, 3, 3)
  assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (32, 4, 1, 1)
  layer = lora.lora_layers(unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
  np.testing.assert_allclose(tensors[f"{prefix}.attn1.to_q.lora_B.weight"],  # alpha folded in
                             2.0 * np.asarray(layer.lora_b.get_value()).T)

  def assert_same_branches(loaded, scale=None):
    originals = lora.lora_layers(unet)
    assert set(lora.lora_layers(loaded)) == set(originals)
    for name, layer in lora.lora_layers(loaded).items():
      original = originals[name]
      assert layer.lora_scale == (original.lora_scale if scale is None else scale)
      np.testing.assert_allclose(layer.lora_a.get_value(), original.lora_a.get_value())
      np.testing.assert_allclose(layer.lora_scale * np.asarray(layer.lora_b.get_value()),
                                 original.lora_scale * np.asarray(original.lora_b.get_value()),
                                 rtol=1e-6)

  # Onto a plain base UNet: the file's layers, ranks and (recorded) alpha.
  loaded = weights.load_lora(tiny_unet(), path)
  assert_same_branches(loaded)
  np.testing.assert_allclose(_forward(loaded, *inputs), _forward(unet, *inputs), atol=1e-6)
  # Into a run's LoRA layers (config.lora.init_from): the factors are replaced.
  assert_same_branches(weights.load_lora(lora.add_lora(tiny_unet(), ALL, seed=5), tmp_path))
  # A peft file without our header: scale 1 (alpha = rank), as diffusers applies it.
  save_file(tensors, str(tmp_path / "bare.safetensors"))
  assert_same_branches(weights.load_lora(tiny_unet(), tmp_path / "bare.safetensors"), scale=1.0)


def abstract_unet():
  return nnx.eval_shape(lambda: UNet2DConditionModel(TINY.unet, rngs=nnx.Rngs(0)))


def _refusal(tmp_path, tensors, unet, message):
  path = str(tmp_path / "bad.safetensors")
  save_file(tensors, path)
  with pytest.raises(weights.CheckpointError, match=message):
    weights.load_lora(unet, path)


def test_lora_files_that_do_not_fit_are_refused_naming_the_key(tmp_path):
  attn = lora.LoRAConfig(rank=4, targets=("attn",))
  tensors = load_file(weights.save_lora(lora.add_lora(tiny_unet(), attn), tmp_path, attn))
  q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  # A module the UNet does not have.
  wrong = {k.replace(".attn1.to_q.", ".attn3.to_q."): v for k, v in tensors.items()}
  _refusal(tmp_path, wrong, abstract_unet(), re.escape(
      "keys name no linear or convolution layers of the UNet: "
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q.lora_A.weight"))
  # A shape that does not fit the layer (in_features 32).
  narrow = dict(tensors, **{f"{q}.lora_A.weight": tensors[f"{q}.lora_A.weight"][:, :31].copy()})
  _refusal(tmp_path, narrow, abstract_unet(), re.escape(
      f"{q}.lora_A.weight: expected (4, 32), found (4, 31)"))
  # Not a UNet LoRA key (a text encoder LoRA, a kohya alpha), a factor without its partner.
  _refusal(tmp_path, dict(tensors, **{"text_encoder.x.lora_A.weight": np.zeros((4, 2))}),
           abstract_unet(), r"key 'text_encoder.x.lora_A.weight' is not a UNet LoRA factor")
  _refusal(tmp_path, {k: v for k, v in tensors.items() if k != f"{q}.lora_B.weight"},
           abstract_unet(),
           re.escape(f"key '{q}.lora_A.weight' has no partner '{q}.lora_B.weight'"))
  # Into a run's LoRA (abstract UNets: the file is refused before any value is read): other
  # targets, a missing layer, another rank.
  ff_run = lora.add_lora(abstract_unet(), lora.LoRAConfig(rank=4, targets=("ff",)))
  _refusal(tmp_path, tensors, ff_run, r"keys name no LoRA layers of this run .*attn1\.to_k")
  _refusal(tmp_path, tensors, lora.add_lora(abstract_unet(), lora.LoRAConfig(rank=8)),
           re.escape(f"{q}.lora_A.weight: expected (8, 32), found (4, 32)"))
  partial = {k: v for k, v in tensors.items() if not k.startswith(q + ".")}
  _refusal(tmp_path, partial, lora.add_lora(abstract_unet(), attn),
           re.escape(f"1 missing keys: {q}.lora_A.weight"))
  # A corrupt header of ours (its rank and alpha) is named, not read as scale 1.
  path = str(tmp_path / "bad_header.safetensors")
  save_file(tensors, path, metadata={"format": "pt", "uip2p_lora": '{"rank": 4, "alpha"'})
  with pytest.raises(weights.CheckpointError,
                     match=r"bad_header.safetensors: the header's 'uip2p_lora' field .* not JSON"):
    weights.load_lora(abstract_unet(), path)


def test_diffusers_pipeline_with_our_lora_equals_our_merged_edit(ip2p_folder, tmp_path):
  """Our LoRA file loaded by diffusers' `load_lora_weights` into its IP2P pipeline edits as our
  merged UNet does in our pipeline (the pipeline parity tolerance: 1e-3 on [0, 1] images);
  every target group (linear and convolution factors) is covered."""
  import torch
  from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
  from PIL import Image

  from uip2p_jax.image_io import prepare_image
  from uip2p_jax.pipeline import EditPipeline
  _, folder = ip2p_folder
  unet = randomise_b(lora.add_lora(weights.load_unet(folder), ALL, seed=2), std=0.1)
  weights.save_lora(unet, tmp_path / "lora", ALL)
  merged_folder = tmp_path / "merged"
  shutil.copytree(folder, merged_folder)
  weights.save_unet(lora.merge_lora(unet), merged_folder / "unet")

  yy, xx = np.meshgrid(np.linspace(0, 255, 32), np.linspace(0, 255, 32), indexing="ij")
  pil = Image.fromarray(np.stack([yy, xx, 255 - yy], -1).astype(np.uint8))
  noise = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
  args = dict(steps=4, sampler="euler", seeds=[1], initial_noise=noise)
  ours = EditPipeline.from_pretrained(str(merged_folder))
  image = prepare_image(pil, 32, ours.size_multiple)[None]
  edited = (ours.edit(image, ["make it snowy"], **args) + 1) / 2

  pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
  pipe.scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
  run = lambda: pipe(["make it snowy"], image=[pil], num_inference_steps=4, guidance_scale=7.5,
                     image_guidance_scale=1.5, output_type="np",
                     latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: more torch threads only contend with XLA's (3x slower)
  try:
    without = run()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    reference = run()
  finally:
    torch.set_num_threads(threads)
  assert edited.shape == reference.shape == (1, 32, 32, 3)
  assert np.abs(edited - reference).max() < 1e-3
  assert np.abs(reference - without).max() > 1e-2  # the LoRA changes the edit
  # Our pipeline applies the same file to the base (`from_pretrained(..., lora=...)`).
  applied = EditPipeline.from_pretrained(folder, lora=str(tmp_path / "lora"))
  np.testing.assert_allclose((applied.edit(image, ["make it snowy"], **args) + 1) / 2, edited,
                             atol=1e-5)
  # In bfloat16, the file's float32 factors are merged in float32, then cast (not cast first).
  low = EditPipeline.from_pretrained(folder, dtype=jnp.bfloat16, lora=str(tmp_path / "lora"))
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  base = lora.adaptable_layers(weights.load_unet(folder))[name].kernel.get_value()
  exact = weights.load_lora(weights.load_unet(folder), tmp_path / "lora", jnp.float32)
  want = (jnp.asarray(base, jnp.bfloat16).astype(jnp.float32)
          + lora.lora_layers(exact)[name].delta()).astype(jnp.bfloat16)
  np.testing.assert_array_equal(lora.adaptable_layers(low.unet)[name].kernel.get_value(), want)
