"""The run directory of an example: a new ``runs/<example>/version_N`` per run.

Examples never write into the current directory, and running one again never mixes two
runs in one folder: each run takes the next ``version_N`` under its root, or the directory
named by ``--run-dir``, which must be new or empty (ModelCheckpoint refuses to mix runs).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def next_version(root: Path) -> Path:
    """``root/version_N`` for the first N past every existing version."""
    taken = [int(m.group(1)) for p in root.glob("version_*")
             if (m := re.fullmatch(r"version_(\d+)", p.name)) and p.is_dir()]  # fmt: skip
    return root / f"version_{max(taken) + 1 if taken else 0}"


def run_dir(example: str, given: str | None) -> Path:
    """The directory this run writes to, created; exits with a message if ``given`` holds
    a run already (before any work, so a clash costs no time)."""
    path = Path(given) if given is not None else next_version(Path("runs") / example)
    if path.is_dir() and any(path.iterdir()):
        sys.exit(f"error: {path} already holds a run: pass a new --run-dir, or none for the next "
                 f"runs/{example}/version_N")
    path.mkdir(parents=True, exist_ok=True)
    return path
