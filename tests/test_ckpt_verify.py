"""verify_resume: passes on a deterministic run, reports what differs on a broken one."""

import pytest
from conftest import BNDropout, make_trainer

from jaxfit import Callback
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import verify_resume

# Each check trains the run several times (once whole, once per stop point).
pytestmark = pytest.mark.slow


def test_resume_matches_at_an_epoch_boundary_and_mid_epoch(data, tmp_path):
    x, y = data
    # 70 examples, batch 16: 5 steps per epoch. Step 5 ends epoch 1, step 7 is mid-epoch 2.
    report = make_trainer(seed=2).verify_resume(
        BNDropout(), (x, y), stop_at=[5, 7], validation_data=(x[:20], y[:20]), epochs=3,
        batch_size=16, shuffle=False, callbacks=[ModelCheckpoint(tmp_path / "untouched")])
    assert report.ok, str(report)
    assert report.stopped_at == [5, 7] and report.total_steps == 15
    assert "bit for bit" in str(report)
    assert not (tmp_path / "untouched").exists()  # the user's run directory is left alone


class ForgetfulDecay(Callback):
    """Halves the learning rate every epoch but keeps its counter outside state_dict."""

    def __init__(self):
        self.epochs_seen = 0

    def on_epoch_end(self, trainer, logs):
        self.epochs_seen += 1
        trainer.hyperparams["learning_rate"] = 0.1 * 0.5 ** self.epochs_seen


def test_state_kept_outside_state_dict_is_reported(data):
    report = verify_resume(make_trainer(), BNDropout(), data, stop_at=6, epochs=3,
                           batch_size=16, callbacks=[ForgetfulDecay()])
    assert not report
    assert "stop at 6: train_state/state/params/" in str(report)
    assert "learning_rate differs" in str(report)


@pytest.mark.parametrize("stop_at", [0, 15, [3, 99]])
def test_stop_steps_outside_the_run_are_refused(data, stop_at):
    with pytest.raises(ValueError, match=r"stop_at must be between 1 and 14 \(the run has 15"):
        verify_resume(make_trainer(), BNDropout(), data, stop_at=stop_at, epochs=3, batch_size=16)


def test_nnx_model_with_rng_state_resumes_exactly(data):
    import optax
    from flax import nnx

    from jaxfit import Trainer

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.bn = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.do, self.l2 = nnx.Dropout(0.3, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.do(self.bn(self.l1(x))))

    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    report = verify_resume(trainer, Net(nnx.Rngs(0)), data, epochs=3, batch_size=16,
                           stop_at=[5, 7])
    assert report.ok, str(report)
