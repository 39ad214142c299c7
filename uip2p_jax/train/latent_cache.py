"""The frozen VAE's posterior of every training image, computed once (`config.data.cache_latents`).

A supervised step (`ip2p`, and `t2i` on a built captions dataset) spends much of its time in the
frozen VAE's encoder: on ShapesWorld's IP2P (64 px, batch 32, input and edited image) it is 12 of
the step's 37 GFLOP. With no augmentation (no flip, crop scale 1, every image stored square at
the training resolution) an image's posterior is the same at every epoch, so this encodes each
record once, keeps the posterior's mean and log-variance (float32) on the host, and hands the step
`<field>_latent_mean` / `<field>_latent_logvar` in place of the images; the step draws the latent
sample from them exactly as it would from the encoder's output (`cycle.image_posterior`). The
stream of records, their order and the step keys do not change, so a run can turn the cache on
(or off) and resume.

The posteriors are saved in the workdir (`latent_cache/<split>-<fingerprint>.npz`), keyed by the
VAE's weights, the resolution and the records' ids: a resumed run reads them back in seconds; any
change in those is another file (computed again), never a stale one.
"""

from __future__ import annotations

import hashlib
import io
import os

import jax
import numpy as np
from flax import nnx

from uip2p_jax import storage

# What each objective can take from the cache (its other image fields stay images).
CACHED_FIELDS = {"ip2p": ("image", "edited_image"), "t2i": ("image",)}
SUFFIXES = ("_latent_mean", "_latent_logvar")
ENCODE_BATCH = 64


def cached_name(field: str, suffix: str) -> str:
  return field + suffix


def check_cacheable(config) -> str | None:
  """Why the run's images cannot be cached (None: they can)."""
  d = config.data
  if config.objective not in CACHED_FIELDS:
    return (f"objective {config.objective!r} reads its images in the step; the cache serves "
            f"{sorted(CACHED_FIELDS)}")
  if d.kind == "world":
    return "a rendered world is a new scene every step; the cache needs a built dataset"
  if d.flip or d.min_scale != 1.0 or d.max_scale != 1.0:
    return (f"augmentation changes an image between epochs (data.flip={d.flip}, "
            f"data.min_scale={d.min_scale}, data.max_scale={d.max_scale}); the cache needs "
            "flip=False and min_scale=max_scale=1")
  return None


def _fingerprint(vae_params, resolution: int, ids: np.ndarray) -> str:
  digest = hashlib.sha256(f"resolution={resolution}".encode())
  for leaf in jax.tree.leaves(vae_params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  digest.update("\n".join(ids.tolist()).encode())
  return digest.hexdigest()[:16]


def _record_ids(source) -> np.ndarray:
  return np.asarray([r.decode() if isinstance(r, bytes) else str(r)
                     for r in (source[i]["id"] for i in range(len(source)))])


def _record_images(source, ids: np.ndarray, fields, resolution: int):
  """(the ids of the records that decode, {field: their uint8 images}), in index order: exactly
  what the loader's crop gives at scale 1 (the whole image), refused where that is not so."""
  from uip2p_jax.data.loader import decode_image
  kept, images = [], {field: [] for field in fields}
  for index, rid in enumerate(ids):
    record = source[index]
    try:
      decoded = [decode_image(record[field], resolution) for field in fields]
    except Exception:  # the loader skips (and counts) it too: it is never asked for
      continue
    for field, image in zip(fields, decoded):
      if image.size != (resolution, resolution):
        raise ValueError(
            f"data.cache_latents: record {rid}'s {field} is {image.size[0]}x{image.size[1]}; "
            f"the cache needs every image stored at the training resolution "
            f"{resolution}x{resolution} (a crop of another size differs between epochs). Set "
            "data.cache_latents=False")
      images[field].append(np.asarray(image, np.uint8))
    kept.append(rid)
  if not kept:
    raise ValueError("data.cache_latents: no record of the split decodes")
  return np.asarray(kept), {field: np.stack(v) for field, v in images.items()}


class LatentCache:
  """Host-side posteriors by record id; `replace_images(batch)` swaps a loader batch's images
  for them."""

  def __init__(self, ids: np.ndarray, arrays: dict[str, np.ndarray]):
    self.row = {rid: i for i, rid in enumerate(ids.tolist())}
    self.arrays = arrays
    self.fields = tuple(sorted({name[:-len(s)] for name in arrays for s in SUFFIXES
                                if name.endswith(s)}))

  def __len__(self) -> int:
    return len(self.row)

  def replace_images(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in batch["id"]]
    try:
      rows = np.asarray([self.row[i] for i in ids])
    except KeyError as e:
      raise KeyError(f"record {e.args[0]} is not in the latent cache (the dataset changed "
                     "after the cache was built?)") from None
    out = {k: v for k, v in batch.items() if k not in self.fields}
    for name, array in self.arrays.items():
      out[name] = array[rows]
    return out


def build(loader_config, objective: str, vae_graph, vae_params, cache_dir: str,
          log=print) -> LatentCache:
  """The cache of `loader_config`'s split for `objective`: read from `cache_dir` when it holds
  this VAE's, resolution's and records' file, else computed (and saved there). Host memory:
  records x fields x 2 x the latent's size in float32 (ShapesWorld's 20000 pairs: 330 MB)."""
  from uip2p_jax.data.builders import open_split
  fields = CACHED_FIELDS[objective]
  source, _ = open_split(loader_config.data_dir, loader_config.kind, loader_config.split)
  r = loader_config.resolution
  ids = _record_ids(source)
  split = loader_config.split or "train"
  path = os.path.join(cache_dir, f"{split}-{_fingerprint(vae_params, r, ids)}.npz")
  if storage.isfile(path):
    with storage.open_file(path, "rb") as f:
      saved = dict(np.load(io.BytesIO(f.read())))
    kept = saved.pop("ids")
    log(f"train: latent cache: {len(kept)} records' posteriors read from {path}")
    return LatentCache(kept, saved)

  @jax.jit
  def encode(params, images):
    posterior = nnx.merge(vae_graph, params).encode(images.astype(np.float32) * (2 / 255) - 1)
    return posterior.mean, posterior.logvar

  kept, images = _record_images(source, ids, fields, r)
  arrays = {}
  for field in fields:
    means, logvars = [], []
    for start in range(0, len(kept), ENCODE_BATCH):
      chunk = images[field][start:start + ENCODE_BATCH]
      pad = ENCODE_BATCH - len(chunk)  # one compiled shape
      mean, logvar = encode(vae_params, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
      means.append(np.asarray(mean)[:len(chunk)])
      logvars.append(np.asarray(logvar)[:len(chunk)])
    arrays[cached_name(field, SUFFIXES[0])] = np.concatenate(means)
    arrays[cached_name(field, SUFFIXES[1])] = np.concatenate(logvars)
  if jax.process_index() == 0:
    storage.makedirs(cache_dir)
    buffer = io.BytesIO()
    np.savez(buffer, ids=kept, **arrays)
    storage.write_bytes(path + ".tmp", buffer.getvalue())
    storage.rename(path + ".tmp", path)
  skipped = len(ids) - len(kept)
  log(f"train: latent cache: encoded {len(kept)} records' {', '.join(fields)} into {path}"
      + (f" ({skipped} undecodable records left out, as the loader skips them)" if skipped
         else ""))
  return LatentCache(kept, arrays)


__all__ = ["CACHED_FIELDS", "LatentCache", "build", "check_cacheable"]
