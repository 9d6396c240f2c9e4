"""Hostile or odd files in a run directory cannot hang or exhaust a reader.

Each damage (a FIFO, a symlink to /dev/zero, a sparse 100 GiB file, ...) is tried on every
read path: ``read_checkpoint``, ``Trainer.load``, ``jaxfit.checkpoint.restore`` and
``python -m jaxfit info``. Pointed at the damaged checkpoint itself, each raises a
``CheckpointCorruptError`` naming the file; pointed at the run, each falls back to the older
checkpoint with a ``CheckpointWarning``. An alarm turns a hang into a failure.
"""

import json
import os
import shutil
import signal

import pytest
from ckpt_helpers import run_fixtures
from conftest import MLP, make_trainer

from jaxfit import Trainer
from jaxfit.__main__ import main
from jaxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWarning,
    read_checkpoint,
    restore,
)

HUGE = 100 * 2**30  # sparse: takes no space on disk


@pytest.fixture(autouse=True)
def no_hang():
    """Fails a test that blocks (instead of hanging the suite): no timing is asserted."""
    def hung(signum, frame):
        raise AssertionError("the reader blocked on a hostile file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


base_run, run = run_fixtures(epochs=2)


def _newest(run):
    return max(p for p in run.iterdir() if p.name.startswith("ckpt-"))


def _set_manifest_size(ckpt, name, size):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name]["size"] = size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _damage(ckpt, kind):
    """Damages one checkpoint; returns a regex its error message must match."""
    state, manifest = ckpt / "state.msgpack", ckpt / "manifest.json"
    if kind == "fifo_state":
        state.unlink()
        os.mkfifo(state)
        return r"state\.msgpack is a FIFO \(named pipe\), not a regular file"
    if kind == "fifo_manifest":
        manifest.unlink()
        os.mkfifo(manifest)
        return r"manifest\.json .*is a FIFO"
    if kind == "zero_state":
        state.unlink()
        state.symlink_to("/dev/zero")
        return r"state\.msgpack is a symbolic link, not a regular file"
    if kind == "zero_manifest":
        manifest.unlink()
        manifest.symlink_to("/dev/zero")
        return r"manifest\.json .*symbolic link"
    if kind == "link_out":  # a link to a valid state elsewhere is refused all the same
        copy = ckpt.parent.parent / "elsewhere.msgpack"
        shutil.copy(state, copy)
        state.unlink()
        state.symlink_to(copy)
        return r"state\.msgpack is a symbolic link"
    if kind == "sparse_state":  # the manifest's size is checked before a byte is read
        os.truncate(state, HUGE)
        return rf"state\.msgpack has {HUGE} bytes, the manifest recorded \d+"
    if kind == "sparse_state_forged":  # the manifest agrees: max_bytes refuses it unread
        os.truncate(state, HUGE)
        _set_manifest_size(ckpt, "state.msgpack", HUGE)
        return rf"state\.msgpack: {HUGE} bytes is more than the limit of 1048576 bytes"
    if kind == "sparse_manifest":
        os.truncate(manifest, HUGE)
        return rf"manifest\.json: {HUGE} bytes is more than a manifest can be"
    if kind == "deep_manifest":  # JSON nesting that would exhaust the parser's stack
        manifest.write_text("[" * 200_000 + "]" * 200_000)
        return r"manifest\.json is not a readable JSON manifest"
    raise AssertionError(kind)


KINDS = ["fifo_state", "fifo_manifest", "zero_state", "zero_manifest", "link_out",
         "sparse_state", "sparse_state_forged", "sparse_manifest", "deep_manifest"]


def _read(path, how, data):
    if how == "read_checkpoint":
        return read_checkpoint(path, max_bytes=2**20)[0].name
    if how == "Trainer.load":
        return Trainer.load(path, max_bytes=2**20).step
    trainer = restore(make_trainer(), path, model=MLP(), data=data, epochs=3, batch_size=16,
                      max_bytes=2**20)
    return trainer.step


@pytest.mark.parametrize("how", ["read_checkpoint", "Trainer.load", "restore"])
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_file_is_refused_and_the_run_falls_back(run, base_run, kind, how):
    newest = _newest(run)
    match = _damage(newest, kind)
    with pytest.raises(CheckpointCorruptError, match=match):
        _read(newest, how, base_run[1])
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint {newest.name}: .*{match}"):
        got = _read(run, how, base_run[1])
    assert got in ("ckpt-000001-step5", 5)


@pytest.mark.parametrize("kind", KINDS)
def test_info_reports_a_hostile_checkpoint_invalid(run, kind, capsys, monkeypatch):
    newest = _newest(run)
    _damage(newest, kind)
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["info", str(run)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()
            if "ckpt-" in line}
    assert "no:" in rows[newest.name]
    assert "●" in rows["ckpt-000001-step5"]


@pytest.mark.parametrize("target", ["latest", "recipe"])
def test_fifo_latest_pointer_or_recipe_never_blocks(run, target, capsys):
    if target == "latest":
        (run / "latest").unlink()
        os.mkfifo(run / "latest")
        assert main(["info", str(run)]) == 0
        assert "ckpt-000002-step10" in capsys.readouterr().out
        assert Trainer.load(run).step == 10
        return
    (recipe,) = run.glob("recipe-*.pkl")
    recipe.unlink()
    os.mkfifo(recipe)
    # Both checkpoints share the recipe: nothing loads, and the error names the FIFO.
    with pytest.raises(CheckpointError, match=r"(?s)recipe-.*\.pkl is a FIFO.*recipe-.*FIFO"):
        Trainer.load(run)


def test_a_symlinked_checkpoint_directory_is_skipped(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    newest = _newest(run)
    newest.rename(elsewhere)
    newest.symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(CheckpointWarning, match=rf"{newest.name}: .*is a symbolic link"):
        assert read_checkpoint(run)[0].name == "ckpt-000001-step5"


def test_recipe_of_another_size_than_recorded_is_refused_unread(run):
    (recipe,) = run.glob("recipe-*.pkl")
    os.truncate(recipe, HUGE)
    with pytest.raises(CheckpointError, match=rf"recipe-.*\.pkl has {HUGE} bytes, the manifest"):
        Trainer.load(run)
