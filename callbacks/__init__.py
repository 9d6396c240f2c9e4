"""jaxfit's built-in callback plugins, imported as ``jaxfit.callbacks``."""

if __name__ != "jaxfit.callbacks":  # the folder is a plugin directory, not a package of its own
    raise ImportError("import the built-in callbacks as `jaxfit.callbacks`, not as a top-level `callbacks`")

from jaxfit.history import History as History
