"""Subprocess side of the two-process FSDP kill-and-resume tests (test_trainer_multihost.py).

Usage: python tests/multihost_kill_worker.py MODE PROCESS_ID PORT RUN_DIR OUT
  full     train 3 epochs with checkpoints every 3 steps; process 0 dumps params and history to OUT
  kill     the same, and with MH_KILL=1 both processes SIGKILL themselves after step 7 (not a
           checkpoint step: the run dies mid-epoch with the step-6 checkpoint newest)
  killone  the same run; process 1 SIGKILLs itself while the step-6 checkpoint is written,
           after its part file is on disk and before it reports it (process 0 is left waiting)
  resume   Trainer.load(RUN_DIR, mesh=...).fit() on both processes; process 0 dumps to OUT

The mesh is (8,) ("fsdp",) over both processes' 4 CPU devices each: every kernel (and its
Adam moments) is split across the two processes, so each checkpoint is sharded, each
process writing the slices of its own devices.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # this checkout's jaxfit, and the test models

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
MODE, PID, PORT, RUN, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"localhost:{PORT}", num_processes=2, process_id=PID)

import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from sharding_models import Block, adam, data

from jaxfit import Callback, Trainer
from jaxfit.callbacks import ModelCheckpoint

KILL_AT = 7


class Killer(Callback):
    """SIGKILLs this process after step ``at`` (order 300: after ModelCheckpoint), once the
    run's newest checkpoint is the one of step ``at - 1`` (process 1 writes nothing itself)."""

    order = 300

    def __init__(self, at, run):
        self.at, self.run = at, run

    def on_train_batch_end(self, trainer, logs):
        if os.environ.get("MH_KILL") != "1" or trainer.step != self.at:
            return  # the resumed processes restore this callback too: it must not fire again
        jax.block_until_ready(trainer.engine_state)  # both processes finish step 7's collectives
        latest = os.path.join(self.run, "latest")
        while not (os.path.exists(latest) and Path(latest).read_text().strip().endswith(f"step{self.at - 1}")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


def mesh():
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("fsdp",))


def die_after_writing_part(at):
    """Process 1 SIGKILLs itself once its part of the step-``at`` checkpoint is on disk."""
    from jaxfit.checkpoint import _sharded

    write_part = _sharded.write_part

    def write_then_die(path, records):
        out = write_part(path, records)
        if path.parent.name.endswith(f"-step{at}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    _sharded.write_part = write_then_die


def dump(trainer):
    params = multihost_utils.process_allgather(trainer.params, tiled=True)
    Path(f"{OUT}.run_id{PID}").write_text(trainer.run_id)
    if PID == 0:
        with open(OUT, "w") as f:
            json.dump({"history": trainer.history.history, "step": trainer.step,
                       "spec": str(trainer.params["up"]["kernel"].sharding.spec),
                       "params": [np.asarray(a).ravel().tolist() for a in jax.tree_util.tree_leaves(params)]}, f)


if MODE == "resume":
    trainer = Trainer.load(RUN, mesh=mesh())
    trainer.fit()
else:
    if MODE == "killone" and PID == 1:
        die_after_writing_part(KILL_AT - 1)
    x, y = data(64)
    trainer = Trainer(optimizer=adam(), loss="softmax_cross_entropy", seed=0, mesh=mesh(),
                      param_rules=[(r"(up|down)/kernel$", P("fsdp"))], data_axes=("fsdp",))
    trainer.fit(Block("plain"), (x, y), epochs=3, batch_size=16, verbose=0,
                callbacks=[ModelCheckpoint(RUN, every_n_steps=3, keep_last=10), Killer(KILL_AT, RUN)])
dump(trainer)
