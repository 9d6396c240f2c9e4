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
