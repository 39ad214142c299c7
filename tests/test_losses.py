"""CEC and IP2P losses against values worked out by hand on small inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uip2p_jax import losses


def test_clip_direction_loss_hand_values():
  # Image moves along +y, text along +y: aligned -> 0. Text along +x: orthogonal -> 1.
  image_in, image_out = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])   # direction (-1, 1)
  text_in, text_out = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 3.0]])     # normalised: (-1, 1)
  np.testing.assert_allclose(losses.clip_direction_loss(image_out, image_in, text_out, text_in),
                             [0.0], atol=1e-6)
  np.testing.assert_allclose(losses.clip_direction_loss(image_out, image_in, text_in, text_out),
                             [2.0], atol=1e-6)  # opposite direction
  text_in2, text_out2 = jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[1.0, 1.0, 1.0]])
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 1)))
  # image direction (-1, 1, 0); text direction (1/sqrt3, 1/sqrt3, 1/sqrt3 - 1): dot = 0 -> loss 1.
  np.testing.assert_allclose(losses.clip_direction_loss(pad(image_out), pad(image_in), text_out2,
                                                        text_in2), [1.0], atol=1e-6)


def test_similarity_and_reconstruction_hand_values():
  np.testing.assert_allclose(losses.similarity_loss(jnp.array([[1.0, 0.0], [1.0, 1.0]]),
                                                    jnp.array([[2.0, 0.0], [1.0, 0.0]])),
                             [0.0, 1 - 1 / np.sqrt(2)], atol=1e-6)
  x = jnp.zeros((2, 2, 2, 3))
  shifted = x.at[0].add(0.5).at[1, 0, 0, 0].set(-2.0)
  np.testing.assert_allclose(losses.reconstruction_loss(shifted, x), [0.5, 2.0 / 12], atol=1e-6)
  np.testing.assert_allclose(losses.reconstruction_loss(shifted, x, "l2"), [0.25, 4.0 / 12],
                             atol=1e-6)
  with pytest.raises(ValueError, match="'huber'"):
    losses.reconstruction_loss(x, x, "huber")


def test_clip_direction_floor_scores_short_changes_by_their_projection():
  text_in, text_out = jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, 0.0]])
  image_in = jnp.array([[1.0, 0.0, 0.0]])
  short = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  edited = jnp.asarray(short(np.array([[1.0, 0.02, 0.0]])))  # a short move along the text's way
  move = np.asarray(edited - image_in)
  text_direction = short(np.array([[-1.0, 1.0, 0.0]]))
  loss = lambda floor: float(losses.clip_direction_loss(edited, image_in, text_out, text_in,
                                                        image_floor=floor)[0])
  # No floor: the cosine of a short move is as large as a long one's.
  np.testing.assert_allclose(1 - loss(0.0), np.sum(short(move) * text_direction), rtol=1e-5)
  # Floor 0.1 > |move| = 0.02: the projection over the floor.
  np.testing.assert_allclose(1 - loss(0.1), np.sum(move * text_direction) / 0.1, rtol=1e-4)
  # Floor below |move|: the plain cosine.
  np.testing.assert_allclose(loss(0.001), loss(0.0), rtol=1e-6)


def test_latent_l1_reads_the_positions_that_changed_least():
  # One example, 2 x 2 positions, 2 channels: per-position mean |change| 0, 1, 2, 5.
  edited = jnp.array([[[[0.0, 0.0], [1.0, -1.0]], [[2.0, 2.0], [4.0, -6.0]]]])
  unchanged = jnp.zeros_like(edited)
  np.testing.assert_allclose(losses.latent_l1(edited, unchanged), [2.0])          # every position
  np.testing.assert_allclose(losses.latent_l1(edited, unchanged, 0.5), [0.5])     # 0 and 1
  np.testing.assert_allclose(losses.latent_l1(edited, unchanged, 0.01), [0.0])    # at least one
  # The gradient reaches only the kept positions: the edit may move the others freely.
  grad = jax.grad(lambda e: losses.latent_l1(e, unchanged, 0.5)[0])(edited)
  np.testing.assert_allclose(grad[0, 1], 0.0)
  np.testing.assert_allclose(grad[0, 0, 1], [0.25, -0.25])


def test_attention_map_and_loss_hand_values():
  ids = jnp.array([[49406, 320, 786, 49407, 49407]])  # BOS, 2 instruction tokens, EOS, pad
  mask = losses.instruction_token_mask(ids, eos_id=49407)
  np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0]])
  # Position, not id, decides: a tokenizer padding with id 0 after EOS, a row with no EOS.
  other = jnp.array([[998, 5, 0, 999, 0, 0], [998, 0, 7, 8, 9, 10]])
  np.testing.assert_array_equal(losses.instruction_token_mask(other, eos_id=999),
                                [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
  probs = np.zeros((1, 2, 2, 5), np.float32)
  probs[0, 0, 0] = [0.5, 0.25, 0.25, 0, 0]   # instruction mass 0.5
  probs[0, 0, 1] = [0.9, 0.05, 0.05, 0, 0]   # 0.1
  probs[0, 1, 0] = [0.0, 0.0, 0.0, 1, 0]     # 0 (all on EOS)
  probs[0, 1, 1] = [0.0, 0.5, 0.5, 0, 0]     # 1.0
  other = np.full_like(probs, 0.2)          # 0.4 everywhere
  maps = losses.attention_map({"a": jnp.asarray(probs), "b": jnp.asarray(other)}, mask)
  # Layer mean: [[0.45, 0.25], [0.2, 0.7]] -> divided by its max 0.7.
  np.testing.assert_allclose(maps[0], np.array([[0.45, 0.25], [0.2, 0.7]]) / 0.7, atol=1e-6)
  flat = jnp.ones((1, 2, 2))
  expected = np.mean((np.array([[0.45, 0.25], [0.2, 0.7]]) / 0.7 - 1) ** 2)
  np.testing.assert_allclose(losses.attention_loss(maps, flat), [expected], atol=1e-6)
  with pytest.raises(ValueError, match="different resolutions"):
    losses.attention_map({"a": jnp.zeros((1, 2, 2, 5)), "b": jnp.zeros((1, 4, 4, 5))}, mask)


def test_weighted_total_and_ip2p_loss():
  total = losses.weighted_total({"clip": jnp.array([1.0, 3.0]), "recon": jnp.array([0.5])},
                                {"clip": 2.0, "recon": 1.0, "attn": 0.0})
  np.testing.assert_allclose(total, 2.0 * 2.0 + 0.5)
  with pytest.raises(ValueError, match="weight 0"):
    losses.weighted_total({"attn": jnp.array([1.0])}, {"attn": 0.0})
  np.testing.assert_allclose(losses.ip2p_loss(jnp.ones((2, 3)), jnp.zeros((2, 3))), 1.0)


def test_conditioning_dropout_matches_the_ip2p_ranges():
  batch = 4000
  key = jax.random.key(0)
  text = jnp.ones((batch, 3, 2))
  empty = jnp.full((3, 2), -1.0)
  image = jnp.ones((batch, 2, 2, 4))
  new_text, new_image = losses.conditioning_dropout(key, text, empty, image)
  r = np.asarray(jax.random.uniform(key, (batch,)))
  text_dropped = np.asarray(new_text[:, 0, 0] == -1.0)
  image_dropped = np.asarray(new_image[:, 0, 0, 0] == 0.0)
  np.testing.assert_array_equal(text_dropped, r < 0.10)
  np.testing.assert_array_equal(image_dropped, (r >= 0.05) & (r < 0.15))
  assert 0.03 < np.mean(text_dropped & ~image_dropped) < 0.07   # text only ~5%
  assert 0.03 < np.mean(text_dropped & image_dropped) < 0.07    # both ~5%
  assert 0.03 < np.mean(~text_dropped & image_dropped) < 0.07   # image only ~5%


def test_metrics_share_the_loss_definitions_with_their_own_epsilon():
  from uip2p_jax.eval import metrics
  rng = np.random.default_rng(0)
  a, b, c, d = (jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(4))
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # The metrics divide by the bare norm, exactly as before they shared the definition.
  np.testing.assert_array_equal(metrics.cosine_similarity(a, b), jnp.sum(unit(a) * unit(b), -1))
  old_direction = jnp.sum(unit(unit(b) - unit(a)) * unit(unit(d) - unit(c)), -1)
  np.testing.assert_array_equal(metrics.direction_similarity(a, b, c, d), old_direction)
  np.testing.assert_allclose(1 - losses.clip_direction_loss(b, a, d, c), old_direction,
                             atol=1e-6)
  # Only a zero vector tells them apart: NaN in the metric, a finite 0 in the loss.
  zero = jnp.zeros((1, 8))
  assert np.isnan(metrics.cosine_similarity(zero, a[:1])[0])
  assert float(losses.cosine(zero, a[:1])[0]) == 0.0
