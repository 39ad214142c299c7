"""uip2p_jax: UIP2P (Cycle Edit Consistency) on InstructPix2Pix, in JAX/Flax."""

__version__ = "0.1.0"
