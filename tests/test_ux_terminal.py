"""The display in a real terminal: tmux panes of 80 and 160 columns, read with capture-pane.

RichProgress's live bar (label, bar, counter, rates, values), its epoch table (headers
whole) and summary, and ``python -m jaxfit info``'s table must lay out for the width they
have. The worker pauses mid-epoch on a file handshake, so nothing here depends on timing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(shutil.which("tmux") is None,
                       reason="needs tmux (apt-get install -y tmux)"),  # fmt: skip
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WIDTHS = [80, 160]


class Pane:
    """One detached tmux session on a private server, running one shell command."""

    def __init__(self, tmp: Path, width: int, command: str) -> None:
        self.socket = f"jaxfit-test-{os.getpid()}-{width}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]),
                   PYTHONIOENCODING="utf-8")  # fmt: skip
        env.pop("COLUMNS", None)  # the pane's own size must decide
        env.pop("LINES", None)
        # The command's output stays on screen after it ends (the trailing sleep).
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", "40",
                   f"cd {tmp} && {command}; sleep 600", env=env)  # fmt: skip

    def _tmux(self, *args: str, env: dict | None = None) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        return proc.stdout

    def capture(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, pattern: str, what: str, timeout: float = 300) -> str:
        """The screen once ``pattern`` is on it (fails after ``timeout`` s, not a timing test)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.capture()
            if re.search(pattern, screen, re.M):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: {pattern!r} never appeared on the screen:\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def wait_for_file(path: Path, pane: Pane, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} never appeared; the screen:\n{pane.capture()}")
        time.sleep(0.1)


def lines_of(screen: str) -> list[str]:
    return [ln.rstrip() for ln in screen.splitlines() if ln.strip()]


@pytest.mark.parametrize("width", WIDTHS)
def test_rich_progress_in_a_real_terminal(tmp_path, width):
    worker = HERE / "ux_progress_worker.py"
    pane = Pane(tmp_path, width, f"{sys.executable} {worker} {tmp_path}")
    try:
        wait_for_file(tmp_path / "paused", pane)
        # Epoch 2 is paused at batch 5 of 8, after a refresh of the bar.
        screen = pane.wait_for(r"^Epoch 2/3 .* 5/8 ", "the live bar at batch 5")
        lines = lines_of(screen)
        assert all(len(ln) <= width for ln in lines), screen
        bar = next(ln for ln in lines if ln.startswith("Epoch 2/3"))
        m = re.match(r"Epoch 2/3 ([━╸╺]+) 5/8 (.*)$", bar)
        assert m, f"label, bar and counter not intact:\n{screen}"
        assert len(m.group(1)) >= 10
        # The rates and the ETA, whole (80 columns has room for all of them here too).
        assert re.search(r"[\d.]+ steps/s [\d]+ samples/s ETA \S+ \(fit \S+\)$", m.group(2)), bar
        values = lines[lines.index(bar) + 1]
        assert re.fullmatch(r"loss \d\.\d{4}  accuracy \d\.\d{4}  learning_rate \d\.\d{4}",
                            values), screen  # fmt: skip
        header = lines[0].split()
        want = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "time"]
        assert header == want + (["steps/s"] if width >= 160 else []), screen
        assert re.match(r"\s*1/3(\s+\d\.\d{4}){5}\s+\d", lines[1]), screen

        (tmp_path / "go").touch()
        wait_for_file(tmp_path / "done", pane)
        screen = pane.wait_for(r"^Trained 3 epochs", "the summary")
        lines = lines_of(screen)
        assert all(len(ln) <= width for ln in lines), screen
        rows = [ln.split()[0] for ln in lines if re.match(r"\s*\d/3\s", ln)]
        assert rows == ["1/3", "2/3", "3/3"], screen
        assert not any(ln.startswith("Epoch ") for ln in lines), screen  # the bar is gone
        # No word of the summary is cut at the edge of the screen.
        first = next(i for i, ln in enumerate(lines) if ln.startswith("Trained"))
        summary = "\n".join(lines[first:])
        assert re.search(r"first step \(with compilation\) \S+s;", summary), summary
        assert re.search(r"(learning_rate|lr) \d\.\d{4}$", summary), summary
    finally:
        pane.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import numpy as np
    import optax
    from conftest import MLP

    from jaxfit import Trainer
    from jaxfit.callbacks import LRScheduler, ModelCheckpoint

    run = tmp_path_factory.mktemp("info") / "runs" / "a_run_with_a_long_name" / "version_0"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      metrics=["accuracy", "top_2_accuracy"], seed=0)  # fmt: skip
    trainer.fit(MLP(), (x, y), validation_data=(x, y), epochs=2, batch_size=16,
                callbacks=[LRScheduler(optax.linear_schedule(0.1, 0.01, 8)),
                           ModelCheckpoint(run, monitor="val_accuracy", mode="max")])  # fmt: skip
    return run


@pytest.mark.parametrize("width", WIDTHS)
def test_info_in_a_real_terminal(tmp_path, run_dir, width):
    pane = Pane(tmp_path, width, f"{sys.executable} -m jaxfit info {run_dir}")
    try:
        screen = pane.wait_for(r"^resume with: ", "the end of the info output")
        lines = lines_of(screen)
        assert all(len(ln) <= width for ln in lines), screen
        header = next(ln for ln in lines if ln.startswith("┃") and "checkpoint" in ln)
        names = [c.strip() for c in header.strip("┃").split("┃")]
        want = ["checkpoint", "step", "epoch", "metrics", "size", "valid", "latest", "best"]
        if width < 100:  # fewer columns first: size, then step (the name holds the step)
            want = [c for c in want if c not in ("size", "step")]
        assert names == want, screen
        # Every metric whole: key=value items, abbreviated at 80 columns.
        cells = [ln.split("│")[names.index("metrics") + 1].strip() for ln in lines
                 if ln.startswith("│")]  # fmt: skip
        items = " ".join(cells).split()
        assert items and all(re.fullmatch(r"[a-z_0-9]+=\d\.?\d*", it) for it in items), screen
        keys = {it.split("=")[0] for it in items}
        full = {"val_accuracy", "accuracy", "learning_rate", "loss", "top_2_accuracy",
                "val_loss", "val_top_2_accuracy"}  # fmt: skip
        short = {"v_acc", "acc", "lr", "loss", "top2_acc", "v_loss", "v_top2_acc"}
        assert keys == (full if width >= 160 else short), screen
        # The command soft-wraps (a terminal joins it back when copied): whole, in order.
        assert f"resume with: python -m jaxfit resume {run_dir}" in screen.replace("\n", "")
    finally:
        pane.close()
