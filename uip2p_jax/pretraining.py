"""The losses that train a world's own pretrained models from nothing (ShapesWorld's VAE, CLIP,
text-to-image UNet and attribute probe): the trainer's objectives `vae`, `clip`, `t2i` and
`probe`, beside `cec` and `ip2p` (cycle.py). Each is (module(s), batch, key) -> (loss, metrics)
with `metrics["loss"]` the value optimised; images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from uip2p_jax import schedules
from uip2p_jax.cycle import image_posterior
from uip2p_jax.models import AutoencoderKL, CLIPModel, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.models.probe import AttributeProbe


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """config.pretrain: the weights of the objectives above (unused keys are ignored by the others)."""
  vae_kl: float = 1e-6            # SD's VAE: reconstruction + a very small KL (no GAN here)
  vae_l2: float = 1.0             # L1 + vae_l2 * MSE: L1 keeps edges sharp, MSE flat colours exact
  caption_dropout: float = 0.1    # t2i: caption -> "" for classifier-free guidance
  probe_degrade: float = 0.5      # probe: blur / noise strength of its training images


def vae_losses(vae: AutoencoderKL, batch, key, config: PretrainConfig):
  """Reconstruction of a sampled latent, plus config.vae_kl x KL(q(z|x) || N(0, I))."""
  posterior = vae.encode(batch["image"])
  reconstruction = vae.decode(posterior.sample(key))
  error = reconstruction - batch["image"]
  l1, l2 = jnp.mean(jnp.abs(error)), jnp.mean(error ** 2)
  kl = 0.5 * jnp.mean(jnp.sum(posterior.mean ** 2 + jnp.exp(posterior.logvar) - 1.0
                              - posterior.logvar, axis=(1, 2, 3)))
  loss = l1 + config.vae_l2 * l2 + config.vae_kl * kl
  # PSNR of images in [0, 1] (the error is in [-1, 1] units: MSE / 4).
  psnr = -10.0 * jnp.log10(jnp.maximum(l2 / 4.0, 1e-10))
  return loss, {"loss": loss, "loss_l1": l1, "loss_l2": l2, "kl": kl, "psnr": psnr,
                "latent_std": jnp.std(posterior.mean)}


def clip_losses(clip: CLIPModel, batch, key, config: PretrainConfig):
  """CLIP's symmetric contrastive loss over the batch's image/caption pairs (temperature learnt,
  its scale capped at 100 as in CLIP); accuracies are in-batch retrieval top-1."""
  del key, config
  images = clip.embed_images(batch["image"])
  texts = clip.embed_texts(batch["input_caption_ids"])
  scale = jnp.minimum(jnp.exp(clip.logit_scale[...].astype(jnp.float32)), 100.0)
  logits = scale * images @ texts.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  loss = (image_to_text + text_to_image) / 2
  return loss, {"loss": loss, "logit_scale": scale,
                "accuracy_image_to_text": jnp.mean(jnp.argmax(logits, 1) == labels),
                "accuracy_text_to_image": jnp.mean(jnp.argmax(logits, 0) == labels)}


def t2i_losses(unet: UNet2DConditionModel, vae: AutoencoderKL,
               text_encoder: CLIPTextTransformer, batch, key, alphas_cumprod: jax.Array,
               config: PretrainConfig, *, empty_ids: jax.Array, prediction_type: str = "epsilon"):
  """Stable Diffusion's loss: MSE to the model's target (the noise, or v for `prediction_type`
  "v_prediction") on the noised image latent given its caption (dropped to "" with probability
  config.caption_dropout, for classifier-free guidance)."""
  keys = jax.random.split(key, 4)
  latents = jax.lax.stop_gradient(image_posterior(vae, batch, "image").sample(keys[0])
                                  * vae.config.scaling_factor)
  ids = batch["input_caption_ids"]
  empty_ids = jnp.broadcast_to(jnp.reshape(empty_ids, (1, -1))[:, :ids.shape[1]], ids.shape)
  drop = jax.random.uniform(keys[1], (ids.shape[0],)) < config.caption_dropout
  text = jax.lax.stop_gradient(text_encoder(jnp.where(drop[:, None], empty_ids, ids))[0])
  timesteps = jax.random.randint(keys[2], (latents.shape[0],), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(keys[3], latents.shape)
  noisy = schedules.add_noise(alphas_cumprod, latents, noise, timesteps)
  target = schedules.training_target(schedules.alpha_at(alphas_cumprod, timesteps, noisy.ndim),
                                     latents, noise, prediction_type)
  loss = jnp.mean((unet(noisy, timesteps, text).astype(jnp.float32) - target) ** 2)
  return loss, {"loss": loss, "loss_t2i": loss}


def degrade(images: jax.Array, key: jax.Array, strength: float) -> jax.Array:
  """What an edit's decoding does to a scene, drawn per image: a blur (a mix with the image
  resized to half and back, weight U(0, strength)) and pixel noise (std U(0, strength / 10)), so
  the probe reads generated images as well as renders."""
  if strength <= 0:
    return images
  b, h, w, c = images.shape
  k1, k2, k3 = jax.random.split(key, 3)
  blurred = jax.image.resize(jax.image.resize(images, (b, h // 2, w // 2, c), "linear"),
                             images.shape, "linear")
  mix = jax.random.uniform(k1, (b, 1, 1, 1), maxval=strength)
  sigma = jax.random.uniform(k2, (b, 1, 1, 1), maxval=strength / 10)
  return (1 - mix) * images + mix * blurred + sigma * jax.random.normal(k3, images.shape)


def probe_losses(probe: AttributeProbe, batch, key, config: PretrainConfig):
  """Sum over labels of the cross-entropy on (mildly degraded, `degrade`) scenes; accuracy per
  label and per whole scene."""
  per_label = probe.split(probe(degrade(batch["image"], key, config.probe_degrade)))
  labels = batch["labels"]
  loss = sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, i]).mean()
             for i, logits in enumerate(per_label))
  correct = jnp.stack([jnp.argmax(l, -1) == labels[:, i] for i, l in enumerate(per_label)], -1)
  return loss, {"loss": loss, "accuracy_label": jnp.mean(correct),
                "accuracy_background": jnp.mean(correct[:, 0]),
                "accuracy_scene": jnp.mean(jnp.all(correct, -1))}


__all__ = ["PretrainConfig", "clip_losses", "probe_losses", "t2i_losses", "vae_losses"]
