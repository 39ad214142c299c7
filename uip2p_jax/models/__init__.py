"""Pure Flax NNX modules (no I/O). Weights are loaded by `uip2p_jax.weights`."""

from uip2p_jax.models.attention import AttentionCapture
from uip2p_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextTransformer,
                                   CLIPVisionConfig)
from uip2p_jax.models.gemma import Gemma2Config, Gemma2ForCausalLM
from uip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from uip2p_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from uip2p_jax.models.vit import ViTConfig, ViTModel
