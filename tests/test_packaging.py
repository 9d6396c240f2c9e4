"""Packaging: `callbacks/` is `jaxfit.callbacks` from a checkout and from a wheel, never top level."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

import jaxfit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_and_typed_marker():
    assert isinstance(jaxfit.__version__, str) and jaxfit.__version__.count(".") == 2
    assert os.path.isfile(os.path.join(os.path.dirname(jaxfit.__file__), "py.typed"))


def test_callbacks_import_as_a_subpackage_of_jaxfit():
    import jaxfit.callbacks as cbs

    assert cbs.__name__ == "jaxfit.callbacks"
    assert "callbacks" not in sys.modules


def test_importing_the_folder_as_top_level_callbacks_is_refused():
    code = "import sys; sys.path.insert(0, %r); import callbacks" % ROOT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "import the built-in callbacks as `jaxfit.callbacks`" in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_wheel_installs_callbacks_inside_jaxfit(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True, capture_output=True,
    )
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    assert "jaxfit/callbacks/__init__.py" in names and "jaxfit/py.typed" in names
    assert not any(n.startswith("callbacks/") for n in names)
    code = "import jaxfit.callbacks as c, sys; print(c.__file__); assert 'callbacks' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(tmp_path / "site" / "jaxfit" / "callbacks"))
