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
VAE's weights, the resolution and the records (ids and stored image bytes): a resumed run reads
them back in seconds; any change in those is another file (computed again), never a stale one.
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


# Part of every fingerprint: a change in what the file holds makes old files another key.
FORMAT = "latent-cache-1"


def _scan(source, fields, resolution: int):
  """(every record's id in index order, a hash of the ids and the images' stored bytes)."""
  digest = hashlib.sha256(f"{FORMAT} resolution={resolution}".encode())
  ids = []
  for index in range(len(source)):
    record = source[index]
    rid = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    ids.append(rid)
    digest.update(rid.encode())
    for field in fields:
      digest.update(hashlib.sha256(record[field]).digest())
  return np.asarray(ids), digest


def _fingerprint(digest, vae_params) -> str:
  digest = digest.copy()
  for leaf in jax.tree.leaves(vae_params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def _decoded_chunk(source, indices, fields, resolution: int):
  """(the indices whose images decode, {field: their uint8 images}): exactly what the loader's
  crop gives at scale 1 (the whole image), refused where that is not so."""
  from uip2p_jax.data.loader import decode_image
  kept, images = [], {field: [] for field in fields}
  for index in indices:
    record = source[int(index)]
    try:
      decoded = [decode_image(record[field], resolution) for field in fields]
    except Exception:  # the loader skips (and counts) it too: it is never asked for
      continue
    for field, image in zip(fields, decoded):
      if image.size != (resolution, resolution):
        rid = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
        raise ValueError(
            f"data.cache_latents: record {rid}'s {field} is {image.size[0]}x{image.size[1]}; "
            f"the cache needs every image stored at the training resolution "
            f"{resolution}x{resolution} (a crop of another size differs between epochs). Set "
            "data.cache_latents=False")
      images[field].append(np.asarray(image, np.uint8))
    kept.append(int(index))
  return kept, images


class LatentCache:
  """Host-side posteriors by record id; `replace_images(batch)` swaps a loader batch's images
  for them."""

  def __init__(self, ids: np.ndarray, arrays: dict[str, np.ndarray], fields: tuple[str, ...]):
    self.row = {rid: i for i, rid in enumerate(ids.tolist())}
    self.arrays = arrays
    self.fields = fields  # the image fields the arrays replace

  def __len__(self) -> int:
    return len(self.row)

  def replace_images(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in batch["id"]]
    try:
      rows = np.asarray([self.row[i] for i in ids])
    except KeyError as e:
      raise ValueError(f"record {e.args[0]} is not in the latent cache: the dataset changed "
                       "after the run built it; rerun the command (the cache is rebuilt for "
                       "the new records)") from None
    out = {k: v for k, v in batch.items() if k not in self.fields}
    for name, array in self.arrays.items():
      out[name] = array[rows]
    return out


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _read(path: str) -> dict[str, np.ndarray]:
  with storage.open_file(path, "rb") as f:
    return dict(np.load(io.BytesIO(f.read())))


def build(loader_config, objective: str, vae_graph, vae_params, cache_dir: str,
          log=print) -> LatentCache:
  """The cache of `loader_config`'s split for `objective`: read from `cache_dir` when it holds
  the file of this VAE, resolution and these records (ids and image bytes), else computed by
  process 0 (a chunk at a time) and saved there, then read by the others. Host memory:
  records x fields x 2 x the latent's size in float32 (ShapesWorld's 20000 pairs: 330 MB)."""
  from uip2p_jax.data.builders import open_split
  fields = CACHED_FIELDS[objective]
  source, _ = open_split(loader_config.data_dir, loader_config.kind, loader_config.split)
  r = loader_config.resolution
  ids, digest = _scan(source, fields, r)
  split = loader_config.split or "train"
  path = os.path.join(cache_dir, f"{split}-{_fingerprint(digest, vae_params)}.npz")
  if not storage.isfile(path) and jax.process_index() == 0:
    _encode_all(source, ids, fields, r, vae_graph, vae_params, cache_dir, path, log)
  else:
    log(f"train: latent cache: read from {path}")
  _sync("latent cache")
  saved = _read(path)
  return LatentCache(saved.pop("ids"), saved, fields)


def _encode_all(source, ids, fields, resolution, vae_graph, vae_params, cache_dir, path, log):

  @jax.jit
  def encode(params, images):
    posterior = nnx.merge(vae_graph, params).encode(images.astype(np.float32) * (2 / 255) - 1)
    return posterior.mean, posterior.logvar

  kept, parts = [], {field + suffix: [] for field in fields for suffix in SUFFIXES}
  for start in range(0, len(ids), ENCODE_BATCH):
    indices, images = _decoded_chunk(source, range(start, min(start + ENCODE_BATCH, len(ids))),
                                     fields, resolution)
    if not indices:
      continue
    kept += indices
    for field in fields:
      chunk = np.stack(images[field])
      pad = ENCODE_BATCH - len(chunk)  # one compiled shape
      mean, logvar = encode(vae_params, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
      parts[field + SUFFIXES[0]].append(np.asarray(mean)[:len(chunk)])
      parts[field + SUFFIXES[1]].append(np.asarray(logvar)[:len(chunk)])
  if not kept:
    raise ValueError("data.cache_latents: no record of the split decodes")
  storage.makedirs(cache_dir)
  buffer = io.BytesIO()
  np.savez(buffer, ids=ids[kept], **{name: np.concatenate(v) for name, v in parts.items()})
  storage.write_bytes(path + ".tmp", buffer.getvalue())
  storage.rename(path + ".tmp", path)
  skipped = len(ids) - len(kept)
  log(f"train: latent cache: encoded {len(kept)} records' {', '.join(fields)} into {path}"
      + (f" ({skipped} undecodable records left out, as the loader skips them)" if skipped
         else ""))


__all__ = ["CACHED_FIELDS", "LatentCache", "build", "check_cacheable"]
