"""A state that decodes but has the wrong structure, a bad recipe reference, swapped
checkpoint directories: each a named error, and loading a run falls back past them."""

import json
import shutil

import numpy as np
import pytest
from ckpt_helpers import run_fixtures
from conftest import MLP, make_trainer

from jaxfit import Trainer
from jaxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointStructureError,
    CheckpointWarning,
    decode_state,
    encode_state,
    read_checkpoint,
    restore,
)
from jaxfit.checkpoint import _io


base_run, run = run_fixtures(epochs=3)


def _ckpts(run):
    return sorted(p for p in run.iterdir() if p.name.startswith("ckpt-"))


def rewrite_state(ckpt, change):
    """Re-encodes the checkpoint's state after ``change(state)``, with a matching manifest
    (so it verifies: only its structure is wrong)."""
    state = decode_state((ckpt / "state.msgpack").read_bytes())
    change(state)
    (ckpt / "state.msgpack").write_bytes(encode_state(state))
    digest, size = _io.sha256_file(ckpt / "state.msgpack")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.msgpack"] = {"sha256": digest, "size": size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(ckpt, **fields):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest.update(fields)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


CHANGES = {
    "no_history": (lambda s: s.pop("history"), r"the state has no entry 'history'"),
    "step_is_text": (lambda s: s.update(step="ten"), r"the state's 'step' is a str"),
    "param_shape": (lambda s: s["train_state"]["state"]["params"]["Dense_0"].update(
        bias=np.zeros(5, np.float32)), r"Dense_0\.bias: saved shape \(5,\), expected \(3,\)"),
    "param_dtype": (lambda s: s["train_state"]["state"]["params"]["Dense_0"].update(
        bias=np.zeros(3, np.int32)), r"Dense_0\.bias: saved dtype int32, expected float32"),
    "params_list": (lambda s: s["train_state"]["state"].update(params=[1, 2]),
                    r"no entry 'state\.params\.Dense_0"),
    "history_list": (lambda s: s.update(history=[]), r"'history' is a list"),
    "spec_huge": (lambda s: s["input_spec"]["tuple"][0].update(shape=[2**40, 2**20]),
                  r"input_spec describes an example batch of \d+ bytes, more than max_bytes"),
    "spec_dtype": (lambda s: s["input_spec"]["tuple"][0].update(dtype="object"),
                   r"input_spec\[0\]: array dtype 'object' is not one a checkpoint holds"),
    "history_garbage": (lambda s: s["history"].update(history={"loss": "x"}),
                        r"does not have the structure this trainer expects \(ValueError: "),
    "callbacks_list": (lambda s: s.update(callbacks=[]), r"'callbacks' is a list"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_wrong_structure_is_named_and_the_run_falls_back(run, base_run, change):
    fn, match = CHANGES[change]
    newest = _ckpts(run)[-1]
    rewrite_state(newest, fn)
    where = rf"{newest.name}/state\.msgpack: .*{match}"
    with pytest.raises(CheckpointStructureError, match=where):
        Trainer.load(newest)
    with pytest.raises(CheckpointStructureError, match=where):
        restore(make_trainer(), newest, model=MLP(), data=base_run[1], epochs=4)
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint {newest.name}: .*{match}"):
        assert Trainer.load(run).step == 10
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint {newest.name}"):
        assert restore(make_trainer(), run, model=MLP(), data=base_run[1], epochs=4).step == 10


def test_when_no_checkpoint_fits_every_one_is_listed(run, base_run):
    with pytest.raises(CheckpointStructureError,
                       match=r"(?s)no checkpoint in .* fits.*step15.*saved shape \(3,\), "
                             r"expected \(4,\).*step10.*step5"):
        restore(make_trainer(), run, model=MLP(classes=4), data=base_run[1], epochs=4)


@pytest.mark.parametrize("ref, match", [
    ({"file": "recipe-0000000000000000.pkl", "sha256": "0" * 64}, r"recipe-0+\.pkl is missing"),
    ({"file": "../../etc/passwd", "sha256": "0" * 64}, r"recipe entry .* is malformed"),
    ("recipe.pkl", r"recipe entry 'recipe\.pkl' is malformed"),
    (None, r"has no recipe to rebuild the trainer from"),
])
def test_a_bad_recipe_reference_falls_back_to_an_older_checkpoint(run, ref, match):
    newest = _ckpts(run)[-1]
    _edit_manifest(newest, recipe=ref)
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint {newest.name}: .*{match}"):
        assert Trainer.load(run).step == 10
    with pytest.raises(CheckpointCorruptError, match=match):
        Trainer.load(newest)


def test_a_missing_recipe_file_fails_with_every_checkpoint_listed(run):
    for recipe in run.glob("recipe-*.pkl"):
        recipe.unlink()
    with pytest.raises(Exception, match=r"(?s)no valid checkpoint.*step15.*is missing.*step5"):
        Trainer.load(run)


def test_swapped_checkpoint_directories_are_detected_not_loaded(run):
    first, second, third = _ckpts(run)
    aside = run / "aside"
    third.rename(aside)
    second.rename(third)
    aside.rename(second)
    with pytest.raises(CheckpointCorruptError,
                       match=r"describes checkpoint 2 at step 10, but its directory is named "
                             r"'ckpt-000003-step15'.*renamed or swapped"):
        read_checkpoint(third)
    with pytest.warns(CheckpointWarning) as caught:
        path, manifest, _ = read_checkpoint(run)
    # Neither swapped directory passes for what its name says; the older intact one loads.
    assert path == first and manifest["step"] == 5
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        "skipping checkpoint ckpt-000002-step10", "skipping checkpoint ckpt-000003-step15"]


def test_a_checkpoint_copied_under_another_name_still_loads(run, tmp_path):
    # Only checkpoint-style names are checked against the manifest: "best/" is the user's.
    best = tmp_path / "best"
    shutil.copytree(_ckpts(run)[-1], best)
    assert read_checkpoint(best)[1]["step"] == 15


@pytest.mark.parametrize("field, value, match", [
    ("monitor", [1], r"field 'monitor' is a list, expected str or NoneType"),
    ("mode", "sideways", r"field 'mode' is 'sideways', expected 'min', 'max' or null"),
    ("recipe", 3, r"field 'recipe' is a int"),
    ("step", -5, r"a negative seq, step"),
    ("files", {"state.msgpack": {"size": "12", "sha256": "x"}}, r"bad entry for 'state\.msgpack'"),
])
def test_manifest_fields_of_the_wrong_type_are_named(run, field, value, match, capsys):
    from jaxfit.__main__ import main

    newest = _ckpts(run)[-1]
    _edit_manifest(newest, **{field: value})
    with pytest.raises(CheckpointCorruptError, match=rf"manifest\.json: .*{match}"):
        read_checkpoint(newest)
    assert main(["info", str(run)]) == 0  # the table shows it invalid instead of crashing
    assert "ckpt-000002-step10" in capsys.readouterr().out
