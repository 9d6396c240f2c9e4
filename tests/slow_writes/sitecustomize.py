"""Loaded at startup by the processes of a "race" run of tests/ckpt_worker.py (this directory
is put first on their PYTHONPATH), including the checkpoint writer process that the trainer
starts: every state file is held open for 3 s after it is written (before its fsync and
rename), so that a kill lands in the middle of a checkpoint write."""

import os

if os.environ.get("CKPT_SLOW_WRITES") == "1":
    import time

    from jaxfit.checkpoint import _msgpack

    _write_tree = _msgpack.write_tree

    def _slow(fileobj, tree):
        _write_tree(fileobj, tree)
        time.sleep(3.0)

    _msgpack.write_tree = _slow
