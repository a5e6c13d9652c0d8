"""Orbax checkpoints of the train state and the data iterator, saved together under one step.

    workdir/checkpoints/<step>/state   params, optimizer state, step, base RNG key (sharded arrays)
    workdir/checkpoints/<step>/data    the grain iterator state (JSON)

Saves are asynchronous (the device-to-host copy happens in `save`, the write in the background),
so a donated state may be reused right after `save` returns.
"""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

import orbax.checkpoint as ocp

from mcpo_jax.training import files

log = logging.getLogger(__name__)


def _encode_iterator_state(state: Any) -> Any:
    if isinstance(state, bytes):
        return {"__bytes__": base64.b64encode(state).decode("ascii")}
    return state


def _decode_iterator_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.fspath(files.workdir_path(workdir) / "checkpoints")  # a URL is kept as is
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, iterator_state=None, *, force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if iterator_state is not None:
            items["data"] = ocp.args.JsonSave(_encode_iterator_state(iterator_state))
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if saved:
            log.debug("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, *, with_data: bool = True):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (files.workdir_path(self.directory) / str(step) / "data").is_dir()
        if with_data and has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        data = _decode_iterator_state(out["data"]) if "data" in items else None
        return out["state"], data

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
