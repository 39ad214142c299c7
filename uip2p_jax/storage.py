"""Files that may live in a bucket: a run's workdir, its data dir, the export and eval outputs.

Paths stay plain strings. A URL (gs://BUCKET/run, s3://...) is read and written through
etils.epath (fsspec with gcsfs / s3fs / adlfs, or TensorFlow's gfile where it is installed),
never through os.path: `os.path.abspath("gs://b/run")` is "./gs:/b/run", a folder on each VM.
Local paths behave as before: a relative one resolves against the current directory, a
temporary file renamed over its target stays atomic, appending appends.

    storage.makedirs(workdir)
    storage.write_text_atomic(os.path.join(workdir, "config.json"), text)
    with storage.local_folder(export_dir) as folder:   # for writers that need a local path
      weights.save_unet(unet, os.path.join(folder, "unet"))
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import tempfile

# The URL schemes etils.epath reads and writes: (fsspec's name, the package that provides it).
FILESYSTEMS = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs"), "az": ("az", "adlfs")}


def _path(path: str | os.PathLike):
  from etils import epath  # imported on first use: it pulls in unittest.mock (0.1 s)
  return epath.Path(path)


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def url_problem(path: str | os.PathLike) -> str | None:
  """Why `path`, a URL, cannot be read or written here (None: it can, or it is local)."""
  path = os.fspath(path)
  if not is_remote(path):
    return None
  scheme = path.split("://", 1)[0]
  if scheme not in FILESYSTEMS:
    return (f"{scheme}:// is not a storage this package reads or writes; expected a local path "
            f"(a mounted bucket too) or {', '.join(s + '://' for s in FILESYSTEMS)}")
  if importlib.util.find_spec("tensorflow") is not None:  # epath then uses tf.io.gfile
    return None
  name, package = FILESYSTEMS[scheme]
  try:
    import fsspec
    fsspec.get_filesystem_class(name)
  except (ImportError, ValueError):
    return (f"{scheme}:// is read and written with {package}, which is not installed here "
            f"(pip install {package}; or mount the bucket and give its local path)")
  return None


def absolute(path: str | os.PathLike) -> str:
  """os.path.abspath for a local path; a URL as it is (absolute already), less a trailing slash
  as abspath drops one (`gs://b/run/export/` names the folder `export`, not '')."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.abspath(path)
  return path if path.endswith("://") else path.rstrip("/")


def exists(path: str | os.PathLike) -> bool:
  return _path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return _path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  target = _path(path)
  return target.exists() and not target.is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in folder `path` (unsorted, as os.listdir)."""
  return [child.name for child in _path(path).iterdir()]


def makedirs(path: str | os.PathLike) -> None:
  """Creates folder `path` and its parents. Nothing for a URL: a bucket has no folders (objects
  are written under any prefix), and gcsfs would create a missing (misspelt) bucket."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """os.rename locally; in a bucket a copy and delete of every object under `source`."""
  _path(source).rename(target)


def open_file(path: str | os.PathLike, mode: str = "r", newline: str | None = None):
  """open(path, mode) for modes r, w (and rb, wb); text is UTF-8, `newline` as open's (csv
  needs "")."""
  if "a" in mode:
    raise ValueError("appending: use append_text (an object in a bucket cannot be appended to)")
  if "b" in mode:
    return _path(path).open(mode)
  return io.TextIOWrapper(_path(path).open(mode + "b"), encoding="utf-8", newline=newline)


def read_text(path: str | os.PathLike) -> str:
  with open_file(path) as f:
    return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with open_file(path, "wb") as f:
    f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` so that a reader (or a killed writer) never sees half of it:
  locally through a temporary file renamed over it; a bucket object appears whole when its
  upload completes."""
  path = os.fspath(path)
  if is_remote(path):
    with open_file(path, "w") as f:
      f.write(text)
    return
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends `text` to `path` (created if missing). An object in a bucket cannot be appended
  to, so a remote file is read and written back whole (fine for the small logs this is for)."""
  path = os.fspath(path)
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(text)
    return
  before = read_text(path) if exists(path) else ""
  with open_file(path, "w") as f:
    f.write(before + text)


def copy_file(source: str | os.PathLike, destination: str | os.PathLike) -> None:
  """Copies file `source` to `destination`, each local or a URL (epath's own copy wants both on
  one filesystem)."""
  with _path(source).open("rb") as reader, _path(destination).open("wb") as writer:
    shutil.copyfileobj(reader, writer, 16 << 20)


def upload_folder(local_dir: str, target: str | os.PathLike) -> None:
  """Copies every file under the local folder `local_dir` to `target`, same relative paths."""
  for root, _, names in os.walk(local_dir):
    relative = os.path.relpath(root, local_dir)
    folder = _path(target) if relative == "." else _path(target) / relative
    makedirs(folder)
    for name in names:
      copy_file(os.path.join(root, name), folder / name)


@contextlib.contextmanager
def local_folder(path: str | os.PathLike):
  """A local folder to write `path`'s files in, for writers that only take local paths
  (safetensors, tokenizers, shutil): `path` itself when it is local; for a URL a temporary
  folder, uploaded to `path` when the block ends without an error (then deleted)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="uip2p-upload-") as staging:
    yield staging
    upload_folder(staging, path)


__all__ = ["FILESYSTEMS", "absolute", "append_text", "copy_file", "exists", "is_remote", "isdir",
           "isfile", "listdir", "local_folder", "makedirs", "open_file", "read_text", "rename",
           "upload_folder", "url_problem", "write_bytes", "write_text_atomic"]
