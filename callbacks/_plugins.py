"""Finding callback plugins: the ``jaxfit.callbacks`` entry-point group."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

GROUP = "jaxfit.callbacks"

# The built-ins, as pyproject.toml registers them (a test keeps the two in step). Listed
# here too so that a source checkout, where no distribution metadata exists, finds them.
BUILTINS = {
    name: f"jaxfit.callbacks:{name}"
    for name in (
        "CSVLogger",
        "EarlyStopping",
        "History",
        "LambdaCallback",
        "LearningRateMonitor",
        "LRScheduler",
        "ModelCheckpoint",
        "ReduceOnPlateau",
        "RichProgress",
        "TensorBoard",
        "TerminateOnNaN",
        "Timer",
    )
}


def available() -> dict[str, EntryPoint]:
    """Every installed callback plugin, by name: the built-ins and third-party ones.

    A package makes its callbacks available by declaring them in the
    ``jaxfit.callbacks`` entry-point group of its ``pyproject.toml``::

        [project.entry-points."jaxfit.callbacks"]
        WandbLogger = "my_package.callbacks:WandbLogger"

    Nothing is imported until you call ``.load()`` on an entry. A third-party entry never
    replaces a built-in of the same name.

    Returns:
        ``{name: importlib.metadata.EntryPoint}``, sorted by name.

    Example:
        >>> from jaxfit.callbacks import available
        >>> early = available()["EarlyStopping"].load()
        >>> early.__name__
        'EarlyStopping'
    """
    import jaxfit.callbacks as builtin

    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    found.update({n: EntryPoint(n, v, GROUP) for n, v in BUILTINS.items() if hasattr(builtin, n)})
    return dict(sorted(found.items()))


def load(name: str) -> type:
    """The callback class registered as ``name`` (see :func:`available`).

    Raises:
        KeyError: naming the plugins that are installed.
    """
    plugins = available()
    if name not in plugins:
        raise KeyError(
            f"no callback plugin named {name!r}; installed: {', '.join(plugins)}. Third-party "
            f"callbacks register under the {GROUP!r} entry-point group."
        )
    return plugins[name].load()
