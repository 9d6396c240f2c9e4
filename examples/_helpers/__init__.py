"""Helpers shared by the example scripts (not examples themselves).

The scripts run as ``python examples/<name>.py``, which puts ``examples/`` first on
``sys.path``: they import these as ``from _helpers.hyperparam_trace import ...``.
"""
