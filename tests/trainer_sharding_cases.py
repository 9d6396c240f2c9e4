"""Trainer(mesh=...) with sharded state on 8 fake CPU devices. Not collected by itself:
test_trainer_sharding.py runs it in a subprocess with 8 devices (run it the same way:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/trainer_sharding_cases.py``)."""

from __future__ import annotations

import re
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import meta
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from sharding_models import LECUN, Block, adam, data

import jaxfit
from jaxfit import Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.errors import ConfigError
from jaxfit.sharding import path_str, per_device_bytes

if jax.device_count() != 8:
    raise RuntimeError("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_trainer_sharding.py)")

TP = jax.make_mesh((2, 4), ("data", "model"))
FSDP = jax.make_mesh((2, 4), ("data", "fsdp"))
FSDP8 = jax.make_mesh((8,), ("fsdp",))
LOGICAL_TP = [("embed", None), ("mlp", "model")]
LOGICAL_FSDP = [("embed", "fsdp"), ("mlp", None)]
X, Y = data(64)
XV, YV = data(32, seed=1)
TP_SPECS = {"up/kernel": P(None, "model"), "up/bias": P("model"), "down/kernel": P("model"),
            "down/bias": P(), "norm/scale": P(), "norm/bias": P(), "head/kernel": P(), "head/bias": P()}
FSDP_SPECS = {"up/kernel": P("fsdp"), "up/bias": P(), "down/kernel": P(None, "fsdp"),
              "down/bias": P(), "norm/scale": P(), "norm/bias": P(), "head/kernel": P(), "head/bias": P()}


def _norm(spec):
    """P(None,) and P() are the same layout: drop trailing Nones."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def specs(tree):
    return {path_str(p): _norm(leaf.sharding.spec) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(tree))]


def fit(mesh=None, mode="physical", epochs=2, model=None, **kw):
    t = Trainer(optimizer=kw.pop("optimizer", adam()), loss="softmax_cross_entropy", metrics=["accuracy"],
                seed=0, mesh=mesh, **kw)
    t.fit(model or Block(mode), (X, Y), validation_data=(XV, YV), epochs=epochs, batch_size=16, verbose=0)
    return t


_REF: dict = {}


def reference(mode="physical", **kw):
    """The one-device run of the same model (cached per annotation mode)."""
    key = (mode, kw.get("steps_per_execution", 1))
    if key not in _REF:
        _REF[key] = fit(None, mode, **kw)
    return _REF[key]


def assert_matches(ref, t, atol=1e-5):
    for k in ref.history.history:
        tol = 0.02 if "accuracy" in k else atol  # an accuracy may flip on a near-tie logit
        np.testing.assert_allclose(t.history.history[k], ref.history.history[k], atol=tol, rtol=1e-5)
    for a, b in zip(host(ref.params), host(t.params)):
        np.testing.assert_allclose(b, a, atol=atol, rtol=1e-5)


def opt_specs(t):
    """{(moment, param path): spec} of Adam's mu and nu."""
    out = {}
    for path, spec in specs(t.opt_state).items():
        m = re.search(r"\b(mu|nu)/(.+)$", path)
        if m:
            out[(m.group(1), m.group(2))] = spec
    return out


@pytest.mark.parametrize("mode, rules, k", [("physical", (), 1), ("logical", LOGICAL_TP, 1),
                                            ("physical", (), 2)])
def test_tensor_parallel_on_2x4_follows_the_annotations_and_matches_one_device(mode, rules, k):
    t = fit(TP, mode, rules=rules, steps_per_execution=k)
    assert specs(t.params) == TP_SPECS
    assert opt_specs(t) == {(m, p): s for m in ("mu", "nu") for p, s in TP_SPECS.items()}
    # Unboxed: the step and the user see arrays, not nn.Partitioned.
    assert not any(isinstance(x, meta.AxisMetadata)
                   for x in jax.tree_util.tree_leaves(t.state, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)))
    assert t.params["up"]["kernel"].addressable_shards[0].data.shape == (8, 4)
    assert_matches(reference(mode, steps_per_execution=k), t)
    np.testing.assert_allclose(t.predict(X[:16]), reference(mode, steps_per_execution=k).predict(X[:16]),
                               atol=1e-5)
    assert t.trace_counts["train"] == 1  # one compile for the whole fit: the layout never drifts


@pytest.mark.parametrize("mesh, kw, want", [
    (FSDP, {"mode": "logical", "rules": LOGICAL_FSDP, "data_axes": ("data", "fsdp")}, FSDP_SPECS),
    (FSDP8, {"mode": "plain", "param_rules": [(r"(up|down)/kernel$", P("fsdp"))], "data_axes": ("fsdp",)},
     {**{k: P() for k in TP_SPECS}, "up/kernel": P("fsdp"), "down/kernel": P("fsdp")}),
], ids=["logical-2x4", "regex-8"])
def test_fsdp_shards_params_and_adam_state_and_matches_one_device(mesh, kw, want):
    kw = dict(kw)
    mode = kw.pop("mode")
    t = fit(mesh, mode, **kw)
    assert specs(t.params) == want
    assert opt_specs(t) == {(m, p): s for m in ("mu", "nu") for p, s in want.items()}
    assert_matches(reference(mode), t)


def test_sharded_state_holds_one_nth_per_device_against_replicated():
    rep, tp, fsdp = fit(jax.make_mesh((8,), ("data",)), "plain"), fit(TP, "physical"), fit(
        FSDP8, "plain", param_rules=[(r"(up|down)/kernel$", P("fsdp"))], data_axes=("fsdp",))
    kernel = lambda t: t.params["up"]["kernel"]
    mu = lambda t: t.opt_state.inner_state[0].mu["up"]["kernel"]
    for leaf, n in ((kernel, 4), (mu, 4)):
        full = max(per_device_bytes(leaf(rep)).values())
        assert full == 8 * 16 * 4
        assert set(per_device_bytes(leaf(tp)).values()) == {full // n}
        assert set(per_device_bytes(leaf(fsdp)).values()) == {full // 8}
    whole = {name: max(per_device_bytes(t.engine_state).values()) for name, t in
             (("replicated", rep), ("tp", tp), ("fsdp", fsdp))}
    print("per-device bytes of the whole EngineState:", whole)
    assert whole["tp"] < whole["replicated"] / 2 and whole["fsdp"] < whole["replicated"] / 2


def test_train_program_keeps_the_layout_and_never_gathers_a_whole_tensor_parallel_param():
    t = fit(TP, "physical", epochs=1)
    fn = t._engine.train_fn(1, {}, 1)
    batch = t._place_batch(jax.tree_util.tree_map(lambda a: a[:16], (X, Y)), False)
    mask = t._place_batch(np.ones(16, np.float32), False)
    compiled = fn.lower(t.engine_state, batch, mask).compile()
    hlo = compiled.as_text()
    # No collective produces a whole (8, 16)/(16, 8) kernel or (16,) bias: Megatron-style
    # tensor parallelism only all-reduces activations.
    gathers = re.findall(r"= (\S+) all-gather", hlo)
    assert not any(s.startswith(("f32[8,16]", "f32[16,8]", "f32[16]")) for s in gathers), gathers
    out_state = compiled.output_shardings[0]
    for (p, a), s in zip(jax.tree_util.tree_flatten_with_path(t.engine_state)[0],
                         jax.tree_util.tree_leaves(out_state)):
        assert s.is_equivalent_to(a.sharding, a.ndim), path_str(p)


class EMAStep(jaxfit.Step):
    """A custom step with an EMA copy of the params."""

    def __init__(self, model):
        self.model, self.tx = model, adam()

    def init(self, model, batch, key):
        params = self.model.init(key, batch[0])["params"]  # boxed: the engine reads the annotations
        return {"params": params, "ema": params, "opt": self.tx.init(params)}

    def _loss(self, p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self.model.apply({"params": p}, x), y).mean()

    def train_step(self, state, batch, ctx):
        loss, g = jax.value_and_grad(self._loss)(state["params"], batch)
        updates, opt = self.tx.update(g, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optax.incremental_update(params, state["ema"], 0.1)
        return {"params": params, "ema": ema, "opt": opt}, {"loss": loss}

    def eval_step(self, state, batch, ctx):
        return {"loss": self._loss(state["ema"], batch)}


def test_custom_step_ema_params_shard_like_their_params_and_match_one_device():
    runs = {}
    for name, mesh in (("single", None), ("tp", TP)):
        t = Trainer(step=EMAStep(Block("physical")), seed=0, mesh=mesh)
        t.fit(data=(X, Y), epochs=2, batch_size=16, verbose=0)
        runs[name] = t
    assert specs(runs["tp"].state["ema"]) == TP_SPECS
    assert specs(runs["tp"].params) == TP_SPECS
    for a, b in zip(host(runs["single"].state), host(runs["tp"].state)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs, kernel_init=nnx.with_partitioning(LECUN, (None, "model")))
        self.down = nnx.Linear(16, 8, rngs=rngs, kernel_metadata={"out_sharding": ("mlp", "embed")})
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.down(nnx.relu(self.up(x))))


def test_nnx_out_sharding_metadata_physical_and_logical():
    runs = {}
    for name, mesh in (("single", None), ("tp", TP)):
        with nnx.use_eager_sharding(False):
            model = NnxBlock(nnx.Rngs(0))
        runs[name] = fit(mesh, model=model, rules=LOGICAL_TP if mesh is not None else ())
    got = specs(runs["tp"].params)
    assert got["up/kernel/value"] == P(None, "model") and got["down/kernel/value"] == P("model")
    assert got["head/kernel/value"] == P()
    assert_matches(runs["single"], runs["tp"])


def _mesh(devices, shape, names):
    return Mesh(np.array(devices).reshape(shape), names)


def test_resume_8_to_4_to_1_devices_matches_the_uninterrupted_run(tmp_path):
    kw = {"mode": "logical", "rules": LOGICAL_FSDP, "data_axes": ("data", "fsdp")}
    full = fit(FSDP, epochs=3, **kw)
    run = tmp_path / "run"
    t = Trainer(optimizer=adam(), loss="softmax_cross_entropy", metrics=["accuracy"], seed=0, mesh=FSDP,
                rules=LOGICAL_FSDP, data_axes=("data", "fsdp"))
    t.fit(Block("logical"), (X, Y), validation_data=(XV, YV), epochs=1, batch_size=16, verbose=0,
          callbacks=[ModelCheckpoint(run, keep_last=5, background=False)])
    shutil.copytree(run, tmp_path / "copy")  # the epoch-1 checkpoint, for the same-mesh resume below
    four = _mesh(jax.devices()[:4], (2, 2), ("data", "fsdp"))
    t4 = Trainer.load(str(run), mesh=four)
    assert specs(t4.params)["up/kernel"] == P("fsdp")
    assert set(per_device_bytes(t4.params["up"]["kernel"]).values()) == {8 * 16 * 4 // 2}
    assert {d.id for d in t4.params["up"]["kernel"].sharding.device_set} == {d.id for d in jax.devices()[:4]}
    t4.fit(epochs=2)
    t1 = Trainer.load(str(run))  # no mesh: one device
    assert t1.epoch == 2 and t1.mesh is None
    t1.fit(epochs=3)
    assert_matches(full, t1)
    # On the same mesh, bit for bit.
    same = Trainer.load(str(tmp_path / "copy"), mesh=FSDP)
    assert same.epoch == 1
    assert specs(same.params) == FSDP_SPECS
    same.fit(epochs=3)
    for a, b in zip(host(full.state), host(same.state)):
        np.testing.assert_array_equal(a, b)
    assert same.history.history == full.history.history


def test_layout_errors_before_any_work():
    with pytest.raises(ConfigError, match="pass mesh="):
        Trainer(optimizer=adam(), rules=LOGICAL_TP)
    with pytest.raises(ConfigError, match=r"param 'head/kernel' of shape \(8, 3\).*dim 1 \(3\) does not split evenly"):
        fit(jax.make_mesh((1, 8), ("data", "model")), "plain", epochs=1,
            param_rules=[(r"head/kernel$", P(None, "model"))])
    with pytest.raises(ConfigError, match=r"param_rules regex 'Dense_0/kernel\$' matches no param; .*up/kernel"):
        fit(FSDP8, "plain", epochs=1, param_rules=[(r"Dense_0/kernel$", P("fsdp"))], data_axes=("fsdp",))
    with pytest.raises(ConfigError, match="'mlp'.* have no rule"):
        fit(TP, "logical", epochs=1, rules=[("embed", None)])
    with pytest.raises(ConfigError, match=r"batch size 12 does not split evenly over the 8 devices of mesh axes \('data', 'fsdp'\)"):
        Trainer(optimizer=adam(), mesh=FSDP, data_axes=("data", "fsdp")).fit(Block("plain"), (X, Y), batch_size=12,
                                                                             verbose=0)
