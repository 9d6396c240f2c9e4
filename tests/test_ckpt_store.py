"""Writing, retention, and finding the newest valid checkpoint, on plain state dicts."""

import json
import os
import threading
import warnings

import numpy as np
import pytest

from jaxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWarning,
    RunWriter,
    _io,
    _manifest,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from jaxfit.checkpoint._retention import Entry, select_keep


def _state(step):
    return {"train_state": {"w": np.full(3, step, np.float32)}, "epoch": step}


def _write(run, seq, step, **metrics):
    return write_checkpoint(run, _state(step), seq=seq, step=step, epoch=step, batch_in_epoch=0,
                            reason="epoch", metrics=metrics, monitor="val_loss", mode="min")


def test_written_checkpoint_has_manifest_with_versions_and_checksums(tmp_path):
    path = _write(tmp_path, 1, 10, val_loss=0.5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert path.name == "ckpt-000001-step10"
    assert manifest["format_version"] == 1 and manifest["step"] == 10
    assert {"jaxfit", "jax", "flax", "optax"} <= manifest["versions"].keys()
    assert manifest["metrics"] == {"val_loss": 0.5}
    digest, size = _io.sha256_file(path / "state.msgpack")
    assert manifest["files"]["state.msgpack"] == {"sha256": digest, "size": size}
    assert (tmp_path / "latest").read_text() == "ckpt-000001-step10\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_non_finite_metrics_stay_valid_json(tmp_path):
    path = _write(tmp_path, 1, 1, val_loss=float("nan"))
    assert json.loads((path / "manifest.json").read_text())["metrics"] == {"val_loss": "nan"}


def test_failed_write_leaves_no_partial_checkpoint(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        write_checkpoint(tmp_path, {"x": object()}, seq=1, step=1, epoch=1, batch_in_epoch=0,
                         reason="epoch", metrics={})
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".tmp-999999999-ckpt-000001-step1"
    dead.mkdir()
    alive = tmp_path / f".tmp-{os.getppid()}-ckpt-000002-step2"
    alive.mkdir()
    assert _io.remove_stale_tmp(tmp_path) == [dead.name]
    assert alive.exists()


def test_read_picks_newest_and_loads_bit_exact_state(tmp_path):
    for seq in (1, 2, 3):
        _write(tmp_path, seq, seq * 10)
    path, manifest, state = read_checkpoint(tmp_path)
    assert path.name == "ckpt-000003-step30" and manifest["step"] == 30
    assert state["train_state"]["w"].tolist() == [30.0, 30.0, 30.0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "no_state", "bad_json"])
def test_corrupt_newest_falls_back_to_previous_with_warning_naming_it(tmp_path, damage):
    _write(tmp_path, 1, 10)
    newest = _write(tmp_path, 2, 20)
    state_file, manifest_file = newest / "state.msgpack", newest / "manifest.json"
    data = state_file.read_bytes()
    if damage == "flip":
        state_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncate":
        state_file.write_bytes(data[: len(data) // 2])
    elif damage == "no_manifest":
        manifest_file.unlink()
    elif damage == "no_state":
        state_file.unlink()
    else:
        manifest_file.write_text("{not json")
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint ckpt-000002-step20"):
        path, manifest, _ = read_checkpoint(tmp_path)
    assert path.name == "ckpt-000001-step10" and manifest["step"] == 10


def test_loading_one_corrupt_checkpoint_names_the_file(tmp_path):
    path = _write(tmp_path, 1, 10)
    (path / "state.msgpack").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointCorruptError, match=r"state\.msgpack has 3 bytes, the manifest"):
        read_checkpoint(path)


def test_newer_format_version_is_refused_with_upgrade_hint(tmp_path):
    path = _write(tmp_path, 1, 10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorruptError, match=r"newer jaxfit.*upgrade jaxfit"):
        read_checkpoint(path)


def test_a_checkpoint_file_stands_for_its_checkpoint(tmp_path):
    path = _write(tmp_path, 1, 10)
    assert read_checkpoint(path / "state.msgpack")[0] == path
    with pytest.raises(CheckpointError, match=r"latest is a file; pass a run directory"):
        read_checkpoint(tmp_path / "latest")


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint or run directory"):
        read_checkpoint(tmp_path / "nope")


def test_run_without_valid_checkpoints_lists_the_problems(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        read_checkpoint(tmp_path)
    (_write(tmp_path, 1, 10) / "manifest.json").unlink()
    # No warning when nothing loads: the error lists every problem once.
    with pytest.raises(CheckpointError, match=r"(?s)no valid checkpoint.*ckpt-000001-step10"):
        read_checkpoint(tmp_path)


# keep_last / keep_best retention table: scores by seq, "min" mode.
SCORES = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.3, 5: 0.8, 6: None}


@pytest.mark.parametrize("keep_last, keep_best, mode, kept", [
    (3, 1, "min", {2, 4, 5, 6}),        # newest 3 + the best (seq 2), best outside newest
    (1, 1, "min", {2, 6}),              # newest is never dropped for the best (orbax#526)
    (1, 2, "min", {2, 4, 6}),
    (3, 1, "max", {1, 4, 5, 6}),        # best under max is seq 1
    (2, 0, "min", {5, 6}),
    (None, 1, "min", {1, 2, 3, 4, 5, 6}),
    (1, None, "min", {1, 2, 3, 4, 5, 6}),
    (2, 3, None, {5, 6}),               # nothing monitored: keep_best has nothing to rank
    (6, 1, "min", {1, 2, 3, 4, 5, 6}),
])
def test_retention_table(keep_last, keep_best, mode, kept):
    entries = [Entry(f"c{seq}", seq, score) for seq, score in SCORES.items()]
    names = select_keep(entries, keep_last=keep_last, keep_best=keep_best, mode=mode)
    assert names == {f"c{seq}" for seq in kept}


def test_retention_ties_keep_the_earlier_checkpoint():
    entries = [Entry("a", 1, 0.5), Entry("b", 2, 0.5), Entry("c", 3, 0.9)]
    assert select_keep(entries, keep_last=1, keep_best=1, mode="min") == {"a", "c"}


def test_run_writer_applies_retention_and_keeps_unreadable_ones(tmp_path):
    writer = RunWriter(tmp_path, keep_last=2, keep_best=1, monitor="val_loss", mode="min")
    writer.set_recipe(b"recipe bytes")
    foreign = tmp_path / "ckpt-000000-step0"
    foreign.mkdir()  # no manifest: never deleted
    for step, loss in [(1, 0.1), (2, 0.5), (3, 0.4), (4, 0.6)]:
        writer.save(_state(step), step=step, epoch=step, batch_in_epoch=0, reason="epoch",
                    metrics={"val_loss": loss}, monitor="val_loss", mode="min")
    writer.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000-step0", "ckpt-000001-step1", "ckpt-000003-step3",
                     "ckpt-000004-step4", "latest", writer.recipe_ref["file"]]
    assert len(writer.stats.blocking) == len(writer.stats.write) == 4
    assert [i.step for i in list_checkpoints(tmp_path) if i.manifest] == [1, 3, 4]


def test_run_writer_surfaces_background_errors(tmp_path):
    writer = RunWriter(tmp_path, keep_last=2, keep_best=1, monitor=None, mode=None)
    writer.save({"x": object()}, step=1, epoch=1, batch_in_epoch=0, reason="epoch", metrics={})
    with pytest.raises(CheckpointError, match="writing a checkpoint into .* failed: cannot store"):
        writer.wait()
    writer.wait()  # reported once


def test_recipe_files_no_checkpoint_refers_to_are_removed(tmp_path):
    writer = RunWriter(tmp_path, keep_last=1, keep_best=0, monitor=None, mode=None)
    writer.set_recipe(b"first fit")
    first = writer.recipe_ref["file"]
    writer.save(_state(1), step=1, epoch=1, batch_in_epoch=0, reason="epoch", metrics={})
    writer.set_recipe(b"second fit")
    writer.save(_state(2), step=2, epoch=2, batch_in_epoch=0, reason="epoch", metrics={})
    writer.wait()
    assert not (tmp_path / first).exists() and (tmp_path / writer.recipe_ref["file"]).exists()
    assert _manifest.read_latest_pointer(tmp_path) == "ckpt-000002-step2"


def test_a_checkpoint_deleted_while_it_is_read_is_looked_for_again(tmp_path, monkeypatch):
    from jaxfit.checkpoint import _read

    _write(tmp_path, 1, 10)
    doomed = _write(tmp_path, 2, 20)
    read_one = _read.read_one

    def retention_strikes(ckpt_dir, max_bytes):
        # A writer's retention removes the newest between the reader's scan and its read
        # (as when it writes a newer one): no warning, the rescan finds what is there.
        if ckpt_dir == doomed:
            _io.remove_dir(doomed)
            _write(tmp_path, 3, 30)
        return read_one(ckpt_dir, max_bytes)

    monkeypatch.setattr(_read, "read_one", retention_strikes)
    path, manifest, _ = read_checkpoint(tmp_path)
    assert path.name == "ckpt-000003-step30" and manifest["step"] == 30


def _save_from(writer, step, seen=None):
    def fetch():  # runs on the writer thread
        if seen is not None:
            seen.append(threading.current_thread())
        return {"state": _state(step)}

    writer.save({}, fetch=fetch, step=step, epoch=step, batch_in_epoch=0, reason="epoch",
                metrics={})


def test_one_writer_thread_writes_every_save_and_ends_with_close(tmp_path):
    writer = RunWriter(tmp_path, keep_last=2, keep_best=0, monitor=None, mode=None)
    seen = []
    for step in range(1, 5):
        _save_from(writer, step, seen)
    writer.wait()
    assert len(seen) == 4 and len(set(seen)) == 1  # started once, not per save
    assert seen[0] is not threading.current_thread() and seen[0].is_alive()
    writer.close()
    assert not seen[0].is_alive()
    assert [i.step for i in list_checkpoints(tmp_path)] == [3, 4]


def test_an_idle_writer_thread_ends_and_the_next_save_starts_another(tmp_path, monkeypatch):
    from jaxfit.checkpoint import _writer

    monkeypatch.setattr(_writer._Threads, "IDLE", 0.05)
    writer = RunWriter(tmp_path, keep_last=None, keep_best=None, monitor=None, mode=None)
    seen = []
    _save_from(writer, 1, seen)
    writer.wait()
    seen[0].join(timeout=10)
    assert not seen[0].is_alive()  # idle for longer than IDLE: ended without close()
    _save_from(writer, 2, seen)
    writer.close()
    assert seen[1] is not seen[0] and not seen[1].is_alive()
    assert [i.step for i in list_checkpoints(tmp_path)] == [1, 2]


def test_retention_removes_a_checkpoint_holding_a_file_its_manifest_does_not_list(tmp_path):
    writer = RunWriter(tmp_path, keep_last=1, keep_best=0, monitor=None, mode=None)
    _save_from(writer, 1)
    writer.wait()
    (first,) = list_checkpoints(tmp_path)
    (first.path / "notes.txt").write_text("put here by hand")
    _save_from(writer, 2)
    writer.close()
    assert [i.step for i in list_checkpoints(tmp_path)] == [2]
    assert not first.path.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_retention_deletes_no_file_outside_the_run_directory_a_manifest_names(tmp_path):
    run = tmp_path / "run"
    writer = RunWriter(run, keep_last=1, keep_best=0, monitor=None, mode=None)
    writer.set_recipe(b"the fit's recipe")
    _save_from(writer, 1)
    writer.wait()
    (first,) = list_checkpoints(run)
    victim = tmp_path / "recipe-0123456789abcdef.pkl"
    victim.write_bytes(b"not the run's")
    manifest = json.loads((first.path / "manifest.json").read_text())
    manifest["recipe"]["file"] = "../" + victim.name  # a hand-edited (or hostile) manifest
    (first.path / "manifest.json").write_text(json.dumps(manifest))
    _save_from(writer, 2)
    writer.close()
    assert [i.step for i in list_checkpoints(run)] == [2]  # the edited one was removed
    assert victim.read_bytes() == b"not the run's"
    assert (run / writer.recipe_ref["file"]).exists()


def test_temporary_names_of_a_forked_child_carry_its_own_pid(tmp_path):
    parent = _io.tmp_name("x")
    assert parent.startswith(f".tmp-{os.getpid()}-")
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax warns of fork in a multithreaded process
        pid = os.fork()
    if pid == 0:  # the child: report its name and leave at once
        try:
            os.write(write, _io.tmp_name("x").encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child.startswith(f".tmp-{pid}-") and child != parent
