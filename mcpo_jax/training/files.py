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


def copy_tree(src, dst, *, last: str | None = None) -> None:
    """Every file under the folder `src` to the same place under `dst` (either may be a URL); `last`: a file
    name copied after all others (a marker whose presence says the rest is complete)."""
    src, dst = epath.Path(src), epath.Path(dst)

    def files_under(folder: epath.Path, rel: tuple[str, ...] = ()):  # no recursive glob on an object store
        for path in folder.iterdir():
            if path.is_dir():
                yield from files_under(path, (*rel, path.name))
            else:
                yield path, (*rel, path.name)

    for path, rel in sorted(files_under(src), key=lambda x: (x[1][-1] == last, x[1])):
        target = dst.joinpath(*rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.copy(target, overwrite=True)


class Staged:
    """Files a run writes on a local disk because their readers need local files (model folders, an online
    segment's data): the folder `local`, and for a URL workdir, `remote`, the run's record under the URL, from
    which a rerun on another machine fetches what its local disk lacks. For a local workdir both are one."""

    def __init__(self, workdir, name: str):
        workdir = os.fspath(workdir)
        if is_url(workdir):
            self.remote: epath.Path | None = workdir_path(workdir) / name
            self.local = os.path.join(local_cache_dir(workdir), name)
        else:
            self.remote, self.local = None, os.path.join(os.path.abspath(workdir), name)
        os.makedirs(self.local, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def fetch(self, folder: str, marker: str) -> bool:
        """Whether `folder` is complete (holds its `marker`). Under a URL the record there decides: a complete
        remote copy is fetched where the local disk lacks it, and a local copy the record lacks (an earlier run
        of the same URL on this machine) loses its marker, so that it is written again, not taken for this
        run's (the folder's other files are overwritten then; a subfolder this run wrote is kept)."""
        local = self.path(folder)
        if self.remote is None:
            return os.path.exists(os.path.join(local, marker))
        src = self.remote / folder
        if not (src / marker).exists():
            if os.path.exists(os.path.join(local, marker)):
                os.remove(os.path.join(local, marker))
            return False
        if not os.path.exists(os.path.join(local, marker)):
            copy_tree(src, local, last=marker)
        return True

    def publish(self, folder: str, marker: str) -> None:
        """The local `folder` to the remote record, its completion `marker` copied last."""
        if self.remote is not None:
            copy_tree(self.path(folder), self.remote / folder, last=marker)
