"""`cycle_losses` is wired as documented.

Recording stubs (a UNet with the real call signature, a pooling VAE, a sine text encoder, a
pooling CLIP) make every value hand-checkable on 2 x 16 x 16 images (4 x 4 latents), un-jitted;
tiny real models show that each loss term alone reaches the UNet's parameters through the frozen
VAE decoder and CLIP image tower.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uip2p_jax import losses, schedules
from uip2p_jax.cycle import (CycleConfig, LossConfig, attention_resolution, cycle_losses,
                             ip2p_losses)
from uip2p_jax.models.vae import DiagonalGaussian
from uip2p_jax.schedules import NoiseSchedule

SCALING = 0.18215
ALPHAS = jnp.asarray(NoiseSchedule().alphas_cumprod(), jnp.float32)
A = np.asarray(ALPHAS, np.float64)
T = ALPHAS.shape[0]
BOS, EOS = 998, 999  # not CLIP's 49406/49407: the ids of "" must come from `empty_ids`
EMPTY_IDS = np.asarray([[BOS] + [EOS] * 7], np.int32)
FREQS = jnp.linspace(0.01, 0.08, 6)
ONLY = {name: {**dict(clip=0.0, sim=0.0, attn=0.0, recon=0.0, keep=0.0), name: 1.0}
        for name in ("clip", "sim", "attn", "recon", "keep")}                # one-hot loss weights


def text_ids(*tokens):
  return np.asarray([[BOS, *row, EOS] + [EOS] * (6 - len(row)) for row in tokens], np.int32)


def stub_text_states(ids):
  return jnp.sin(jnp.asarray(ids, jnp.float32)[..., None] * FREQS)


def stub_eps(noisy, condition, text):
  """What RecordingUNet predicts: simple, differentiable, sensitive to every input."""
  return 0.5 * noisy + 0.25 * condition + jnp.mean(text, axis=(1, 2))[:, None, None, None]


class RecordingUNet:
  """The UNet's call signature; records (noisy, condition, t, text) of every call through a
  debug callback, so the record holds values even inside `lax.switch` or `jit`."""

  def __init__(self, attention_sizes=(4, 2)):
    self.config = types.SimpleNamespace(block_out_channels=(8, 8, 8))
    self.attention_sizes = attention_sizes
    self.calls, self.captures = [], []

  def _record(self, noisy, condition, t, text):
    self.calls.append({"noisy": np.asarray(noisy, np.float64),
                       "condition": np.asarray(condition, np.float64),
                       "t": np.asarray(t), "text": np.asarray(text, np.float64)})

  def __call__(self, sample, timesteps, encoder_hidden_states, *, capture=None):
    noisy, condition = sample[..., :4], sample[..., 4:]
    jax.debug.callback(self._record, noisy, condition, timesteps, encoder_hidden_states)
    eps = stub_eps(noisy, condition, encoder_hidden_states)
    if capture is None:
      return eps
    (size,) = capture.resolutions
    self.captures.append(size)
    if size not in self.attention_sizes:
      return eps, {}
    spatial = jax.image.resize(noisy.mean(-1, keepdims=True), (noisy.shape[0], size, size, 1),
                               "linear")
    logits = spatial * encoder_hidden_states.mean(-1)[:, None, None, :]
    return eps, {"stub.attn2": jax.nn.softmax(logits, axis=-1)}


class StubVAE:
  """Encoder: 4x4 average pooling (+ a 4th channel); decoder: nearest 4x upsampling of the first
  3 channels, times 3 so decoded images leave [-1, 1]. Records every call and posterior sample."""

  config = types.SimpleNamespace(scaling_factor=SCALING)

  def __init__(self, logvar=0.0):
    self.logvar, self.encoded, self.decoded, self.samples = logvar, [], [], []

  def encode(self, images):
    self.encoded.append(images)
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
    mean = jnp.concatenate([pooled, pooled.mean(-1, keepdims=True)], axis=-1)
    vae = self

    class Posterior(DiagonalGaussian):
      def sample(self, key):
        value = super().sample(key)
        vae.samples.append(value)
        return value
    return Posterior(mean, jnp.full_like(mean, self.logvar))

  def decode(self, latents):
    self.decoded.append(latents)
    return 3.0 * jnp.repeat(jnp.repeat(latents[..., :3], 4, axis=1), 4, axis=2)


def stub_decode(latents):
  return 3.0 * np.repeat(np.repeat(np.asarray(latents)[..., :3], 4, axis=1), 4, axis=2)


class StubTextEncoder:
  def __call__(self, ids):
    states = stub_text_states(ids)
    return states, states[:, -1]


IMAGE_PROJECTION = jnp.asarray(np.random.default_rng(7).normal(size=(12, 6)), jnp.float32)


class StubCLIP:
  def __init__(self):
    self.images = []

  def embed_images(self, images):
    self.images.append(images)
    b, h, w, _ = images.shape
    pooled = images.reshape(b, 2, h // 2, 2, w // 2, 3).mean(axis=(2, 4)).reshape(b, 12)
    return losses.normalise(pooled @ IMAGE_PROJECTION)

  def embed_texts(self, ids):
    return losses.normalise(stub_text_states(ids).mean(axis=1))


def make_batch(seed=0, batch_size=2):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (batch_size, 16, 16, 3)), jnp.float32),
          "input_caption_ids": text_ids(*[[11, 12, 13]] * batch_size),
          "instruction_ids": text_ids(*[[21, 22], [23, 24, 25]] * (batch_size // 2)),
          "edited_caption_ids": text_ids(*[[31, 32, 33]] * batch_size),
          "reverse_instruction_ids": text_ids(*[[41], [42, 43]] * (batch_size // 2))}


def run(cycle=None, loss=None, *, batch=None, seed=1, vae=None, unet=None):
  """cycle_losses on the stubs, un-jitted; returns (metrics as floats, unet, vae, clip)."""
  unet, vae, clip = unet or RecordingUNet(), vae or StubVAE(), StubCLIP()
  cycle = cycle or CycleConfig(attention_resolution=4)
  _, metrics = cycle_losses(unet, vae, StubTextEncoder(), clip,
                            make_batch() if batch is None else batch, jax.random.key(seed),
                            ALPHAS, cycle, loss or LossConfig(), empty_ids=EMPTY_IDS)
  jax.effects_barrier()
  return {k: float(v) for k, v in metrics.items()}, unet, vae, clip


def sqrt_alpha(t):
  a = A[t][:, None, None, None]
  return np.sqrt(a), np.sqrt(1 - a)


def x0_of(call):
  """The x0 the cycle must have taken from one recorded (K = 1) UNet call."""
  eps = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
  root_a, root_1ma = sqrt_alpha(call["t"])
  return (call["noisy"] - root_1ma * eps) / root_a


def clamp(x):
  return np.clip(x, -1.0, 1.0)


@pytest.mark.parametrize("share_noise", [True, False])
def test_edits_are_conditioned_and_noised_as_documented(share_noise):
  batch = make_batch()
  _, unet, vae, clip = run(CycleConfig(share_noise=share_noise, attention_resolution=4),
                           batch=batch)
  forward, reverse = unet.calls                       # K = 1: one call per edit
  image_latent = np.asarray(vae.encode(batch["image"]).mode(), np.float64)
  input_latent = np.asarray(vae.samples[0], np.float64) * SCALING      # z_x, sampled
  np.testing.assert_allclose(forward["condition"], image_latent, atol=1e-6)   # c_x, unscaled
  np.testing.assert_allclose(forward["text"], stub_text_states(batch["instruction_ids"]),
                             atol=1e-6)
  np.testing.assert_allclose(reverse["text"],
                             stub_text_states(batch["reverse_instruction_ids"]), atol=1e-6)
  np.testing.assert_array_equal(forward["t"], reverse["t"])         # t is always shared
  assert forward["t"][0] != forward["t"][1]                          # drawn per example
  root_a, root_1ma = sqrt_alpha(forward["t"])
  forward_noise = (forward["noisy"] - root_a * input_latent) / root_1ma
  edited_latent = x0_of(forward)
  # The reverse edit is conditioned on z_e / 0.18215 and starts from z_e noised at the same t.
  np.testing.assert_allclose(reverse["condition"], edited_latent / SCALING, rtol=1e-4,
                             atol=1e-4)
  reverse_noise = (reverse["noisy"] - root_a * edited_latent) / root_1ma
  if share_noise:
    np.testing.assert_allclose(reverse_noise, forward_noise, atol=2e-3)
  else:
    assert np.abs(reverse_noise - forward_noise).mean() > 0.5
  # One batched decode of (z_e, z_r), interleaved per example; CLIP sees clamped images.
  (decoded,) = vae.decoded
  np.testing.assert_allclose(np.asarray(decoded)[0::2], edited_latent / SCALING, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(decoded)[1::2], x0_of(reverse) / SCALING, rtol=1e-4,
                             atol=1e-4)
  (clip_images,) = clip.images
  assert np.abs(stub_decode(decoded)).max() > 1.5 and np.abs(clip_images).max() <= 1.0


def test_reencode_conditions_on_the_reencoded_edit_and_decodes_it_once():
  batch = make_batch()
  _, unet, vae, clip = run(CycleConfig(reencode=True, attention_resolution=4), batch=batch)
  forward, reverse = unet.calls
  edited_image = clamp(stub_decode(x0_of(forward) / SCALING))
  assert len(vae.encoded) == 2 and len(vae.decoded) == 2
  np.testing.assert_allclose(vae.encoded[1], edited_image, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(reverse["condition"], vae.encode(vae.encoded[1]).mode(), atol=1e-6)
  # z_e decoded once (before the reverse edit), z_r once after: 2B latents in all, not 3B.
  assert [d.shape[0] for d in vae.decoded] == [2, 2]
  np.testing.assert_allclose(vae.decoded[1], x0_of(reverse) / SCALING, rtol=1e-4, atol=1e-4)
  # CLIP's edited image is the very array that was re-encoded.
  (clip_images,) = clip.images
  np.testing.assert_array_equal(np.asarray(clip_images)[1::3], np.asarray(vae.encoded[1]))


def test_start_noise_starts_both_edits_from_pure_noise_at_the_last_timestep():
  cycle = CycleConfig(start="noise", attention_resolution=4)
  calls = [run(cycle, batch=make_batch(seed))[1].calls for seed in (0, 1)]
  for forward, reverse in calls:
    np.testing.assert_array_equal(forward["t"], [T - 1, T - 1])
    np.testing.assert_array_equal(reverse["t"], [T - 1, T - 1])
    np.testing.assert_array_equal(forward["noisy"], reverse["noisy"])  # the same noise
  # Independent of the image: two batches, one key, the same start.
  np.testing.assert_array_equal(calls[0][0]["noisy"], calls[1][0]["noisy"])
  assert abs(calls[0][0]["noisy"].std() - 1.0) < 0.3


def edit_lengths(calls):
  """[K of the forward edit, K of the reverse edit], checking every call's t follows DDIM's
  floor(t * (K - k) / K) with one K for every example (K is drawn per step)."""
  starts = [i for i, c in enumerate(calls) if np.array_equal(c["t"], calls[0]["t"])]
  assert len(starts) == 2 and starts[0] == 0, [c["t"] for c in calls]
  lengths = [starts[1], len(calls) - starts[1]]
  t0 = calls[0]["t"]
  for begin, k in zip(starts, lengths):
    for step in range(k):
      np.testing.assert_array_equal(calls[begin + step]["t"], np.floor(t0 * (k - step) / k))
  return lengths


@pytest.mark.parametrize("same_k", [True, False])
def test_k_range_draws_one_k_per_step_and_same_k_mirrors_it(same_k):
  cycle = CycleConfig(num_steps_min=1, num_steps_max=3, timestep_min=100, same_k=same_k,
                      attention_resolution=4)
  unet = RecordingUNet()
  batch = make_batch()
  # One compile for every key: K is data (a lax.switch index), not a new shape.
  loss = jax.jit(lambda key: cycle_losses(unet, StubVAE(), StubTextEncoder(), StubCLIP(), batch,
                                          key, ALPHAS, cycle, LossConfig(**ONLY["recon"]),
                                          empty_ids=EMPTY_IDS)[0])
  pairs = []
  for seed in range(10):
    unet.calls.clear()
    jax.block_until_ready(loss(jax.random.key(seed)))
    jax.effects_barrier()
    pairs.append(tuple(edit_lengths(unet.calls)))
  assert {k for pair in pairs for k in pair} == {1, 2, 3}
  if same_k:
    assert all(f == r for f, r in pairs), pairs
  else:
    assert any(f != r for f, r in pairs), pairs


def test_sim_and_recon_kinds_compute_what_they_document():
  batch = make_batch()
  image = np.asarray(batch["image"], np.float64)
  clip = StubCLIP()
  embed = lambda x: np.asarray(clip.embed_images(jnp.asarray(x, jnp.float32)), np.float64)
  cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

  metrics, unet, vae, _ = run(loss=LossConfig(**ONLY["sim"]), batch=batch)
  forward, reverse = unet.calls
  reconstructed = clamp(stub_decode(x0_of(reverse) / SCALING))
  np.testing.assert_allclose(metrics["loss_sim"],
                             np.mean(1 - cos(embed(reconstructed), embed(image))), atol=1e-5)

  metrics, unet, _, _ = run(loss=LossConfig(**ONLY["sim"], sim_kind="edit_text"), batch=batch)
  edited = clamp(stub_decode(x0_of(unet.calls[0]) / SCALING))
  caption = np.asarray(clip.embed_texts(batch["edited_caption_ids"]), np.float64)
  np.testing.assert_allclose(metrics["loss_sim"], np.mean(1 - cos(embed(edited), caption)),
                             atol=1e-5)

  values = {}
  for kind in ("l1", "l2", "latent"):
    metrics, unet, vae, _ = run(loss=LossConfig(**ONLY["recon"], recon_kind=kind), batch=batch)
    values[kind] = metrics["loss_recon"]
    z_r = x0_of(unet.calls[1])
    pixels = clamp(stub_decode(z_r / SCALING))
    mode = np.asarray(vae.encode(batch["image"]).mode(), np.float64) * SCALING
    expected = {"l1": np.mean(np.abs(pixels - image)), "l2": np.mean((pixels - image) ** 2),
                "latent": np.mean(np.abs(z_r - mode))}[kind]
    np.testing.assert_allclose(values[kind], expected, rtol=1e-4)
    if kind == "latent":  # against the mode, not the sampled z_x (logvar 0: they differ)
      sampled = np.asarray(vae.samples[0], np.float64) * SCALING
      assert abs(values[kind] - np.mean(np.abs(z_r - sampled))) > 1e-2
  assert len(set(values.values())) == 3

  # L_keep: the forward edit's latent against the same mode target as the latent L_recon.
  metrics, unet, vae, _ = run(loss=LossConfig(**ONLY["keep"]), batch=batch)
  assert len(unet.calls) == 2 and {n for n in metrics if n.startswith("loss_")} == {"loss_keep"}
  mode = np.asarray(vae.encode(batch["image"]).mode(), np.float64) * SCALING
  np.testing.assert_allclose(metrics["loss_keep"], np.mean(np.abs(x0_of(unet.calls[0]) - mode)),
                             rtol=1e-4)


def test_clip_reference_null_edit_starts_the_direction_at_the_empty_instructions_edit():
  batch = make_batch()
  clip = StubCLIP()
  embed = lambda x: np.asarray(clip.embed_images(jnp.asarray(x, jnp.float32)), np.float64)
  text = lambda ids: np.asarray(clip.embed_texts(ids), np.float64)
  cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  text_direction = text(batch["edited_caption_ids"]) - text(batch["input_caption_ids"])

  metrics, unet, _, _ = run(loss=LossConfig(**ONLY["clip"], clip_reference="null_edit"),
                            batch=batch)
  null, forward, reverse = unet.calls  # the null edit is made first, from the forward's start
  np.testing.assert_allclose(null["noisy"], forward["noisy"])
  np.testing.assert_allclose(null["condition"], forward["condition"])
  np.testing.assert_array_equal(null["t"], forward["t"])
  empty_states = np.asarray(stub_text_states(EMPTY_IDS), np.float64)
  np.testing.assert_allclose(null["text"], np.broadcast_to(empty_states, null["text"].shape),
                             atol=1e-6)
  edited = embed(clamp(stub_decode(x0_of(forward) / SCALING)))
  null_edit = embed(clamp(stub_decode(x0_of(null) / SCALING)))
  np.testing.assert_allclose(metrics["loss_clip"],
                             np.mean(1 - cos(edited - null_edit, text_direction)), atol=1e-5)
  image = embed(np.asarray(batch["image"], np.float64))
  assert abs(metrics["loss_clip"] - np.mean(1 - cos(edited - image, text_direction))) > 1e-3

  metrics, unet, _, _ = run(loss=LossConfig(**ONLY["clip"]), batch=batch)  # the paper's
  assert len(unet.calls) == 2
  np.testing.assert_allclose(metrics["loss_clip"],
                             np.mean(1 - cos(edited - image, text_direction)), atol=1e-5)
  with pytest.raises(ValueError, match="loss.clip_reference"):
    LossConfig(clip_reference="noise")


def test_clamp_decoded_is_straight_through_and_can_be_switched_off():
  batch = make_batch()
  clamped, unet, _, clip_on = run(loss=LossConfig(**ONLY["recon"]), batch=batch)
  z_r = x0_of(unet.calls[1])
  raw = stub_decode(z_r / SCALING)
  assert np.abs(raw).max() > 1.5
  unclamped, _, _, _ = run(CycleConfig(clamp_decoded=False, attention_resolution=4),
                           LossConfig(**ONLY["recon"]), batch=batch)
  image = np.asarray(batch["image"], np.float64)
  np.testing.assert_allclose(clamped["loss_recon"], np.mean(np.abs(clamp(raw) - image)),
                             rtol=1e-4)
  np.testing.assert_allclose(unclamped["loss_recon"], np.mean(np.abs(raw - image)), rtol=1e-4)
  # The gradient through the clamp is the identity, also outside [-1, 1].
  from uip2p_jax.cycle import _clamp_straight_through
  x, w = jnp.asarray([-3.0, -0.5, 0.5, 3.0]), jnp.asarray([1.0, 2.0, 3.0, 4.0])
  value, grad = jax.value_and_grad(lambda x: jnp.sum(_clamp_straight_through(x) * w))(x)
  np.testing.assert_allclose(value, np.sum(np.clip(x, -1, 1) * w))
  np.testing.assert_allclose(grad, w)


def test_conditioning_dropout_uses_the_empty_ids_and_draws_per_edit():
  batch = make_batch(batch_size=8)
  cycle = CycleConfig(conditioning_dropout=1 / 3, attention_resolution=4)
  _, unet, vae, _ = run(cycle, LossConfig(**ONLY["recon"]), batch=batch)
  empty_text = np.asarray(stub_text_states(EMPTY_IDS)[0], np.float64)
  patterns = []
  for call, ids in zip(unet.calls, ("instruction_ids", "reverse_instruction_ids")):
    text = np.asarray(stub_text_states(batch[ids]), np.float64)
    rows = []
    for i in range(8):
      text_dropped = np.allclose(call["text"][i], empty_text, atol=1e-6)
      assert text_dropped or np.allclose(call["text"][i], text[i], atol=1e-6)
      image_dropped = not np.any(call["condition"][i])
      rows.append((text_dropped, image_dropped))
    # p = 1/3: every example drops text, both, or the image; never neither.
    assert (False, False) not in rows and len(set(rows)) >= 2, rows
    patterns.append(rows)
  assert patterns[0] != patterns[1]   # each edit draws its own dropout
  # Without dropout every edit keeps both conditions.
  _, unet, _, _ = run(loss=LossConfig(**ONLY["recon"]), batch=batch)
  assert all(np.any(c["condition"][i]) for c in unet.calls for i in range(8))


def test_attention_level_names_the_same_blocks_at_any_size():
  level = lambda n: CycleConfig(attention_select="level", attention_level=n)
  # SD 1.5 (4 levels): level 1 is 16x16 at 256 px (latent 32), 32x32 at 512 px.
  assert attention_resolution(level(1), 32, 4) == 16
  assert attention_resolution(level(1), 64, 4) == 32
  assert attention_resolution(level(0), 8, 2) == 8       # smoke: tiny UNet, 64 px
  assert attention_resolution(level(2), 5, 3) == 2       # stride-2 convs round up: 5, 3, 2
  assert attention_resolution(CycleConfig(attention_resolution=16), 64, 4) == 16  # absolute
  with pytest.raises(ValueError, match="attention_level=4: this UNet has 4 levels"):
    attention_resolution(level(4), 32, 4)
  metrics, unet, _, _ = run(level(1), LossConfig(**ONLY["attn"]))
  assert unet.captures == [2, 2] and metrics["loss_attn"] > 0
  with pytest.raises(ValueError, match="attention_level=2: no cross-attention layer"):
    run(level(2), LossConfig(**ONLY["attn"]))


def test_out_of_schedule_timesteps_and_bad_empty_ids_are_refused():
  batch = make_batch()
  with pytest.raises(ValueError, match="timestep_max=1001 is beyond the noise schedule's 1000"):
    cycle_losses(RecordingUNet(), StubVAE(), StubTextEncoder(), StubCLIP(), batch,
                 jax.random.key(0), ALPHAS, CycleConfig(timestep_max=1001), LossConfig(),
                 empty_ids=EMPTY_IDS)
  with pytest.raises(ValueError, match="timestep_max=1000 is beyond the noise schedule's 500"):
    cycle_losses(RecordingUNet(), StubVAE(), StubTextEncoder(), StubCLIP(), batch,
                 jax.random.key(0), ALPHAS[:500], CycleConfig(), LossConfig(),
                 empty_ids=EMPTY_IDS)
  with pytest.raises(ValueError, match=r"empty_ids: shape \(1, 77\)"):
    cycle_losses(RecordingUNet(), StubVAE(), StubTextEncoder(), StubCLIP(), batch,
                 jax.random.key(0), ALPHAS, CycleConfig(), LossConfig(),
                 empty_ids=np.zeros((1, 77), np.int32))


def test_ip2p_loss_noises_the_edited_latent_and_drops_to_the_empty_ids():
  batch = make_batch(batch_size=8)
  batch["edited_image"] = -batch["image"]
  unet, vae = RecordingUNet(), StubVAE()
  value, _ = ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                         conditioning_dropout=1 / 3, empty_ids=EMPTY_IDS)
  jax.effects_barrier()
  (call,) = unet.calls
  edited_latent = np.asarray(vae.samples[0], np.float64) * SCALING
  root_a, root_1ma = sqrt_alpha(call["t"])
  noise = (call["noisy"] - root_a * edited_latent) / root_1ma
  eps = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
  np.testing.assert_allclose(float(value), np.mean((eps - noise) ** 2), rtol=1e-3)
  empty_text = np.asarray(stub_text_states(EMPTY_IDS)[0], np.float64)
  text = np.asarray(stub_text_states(batch["instruction_ids"]), np.float64)
  image_latent = np.asarray(vae.encode(batch["image"]).mode(), np.float64)
  for i in range(8):  # p = 1/3: text, both or the image dropped, never neither
    text_dropped = np.allclose(call["text"][i], empty_text, atol=1e-6)
    image_dropped = not np.any(call["condition"][i])
    assert text_dropped or np.allclose(call["text"][i], text[i], atol=1e-6)
    assert image_dropped or np.allclose(call["condition"][i], image_latent[i], atol=1e-6)
    assert text_dropped or image_dropped


# ---------------------------------------------------------------------------------------------
# Tiny real models: every loss term alone reaches the UNet's parameters.

@pytest.fixture(scope="module")
def real_models(torch_unets, torch_vae, torch_text_encoder, torch_clip):
  """conftest's tiny reference models as Flax modules (VAE factor 2: 8 x 8 images, 4 x 4
  latents), a batch with the tiny text vocabulary's ids (BOS 998, EOS 999) and its ids of ""."""
  from uip2p_jax import weights
  models = types.SimpleNamespace(
      unet=weights.load_unet(torch_unets["ip2p_conv"][1], subfolder=None),
      vae=weights.load_vae(torch_vae[1], subfolder=None),
      text_encoder=weights.load_text_encoder(torch_text_encoder[1], subfolder=None),
      clip=weights.load_clip(torch_clip[1]))
  ids = lambda *tokens: np.asarray([[BOS, *tokens] + [EOS] * (76 - len(tokens))] * 2, np.int32)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32),
           "input_caption_ids": ids(11, 12, 13), "instruction_ids": ids(21, 22),
           "edited_caption_ids": ids(31, 32, 33), "reverse_instruction_ids": ids(41, 42)}
  return models, batch, ids()[:1]


class ProbedVAE:
  """The frozen VAE with a zero `probe` added to every decoded image: d loss / d probe != 0
  shows the loss depends on the decoder's output."""

  def __init__(self, vae, probe):
    self.vae, self.probe, self.config = vae, probe, vae.config

  def encode(self, images):
    return self.vae.encode(images)

  def decode(self, latents):
    return self.vae.decode(latents) + self.probe


class ProbedCLIP:
  def __init__(self, clip, probe):
    self.clip, self.probe = clip, probe

  def embed_images(self, images):
    return self.clip.embed_images(images + self.probe)

  def embed_texts(self, ids):
    return self.clip.embed_texts(ids)


@pytest.mark.parametrize("torch_clip", ["vit_b32_like"], indirect=True)  # one CLIP is enough
def test_each_loss_term_alone_trains_the_unet_through_the_frozen_models(real_models, torch_clip):
  from flax import nnx
  models, batch, empty_ids = real_models
  graph, params = nnx.split(models.unet)
  cycle = CycleConfig(attention_select="level", attention_level=0)
  probes = {"decoded": jnp.zeros((1, 1, 1, 3)), "clip_input": jnp.zeros((1, 1, 1, 3))}

  def loss(params, probes, weights):
    return cycle_losses(nnx.merge(graph, params), ProbedVAE(models.vae, probes["decoded"]),
                        models.text_encoder, ProbedCLIP(models.clip, probes["clip_input"]),
                        batch, jax.random.key(1), ALPHAS, cycle, LossConfig(**weights),
                        empty_ids=empty_ids)

  # A term alone computes only itself: the others' zero weights switch them off (traced only).
  for term, weights in ONLY.items():
    _, metrics = jax.eval_shape(lambda p, q: loss(p, q, weights), params, probes)
    assert {n for n in metrics if n.startswith("loss_")} == {f"loss_{term}"}, (term, metrics)
    assert "loss" in metrics

  # Each term's gradient, w.r.t. the UNet's parameters and the probes only (the frozen models
  # are differentiated through, and nothing else could be updated): with every term on, one
  # forward and the four terms' pullbacks batched. One program: four (one per term alone)
  # took 136 s of compile in the suite (2026-11-29).
  terms = tuple(ONLY)

  @jax.jit
  def term_gradients(params, probes):
    metrics, pullback = jax.vjp(lambda p, q: loss(p, q, dict.fromkeys(terms, 1.0))[1],
                                params, probes)
    one_hot = {name: jnp.asarray([name == f"loss_{term}" for term in terms], value.dtype)
               for name, value in metrics.items()}  # row i: d loss_{terms[i]}
    return metrics, jax.vmap(pullback)(one_hot)

  metrics, (grads, probe_grads) = term_gradients(params, probes)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for i, term in enumerate(terms):
    assert np.isfinite(float(metrics[f"loss_{term}"])), term
    leaves = [g[i] for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves), term
    assert float(sum(jnp.sum(jnp.abs(g)) for g in leaves)) > 0, term
    through_decoder = float(jnp.abs(probe_grads["decoded"][i]).sum())
    through_clip = float(jnp.abs(probe_grads["clip_input"][i]).sum())
    if term in ("clip", "sim", "recon"):
      assert through_decoder > 0, term
    else:  # L_attn and L_keep compare UNet outputs only: they do not depend on a decode
      assert through_decoder == 0, term
    assert (through_clip > 0) == (term in ("clip", "sim")), term


def test_ip2p_noise_offset_adds_one_constant_per_example_and_channel():
  batch = make_batch(batch_size=8)
  batch["edited_image"] = -batch["image"]

  def channel_means_of_noise(noise_offset):
    unet, vae = RecordingUNet(), StubVAE()
    value, _ = ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                           conditioning_dropout=0.0, empty_ids=EMPTY_IDS,
                           noise_offset=noise_offset)
    jax.effects_barrier()
    (call,) = unet.calls
    root_a, root_1ma = sqrt_alpha(call["t"])
    noise = (call["noisy"] - root_a * np.asarray(vae.samples[0], np.float64) * SCALING) / root_1ma
    eps = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
    np.testing.assert_allclose(float(value), np.mean((eps - noise) ** 2), rtol=1e-3)
    means = noise.mean(axis=(1, 2), keepdims=True)
    return means, np.std(noise - means)

  plain_means, plain_spread = channel_means_of_noise(0.0)
  offset_means, offset_spread = channel_means_of_noise(20.0)
  # 4x4 latents: plain noise's channel means have std 1/4; the offset's constant has std 20.
  assert np.std(plain_means) < 0.6 and np.std(offset_means) > 8.0
  assert 0.7 < plain_spread < 1.3 and 0.7 < offset_spread < 1.3  # the rest is unit noise


def test_cycle_noise_offset_is_refused_negative():
  with pytest.raises(ValueError, match="cycle.noise_offset=-0.1"):
    CycleConfig(noise_offset=-0.1)


def test_ip2p_v_weighting_divides_each_examples_noise_mse_by_alpha_bar():
  batch = make_batch(batch_size=8)
  batch["edited_image"] = -batch["image"]
  unet, vae = RecordingUNet(), StubVAE()
  value, metrics = ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                               conditioning_dropout=0.0, empty_ids=EMPTY_IDS,
                               loss_weighting="v")
  jax.effects_barrier()
  (call,) = unet.calls
  root_a, root_1ma = sqrt_alpha(call["t"])
  noise = (call["noisy"] - root_a * np.asarray(vae.samples[0], np.float64) * SCALING) / root_1ma
  eps = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
  per_example = np.mean((eps - noise) ** 2, axis=(1, 2, 3))
  alpha = np.asarray(root_a, np.float64).reshape(-1) ** 2
  np.testing.assert_allclose(float(value), np.mean(per_example / alpha), rtol=1e-3)
  np.testing.assert_allclose(float(metrics["noise_mse"]), np.mean(per_example), rtol=1e-3)
  with pytest.raises(ValueError, match="ip2p.loss_weighting='x0'"):
    ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                empty_ids=EMPTY_IDS, loss_weighting="x0")


# ---------------------------------------------------------------------------------------------
# v-prediction: the losses train the run's prediction type; the CEC edits read the UNet by it.

def test_v_target_is_the_output_the_conversions_invert():
  rng = np.random.default_rng(3)
  x0, noise = (jnp.asarray(rng.normal(size=(3, 4, 4, 4)), jnp.float32) for _ in range(2))
  alpha = ALPHAS[jnp.asarray([0, 500, 999])][:, None, None, None]
  noisy = jnp.sqrt(alpha) * x0 + jnp.sqrt(1 - alpha) * noise
  v = schedules.v_target(alpha, x0, noise)
  np.testing.assert_allclose(v, jnp.sqrt(alpha) * noise - jnp.sqrt(1 - alpha) * x0, atol=1e-6)
  np.testing.assert_allclose(schedules.predict_x0(alpha, noisy, v, "v_prediction"), x0,
                             atol=1e-5)
  np.testing.assert_allclose(schedules.predict_epsilon(alpha, noisy, v, "v_prediction"), noise,
                             atol=1e-5)
  np.testing.assert_array_equal(schedules.training_target(alpha, x0, noise, "v_prediction"), v)
  np.testing.assert_array_equal(schedules.training_target(alpha, x0, noise, "epsilon"), noise)


def test_ip2p_loss_of_a_v_model_is_the_mse_to_v():
  batch = make_batch(batch_size=8)
  batch["edited_image"] = -batch["image"]
  unet, vae = RecordingUNet(), StubVAE()
  value, metrics = ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                               conditioning_dropout=0.0, empty_ids=EMPTY_IDS,
                               loss_weighting="v", prediction_type="v_prediction")
  jax.effects_barrier()
  (call,) = unet.calls
  root_a, root_1ma = sqrt_alpha(call["t"])
  x0 = np.asarray(vae.samples[0], np.float64) * SCALING
  noise = (call["noisy"] - root_a * x0) / root_1ma
  v_prediction = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
  np.testing.assert_allclose(float(value),
                             np.mean((v_prediction - (root_a * noise - root_1ma * x0)) ** 2),
                             rtol=1e-3)
  # The same number as the epsilon model's "v" weighting of the equivalent noise prediction.
  eps = root_a * v_prediction + root_1ma * call["noisy"]
  per_example = np.mean((eps - noise) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(float(value), np.mean(per_example / root_a.reshape(-1) ** 2),
                             rtol=1e-3)
  np.testing.assert_allclose(float(metrics["noise_mse"]), np.mean(per_example), rtol=1e-3)
  # "epsilon" would be a different loss (alpha_bar times this one): refused, not reinterpreted.
  with pytest.raises(ValueError, match="loss_weighting='epsilon' with a v_prediction model"):
    ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                empty_ids=EMPTY_IDS, prediction_type="v_prediction")


class CopyImageVUNet:
  """A v-prediction UNet that knows the answer: the exact v of x0 = its image condition
  (scaled), whatever the noisy latent."""
  config = types.SimpleNamespace(block_out_channels=(8, 8, 8))

  def __call__(self, sample, timesteps, encoder_hidden_states, *, capture=None):
    noisy, condition = sample[..., :4], sample[..., 4:]
    alpha = schedules.alpha_at(ALPHAS, timesteps)
    return (jnp.sqrt(alpha) * noisy - condition * SCALING) / jnp.sqrt(1 - alpha)


@pytest.mark.parametrize("k", [1, 3])
def test_cec_edits_read_a_v_unet_as_v(k):
  cycle = CycleConfig(num_steps_min=k, num_steps_max=k, attention_resolution=4)
  loss = LossConfig(**ONLY["recon"], recon_kind="latent")
  batch = make_batch()

  def recon(prediction_type):
    _, metrics = cycle_losses(CopyImageVUNet(), StubVAE(), StubTextEncoder(), StubCLIP(), batch,
                              jax.random.key(1), ALPHAS, cycle, loss, empty_ids=EMPTY_IDS,
                              prediction_type=prediction_type)
    return float(metrics["loss_recon"])
  # Both edits return the scaled condition exactly: the reverse edit gives back z_x's mode.
  assert recon("v_prediction") < 1e-5
  assert recon("epsilon") > 1e-2  # the same outputs read as noise are not an x0


def test_edit_region_weights_rebalance_positions_within_each_example():
  from uip2p_jax.losses import edit_region_weights
  image = np.zeros((2, 4, 4, 4), np.float32)
  edited = image.copy()
  edited[0, 1, 2] = 1.0      # a one-object edit: one position changes
  edited[1] = 0.5            # a background edit: every position changes alike
  weights = np.asarray(edit_region_weights(image, edited, 3.0))
  assert weights.shape == (2, 4, 4, 1)
  np.testing.assert_allclose(weights.mean(axis=(1, 2, 3)), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(weights[1], 1.0, rtol=1e-6)
  assert weights[0, 1, 2, 0] == pytest.approx(4.0 * weights[0, 0, 0, 0])


def test_ip2p_edit_region_weight_weights_each_positions_error():
  batch = make_batch(batch_size=8)
  batch["edited_image"] = batch["image"].at[:, :8].set(-batch["image"][:, :8])  # the top half
  unet, vae = RecordingUNet(), StubVAE()
  value, _ = ip2p_losses(unet, vae, StubTextEncoder(), batch, jax.random.key(0), ALPHAS,
                         conditioning_dropout=0.0, empty_ids=EMPTY_IDS, edit_region_weight=3.0)
  jax.effects_barrier()
  (call,) = unet.calls
  root_a, root_1ma = sqrt_alpha(call["t"])
  noise = (call["noisy"] - root_a * np.asarray(vae.samples[0], np.float64) * SCALING) / root_1ma
  eps = np.asarray(stub_eps(call["noisy"], call["condition"], call["text"]), np.float64)
  change = np.abs(np.asarray(vae.encode(batch["edited_image"]).mode())
                  - np.asarray(vae.encode(batch["image"]).mode())).mean(-1, keepdims=True)
  weights = 1 + 3.0 * change / change.max(axis=(1, 2, 3), keepdims=True)
  weights /= weights.mean(axis=(1, 2, 3), keepdims=True)
  assert weights[:, :2].min() > weights[:, 2:].max()  # the edited half weighs more
  np.testing.assert_allclose(float(value), np.mean(weights * (eps - noise) ** 2), rtol=1e-3)
