"""The public checkpoint protocol is enough for a third-party plugin: a callback written
with ``jaxfit.checkpoint``'s public names only (as ModelCheckpoint is) writes checkpoints
that read back bit for bit and that ``restore`` resumes from."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from conftest import MLP, make_trainer

from jaxfit import Callback
from jaxfit.checkpoint import (
    RunLock,
    RunWriter,
    capture,
    list_checkpoints,
    pack_recipe,
    read_checkpoint,
    restore,
    writes_shards,
)


class EveryEpoch(Callback):
    """A minimal checkpoint plugin: the lock at setup, a writer for the fit, a save per epoch."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.params_at: dict[int, list[np.ndarray]] = {}

    def __getstate__(self):  # the run's recipe pickles the callbacks: not the lock, the writer
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "writer")}

    def setup(self, trainer):
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock.acquire(self.directory, run_id=trainer.run_id, owner=self,
                                    trainer=trainer, who="EveryEpoch")

    def on_fit_start(self, trainer):
        self.sharded = writes_shards(trainer)
        self.writer = RunWriter(self.directory, keep_last=2, keep_best=None, monitor=None,
                                mode=None, run_id=trainer.run_id, sharded=self.sharded)
        self.writer.set_recipe(pack_recipe(trainer.recipe()))

    def on_epoch_end(self, trainer, logs):
        taken = capture(trainer, sharded=self.sharded)
        self.writer.save(taken.state, fetch=taken.fetch, copy_seconds=taken.seconds,
                         **taken.position, reason="epoch", metrics=dict(logs))
        self.params_at[trainer.step] = [np.array(a) for a in
                                        jax.tree_util.tree_leaves(trainer.params)]

    def on_fit_end(self, trainer, logs):
        try:
            self.writer.close()
        finally:
            self.lock.release()


def test_a_plugin_on_the_public_protocol_writes_checkpoints_that_restore_exactly(data, tmp_path):
    x, y = data
    plugin = EveryEpoch(tmp_path / "run")
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=3, batch_size=16, callbacks=[plugin])
    # Retention as asked (the 2 newest), each checkpoint the params of its step, bit for bit.
    infos = list_checkpoints(tmp_path / "run")
    assert [i.manifest["epoch"] for i in infos] == [2, 3]
    for info in infos:
        _, _, state = read_checkpoint(info.path)
        leaves = jax.tree_util.tree_leaves(state["train_state"]["state"]["params"])
        step = info.manifest["step"]
        assert all(np.array_equal(a, b) for a, b in zip(leaves, plugin.params_at[step]))
    # The newest one resumes: a trainer restored from it continues as the run would.
    again = restore(make_trainer(), tmp_path / "run", model=MLP(), data=(x, y), batch_size=16)
    assert again.step == trainer.step
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again.params),
                                                    jax.tree_util.tree_leaves(trainer.params)))
    # The lock was released at the fit's end: another writer may take the directory.
    RunLock.acquire(tmp_path / "run", who="a later fit").release()
