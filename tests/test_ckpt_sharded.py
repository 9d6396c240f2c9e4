"""Sharded checkpoints (each process writes its own slices; any mesh loads them): the
8-device cases of ckpt_sharded_cases.py, in a subprocess with 8 fake CPU devices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ckpt_helpers import run_cases_on_8_devices

from jaxfit.checkpoint import CheckpointCorruptError, read_checkpoint


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharded_checkpoint_cases_on_8_cpu_devices():
    run_cases_on_8_devices("ckpt_sharded_cases.py")


def _written(tmp_path):
    from jaxfit.checkpoint import write_checkpoint

    state = {"train_state": {"w": np.zeros(3, np.float32)}, "epoch": 1}
    return write_checkpoint(tmp_path, state, seq=1, step=5, epoch=1, batch_in_epoch=0, reason="epoch",
                            metrics={})


@pytest.mark.parametrize("change, message", [
    ({"format_version": 0}, r"format version 0 is unknown \(this jaxfit reads versions 1 to 2\)"),
    ({"format_version": 2}, r"format version 2 needs a 'sharded' section"),
    ({"format_version": 2, "sharded": {"process_count": 1, "leaves": {}, "parts": ["shards-00000-of-00001.msgpack"]}},
     r"part 'shards-00000-of-00001.msgpack' is not among the listed files"),
])
def test_a_manifest_of_an_unknown_version_or_a_bad_sharded_section_is_refused(tmp_path, change, message):
    path = _written(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(CheckpointCorruptError, match=message):
        read_checkpoint(path)


def test_a_manifest_too_large_to_read_back_is_never_published(tmp_path, monkeypatch):
    from jaxfit.checkpoint import CheckpointError, _manifest, list_checkpoints, write_checkpoint

    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", 200)
    with pytest.raises(CheckpointError, match=r"manifest of ckpt-000001-step5 would be \d+ bytes, more than the 200"):
        write_checkpoint(tmp_path, {"train_state": {}}, seq=1, step=5, epoch=1, batch_in_epoch=0, reason="epoch",
                         metrics={})
    assert list_checkpoints(tmp_path) == [] and list(tmp_path.iterdir()) == []
