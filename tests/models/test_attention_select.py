"""Which attention implementation every SD 1.5 shape gets on each platform, the errors of an
explicit backend that cannot take a shape, and the Pallas TPU splash kernel (interpret mode on
this CPU) against plain softmax attention, values and gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uip2p_jax.models import attention
from uip2p_jax.models.attention import select_backend, splash_attention
from uip2p_jax.models.presets import SD15, AttentionShape, attention_shapes
from uip2p_jax.models.vit import ViTConfig

# Cells: the f32 and bf16 choice, b = blockwise, x = xla, c = cudnn, s = splash. GPUs by compute
# capability: A100 8.0, L4 8.9, H100 9.0. unet.<level> is a UNet level (0 = full latent size).
TABLE = """
layer           px    q     kv    heads dim  | cpu  A100 L4   H100 TPU
unet.0.attn1    256   1024  1024  8     40   | bb   xc   xc   xc   ss
unet.0.attn2    256   1024  77    8     40   | bb   xc   xc   xc   ss
unet.1.attn1    256   256   256   8     80   | bb   xc   xc   xc   ss
unet.1.attn2    256   256   77    8     80   | bb   xc   xc   xc   ss
unet.2.attn1    256   64    64    8     160  | bb   xx   xx   xc   xx
unet.2.attn2    256   64    77    8     160  | bb   xx   xx   xc   xx
unet.mid.attn1  256   16    16    8     160  | bb   xx   xx   xc   xx
unet.mid.attn2  256   16    77    8     160  | bb   xx   xx   xc   xx
vae.mid         256   1024  1024  1     512  | bb   xx   xx   xx   ss
text_encoder    256   77    77    12    64   | xx   xc   xc   xc   xx
clip.text       256   77    77    12    64   | xx   xc   xc   xc   xx
clip.vision     256   257   257   16    64   | bb   xc   xc   xc   xx
unet.0.attn1    512   4096  4096  8     40   | bb   xc   xc   xc   ss
unet.0.attn2    512   4096  77    8     40   | bb   xc   xc   xc   ss
unet.1.attn1    512   1024  1024  8     80   | bb   xc   xc   xc   ss
unet.1.attn2    512   1024  77    8     80   | bb   xc   xc   xc   ss
unet.2.attn1    512   256   256   8     160  | bb   xx   xx   xc   ss
unet.2.attn2    512   256   77    8     160  | bb   xx   xx   xc   ss
unet.mid.attn1  512   64    64    8     160  | bb   xx   xx   xc   xx
unet.mid.attn2  512   64    77    8     160  | bb   xx   xx   xc   xx
vae.mid         512   4096  4096  1     512  | bb   xx   xx   xx   ss
text_encoder    512   77    77    12    64   | xx   xc   xc   xc   xx
clip.text       512   77    77    12    64   | xx   xc   xc   xc   xx
clip.vision     512   257   257   16    64   | bb   xc   xc   xc   xx
dino            224   197   197   6     64   | bb   xc   xc   xc   ss
"""
PLATFORMS = {"cpu": ("cpu", "cpu"), "A100": ("gpu", "8.0"), "L4": ("gpu", "8.9"),
             "H100": ("gpu", "9.0"), "TPU": ("tpu", "TPU v5 lite")}
CODES = {"b": "blockwise", "x": "xla", "c": "cudnn", "s": "splash"}


def _rows():
  lines = TABLE.strip().splitlines()
  platforms = lines[0].split("|")[1].split()
  for line in lines[1:]:
    shape, cells = line.split("|")
    layer, px, *numbers = shape.split()
    yield layer, int(px), tuple(map(int, numbers)), dict(zip(platforms, cells.split()))


def test_table_covers_every_sd15_attention_shape():
  rows = {(layer, px): numbers for layer, px, numbers, _ in _rows()}
  for px in (256, 512):
    derived = {(s.layer, px): (s.q_len, s.kv_len, s.heads, s.head_dim)
               for s in attention_shapes(SD15, px)}
    assert derived == {key: rows[key] for key in rows if key[1] == px}


@pytest.mark.parametrize("layer,px,numbers,cells", list(_rows()), ids=lambda v: str(v))
def test_backend_table(layer, px, numbers, cells):
  q_len, kv_len, heads, head_dim = numbers
  causal = layer in ("text_encoder", "clip.text")
  got = {}
  for name, (platform, device) in PLATFORMS.items():
    got[name] = "".join(
        next(c for c, b in CODES.items() if b == select_backend(
            platform, device, dtype, q_len, kv_len, head_dim, heads, is_causal=causal))
        for dtype in (jnp.float32, jnp.bfloat16))
  assert got == cells


def test_dino_row_matches_the_vit_config():
  vit = ViTConfig()
  tokens = (vit.image_size // vit.patch_size) ** 2 + 1
  row = next(numbers for layer, _, numbers, _ in _rows() if layer == "dino")
  assert row == (tokens, tokens, vit.num_attention_heads,
                 vit.hidden_size // vit.num_attention_heads)


def test_attention_shape_is_the_model_layer_shape():
  # The UNet's first level at 256 px: a 32 x 32 latent, 320 channels in 8 heads.
  assert AttentionShape("unet.0.attn1", 1024, 1024, 8, 40) in attention_shapes(SD15, 256)


@pytest.mark.parametrize("platform,device,dtype,q_len,head_dim,requested,message", [
    ("gpu", "8.0", jnp.bfloat16, 256, 160, "cudnn",
     r"8 heads x 160 wide, 256 queries x 77 keys, bfloat16, on gpu \(8.0\): head_dim 160 is not "
     r"a multiple of 8 at most 128"),
    ("gpu", "9.0", jnp.bfloat16, 4096, 512, "cudnn", r"head_dim 512 .* at most 256"),
    ("gpu", "9.0", jnp.float32, 4096, 40, "cudnn", r"float32, on gpu .* not float16 or bfloat16"),
    ("gpu", "7.0", jnp.float16, 4096, 40, "cudnn", r"compute capability 7.0 is below 8.0"),
    ("cpu", "cpu", jnp.bfloat16, 4096, 40, "cudnn", r"cuDNN runs on NVIDIA GPUs only"),
    ("gpu", "9.0", jnp.bfloat16, 4096, 40, "splash", r"runs on TPUs only"),
    ("tpu", "TPU v4", jnp.float16, 4096, 40, "splash", r"float16 is not float32 or bfloat16"),
])
def test_explicit_backend_that_cannot_take_the_shape_is_refused(
    platform, device, dtype, q_len, head_dim, requested, message):
  with pytest.raises(ValueError, match=rf"attention backend '{requested}' cannot take .*{message}"):
    select_backend(platform, device, dtype, q_len, 77, head_dim, 8, requested=requested)


def test_explicit_backend_that_fits_is_kept():
  assert select_backend("gpu", "9.0", jnp.bfloat16, 256, 77, 160, 8, requested="cudnn") == "cudnn"
  assert select_backend("tpu", "TPU v4", jnp.float32, 16, 77, 160, 8,
                        requested="splash") == "splash"
  assert select_backend("gpu", "8.0", jnp.float32, 16, 16, 160, 8, requested="blockwise") \
      == "blockwise"
  with pytest.raises(ValueError, match="blockwise attention has no causal mask"):
    select_backend("cpu", "cpu", jnp.float32, 77, 77, 64, 12, is_causal=True,
                   requested="blockwise")


def test_layers_on_this_cpu_refuse_a_gpu_backend():
  x = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match=r"'cudnn' cannot take 2 heads x 8 wide, 16 queries x 16 "
                                       r"keys, float32, on cpu"):
    attention.multi_head_attention(x, x, x, scale=1.0, backend="cudnn")


@pytest.mark.parametrize("platform,device,dtype,expected", [
    ("tpu", "TPU v4", jnp.float32, "splash"), ("gpu", "9.0", jnp.bfloat16, "cudnn"),
    ("gpu", "8.0", jnp.float32, "xla"), ("cpu", "cpu", jnp.float32, "blockwise")])
def test_layers_call_the_selected_backend(platform, device, dtype, expected, monkeypatch):
  calls = []
  record = lambda name: lambda q, k, v, **kwargs: calls.append(name) or q
  monkeypatch.setattr(attention, "local_device", lambda: (platform, device))
  monkeypatch.setattr(attention, "splash_attention", record("splash"))
  monkeypatch.setattr(attention, "blockwise_attention", record("blockwise"))
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, implementation, **kwargs: calls.append(implementation) or q)
  x = jnp.zeros((1, 256, 2, 40), dtype)
  attention.multi_head_attention(x, x, x, scale=1.0)
  assert calls == [expected]


def _reference(q, k, v, scale, causal=False):
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


# (batch, queries, keys, heads, head_dim, causal): self-attention padded 200 -> 256 tokens and
# width 40 -> 128; cross-attention with 77 text keys (128, 51 masked) and width 160 -> 256;
# CLIP's causal 77-token text attention.
KERNEL_SHAPES = [(2, 200, 200, 2, 40, False), (2, 128, 77, 2, 160, False),
                 (1, 77, 77, 2, 64, True)]


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_splash_kernel_matches_softmax_attention(shape, dtype, atol):
  batch, q_len, kv_len, heads, head_dim, causal = shape
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim), dtype)
  cotangent = jax.random.normal(keys[3], (batch, q_len, heads, head_dim), jnp.float32)
  scale = head_dim ** -0.5
  kernel = jax.jit(lambda q, k, v: splash_attention(q, k, v, scale=scale, is_causal=causal,
                                                    interpret=True))
  expected = _reference(q, k, v, scale, causal)
  out = kernel(q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=atol, rtol=atol)

  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cotangent)
  grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  expected_grads = jax.grad(loss(lambda q, k, v: _reference(q, k, v, scale, causal)),
                            argnums=(0, 1, 2))(q, k, v)
  for name, g, e in zip("qkv", grads, expected_grads):
    tolerance = atol * float(jnp.abs(e).max())
    assert g.dtype == dtype, name
    np.testing.assert_allclose(g.astype(jnp.float32), e, atol=max(tolerance, atol), rtol=atol,
                               err_msg=f"d{name}")


# On a TPU `auto` sends these to the kernel: the UNet's cross-attention at its 160-wide level and
# the VAE's single 512-wide head (smaller tiles). Pallas' TPU interpret mode simulates the TPU's
# memories and DMAs on this CPU.
@pytest.mark.parametrize("shape", [(1, 128, 77, 2, 160), (1, 256, 256, 1, 512)],
                         ids=["cross_160", "vae_512"])
def test_layers_on_a_tpu_run_the_kernel(shape, monkeypatch):
  from jax.experimental.pallas import tpu as pltpu
  batch, q_len, kv_len, heads, head_dim = shape
  monkeypatch.setattr(attention, "local_device", lambda: ("tpu", "TPU v5 lite"))
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, kv_len, heads, head_dim)) for key in keys[1:])
  scale = head_dim ** -0.5
  layer = lambda q, k, v: attention.multi_head_attention(q, k, v, scale=scale)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  with pltpu.force_tpu_interpret_mode():
    lowered = jax.jit(layer).lower(q, k, v).as_text()
    out = jax.jit(layer)(q, k, v)
    grads = jax.jit(jax.grad(loss(layer), argnums=(0, 1, 2)))(q, k, v)
  assert "splash" in lowered  # the kernel's named scope
  np.testing.assert_allclose(out, _reference(q, k, v, scale), atol=2e-5)
  expected = jax.grad(loss(lambda q, k, v: _reference(q, k, v, scale)), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, atol=2e-5)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from uip2p_jax.models.attention import splash_attention
    from uip2p_jax.sharding import BATCH_AXES
    mesh = jax.make_mesh((2, 1), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 128, 2, 40)) for i in range(3))
    k, v = k[:, :77], v[:, :77]
    attend = jax.jit(lambda q, k, v: splash_attention(q, k, v, scale=0.5, interpret=True))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))), argnums=(0, 1, 2)))
    single, single_grads = attend(q, k, v), grad(q, k, v)
    with jax.set_mesh(mesh):
      spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
      sharded_inputs = [jax.device_put(t, spec) for t in (q, k, v)]
      sharded, sharded_grads = attend(*sharded_inputs), grad(*sharded_inputs)
      text = attend.lower(q, k, v).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text, text[:2000]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)
    for a, b in zip(sharded_grads, single_grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    print("ok", jax.device_count())
""")


def test_splash_kernel_runs_per_device_under_a_mesh():
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ok 2" in result.stdout
