"""jaxfit's built-in callback plugins, imported as ``jaxfit.callbacks``."""

from jaxfit.history import History as History
