"""Run-folder paths that may be URLs (gs://bucket/run on a TPU pod): etils.epath, never os.path on a URL.

A local workdir is made absolute (the run may chdir); a URL is kept as given: os.path.abspath would turn
gs://b/r into <cwd>/gs:/b/r. Object stores cannot append, so `AppendFile` on a URL writes a local staging
copy and uploads the whole file at most every `upload_every` seconds and on close.
"""

from __future__ import annotations

import os
import tempfile
import time

from etils import epath


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def workdir_path(workdir) -> epath.Path:
    """The run folder as an `epath.Path`: a URL unchanged, a local path absolute."""
    workdir = os.fspath(workdir)
    return epath.Path(workdir if is_url(workdir) else os.path.abspath(workdir))


def local_cache_dir(workdir) -> str:
    """Where memory-mapped caches live: workdir/cache for a local run, a local folder for a URL."""
    workdir = os.fspath(workdir)
    if not is_url(workdir):
        return os.path.join(workdir, "cache")
    name = workdir.split("://", 1)[1].strip("/").replace("/", "_")
    return os.path.join(tempfile.gettempdir(), "mcpo_jax_cache", name)


class AppendFile:
    """A text file opened for appending (metrics.jsonl, train.log), also under a URL."""

    def __init__(self, path, *, upload_every: float = 30.0):
        self.path = epath.Path(path)
        self._url = is_url(path)
        self._upload_every = upload_every
        self._uploaded = time.monotonic()
        if self._url:
            fd, self._staging = tempfile.mkstemp(prefix="mcpo_", suffix="_" + self.path.name)
            os.close(fd)
            if self.path.exists():  # a resumed run appends to what is there
                with open(self._staging, "wb") as f:
                    f.write(self.path.read_bytes())
            self._file = open(self._staging, "a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self._url and time.monotonic() - self._uploaded >= self._upload_every:
            self._upload()

    def _upload(self) -> None:
        with open(self._staging, "rb") as f:
            self.path.write_bytes(f.read())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._url:
            self._upload()
            os.unlink(self._staging)
