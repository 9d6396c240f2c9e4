"""Writing checkpoints into a run directory: atomically, in order, off the training thread.

:class:`RunWriter` owns one run directory for one fit. ``save`` takes a state that is already
a host copy (numpy arrays that own their memory), so the training thread can go on while a
single background thread serializes, hashes, fsyncs, renames, moves the ``latest`` pointer
and applies retention. Writes happen one at a time, in the order they were asked for; an
error in the background is raised by the next ``save`` or by ``wait``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxfit.checkpoint import _io, _manifest, _msgpack, _retention
from jaxfit.checkpoint._errors import CheckpointError
from jaxfit.checkpoint._recipe import write_recipe


@dataclass
class SaveStats:
    """Timings of every save of a fit, in seconds, oldest first.

    Attributes:
      blocking: how long the training thread waited for each save (the host copy plus any
        wait for the previous write to finish).
      write: how long serializing and writing each checkpoint took (in the background when
        asynchronous).
      nbytes: size of each state file.
      copy: the part of ``blocking`` spent copying the state to host memory (the rest is
        waiting for the previous write, and the write itself when not in the background).
      device_wait: before each save, how long the steps already dispatched took to finish
        (the state must be computed before it can be copied; not counted in ``blocking``).
    """

    blocking: list[float] = field(default_factory=list)
    copy: list[float] = field(default_factory=list)
    device_wait: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)


def write_checkpoint(run_dir: Path, state: dict, *, seq: int, step: int, epoch: int,
                     batch_in_epoch: int, reason: str, metrics: dict[str, Any],
                     monitor: str | None = None, mode: str | None = None,
                     recipe: dict | None = None, run_id: str | None = None) -> Path:
    """Writes one checkpoint synchronously and atomically; returns its directory.

    The state is streamed into ``state.msgpack`` inside a temporary directory of ``run_dir``;
    the manifest (with the file's sha256) follows; both are fsynced, the directory is renamed
    to its final name, and the ``latest`` pointer is replaced. A crash at any point leaves a
    temporary directory that loading ignores, never a partial checkpoint under a real name.
    """
    final = run_dir / _manifest.checkpoint_name(seq, step)
    tmp = run_dir / _io.tmp_name(final.name)
    tmp.mkdir()
    try:
        files = {_manifest.STATE_FILE: _io.write_file(
            tmp / _manifest.STATE_FILE, lambda f: _msgpack.write_tree(f, state))}
        manifest = _manifest.build_manifest(
            seq=seq, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, reason=reason,
            metrics=metrics, monitor=monitor, mode=mode, files=files, recipe=recipe, run_id=run_id)
        payload = _manifest.manifest_bytes(manifest)
        _io.write_file(tmp / _manifest.MANIFEST_FILE, lambda f: f.write(payload))
        _io.publish_dir(tmp, final)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _io.replace_file(run_dir / _manifest.LATEST_FILE, (final.name + "\n").encode())
    return final


def apply_retention(run_dir: Path, *, keep_last: int | None, keep_best: int | None,
                    monitor: str | None, mode: str | None,
                    protect: frozenset[str] = frozenset(), run_id: str | None = None) -> list[str]:
    """Deletes the checkpoints retention does not keep, and recipes nothing refers to.

    Only checkpoints of this run are candidates (``run_id``, when given: manifests naming
    another run are never deleted), and never one whose manifest cannot be read (nothing is
    known about it). A recipe is deleted only when no remaining readable checkpoint refers to
    it and it is not in ``protect`` (the recipe of the fit under way). Returns the names
    removed.
    """
    infos = [i for i in _manifest.scan(run_dir) if i.manifest is not None]
    ours = [i for i in infos if i.manifest is not None  # (all are: narrows the type)
            and (run_id is None or i.manifest.get("run_id") in (None, run_id))]
    entries = [_retention.Entry(i.name, i.seq, _retention.score_of(i.metrics, monitor))
               for i in ours]
    keep = _retention.select_keep(entries, keep_last=keep_last, keep_best=keep_best, mode=mode)
    removed = []
    for info in ours:
        if info.name not in keep:
            _io.remove_dir(info.path)
            removed.append(info.name)
    used = set(protect)
    for info in infos:
        if info.name not in removed and info.manifest is not None \
                and isinstance(info.manifest.get("recipe"), dict):
            used.add(info.manifest["recipe"].get("file"))
    for recipe in run_dir.glob("recipe-*.pkl"):
        if recipe.name not in used:
            recipe.unlink(missing_ok=True)
            removed.append(recipe.name)
    return removed


class RunWriter:
    """Saves the checkpoints of one fit into ``run_dir``, in a background thread or inline.

    Args:
      run_dir: the run directory (created if missing).
      keep_last, keep_best, monitor, mode: retention, see :func:`apply_retention`.
      background: write in a background thread (True) or in the caller's thread.
      run_id: the run written; retention deletes only checkpoints of this run.

    The caller holds the run directory's writer lock (see ``RunLock``): the writer assumes
    no other process writes there.
    """

    def __init__(self, run_dir: Path, *, keep_last: int | None, keep_best: int | None,
                 monitor: str | None, mode: str | None, background: bool = True,
                 run_id: str | None = None) -> None:
        self.run_dir = run_dir
        self.retention: dict[str, Any] = dict(keep_last=keep_last, keep_best=keep_best,
                                              monitor=monitor, mode=mode, run_id=run_id)
        self.background = background
        self.stats = SaveStats()
        self.recipe_ref: dict | None = None
        run_dir.mkdir(parents=True, exist_ok=True)
        _io.remove_stale_tmp(run_dir)
        existing = [_manifest.parse_name(p.name) for p in run_dir.iterdir()]
        self._next_seq = 1 + max((p[0] for p in existing if p), default=0)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def set_recipe(self, payload: bytes) -> None:
        """Stores the packed recipe of this fit; later checkpoints refer to it."""
        self.recipe_ref = write_recipe(self.run_dir, payload)

    def save(self, state: dict, *, copy_seconds: float = 0.0, **meta: Any) -> None:
        """Queues (or performs) the write of ``state`` with manifest fields ``meta``.

        ``state`` must already be a host copy that nothing else will modify; ``copy_seconds``
        is how long making that copy took, counted into the blocking time.
        """
        start = time.perf_counter()
        self.wait()  # one write at a time; also re-raises a failed previous write
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        job = dict(state=state, seq=seq, recipe=self.recipe_ref, **meta)
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(job,),
                                            name="jaxfit-checkpoint-writer", daemon=False)
            self._thread.start()
        else:
            self._run(job)
            self._raise_pending()
        self.stats.blocking.append(copy_seconds + time.perf_counter() - start)
        self.stats.copy.append(copy_seconds)

    def _run(self, job: dict) -> None:
        began = time.perf_counter()
        try:
            path = write_checkpoint(self.run_dir, **job)
            protect = frozenset([self.recipe_ref["file"]]) if self.recipe_ref else frozenset()
            apply_retention(self.run_dir, protect=protect, **self.retention)
            self.stats.nbytes.append((path / _manifest.STATE_FILE).stat().st_size)
            self.stats.write.append(time.perf_counter() - began)
        except BaseException as err:  # handed to the training thread by wait()/save()
            self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(
                f"writing a checkpoint into {self.run_dir} failed: {err} (every earlier "
                "checkpoint is intact)"
            ) from err

    def wait(self) -> None:
        """Blocks until the write under way (if any) is on disk; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

