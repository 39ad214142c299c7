"""Checkpoint I/O: round trip through diffusers, IP2P initialisation, Hub cache, refusals."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import UNET_CONFIGS, nchw
from uip2p_jax import weights
from uip2p_jax.weights import CheckpointError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _copy(folder, tmp_path, name="copy"):
  out = tmp_path / name
  shutil.copytree(folder, out)
  return out


def _inputs(in_channels, cross_dim=32):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((1, 8, 8, in_channels)).astype(np.float32), np.array([250]),
          rng.standard_normal((1, 5, cross_dim)).astype(np.float32))


def test_save_unet_round_trips_through_diffusers(torch_unets, tmp_path):
  from diffusers import UNet2DConditionModel
  for name in UNET_CONFIGS:
    torch_model, folder = torch_unets[name]
    unet = weights.load_unet(folder, subfolder=None)
    out = weights.save_unet(unet, tmp_path / name)
    reloaded = UNet2DConditionModel.from_pretrained(out).eval()
    sample, t, ctx = _inputs(UNET_CONFIGS[name]["in_channels"],
                             UNET_CONFIGS[name]["cross_attention_dim"])
    with torch.no_grad():
      args = (torch.from_numpy(nchw(sample)), torch.from_numpy(t), torch.from_numpy(ctx))
      before, after = torch_model(*args).sample.numpy(), reloaded(*args).sample.numpy()
    np.testing.assert_array_equal(before, after)
    # What we write is bit-for-bit what we read (layouts inverted exactly).
    written = load_file(os.path.join(out, WEIGHTS))
    original = load_file(os.path.join(folder, WEIGHTS))
    assert written.keys() == original.keys()
    for key in original:
      np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def test_init_ip2p_from_sd_zero_extends_conv_in(torch_unets):
  sd = weights.load_unet(torch_unets["sd_linear"][1], subfolder=None)
  ip2p = weights.init_ip2p_from_sd(sd)
  assert ip2p.config.in_channels == 8
  kernel = np.asarray(ip2p.conv_in.kernel[...])
  np.testing.assert_array_equal(kernel[:, :, :4], np.asarray(sd.conv_in.kernel[...]))
  assert not np.any(kernel[:, :, 4:])
  # Zero extra channels: the 8-channel UNet ignores the image condition at initialisation.
  sample, t, ctx = _inputs(4, 24)
  condition = np.random.default_rng(5).standard_normal(sample.shape).astype(np.float32)
  forward = nnx.jit(lambda m, x: m(x, t, ctx))
  np.testing.assert_allclose(forward(ip2p, np.concatenate([sample, condition], -1)),
                             forward(sd, sample), atol=1e-5)
  with pytest.raises(ValueError, match="4-channel"):
    weights.init_ip2p_from_sd(ip2p)


def test_load_from_hub_cache_offline(torch_unets, tmp_path, monkeypatch):
  """A repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1."""
  import huggingface_hub.constants as hub_constants
  _, folder = torch_unets["ip2p_conv"]
  revision = "0" * 40
  repo = tmp_path / "hub" / "models--someone--tiny-ip2p"
  shutil.copytree(folder, repo / "snapshots" / revision / "unet")
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(revision)
  monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  unet = weights.load_unet("someone/tiny-ip2p")
  assert unet.config.in_channels == 8
  with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
    weights.load_unet("someone/not-cached")


def _tamper(folder, tmp_path, edit):
  out = _copy(folder, tmp_path)
  tensors = load_file(out / WEIGHTS)
  edit(tensors)
  save_file(tensors, out / WEIGHTS)
  return out


def test_refuses_missing_keys(torch_unets, tmp_path):
  def drop(t):
    del t["conv_in.weight"], t["mid_block.resnets.0.conv1.bias"]
  out = _tamper(torch_unets["ip2p_conv"][1], tmp_path, drop)
  with pytest.raises(CheckpointError, match=r"2 missing keys: .*conv_in.weight"):
    weights.load_unet(out, subfolder=None)


def test_refuses_unexpected_keys(torch_unets, tmp_path):
  def add(t):
    t["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)
  out = _tamper(torch_unets["ip2p_conv"][1], tmp_path, add)
  with pytest.raises(CheckpointError, match=r"1 unexpected keys: down_blocks.0.extra.weight"):
    weights.load_unet(out, subfolder=None)


def test_refuses_shape_mismatch(torch_unets, tmp_path):
  def shrink(t):
    t["conv_in.weight"] = t["conv_in.weight"][:, :4]
  out = _tamper(torch_unets["ip2p_conv"][1], tmp_path, shrink)
  with pytest.raises(CheckpointError,
                     match=r"conv_in.weight: expected \(32, 8, 3, 3\), found \(32, 4, 3, 3\)"):
    weights.load_unet(out, subfolder=None)


def test_refuses_unreadable_files(torch_unets, tmp_path):
  folder = torch_unets["ip2p_conv"][1]
  corrupt = _copy(folder, tmp_path, "corrupt")
  (corrupt / WEIGHTS).write_bytes(b"\x00" * 64)
  with pytest.raises(CheckpointError, match="unreadable safetensors"):
    weights.load_unet(corrupt, subfolder=None)

  truncated = _copy(folder, tmp_path, "truncated")
  data = (truncated / WEIGHTS).read_bytes()
  (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="unreadable safetensors"):
    weights.load_unet(truncated, subfolder=None)

  bad_json = _copy(folder, tmp_path, "bad_json")
  (bad_json / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    weights.load_unet(bad_json, subfolder=None)

  pickle_only = _copy(folder, tmp_path, "pickle_only")
  (pickle_only / WEIGHTS).rename(pickle_only / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointError, match="only PyTorch pickle weights"):
    weights.load_unet(pickle_only, subfolder=None)

  with pytest.raises(CheckpointError, match="no subfolder 'unet'"):
    weights.load_unet(folder)
  with pytest.raises(CheckpointError, match="no such folder"):
    weights.load_unet(str(tmp_path / "does" / "not" / "exist"))


def test_refuses_unsupported_config(torch_unets, tmp_path):
  out = _copy(torch_unets["ip2p_conv"][1], tmp_path)
  config = json.loads((out / "config.json").read_text())
  config["only_cross_attention"] = True
  (out / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="only_cross_attention"):
    weights.load_unet(out, subfolder=None)


def test_load_clip_refuses_text_only_checkpoint(torch_text_encoder):
  with pytest.raises(CheckpointError, match="expected 'clip'"):
    weights.load_clip(torch_text_encoder[1])


def test_bfloat16_storage(torch_vae):
  vae = weights.load_vae(torch_vae[1], subfolder=None, dtype=jnp.bfloat16,
                         param_dtype=jnp.bfloat16)
  params = nnx.state(vae, nnx.Param)
  assert {v.get_value().dtype for _, v in nnx.to_flat_state(params)} == {jnp.dtype(jnp.bfloat16)}
  latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
  assert vae.decode(latents).dtype == jnp.float32
