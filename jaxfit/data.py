"""Data adapters: arrays (any pytree of them) and re-iterables of batches, behind one
interface, ``executions(epoch, start, k, position, limit)``.

Batches reach the step as they are. The last partial batch of array data runs at its true
size (padded, masked, only under a mesh where that is exact: see ``Trainer``), so nothing
computed over the batch sees padding. Arrays are shuffled per epoch with a permutation
derived from ``(seed, epoch)`` alone; iterables carry their position (their iterator's own
state when it has one) with every execution, which checkpoints store. ``docs/data.md``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from jaxfit._tree import batch_rows, same_structure
from jaxfit.errors import ConfigError, DataError

TARGET_KEYS = ("label", "labels", "y", "target", "targets")


@dataclass(frozen=True)
class Execution:
    """``k`` consecutive batches handed to the step at once.

    With ``k == 1`` ``batch`` is one batch pytree ``(B, ...)``; with ``k > 1`` its leaves are
    stacked ``(k, B, ...)``. ``n_valid`` holds the number of real samples of each batch
    (``rows`` and ``n_valid`` are None for a batch without one leading axis, such as a
    graph batch); rows past ``n_valid`` are padding, masked out by the step.
    """

    batch: Any
    n_valid: tuple[int | None, ...]
    rows: int | None  # B, the (padded) batch size
    position: Any = None  # an iterable's position after this execution (IterableData)

    @property
    def k(self) -> int:
        return len(self.n_valid)


def _to_numpy(tree: Any, what: str) -> Any:
    def conv(a: Any) -> np.ndarray:
        if isinstance(a, jax.Array):
            a = jax.device_get(a)
        elif hasattr(a, "numpy") and not isinstance(a, np.ndarray):  # torch / tf tensors
            a = a.detach().cpu().numpy() if hasattr(a, "detach") else a.numpy()
        arr = np.asarray(a)
        if not (arr.dtype.kind in "biuf" or jax.numpy.issubdtype(arr.dtype, jax.numpy.floating)):
            raise DataError(
                f"{what} holds an array of dtype {arr.dtype}: jaxfit trains on numeric arrays "
                "(bool, int, float). Encode strings or objects as numbers first, e.g. with "
                "np.unique(labels, return_inverse=True)."
            )
        return arr

    return jax.tree_util.tree_map(conv, tree)


def _leading(tree: Any) -> list[tuple[str, int]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        if leaf.ndim == 0:
            raise DataError(f"array {jax.tree_util.keystr(path) or 'x'} is a scalar: expected a leading sample axis")
        out.append((jax.tree_util.keystr(path), leaf.shape[0]))
    return out


def split_dict(data: dict, input_keys: Sequence[str] | None, target_keys: Sequence[str] | None,
               need_targets: bool = True) -> tuple[Any, Any]:
    """Split a dict of arrays into (inputs, targets) by key."""
    keys = list(data)
    if target_keys is None:
        target_keys = [k for k in TARGET_KEYS if k in data][:1]
        if not target_keys and need_targets:
            raise DataError(
                f"cannot tell which keys of the data dict are targets: keys are {keys}. "
                "Name one of them 'label', 'labels', 'y', 'target' or 'targets', or pass "
                "Trainer(target_keys=[...], input_keys=[...])."
            )
    if input_keys is None:
        input_keys = [k for k in keys if k not in target_keys]
    missing = [k for k in [*input_keys, *target_keys] if k not in data]
    if missing:
        raise DataError(f"data dict has no key(s) {missing}; its keys are {keys}")
    if not input_keys:
        raise DataError(f"data dict {keys} has no input keys left after the targets {list(target_keys)}")
    pick = lambda ks: data[ks[0]] if len(ks) == 1 else {k: data[k] for k in ks}  # noqa: E731
    return pick(list(input_keys)), (pick(list(target_keys)) if target_keys else None)


def _pad(tree: Any, size: int) -> Any:
    def pad(a: np.ndarray) -> np.ndarray:
        if a.shape[0] == size:
            return a
        out = np.zeros((size, *a.shape[1:]), a.dtype)
        out[: a.shape[0]] = a
        return out

    return jax.tree_util.tree_map(pad, tree)


def _names(data: Any) -> list[tuple[str, int]]:
    """(name, length) of every leaf; an ``(x, y)`` pair names its parts x and y."""
    if isinstance(data, tuple) and len(data) == 2 and not hasattr(data, "_fields"):
        return [(f"x{p}", n) for p, n in _leading(data[0])] + [(f"y{p}", n) for p, n in _leading(data[1])]
    return _leading(data)


class ArrayData:
    """In-memory arrays: any pytree of equal-length arrays (``(x, y)``, a dict, ``x`` alone).

    Batches are taken in order (or in the epoch's permutation) at the batch size; the last,
    partial batch runs at its true size, so whatever the model computes over the batch
    (BatchNorm statistics, a batch-wide loss) sees real rows only. ``drop_remainder=True``
    leaves it out instead. Under a mesh a partial batch must split over the devices:
    ``pad_multiple`` pads it to the next multiple, masked (see ``Trainer``).
    """

    def __init__(self, data: Any, batch_size: int, *, shuffle: bool, seed: int, what: str = "data",
                 drop_remainder: bool = False, pad_multiple: int = 1) -> None:
        self.data = _to_numpy(data, what)
        lengths = _names(self.data)
        if len({n for _, n in lengths}) > 1:
            named = ", ".join(f"{p or 'x'} has {n}" for p, n in lengths)
            raise DataError(f"{what}: every array must have the same number of samples, but {named}")
        self.n = lengths[0][1]
        if self.n == 0:
            raise DataError(f"{what} is empty (0 samples): nothing to train or evaluate on")
        if drop_remainder and self.n < batch_size:
            raise DataError(
                f"{what} has {self.n} samples, fewer than one batch of {batch_size}: with "
                "drop_remainder=True no batch is left. Use a smaller batch_size."
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.pad_multiple = pad_multiple
        # The next epoch's order, drawn while the device still runs this epoch's last steps
        # (not after the epoch's end has waited for them): (epoch, permutation).
        self._ahead: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_remainder else math.ceil(self.n / self.batch_size)

    @property
    def partial_rows(self) -> int:
        """Real rows of the last batch when it is partial (0 when every batch is full)."""
        return 0 if self.drop_remainder else self.n % self.batch_size

    def order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch:
            return ahead[1]
        return self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def executions(self, epoch: int, start: int = 0, k: int = 1, position: Any = None,
                   limit: int | None = None) -> Iterator[Execution]:
        """The epoch's batches from batch index ``start`` (at most ``limit`` of them), grouped
        ``k`` at a time. ``position`` is unused: ``(epoch, start)`` is the position."""
        B, steps = self.batch_size, self.steps_per_epoch
        if limit is not None:
            steps = min(steps, start + limit)
        perm = self.order(epoch)
        # Rows are gathered per execution, not for the whole epoch up front: the copy of the
        # next batch then overlaps the device's work on the current one instead of stalling
        # the epoch start (25 MB for 8k MNIST-sized rows). Leaves are flattened once: slicing
        # them costs far less per step than a tree_map, which shows on ~100 us steps.
        leaves, treedef = jax.tree_util.tree_flatten(self.data)
        full = self.n // B

        def rows(lo: int, hi: int, kk: int) -> list:
            end = min(hi, self.n)
            sel = slice(lo, end) if perm is None else perm[lo:end]
            out = [a[sel] for a in leaves]
            return out if kk == 1 else [a.reshape(kk, B, *a.shape[1:]) for a in out]

        i, last_full = start, min(full, steps)
        unflatten, one, group = jax.tree_util.tree_unflatten, (B,), (B,) * k
        while i < last_full:  # full batches, k at a time while k of them are left
            if i + k <= last_full:
                yield Execution(unflatten(treedef, rows(i * B, (i + k) * B, k)), group, B)
                i += k
            else:
                yield Execution(unflatten(treedef, rows(i * B, (i + 1) * B, 1)), one, B)
                i += 1
        while i < steps:
            n = self.n - i * B  # the last, partial batch, at its true size
            padded = -(-n // self.pad_multiple) * self.pad_multiple
            out = rows(i * B, self.n, 1)
            if padded != n:
                out = _pad(out, padded)
            yield Execution(jax.tree_util.tree_unflatten(treedef, out), (n,), padded)
            i += 1
        if self.shuffle and i == self.steps_per_epoch:
            # The loop draws the epoch's last execution from here while the one before runs.
            self._ahead = (epoch + 1, self._permutation(epoch + 1))

    def example(self) -> Any:
        """A first batch, for shape inference and initialisation."""
        return next(self.executions(1 if self.shuffle else 0, 0, 1)).batch


class _Cursor:
    """A live iterator of one pass over an iterable: which pass, how many batches it has
    yielded, and the object whose state a checkpoint saves (the iterator or the iterable)."""

    def __init__(self, pass_: int, iterator: Iterator[Any], holder: Any) -> None:
        self.pass_, self.iterator, self.holder, self.consumed = pass_, iterator, holder, 0


class IterableData:
    """A re-iterable of batches: a list, a grain ``MapDataset`` / ``IterDataset`` /
    ``DataLoader``, a torch DataLoader, a function returning a fresh iterable each call (a
    generator function, or ``fn(epoch)``). Each item is one batch, any pytree of arrays,
    handed to the step as it is. Batches run at the size they come in (each new shape
    compiles once); ``k > 1`` stacks ``k`` consecutive batches of equal shapes.

    Passes: without ``steps_per_epoch`` each epoch is one pass (the iterable is told the
    epoch: ``set_epoch(epoch)`` before the pass, or ``fn(epoch)``). With it the iterable is a
    stream: epochs take ``steps_per_epoch`` batches from one iterator, and a new pass starts
    only when a pass runs out.

    Position: every execution carries ``position``, the point of the stream after its last
    batch: ``{"pass", "consumed", "state"}``, where ``state`` is the iterator's own
    (``get_state()`` / ``state_dict()``) when it has one. Resuming from a position restores
    that state (no replay); an iterable without one is replayed from the pass's start and the
    first ``consumed`` batches are skipped, exact only for a deterministic iterable (warned,
    except for lists and tuples, which are).
    """

    def __init__(self, source: Iterable | Callable[..., Iterable], *, what: str = "data",
                 steps_per_epoch: int | None = None) -> None:
        if iter_once(source):
            raise DataError(
                f"{what} is a one-shot iterator ({type(source).__name__}): it would be empty from "
                "the second epoch on, and a resumed run could not replay its order. Pass a "
                "re-iterable (a list, a DataLoader, a grain dataset) or the generator function "
                "itself (data=make_batches, not make_batches())."
            )
        self.source = source
        self.what = what
        self.batch_size: int | None = None
        self.stream = steps_per_epoch is not None
        self._spe = steps_per_epoch
        self._cursor: _Cursor | None = None
        self.replayed = 0  # batches produced again to reach a saved position (stateless resume)
        self._example_pass = 1 if what.startswith("training") else 0  # evaluation: pass 0
        _grain_ready(source)

    @property
    def steps_per_epoch(self) -> int | None:
        if self._spe is not None:
            return self._spe
        try:
            return len(self.source)  # type: ignore[arg-type]
        except TypeError:
            return None

    # ------------------------------------------------------------------ passes
    def _open(self, pass_: int, state: Any = None) -> _Cursor:
        src = self.source
        if hasattr(src, "set_epoch"):
            src.set_epoch(pass_)
        if callable(src) and not hasattr(src, "__iter__"):
            iterable = src(pass_) if _takes_epoch(src) else src()
        else:
            iterable = src
        on_iterable = _has_state(iterable)
        if state is not None and on_iterable:
            _set_state(iterable, state)  # torchdata-style: the loader restores, then iterates
        iterator = iter(iterable)
        holder = iterable if on_iterable else iterator if _has_state(iterator) else None
        if state is not None and holder is iterator:
            _set_state(iterator, state)
        return _Cursor(pass_, iterator, holder)

    def _start(self, epoch: int, start: int, position: dict | None) -> _Cursor:
        """The cursor from which this epoch's batches come: the live one when it is where the
        run is, else one opened at the saved position (its state, or a replay)."""
        if self.stream:
            pass_, skip, state = (int(position["pass"]), int(position["consumed"]), position.get("state")) \
                if position is not None else (1, (epoch - 1) * (self._spe or 0) + start, None)
        elif start == 0 or position is None or int(position.get("epoch", epoch)) != epoch:
            pass_, skip, state = epoch, start, None
        else:
            pass_, skip, state = epoch, int(position["consumed"]), position.get("state")
        cur = self._cursor
        if cur is not None and (cur.pass_, cur.consumed) == (pass_, skip):
            return cur
        cur = self._open(pass_, state)
        if state is not None and cur.holder is not None:
            cur.consumed = skip
        elif skip:
            if not isinstance(self.source, (list, tuple)):
                warnings.warn(
                    f"{self.what}: resuming {skip} batches into pass {pass_} of a "
                    f"{type(self.source).__name__}, which has no iterator state (get_state/"
                    "set_state or state_dict/load_state_dict): jaxfit replays the pass from its "
                    f"start and discards the first {skip} batches. The resume is exact only if "
                    "the iterable yields the same batches in the same order every time (a "
                    "shuffling DataLoader does not). Use a grain pipeline or give the iterable "
                    "that state protocol for an exact resume without replay.",
                    UserWarning, stacklevel=2)
            for _ in range(skip):
                if next(cur.iterator, _END) is _END:
                    break
                cur.consumed += 1
                self.replayed += 1
        self._cursor = cur
        return cur

    def _next(self, cur: _Cursor, epoch: int) -> tuple[Any, dict] | None:
        """The next batch and the position after it; in a stream, a pass that runs out opens
        the next one."""
        while True:
            item = next(cur.iterator, _END)
            if item is not _END:
                cur.consumed += 1
                state = _state_of(cur.holder, self.what) if cur.holder is not None else None
                return (_to_numpy(item, f"{self.what} batch"),
                        {"epoch": epoch, "pass": cur.pass_, "consumed": cur.consumed, "state": state})
            if not self.stream:
                return None
            if cur.consumed == 0:
                raise DataError(f"{self.what}: pass {cur.pass_} yielded no batch: the stream is empty")
            cur = self._cursor = self._open(cur.pass_ + 1)

    def executions(self, epoch: int, start: int = 0, k: int = 1, position: dict | None = None,
                   limit: int | None = None) -> Iterator[Execution]:
        """The epoch's batches from batch ``start`` (at ``position`` when resuming), at most
        ``limit`` of them, ``k`` equal-shaped batches stacked per execution."""
        left = math.inf if limit is None else limit
        if self._spe is not None:  # a stream (self.stream)
            left = min(left, self._spe - start)
        cur = self._start(epoch, start, position)
        while left > 0:
            group: list[tuple[Any, dict]] = []
            while len(group) < min(k, left):
                got = self._next(self._cursor or cur, epoch)
                if got is None:
                    break
                group.append(got)
            if not group:
                return
            left -= len(group)
            if len(group) == k > 1 and _same_shapes([b for b, _ in group]):
                n = batch_rows(group[0][0])
                if self.batch_size is None:
                    self.batch_size = n
                stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *[b for b, _ in group])
                yield Execution(stacked, (n,) * k, n, group[-1][1])
                continue
            for batch, pos in group:
                n = batch_rows(batch)
                if self.batch_size is None:
                    self.batch_size = n
                yield Execution(batch, (n,), n, pos)
            if len(group) < min(k, left + len(group)):
                return  # the pass ran out

    def example(self, epoch: int | None = None, start: int = 0, position: dict | None = None) -> Any:
        """The first batch the run will train on (from ``position`` when resuming), for shape
        inference; the opened iterator is kept for that epoch, so nothing is produced twice."""
        epoch = self._example_pass if epoch is None else epoch
        got = self._next(self._start(epoch, start, position), epoch)
        if got is None:  # resuming at the very end of a pass: take the shapes from a new one
            got = self._next(self._open(epoch), epoch)
            if got is None:
                raise DataError(f"{self.what} is empty: it yielded no batch")
            return got[0]
        cur = self._cursor
        assert cur is not None
        cur.iterator, cur.consumed = itertools.chain([got[0]], cur.iterator), cur.consumed - 1
        return got[0]


_END = object()


def _same_shapes(batches: list) -> bool:
    shapes = [tuple((a.shape, a.dtype) for a in jax.tree_util.tree_leaves(b)) for b in batches]
    return all(same_structure(b, batches[0]) for b in batches) and len(set(shapes)) == 1


def _takes_epoch(fn: Callable) -> bool:
    """True for ``fn(epoch)``: a function with a required positional parameter."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in params)


def _has_state(obj: Any) -> bool:
    return (hasattr(obj, "get_state") and hasattr(obj, "set_state")) or \
        (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"))


def _state_of(holder: Any, what: str) -> Any:
    state = holder.get_state() if hasattr(holder, "get_state") else holder.state_dict()
    try:
        return _plain(state)
    except TypeError as e:
        raise DataError(
            f"{what}: its iterator state cannot go into a checkpoint: {e}. The state must be "
            "made of dicts with str keys, lists, str, bytes, numbers and None."
        ) from None


def _set_state(holder: Any, state: Any) -> None:
    if hasattr(holder, "set_state"):
        holder.set_state(state)
    else:
        holder.load_state_dict(state)


def _plain(obj: Any) -> Any:
    """``obj`` as msgpack data (numpy scalars to Python numbers, tuples to lists)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    raise TypeError(f"it holds a {type(obj).__name__}")


def _grain_ready(source: Any) -> None:
    """grain reads absl flags in its worker processes; a program that is not an absl app has
    not parsed them, and grain would fail at the first batch. Mark them parsed (defaults)."""
    if not type(source).__module__.startswith("grain"):
        return
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - grain depends on absl
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iter_once(source: Any) -> bool:
    """True for one-shot iterators (a generator object, ``iter(list)``)."""
    # Checked by type, without calling iter(): that may start a loader's workers, or ask an
    # iterable that is told the epoch (set_epoch) for a pass before it was told one.
    return hasattr(type(source), "__next__") and hasattr(type(source), "__iter__")


def make_source(data: Any, *, batch_size: int | None, shuffle: bool, seed: int, what: str,
                drop_remainder: bool = False, pad_multiple: int = 1,
                steps_per_epoch: int | None = None) -> ArrayData | IterableData:
    """Pick the adapter for ``data``: arrays (any pytree of them: ``(x, y)``, a dict, ``x``)
    or an iterable of batches (a stream of ``steps_per_epoch`` batches per epoch when given)."""
    if data is None:
        raise DataError(f"no {what} given")
    bs = _batch(batch_size)
    if isinstance(data, (dict, tuple)) or _is_array(data):
        leaves = jax.tree_util.tree_leaves(data)
        if leaves and all(_is_array(a) for a in leaves):
            if steps_per_epoch is not None:
                raise ConfigError(
                    f"steps_per_epoch={steps_per_epoch} is for an iterable or a stream of batches; "
                    f"{what} are arrays, whose epoch is one pass over them in batches of "
                    f"{bs}. Leave steps_per_epoch out (or pass max_steps= to end the run at a "
                    "step count).")
            return ArrayData(data, bs, shuffle=shuffle, seed=seed, what=what,
                             drop_remainder=drop_remainder, pad_multiple=pad_multiple)
        if isinstance(data, dict) or _is_array(data):
            got = type(leaves[0]).__name__ if leaves else "nothing"
            raise DataError(f"{what}: a dict of data must hold arrays, got {got}")
    if callable(data) or hasattr(data, "__iter__"):
        return IterableData(data, what=what, steps_per_epoch=steps_per_epoch)
    raise DataError(
        f"{what} of type {type(data).__name__} is not supported: pass (x, y) arrays, a dict of "
        "arrays, or a re-iterable of batches"
    )


def _is_array(a: Any) -> bool:
    return isinstance(a, (np.ndarray, jax.Array)) or (hasattr(a, "shape") and hasattr(a, "dtype"))


def _batch(batch_size: int | None) -> int:
    if batch_size is None:
        return 32
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise DataError(f"batch_size must be a positive integer, got batch_size = {batch_size!r}")
    return int(batch_size)


def split_validation(data: Any, val: Any, split: float | None) -> tuple[Any, Any]:
    """``(training, validation)`` data: Keras's ``validation_split`` holds out the last
    ``split`` of the samples, taken before any shuffling."""
    if split is None:
        return data, val
    if isinstance(split, bool) or not isinstance(split, (float, int)) or not 0 < split < 1:
        raise ConfigError(f"validation_split must be a fraction between 0 and 1, got {split!r}")
    if val is not None:
        raise ConfigError("give validation_data= or validation_split=, not both")
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves or not all(hasattr(a, "shape") and getattr(a, "ndim", 0) for a in leaves) or isinstance(data, list):
        raise ConfigError(
            "validation_split= works on array data ((x, y), a dict of arrays), as in Keras; for an "
            "iterable of batches pass validation_data= instead"
        )
    n = leaves[0].shape[0]
    cut = int(np.floor(n * (1.0 - split)))
    if cut in (0, n):
        raise ConfigError(f"validation_split={split} of {n} samples leaves an empty training or validation set")
    return (jax.tree_util.tree_map(lambda a: a[:cut], data), jax.tree_util.tree_map(lambda a: a[cut:], data))
