"""Helpers shared by the example and plotting tests (test_ex_*.py)."""

import struct
from pathlib import Path


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a PNG, read from its IHDR chunk; fails if the file is not a PNG."""
    blob = Path(path).read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert blob[12:16] == b"IHDR"
    width, height = struct.unpack(">II", blob[16:24])
    return width, height


REPO = Path(__file__).resolve().parent.parent


def run_example(script: str, *args: str, cwd: Path, timeout: float = 600) -> str:
    """Runs ``examples/<script>`` in a fresh interpreter from ``cwd``; returns its stdout.

    The checkout goes first on PYTHONPATH (so the scripts import this jaxfit, installed or
    not), the dataset cache points into ``cwd`` (a smoke run must neither read nor fill the
    user's cache), and rich gets a wide UTF-8 console so table rows stay on one line.
    """
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(PYTHONIOENCODING="utf-8", COLUMNS="200", JAXFIT_DATA=str(cwd / "data-cache"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
