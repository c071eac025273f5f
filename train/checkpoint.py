"""orbax CheckpointManager around the training state.

A checkpoint is one step directory with four items:
    params       the model parameters (a plain nested dict of arrays) - all `load_pretrained` reads
    train_state  step, optimizer state, RNG, non-finite counters
    data         the grain iterator state (JSON), so a resumed run sees the same batches
    meta         the resolved config (JSON), including the model config
Saves are asynchronous; the newest `keep` are kept. Restoring walks the steps newest first and
skips (with a warning) any that cannot be read; unfinished saves (orbax temporary directories)
never count as steps.
"""
from __future__ import annotations

import os
import warnings

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "train_state", "data", "meta")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def _warn_unfinished(self):
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if "tmp" in name:
                warnings.warn(f"checkpoint {os.path.join(self.directory, name)} is incomplete (an "
                              f"interrupted save); skipping it", stacklevel=3)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> bool:
        rest = {k: v for k, v in state.items() if k != "params"}
        return self.manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave(rest),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state):
        """(state, data_state, step) from the newest readable checkpoint, or None."""
        self._warn_unfinished()
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        for step in reversed(self.steps()):
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    train_state=ocp.args.StandardRestore(rest),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be restored "
                              f"({type(e).__name__}: {str(e)[:300]}); trying the previous one",
                              stacklevel=2)
                continue
            return {"params": r["params"], **r["train_state"]}, r["data"], step
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
