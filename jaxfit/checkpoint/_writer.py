"""Writing checkpoints into a run directory: atomically, in order, off the training thread.

:class:`RunWriter` owns one run directory for one fit. ``save`` takes a state that is already
a host copy (numpy arrays that own their memory), or a ``fetch`` that gives the arrays from a
device-side snapshot, so the training thread can go on while a single background thread
fetches, serializes, hashes, fsyncs, renames, moves the ``latest`` pointer and applies
retention. Writes happen one at a time, in the order they were asked for; an
error in the background is raised by the next ``save`` or by ``wait``.
"""

from __future__ import annotations

import collections
import functools
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxfit.checkpoint import _child, _io, _manifest, _msgpack, _retention
from jaxfit.checkpoint._errors import CheckpointError
from jaxfit.checkpoint._recipe import recipe_file, write_recipe

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.checkpoint import _sharded


@dataclass
class SaveStats:
    """Timings of every save of a fit, in seconds, oldest first.

    Attributes:
      blocking: how long the training thread waited for each save (dispatching the
        snapshot and copying the small host state, plus any wait for the previous write to
        finish).
      write: how long fetching, serializing and writing each checkpoint took (in the
        background when asynchronous).
      nbytes: size of each checkpoint's files (the manifest aside).
      copy: the part of ``blocking`` spent on the snapshot: dispatching the device-side copy
        and copying the small host state (the rest is waiting for the previous write, and
        the write itself when not in the background).
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
    return _write_whole(run_dir, state, seq=seq, step=step, epoch=epoch,
                        batch_in_epoch=batch_in_epoch, reason=reason, metrics=metrics,
                        monitor=monitor, mode=mode, recipe=recipe, run_id=run_id)[0]


def _write_whole(run_dir: Path, state: dict, *, seq: int, step: int, monitor: str | None = None,
                 mode: str | None = None, recipe: dict | None = None, run_id: str | None = None,
                 **fields: Any) -> tuple[Path, dict]:
    """:func:`write_checkpoint`, returning the checkpoint's directory and manifest."""
    final = run_dir / _manifest.checkpoint_name(seq, step)
    tmp = run_dir / _io.tmp_name(final.name)
    tmp.mkdir()
    try:
        files = {_manifest.STATE_FILE: _io.write_file(
            tmp / _manifest.STATE_FILE, lambda f: _msgpack.write_tree(f, state))}
        manifest = _commit(tmp, final, files, seq=seq, step=step, monitor=monitor, mode=mode,
                           recipe=recipe, run_id=run_id, **fields)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, manifest


def _commit(tmp: Path, final: Path, files: dict[str, dict], **fields: Any) -> dict:
    """Writes the manifest of the files in ``tmp``, renames it to ``final`` and moves
    ``latest`` to it: the instant the checkpoint becomes visible. Returns the manifest."""
    manifest = _manifest.build_manifest(files=files, **fields)
    payload = _manifest.manifest_bytes(manifest)
    if len(payload) > _manifest.MAX_MANIFEST_BYTES:  # readers refuse it: never publish it
        raise CheckpointError(
            f"the manifest of {final.name} would be {len(payload)} bytes, more than the "
            f"{_manifest.MAX_MANIFEST_BYTES} a reader accepts (a sharded state of very many "
            "leaves); the checkpoint was not written")
    _io.write_file(tmp / _manifest.MANIFEST_FILE, lambda f: f.write(payload))
    _io.publish_dir(tmp, final)
    # For people and `jaxfit info` (loading picks the highest sequence): atomic, not fsynced.
    _io.replace_file(final.parent / _manifest.LATEST_FILE, (final.name + "\n").encode(),
                     durable=False)
    return manifest


def _shared_dir(run_dir: Path, peers: _sharded.Peers | None, save: int, name: str) -> Path:
    """The checkpoint's temporary directory: made by process 0 (its name handed to the
    others through the coordination service), which must be visible to every process."""
    if peers is None or peers.index == 0:
        tmp = run_dir / _io.tmp_name(name)
        try:
            tmp.mkdir()
        except BaseException as err:
            if peers is not None:  # the others wait for the name: tell them it failed
                peers.publish(save, "dir", {"error": f"{type(err).__name__}: {err}"})
            raise
        if peers is not None:
            peers.publish(save, "dir", {"tmp": tmp.name})
        return tmp
    told = peers.read(save, "dir")
    if "error" in told:
        raise CheckpointError(f"process 0 could not create the checkpoint: {told['error']}")
    tmp = run_dir / Path(str(told["tmp"])).name
    if not tmp.is_dir():
        raise CheckpointError(
            f"process {peers.index} does not see the checkpoint directory {tmp} that process 0 "
            "made: the run directory must be on a file system every process shares")
    return tmp


def write_sharded_checkpoint(run_dir: Path, state: dict, records: list,
                             leaves: tuple[dict | None, dict], *,
                             peers: _sharded.Peers | None, save: int, seq: int, step: int,
                             **fields: Any) -> tuple[Path, dict] | None:
    """Writes this process's part of one sharded checkpoint; process 0 commits it.

    Every process streams its records into its own part file inside one temporary
    directory (process 0 also writes ``state.msgpack``, the arrays left out) and fsyncs it.
    With several processes, each then reports its part's size and sha256 (or its error)
    and waits at a barrier; only after it does process 0 write the manifest and rename the
    directory into place. A kill of any process before that leaves the previous checkpoint
    the newest; every process reaches the barrier even when its own write failed, so no
    other waits in vain. Returns the checkpoint's directory and manifest on process 0, else
    None.
    """
    from jaxfit.checkpoint import _sharded  # jax: only a sharded save needs it
    index, count = (peers.index, peers.count) if peers else (0, 1)
    final = run_dir / _manifest.checkpoint_name(seq, step)
    files: dict[str, dict] = {}
    tmp: Path | None = None
    error: BaseException | None = None
    try:
        tmp = _shared_dir(run_dir, peers, save, final.name)
        part = _sharded.part_name(index, count)
        files[part] = _sharded.write_part(tmp / part, records)
        if index == 0:
            files[_manifest.STATE_FILE] = _io.write_file(
                tmp / _manifest.STATE_FILE, lambda f: _msgpack.write_tree(f, state))
    except BaseException as err:  # reported to the others below, raised after the barrier
        error = err
    try:
        if peers is not None:
            peers.publish(save, f"part{index}", {"files": files} if error is None
                          else {"error": f"{type(error).__name__}: {error}"})
            peers.barrier(save)
        if error is not None:
            raise error
        if index != 0:
            return None
        assert tmp is not None
        for q in range(1, count):
            assert peers is not None
            files.update(_peer_files(tmp, q, peers.read(save, f"part{q}"),
                                     _sharded.part_name(q, count)))
        sharded = {"process_count": count, "mesh": leaves[0], "leaves": leaves[1],
                   "parts": [_sharded.part_name(q, count) for q in range(count)]}
        manifest = _commit(tmp, final, files, seq=seq, step=step, sharded=sharded, **fields)
    except BaseException:
        if index == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, manifest


def _peer_files(tmp: Path, q: int, told: dict, part: str) -> dict[str, dict]:
    """The part file process ``q`` reports, checked against what process 0 sees on disk."""
    if "error" in told:
        raise CheckpointError(f"process {q} could not write its part of the checkpoint: "
                              f"{told['error']}")
    entry = (told.get("files") or {}).get(part)
    if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"process {q} reported no size and sha256 for {part}: {told!r}")
    try:
        size = (tmp / part).stat().st_size
    except FileNotFoundError:
        size = None
    if size != entry["size"]:
        raise CheckpointError(
            f"process {q} wrote {part} ({entry['size']} bytes) but process 0 sees "
            f"{'no such file' if size is None else f'{size} bytes'} in {tmp}: the run directory "
            "must be on a file system every process shares")
    return {part: {"sha256": entry["sha256"], "size": entry["size"]}}


def apply_retention(run_dir: Path, *, keep_last: int | None, keep_best: int | None,
                    monitor: str | None, mode: str | None,
                    protect: frozenset[str] = frozenset(), run_id: str | None = None,
                    infos: list[_manifest.CheckpointInfo] | None = None,
                    recipes: bool = True) -> list[str]:
    """Deletes the checkpoints retention does not keep, and recipes nothing refers to.

    Only checkpoints of this run are candidates (``run_id``, when given: manifests naming
    another run are never deleted), and never one whose manifest cannot be read (nothing is
    known about it). A recipe is deleted only when no remaining readable checkpoint refers to
    it and it is not in ``protect`` (the recipe of the fit under way). Returns the names
    removed.

    ``infos`` are the run directory's checkpoints when the caller knows them (the writer
    that made them: it holds the directory's lock), else the directory is scanned.
    ``recipes=False``: the caller knows every recipe but those of the checkpoints removed
    here is either referred to or already gone (the writer, after its first retention), so
    only those are candidates, and the directory is not listed.
    """
    if infos is None:
        infos = _manifest.scan(run_dir)
    infos = [i for i in infos if i.manifest is not None]
    ours = [i for i in infos if i.manifest is not None  # (all are: narrows the type)
            and (run_id is None or i.manifest.get("run_id") in (None, run_id))]
    entries = [_retention.Entry(i.name, i.seq, _retention.score_of(i.metrics, monitor))
               for i in ours]
    keep = _retention.select_keep(entries, keep_last=keep_last, keep_best=keep_best, mode=mode)
    removed, dropped = [], []
    for info in ours:
        if info.name not in keep:
            manifest = info.manifest
            assert manifest is not None  # (ours have one)
            try:
                _io.remove_dir(info.path, _files_of(manifest))
            except FileNotFoundError:  # deleted by hand meanwhile: gone all the same
                pass
            removed.append(info.name)
            dropped.append(recipe_file(manifest.get("recipe")))
    if not removed and not recipes:
        return removed
    used = set(protect) | {recipe_file(i.manifest.get("recipe")) for i in infos
                           if i.manifest is not None and i.name not in removed}
    # Every recipe file of the directory, or only those the removed checkpoints named.
    candidates = [p.name for p in run_dir.glob("recipe-*.pkl")] if recipes \
        else sorted({name for name in dropped if name is not None})
    for name in candidates:
        if name not in used:
            (run_dir / name).unlink(missing_ok=True)
            removed.append(name)
    return removed


def _files_of(manifest: dict) -> list[str]:
    """The files a checkpoint directory holds by its manifest, the manifest last (plain
    names: ``read_manifest`` refuses a manifest listing any other)."""
    return [*manifest["files"], _manifest.MANIFEST_FILE]


class Known:
    """A run directory's checkpoints as their writer knows them; retention after each write.

    The directory is scanned at the first write; after that the writer adds what it writes
    (it holds the directory's lock: nobody else adds any). Lives where the files are
    written: in the writer thread's ``RunWriter``, or in the writer process.
    """

    def __init__(self, run_dir: Path, *, keep_last: int | None, keep_best: int | None,
                 monitor: str | None, mode: str | None, run_id: str | None) -> None:
        self.run_dir = run_dir
        self.retention: dict[str, Any] = dict(keep_last=keep_last, keep_best=keep_best,
                                              monitor=monitor, mode=mode, run_id=run_id)
        self._infos: list[_manifest.CheckpointInfo] | None = None

    def retain(self, path: Path, manifest: dict) -> int:
        """Applies retention after the checkpoint ``path`` was written; returns its size."""
        info = _manifest.CheckpointInfo(path, manifest["seq"], manifest)
        first = self._infos is None
        known = _manifest.scan(self.run_dir) if self._infos is None else [*self._infos, info]
        recipe = manifest.get("recipe")  # the fit's own recipe: never deleted under it
        protect = frozenset([recipe["file"]]) if isinstance(recipe, dict) else frozenset()
        removed = set(apply_retention(self.run_dir, protect=protect, infos=known,
                                      recipes=first, **self.retention))
        self._infos = [i for i in known if i.name not in removed]
        return sum(int(f["size"]) for f in manifest["files"].values())


def perform(known: Known, job: dict) -> int:
    """Writes one whole checkpoint job and applies retention; returns the checkpoint's size."""
    return known.retain(*_write_whole(known.run_dir, **job))


class _Save:
    """One save handed to the writer threads: ``sent`` is set once its job is sent to the
    writer process (or never will be), ``done`` once it is written, skipped or failed."""

    __slots__ = ("sent", "done")

    def __init__(self) -> None:
        self.sent, self.done = threading.Event(), threading.Event()


class _Threads:
    """The writer threads of one :class:`RunWriter`, kept from one save to the next.

    Starting a thread per save cost the training thread ~0.35 ms a save (``Thread.start``
    waits until the new thread has run): these are started at the first saves, at most
    ``size`` of them, and each ends after ``IDLE`` seconds without work or at :meth:`close`.
    They are not daemons, so interpreter exit still waits for a write under way.
    """

    IDLE = 5.0

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._alive: list[threading.Thread] = []
        self._closed = False

    def submit(self, task: Callable[[], None]) -> None:
        with self._cond:
            self._tasks.append(task)
            if len(self._alive) < self.size:
                thread = threading.Thread(target=self._loop, name="jaxfit-checkpoint-writer",
                                          daemon=False)
                self._alive.append(thread)
                thread.start()
            else:
                self._cond.notify()

    def _loop(self) -> None:
        me = threading.current_thread()
        with self._cond:
            try:
                while True:
                    if self._tasks:
                        task = self._tasks.popleft()
                        self._cond.release()
                        try:
                            task()  # (a save's task catches everything itself)
                        finally:
                            del task  # an idle thread keeps no writer alive
                            self._cond.acquire()
                    elif self._closed or not (self._cond.wait(self.IDLE) or self._tasks):
                        return
            finally:
                self._alive.remove(me)

    def close(self) -> None:
        """Ends the threads once the tasks queued are done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._alive)
        for thread in threads:
            thread.join()


class RunWriter:
    """Saves the checkpoints of one fit into ``run_dir``, in a background thread or inline.

    Args:
      run_dir: the run directory (created if missing).
      keep_last, keep_best, monitor, mode: retention, see :func:`apply_retention`.
      background: write in a background thread (True) or in the caller's thread.
      run_id: the run written; retention deletes only checkpoints of this run.
      sharded: every save is a sharded checkpoint (:func:`write_sharded_checkpoint`). With
        several processes, every process has a sharded writer and saves at the same points;
        process 0 owns the run directory (cleanup, ``latest``, retention), the others only
        add their part files to each checkpoint.
      process: in the background, write whole checkpoints in a writer process
        (``_child``, Linux) rather than in the writer thread, whose Python work holds the
        interpreter lock the training loop needs. Sharded checkpoints keep the thread.
      lock_fd: the run lock's file descriptor, held by the writer process too (the
        directory stays locked until it has ended).

    The caller holds the run directory's writer lock (see ``RunLock``): the writer assumes
    no other process writes there.
    End it with :meth:`close` before releasing that lock.
    """

    def __init__(self, run_dir: Path, *, keep_last: int | None, keep_best: int | None,
                 monitor: str | None, mode: str | None, background: bool = True,
                 run_id: str | None = None, sharded: bool = False, process: bool = False,
                 lock_fd: int | None = None) -> None:
        self.run_dir = run_dir
        self.retention: dict[str, Any] = dict(keep_last=keep_last, keep_best=keep_best,
                                              monitor=monitor, mode=mode, run_id=run_id)
        self.background = background
        self.stats = SaveStats()
        self.recipe_ref: dict | None = None
        self.sharded = sharded
        self.peers = _peers() if sharded else None
        self._owner = self.peers is None or self.peers.index == 0
        self._saves = 0
        self._next_seq = 0
        if self._owner:
            run_dir.mkdir(parents=True, exist_ok=True)
            _io.remove_stale_tmp(run_dir)
            existing = [_manifest.parse_name(p.name) for p in run_dir.iterdir()]
            self._next_seq = 1 + max((p[0] for p in existing if p), default=0)
        # The saves under way, oldest first, and the threads that write them.
        self._pending: list[_Save] = []
        self._pool: _Threads | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._skipped: list[int] = []
        self._known = Known(run_dir, **self.retention)
        self._child: _child.WriterProcess | None = None
        self._had_child = False  # a writer process was started (it may have died since)
        if process and background and not sharded and _child.SUPPORTED:
            try:
                self._child = _child.WriterProcess(run_dir, self.retention, lock_fd)
            except OSError as err:  # no usable interpreter to start (a frozen program?)
                warnings.warn(f"ModelCheckpoint: cannot start a checkpoint writer process "
                              f"({err}); checkpoints are written by a thread of the training "
                              "process", RuntimeWarning, stacklevel=3)
            else:
                self._had_child = True
                # A writer dropped without close() (a fit that never reached its end) ends
                # its child when it is collected.
                self._finalizer = weakref.finalize(self, self._child.close)

    def set_recipe(self, payload: bytes) -> None:
        """Stores the packed recipe of this fit; later checkpoints refer to it. Waits for
        the writes under way first: their retention keeps only the recipes it knows of."""
        self.wait()
        self.recipe_ref = write_recipe(self.run_dir, payload)

    def save(self, state: dict, *, copy_seconds: float = 0.0,
             shards: tuple[list, tuple[dict | None, dict]] | None = None,
             fetch: Callable[[], dict | None] | None = None, **meta: Any) -> None:
        """Queues (or performs) the write of ``state`` with manifest fields ``meta``.

        ``state`` must already be a host copy that nothing else will modify; ``copy_seconds``
        is how long making that copy took, counted into the blocking time. A sharded writer
        takes ``shards``: this process's records (``_sharded.snapshot``) and the mesh and
        leaves' metadata (``_sharded.leaf_meta``); ``state`` then holds all but the arrays.

        Or ``fetch``, called first on the writer thread, gives the arrays: it returns the
        job's missing entries (``{"state": ...}``, or ``{"records": ..., "leaves": ...}``
        for a sharded writer), or ``None`` for a save not to write (its step is then in
        :meth:`take_skipped`).
        """
        start = time.perf_counter()
        # One write at a time, or with a writer process one more queued behind it (its
        # snapshot waits in memory); also re-raises a failed earlier write.
        depth = 2 if self._child is not None else 1
        while len(self._pending) >= depth:
            self._pending.pop(0).done.wait()
        self._raise_pending()
        if fetch is None and self.sharded != (shards is not None):
            raise ValueError(f"a {'sharded' if self.sharded else 'whole'} RunWriter was given "
                             f"{'no ' if shards is None else ''}shard records")
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        job = dict(state=state, seq=seq, recipe=self.recipe_ref, fetch=fetch, **meta)
        if shards is not None:
            job.update(records=shards[0], leaves=shards[1])
        if self.sharded:
            job.update(peers=self.peers, save=self._saves)
            self._saves += 1  # the same count on every process: it names the save for the peers
        this = _Save()
        if self.background:
            prev = self._pending[-1] if self._pending else None
            if self._pool is None:  # (kept if the child dies: a thread may idle then)
                self._pool = _Threads(depth)
            self._pool.submit(functools.partial(self._run, job, prev, this))
            self._pending.append(this)
        else:
            self._run(job, None, this)
            self._raise_pending()
        self.stats.blocking.append(copy_seconds + time.perf_counter() - start)
        self.stats.copy.append(copy_seconds)

    def take_skipped(self) -> list[int]:
        """The steps of the saves whose ``fetch`` declined to write, since the last call."""
        with self._lock:
            out, self._skipped = self._skipped, []
        return out

    def _run(self, job: dict, prev: _Save | None, this: _Save) -> None:
        """One save (``this``), on a writer thread. With a writer process, ``prev`` is the
        save before (still under way, or None): this one's job is sent after that one's, and
        its reply read after that one's."""
        began = time.perf_counter()
        try:
            fetch = job.pop("fetch")
            if fetch is not None:
                got = fetch()
                if got is None:
                    self._skip(job["step"])
                    return
                job.update(got)
            if self.sharded:
                written = write_sharded_checkpoint(self.run_dir, **job)
                if written is not None:  # process 0: the checkpoint is in place
                    self.stats.nbytes.append(self._known.retain(*written))
                self.stats.write.append(time.perf_counter() - began)
                return
            child = self._child
            if child is not None:
                if prev is not None:
                    prev.sent.wait()
                if not child.send(job):
                    child = None
            this.sent.set()
            if prev is not None:
                prev.done.wait()  # its reply comes first (and its fallback, if the child died)
            self.stats.nbytes.append(self._write(job, child))
            self.stats.write.append(time.perf_counter() - began)
        except BaseException as err:  # handed to the training thread by wait()/save()
            self._error = err
        finally:
            this.sent.set()
            this.done.set()

    def _write(self, job: dict, child: _child.WriterProcess | None) -> int:
        """Writes a whole checkpoint: the writer process's reply to the job sent to
        ``child``, else here. Returns its size."""
        if child is not None and child is self._child:
            reply = child.receive()
            if reply is not None:
                if "error" in reply:
                    raise reply["error"]
                return int(reply["nbytes"])
        if self._child is not None:
            # Out of memory, or killed by hand: the job is still here, and so is the lock.
            # Write it (and the rest of the fit) from this thread.
            gone, self._child = self._child, None
            self._known = Known(self.run_dir, **self.retention)  # rescans the directory
            warnings.warn(f"ModelCheckpoint: the checkpoint writer process {gone.status()}; "
                          "this and later checkpoints are written by a thread of the "
                          "training process", RuntimeWarning, stacklevel=2)
        done = self.run_dir / _manifest.checkpoint_name(job["seq"], job["step"])
        if self._had_child and done.is_dir():  # published by the writer process before it died
            return sum(f.stat().st_size for f in done.iterdir() if f.name != _manifest.MANIFEST_FILE)
        return perform(self._known, job)

    def _skip(self, step: int) -> None:
        with self._lock:
            self._skipped.append(step)

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(
                f"writing a checkpoint into {self.run_dir} failed: {err} (every earlier "
                "checkpoint is intact)"
            ) from err

    def wait(self) -> None:
        """Blocks until the writes under way (if any) are on disk; re-raises an error."""
        while self._pending:
            self._pending.pop(0).done.wait()
        self._raise_pending()

    def close(self) -> None:
        """Waits for the write under way, then ends the writer process (if any); re-raises
        a failed write's error. The run lock may be released after this, not before."""
        try:
            self.wait()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()
            child, self._child = self._child, None
            if child is not None:
                self._finalizer.detach()
                child.close()


def _peers() -> _sharded.Peers | None:
    """The other processes of a multi-process sharded save (None with one process). jax is
    imported here, not with the module: ``python -m jaxfit info`` reads runs without it."""
    import jax

    from jaxfit.checkpoint import _sharded

    return _sharded.Peers() if jax.process_count() > 1 else None
