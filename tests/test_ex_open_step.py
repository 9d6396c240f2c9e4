"""The open-step examples (vae, transformer_lm, gan) run in smoke mode, print what they
promise, write under a new run directory and can be run again and again."""

import re

import pytest
from ex_support import png_size, run_example

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _checkpoints(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))


def test_vae_smoke_trains_and_writes_samples_twice_into_new_versions(tmp_path):
    out = run_example("vae.py", "--smoke", cwd=tmp_path)
    first, last = map(float, re.search(r"val_loss (\S+) -> (\S+) \(bce", out).groups())
    assert last < first  # BCE + KL falls
    run = tmp_path / "runs" / "vae" / "version_0"
    assert _checkpoints(run) == ["ckpt-000001-step2", "ckpt-000002-step4"]
    w, h = png_size(run / "samples.png")
    assert w > 100 and h > 100
    run_example("vae.py", "--smoke", "--epochs", "1", cwd=tmp_path)
    assert (tmp_path / "runs" / "vae" / "version_1" / "samples.png").is_file()
    assert {p.name for p in tmp_path.iterdir()} <= {"runs", "data-cache"}  # nothing in cwd


def test_transformer_lm_smoke_logs_token_weighted_loss_and_the_schedule(tmp_path):
    out = run_example("transformer_lm.py", "--smoke", cwd=tmp_path)
    m = re.search(r"val_loss (\S+) -> (\S+) per token over (\d+) tokens \(uniform: (\S+)\)", out)
    assert m, out
    first, last, tokens, uniform = float(m[1]), float(m[2]), int(m[3]), float(m[4])
    assert last < first and last < uniform  # better than guessing after two epochs
    assert 1000 < tokens < 64 * 56  # padding excluded: far fewer than rows x length
    # LRScheduler's value is in the epoch lines: warmup then cosine decay.
    rates = [float(r) for r in re.findall(r"learning_rate (\S+)", out)]
    assert len(rates) >= 2 and rates[1] < rates[0]
    assert "the model completes 'the cat s' as 'the cat s" in out
    run = tmp_path / "runs" / "transformer_lm" / "version_0"
    assert (run / "latest").exists() and _checkpoints(run)


def test_gan_smoke_drives_both_optimizers_and_plots_samples(tmp_path):
    out = run_example("gan.py", "--smoke", cwd=tmp_path)
    og, od = map(float, re.search(r"og\.learning_rate (\S+), od\.learning_rate (\S+)", out).groups())
    assert og < 1e-3 and od < 1e-3  # each cosine-decayed by its own LRScheduler
    assert re.search(r"generator: quality \S+ -> \S+, modes reached \S+ of 8", out)
    run = tmp_path / "runs" / "gan" / "version_0"
    assert _checkpoints(run) and png_size(run / "samples.png")[0] > 100


def test_examples_refuse_a_run_dir_that_holds_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(AssertionError, match="already holds a run"):
        run_example("gan.py", "--smoke", "--run-dir", "mine", cwd=tmp_path)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"
