"""The jitted edit against diffusers' StableDiffusionInstructPix2PixPipeline, and image I/O."""

import numpy as np
import pytest
import torch
from PIL import Image

from uip2p_jax.image_io import load_image, prepare_image, working_size
from uip2p_jax.pipeline import EditPipeline, batches_by_size


@pytest.fixture(scope="module")
def ours(ip2p_folder):
  """Our pipeline on the tiny IP2P folder, loaded once for the tests that only edit with it."""
  return EditPipeline.from_pretrained(ip2p_folder[1])


@pytest.mark.parametrize("sampler", ["euler_ancestral", "euler", "ddim"])
def test_edit_matches_diffusers_pipeline(ip2p_folder, ours, sampler, monkeypatch):
  import jax
  from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral
  from uip2p_jax.pipeline import _per_example_normal
  pipe, folder = ip2p_folder
  # The reference reads the same scheduler_config.json from disk that we do.
  pipe.scheduler = {"euler_ancestral": EulerAncestralDiscreteScheduler,
                    "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[sampler] \
      .from_pretrained(folder, subfolder="scheduler")
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 64), indexing="ij")
  pil = Image.fromarray(np.stack([yy, xx, 255 - yy], -1).astype(np.uint8))
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  seeds = [11, 12]
  # The default sampler is stochastic: diffusers draws each step's noise with torch; hand it
  # the noise our pipeline draws for step i from each example's key (fold_in(key, i + 1)).
  keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
  step_noise = iter([np.asarray(_per_example_normal(
      jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys), (8, 8, 4))).transpose(0, 3, 1, 2)
      for i in range(4)])
  monkeypatch.setattr(ancestral, "randn_tensor",
                      lambda shape, **_: torch.from_numpy(next(step_noise).copy()))
  instructions = ["make it snowy", "turn the sky red"]
  reference = pipe(instructions, image=[pil, pil], num_inference_steps=4, guidance_scale=7.5,
                   image_guidance_scale=1.5, output_type="np",
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
  image = prepare_image(pil, 64)
  edited = ours.edit(np.stack([image, image]), instructions, steps=4, sampler=sampler,
                     seeds=seeds, initial_noise=noise)
  if sampler == "euler_ancestral":
    assert next(step_noise, None) is None  # diffusers drew one noise per step, as we do
  edited01 = (edited + 1) / 2
  assert edited01.shape == reference.shape == (2, 64, 64, 3)
  assert np.abs(edited01 - reference).max() < 1e-3
  # The two instructions lead to different edits (guidance is live, not a no-op).
  assert np.abs(edited01[0] - edited01[1]).max() > 1e-3


def test_edit_is_reproducible_and_batch_independent(ours):
  image = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  single = ours.edit(image, ["add snow"], steps=3, seeds=[5])
  batch = ours.edit(np.concatenate([image, image]), ["add snow", "add fog"], steps=3,
                    seeds=[5, 6])
  again = ours.edit(image, ["add snow"], steps=3, seeds=[5])
  np.testing.assert_array_equal(single, again)
  np.testing.assert_allclose(batch[:1], single, atol=1e-4)  # batch-size float reordering
  other_seed = ours.edit(image, ["add snow"], steps=3, seeds=[6])
  assert np.abs(other_seed - single).max() > 1e-3


def test_edit_takes_pil_images_and_paths_and_pads_batches(ours, tmp_path):
  """PIL images and paths are prepared as `uip2p edit` prepares files and come back as PIL
  images (one, or a list, as given); padding to a batch size leaves the edits alone."""
  from uip2p_jax.image_io import to_pil
  pil = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
  from_array = ours.edit(prepare_image(pil, 64)[None], ["add snow"], steps=3, seeds=[5])
  from_pil = ours.edit([pil], ["add snow"], steps=3, seeds=[5], resolution=64)
  assert isinstance(from_pil, list) and from_pil[0].size == (64, 64)
  assert from_pil[0].tobytes() == to_pil(from_array[0]).tobytes()
  pil.convert("RGBA").save(tmp_path / "in.png")   # alpha: composited as load_image does
  from_path = ours.edit(tmp_path / "in.png", "add snow", steps=3, seeds=5, resolution=64)
  assert isinstance(from_path, Image.Image) and from_path.tobytes() == from_pil[0].tobytes()
  padded = ours.edit(prepare_image(pil, 64)[None], ["add snow"], steps=3, seeds=[5], pad_to=2)
  assert padded.shape == (1, 64, 64, 3)
  np.testing.assert_allclose(padded, from_array, atol=1e-4)
  with pytest.raises(ValueError, match="2 images but 1 instructions"):
    ours.edit([pil, pil], "add snow")


def test_edit_runs_pil_images_of_several_sizes_in_one_batch_per_size(ours, monkeypatch):
  """Working sizes as `uip2p edit`'s (longest side `resolution`, multiples of 64); results in
  the input order, each image with its own seed (the model is not run: the batches are)."""
  calls = []

  def fake_edit(images, instructions, *, seeds, **_):
    calls.append((images.shape, list(instructions), list(seeds)))
    return images
  monkeypatch.setattr(ours, "_edit_arrays", fake_edit)
  square, wide = Image.new("RGB", (100, 100), "red"), Image.new("RGB", (300, 150), "blue")
  out = ours.edit([square, wide, square], ["a", "b", "c"], seeds=7, resolution=128)
  assert [image.size for image in out] == [(128, 128), (128, 64), (128, 128)]
  assert out[1].getpixel((0, 0)) == (0, 0, 255)
  assert calls == [((2, 128, 128, 3), ["a", "c"], [7, 9]), ((1, 64, 128, 3), ["b"], [8])]


def test_batches_by_size_groups_then_chunks():
  sizes = [(64, 64), (128, 64), (64, 64), (64, 64), (128, 64)]
  assert batches_by_size(sizes, 2) == [[0, 2], [3], [1, 4]]
  assert batches_by_size(sizes, 8) == [[0, 2, 3], [1, 4]]
  with pytest.raises(ValueError, match="at least 1"):
    batches_by_size(sizes, 0)


def test_prepare_image_warns_when_it_upscales_a_tiny_input(tmp_path, capsys):
  Image.new("RGB", (5, 5), (9, 9, 9)).save(tmp_path / "tiny.png")
  assert prepare_image(load_image(tmp_path / "tiny.png"), 512).shape == (512, 512, 3)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "tiny.png: 5x5 px" in err[0] and "512x512" in err[0]
  prepare_image(Image.new("RGB", (300, 200)), 512)  # above the minimum: no warning
  assert capsys.readouterr().err == ""


def test_edit_rejects_bad_requests(ours):
  image = np.zeros((1, 64, 64, 3), np.float32)
  with pytest.raises(ValueError, match="empty instruction"):
    ours.edit(image, ["  "])
  with pytest.raises(ValueError, match="1 images but 2 instructions"):
    ours.edit(image, ["a", "b"])
  with pytest.raises(ValueError, match="not a multiple of 16"):
    ours.edit(np.zeros((1, 40, 64, 3), np.float32), ["a"])


def test_strength_starts_from_the_noised_input_and_runs_the_remaining_steps(ours):
  """strength 1 is IP2P's start (pure noise); strength 1/4 of 4 DDIM steps is exactly one step
  from the input's latent noised to the level of the last step, computed here by hand."""
  import jax
  import jax.numpy as jnp

  from uip2p_jax.pipeline import guided_noise
  from uip2p_jax.schedules import make_sampler
  from uip2p_jax.tokenizer import tokenize
  rng = np.random.default_rng(3)
  image = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  noise = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  kwargs = dict(steps=4, sampler="ddim", seeds=[0], initial_noise=noise, text_scale=3.0,
                image_scale=1.5)
  full = ours.edit(image, ["add snow"], **kwargs)
  np.testing.assert_array_equal(ours.edit(image, ["add snow"], strength=1.0, **kwargs), full)
  last = ours.edit(image, ["add snow"], strength=0.25, **kwargs)
  sampler = make_sampler("ddim", ours.schedule, 4)
  scaling = ours.vae.config.scaling_factor
  image_latents = ours.vae.encode(jnp.asarray(image)).mode()
  alpha = sampler.alpha[3]
  start = jnp.sqrt(alpha) * image_latents * scaling + jnp.sqrt(1 - alpha) * noise
  text = ours.text_encoder(tokenize(ours.tokenizer, ["add snow"]))[0]
  empty = ours.text_encoder(tokenize(ours.tokenizer, [""]))[0]
  eps = guided_noise(ours.unet, sampler, 3, start, image_latents,
                     jnp.concatenate([text, empty, empty]), 3.0, 1.5)
  expected = jnp.clip(ours.vae.decode(sampler.step(3, start, eps, None) / scaling), -1, 1)
  np.testing.assert_allclose(last, np.asarray(expected), atol=2e-5)
  assert np.abs(last - full).max() > 1e-2  # the start is live, not ignored
  with pytest.raises(ValueError, match="expected a fraction in"):
    ours.edit(image, ["add snow"], strength=0.0, steps=4)
  with pytest.raises(ValueError, match="leaves no step to run"):
    ours.edit(image, ["add snow"], strength=0.1, steps=4)


def test_working_size_keeps_aspect_and_multiples():
  assert working_size(1024, 768, 512) == (512, 384)
  assert working_size(300, 1000, 512) == (128, 512)
  assert working_size(100, 100, 512) == (512, 512)
  assert working_size(4000, 50, 512) == (512, 64)


def test_load_image_handles_alpha_grayscale_and_exif(tmp_path):
  rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))  # fully transparent red -> white
  rgba.save(tmp_path / "a.png")
  assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
  Image.new("L", (8, 4), 128).save(tmp_path / "g.png")
  assert load_image(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)
  exif_image = Image.new("RGB", (8, 4), (0, 0, 255))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees on display
  exif_image.save(tmp_path / "r.jpg", exif=exif)
  assert load_image(tmp_path / "r.jpg").size == (4, 8)
  (tmp_path / "bad.jpg").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="unreadable image"):
    load_image(tmp_path / "bad.jpg")
  with pytest.raises(FileNotFoundError, match="no such image"):
    load_image(tmp_path / "missing.jpg")
