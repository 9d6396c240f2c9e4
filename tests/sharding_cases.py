"""jaxfit.sharding on 8 fake CPU devices. Not collected by itself: test_sharding.py runs it in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (run it the same way:
``XLA_FLAGS=... python -m pytest tests/sharding_cases.py``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sharding_models import Block, NnxBlock, adam, data, state_fns

from jaxfit.errors import ConfigError, ShapeError
from jaxfit.sharding import (
    ShardingPlan,
    assemble,
    assemble_tree,
    local_shards,
    pack_shards,
    path_str,
    per_device_bytes,
    reshard,
    unbox,
    unpack_shards,
)

if jax.device_count() != 8:
    raise RuntimeError("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py)")

TP = jax.make_mesh((2, 4), ("data", "model"))
FSDP = jax.make_mesh((2, 4), ("data", "fsdp"))
LOGICAL_TP = [("embed", None), ("mlp", "model")]
LOGICAL_FSDP = [("embed", "fsdp"), ("mlp", None)]
X, Y = data()
TP_SPECS = {"up/kernel": P(None, "model"), "up/bias": P("model"), "down/kernel": P("model", None),
            "down/bias": P(), "norm/scale": P(), "norm/bias": P(), "head/kernel": P(), "head/bias": P()}


def flat_specs(shardings):
    return {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def param_suffix_specs(specs, param_specs):
    """For every state leaf named after a param, (its spec, the param's spec)."""
    return {k: (v, param_specs[p]) for k, v in specs.items() for p in param_specs if k.endswith("/" + p)}


@pytest.mark.parametrize("mode, rules", [("physical", ()), ("logical", LOGICAL_TP)])
def test_params_and_adam_state_follow_the_annotations_on_a_2x4_mesh(mode, rules):
    init, _ = state_fns(Block(mode), adam())
    plan = ShardingPlan(TP, rules=rules)
    state, shardings = plan.init(init, jax.random.key(0), X[:2])
    specs = flat_specs(shardings)
    assert {k[len("params/"):]: v for k, v in specs.items() if k.startswith("params/")} == TP_SPECS
    # The arrays themselves live where the shardings say, unboxed.
    kernel = state["params"]["up"]["kernel"]
    assert isinstance(kernel, jax.Array) and kernel.sharding.spec == P(None, "model")
    assert kernel.addressable_shards[0].data.shape == (8, 4)
    pairs = param_suffix_specs(specs, TP_SPECS)
    assert {k for k in pairs if "/mu/" in k} and {k for k in pairs if "/nu/" in k} and {k for k in pairs if "ema/" in k}
    for k, (got, want) in pairs.items():
        assert got == want, k
    assert specs["opt/count"] == P() and specs["opt/hyperparams/learning_rate"] == P()
    assert specs["step"] == P()


@pytest.mark.parametrize("make_tx", [
    lambda: optax.chain(optax.clip_by_global_norm(1.0), adam()),
    lambda: optax.MultiSteps(adam(), every_k_schedule=2),
    lambda: optax.multi_transform({"a": adam(), "s": optax.sgd(0.1, momentum=0.9)},
                                  lambda p: jax.tree_util.tree_map_with_path(
                                      lambda k, _: "a" if "kernel" in path_str(k) else "s", p)),
], ids=["chain", "MultiSteps", "multi_transform"])
def test_optimizer_wrappers_shard_like_their_params(make_tx):
    init, _ = state_fns(Block("physical"), make_tx())
    _, shardings = ShardingPlan(TP).init(init, jax.random.key(0), X[:2])
    specs = flat_specs(shardings["opt"])
    pairs = param_suffix_specs(specs, TP_SPECS)
    assert any(want != P() for _, want in pairs.values())  # some sharded param was matched
    for k, (got, want) in pairs.items():
        assert got == want, k
    assert all(v == P() for k, v in specs.items() if k not in pairs)  # counts, hyperparams


def test_fsdp_by_path_regex_and_logical_rules_shard_the_same_way():
    regex = ShardingPlan(FSDP, param_rules=[(r"(up|down)/kernel$", P("fsdp", None))],
                         data_axes=("data", "fsdp"))
    logical = ShardingPlan(FSDP, rules=LOGICAL_FSDP, data_axes=("data", "fsdp"))
    abstract = jax.eval_shape(Block("plain").init, jax.random.key(0), X[:2])["params"]
    regex_specs = flat_specs(regex.shardings(abstract))
    assert regex_specs["up/kernel"] == P("fsdp", None) and regex_specs["head/kernel"] == P()
    _, shardings = logical.init(state_fns(Block("logical"), adam())[0], jax.random.key(0), X[:2])
    assert flat_specs(shardings["params"])["up/kernel"] == P("fsdp", None)
    assert flat_specs(shardings["params"])["down/kernel"] == P(None, "fsdp")
    assert regex.batch_sharding().spec == P(("data", "fsdp"))
    assert regex.batch_sharding(stacked=True).spec == P(None, ("data", "fsdp"))


@pytest.mark.parametrize("mesh, mode, rules, data_axes", [
    (TP, "physical", (), ("data",)),
    (FSDP, "logical", LOGICAL_FSDP, ("data", "fsdp")),
], ids=["tensor-parallel", "fsdp"])
def test_sharded_train_step_matches_one_device(mesh, mode, rules, data_axes):
    init, step = state_fns(Block(mode), adam())
    plan = ShardingPlan(mesh, rules=rules, data_axes=data_axes)
    state, sh = plan.init(init, jax.random.key(0), X[:2])
    batch = plan.batch_sharding()
    sharded_step = jax.jit(step, in_shardings=(sh, batch, batch), out_shardings=(sh, plan.replicated),
                           donate_argnums=0)
    ref = jax.jit(lambda k, x: unbox(init(k, x)))(jax.random.key(0), X[:2])
    ref_step = jax.jit(step)
    losses, ref_losses = [], []
    for i in range(3):
        x, y = plan.place_batch((X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]))
        state, loss = sharded_step(state, x, y)
        ref, ref_loss = ref_step(ref, X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8])
        losses.append(float(loss)), ref_losses.append(float(ref_loss))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The step kept the layout (no silent gather to replicated).
    assert flat_specs(jax.tree_util.tree_map(lambda a: a.sharding, state)) == flat_specs(sh)


def test_stacked_batches_for_steps_per_execution_match_one_device():
    init, step = state_fns(Block("logical"), adam())
    plan = ShardingPlan(FSDP, rules=LOGICAL_FSDP, data_axes=("data", "fsdp"))
    state, sh = plan.init(init, jax.random.key(0), X[:2])

    def k_steps(state, xs, ys):  # what steps_per_execution=k runs: a scan over (k, B, ...)
        return jax.lax.scan(lambda s, b: step(s, *b), state, (xs, ys))

    stacked = plan.batch_sharding(stacked=True)
    run = jax.jit(k_steps, in_shardings=(sh, stacked, stacked), out_shardings=(sh, plan.replicated))
    xs, ys = X[:24].reshape(3, 8, 8), Y[:24].reshape(3, 8)
    state, losses = run(state, *plan.place_batch((xs, ys), stacked=True))
    ref, ref_losses = jax.jit(k_steps)(jax.jit(lambda k, x: unbox(init(k, x)))(jax.random.key(0), X[:2]), xs, ys)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert state["params"]["up"]["kernel"].sharding.spec == P("fsdp", None)


def test_per_device_bytes_of_a_sharded_param_and_its_adam_state_are_one_eighth():
    init, _ = state_fns(Block("plain"), adam())
    sharded = ShardingPlan(FSDP, param_rules=[(r"up/kernel$", P(("data", "fsdp"), None))])
    replicated = ShardingPlan(FSDP)
    s_state, _ = sharded.init(init, jax.random.key(0), X[:2])
    r_state, _ = replicated.init(init, jax.random.key(0), X[:2])
    pick = lambda s: [s["params"]["up"]["kernel"], s["opt"].inner_state[0].mu["up"]["kernel"],
                      s["opt"].inner_state[0].nu["up"]["kernel"], s["ema"]["up"]["kernel"]]
    s_bytes, r_bytes = per_device_bytes(pick(s_state)), per_device_bytes(pick(r_state))
    assert len(s_bytes) == 8 and set(r_bytes.values()) == {4 * 8 * 16 * 4}
    assert set(s_bytes.values()) == {4 * 8 * 16 * 4 // 8}
    assert sum(per_device_bytes(s_state).values()) < sum(per_device_bytes(r_state).values())


def test_place_batch_gives_each_device_only_its_rows():
    plan = ShardingPlan(FSDP, data_axes=("data", "fsdp"))
    x = plan.place_batch(X[:16])
    assert {s.data.shape for s in x.addressable_shards} == {(2, 8)}
    stacked = plan.place_batch(X[:16].reshape(2, 8, 8), stacked=True)
    assert {s.data.shape for s in stacked.addressable_shards} == {(2, 1, 8)}
    np.testing.assert_array_equal(np.asarray(stacked), X[:16].reshape(2, 8, 8))
    local = plan.place_batch(X[:16], process_local=True)  # one process: local rows are all rows
    np.testing.assert_array_equal(np.asarray(local), X[:16])
    with pytest.raises(ConfigError, match=r"batch of shape \(12, 8\) does not split evenly over the 8 devices"):
        plan.place_batch(X[:12])


def test_reshard_8_to_4_to_1_devices_round_trips_exactly():
    init, _ = state_fns(Block("physical"), adam())
    state, _ = ShardingPlan(TP).init(init, jax.random.key(0), X[:2])
    host = jax.tree_util.tree_map(lambda a: np.array(a, copy=True), state)
    abstract = jax.eval_shape(init, jax.random.key(0), X[:2])
    four = ShardingPlan(jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4]))
    on4 = reshard(host, four.shardings(abstract, abstract["params"]))
    assert on4["params"]["up"]["kernel"].addressable_shards[0].data.shape == (8, 8)
    assert len(on4["params"]["up"]["kernel"].sharding.device_set) == 4
    one = ShardingPlan(jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1]))
    on1 = reshard(jax.tree_util.tree_map(np.asarray, on4), one.shardings(abstract, abstract["params"]))
    for a, b in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(on1)):
        np.testing.assert_array_equal(a, np.asarray(b))
        assert b.sharding.device_set == {jax.devices()[0]}


def test_shard_records_reassemble_on_another_mesh_and_layout():
    init, _ = state_fns(Block("physical"), adam())
    state, _ = ShardingPlan(TP).init(init, jax.random.key(0), X[:2])
    records = local_shards(state)
    kernel = [r for r in records if r.path == "params/up/kernel"]
    # (None, "model") on 2x4: 4 distinct slices, replicas over "data" written once.
    assert sorted(r.index for r in kernel) == [((0, 8), (4 * i, 4 * i + 4)) for i in range(4)]
    assert kernel[0].global_shape == (8, 16) and kernel[0].spec == (None, "model")
    assert len([r for r in records if r.path == "opt/count"]) == 1
    blob = pack_shards(records)
    half = len(records) // 2  # two "files", as two processes would write
    restored = unpack_shards(pack_shards(unpack_shards(blob)[:half])) + unpack_shards(blob)[half:]
    abstract = jax.eval_shape(init, jax.random.key(0), X[:2])
    fsdp4 = ShardingPlan(jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[4:]), data_axes=(),
                         param_rules=[(r"kernel$", P("fsdp"))])
    for plan in (fsdp4, ShardingPlan(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))):
        target = plan.shardings(unbox(abstract), unbox(abstract["params"]))
        back = assemble_tree(restored, target)
        assert back["params"]["up"]["kernel"].sharding == target["params"]["up"]["kernel"]
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ShapeError, match=r"'params/up/kernel' of shape \(8, 16\): the shard records cover 96 of the 128 elements"):
        assemble(kernel[1:], NamedSharding(TP, P()))
    with pytest.raises(ShapeError, match=r"missing \['params/up/kernel'\]"):
        assemble_tree([r for r in restored if r.path != "params/up/kernel"], target)


def test_nnx_out_sharding_metadata_physical_and_logical():
    plan = ShardingPlan(TP, rules=LOGICAL_TP)

    def init():
        _, params, _ = nnx.split(NnxBlock(nnx.Rngs(0)), nnx.Param, ...)
        return {"params": params, "opt": adam().init(unbox(params))}

    state, shardings = plan.init(init)
    specs = flat_specs(shardings)
    assert specs["params/up/kernel"] == P(None, "model") and specs["params/down/kernel"] == P("model", None)
    assert specs["params/head/kernel"] == P()
    assert specs["opt/hyperparams/learning_rate"] == P() and specs["opt/count"] == P()
    assert specs["opt/inner_state/0/mu/down/kernel"] == P("model", None)
    assert not any(isinstance(x, nnx.Variable) for x in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert state["params"]["up"]["kernel"].sharding.spec == P(None, "model")
    # flax's own eager nnx sharding, under the plan's context, agrees with the plan.
    with plan.context():
        eager = nnx.split(NnxBlock(nnx.Rngs(0)), nnx.Param, ...)[1]
    eager_specs = flat_specs(jax.tree_util.tree_map(lambda a: a.sharding, unbox(eager)))
    assert eager_specs == {k[len("params/"):]: v for k, v in specs.items() if k.startswith("params/")}


def _abstract(shape):
    return jax.ShapeDtypeStruct(shape, np.float32)


@pytest.mark.parametrize("plan_kw, params, message", [
    ({}, {"w": nn.Partitioned(_abstract((8, 6)), (None, "model"))},
     (r"param 'w' of shape \(8, 6\) has PartitionSpec \(None, 'model'\) on mesh "
      r"\{'data': 2, 'model': 4\}: dim 1 \(6\) does not split evenly over mesh axes "
      r"\('model',\) \(4 devices\); pad it to a multiple of 4")),
    ({}, {"w": nn.Partitioned(_abstract((8, 8)), ("tensor", None))},
     r"param 'w' .*: 'tensor' is not an axis of the mesh; use one of \('data', 'model'\) or None"),
    ({}, {"w": nn.LogicallyPartitioned(_abstract((8, 8)), ("embed", "mlp"))},
     r"param 'w' has logical axis names \('embed', 'mlp'\), but \['embed', 'mlp'\] have no rule"),
    ({"param_rules": [("kernel", P("model", "model"))]}, {"kernel": _abstract((8, 8))},
     r"mesh axis 'model' is used twice"),
    ({"param_rules": [("kernel", P(None, None, "model"))]}, {"kernel": _abstract((8, 8))},
     r"the spec has 3 entries for 2 dims"),
])
def test_specs_that_do_not_fit_raise_config_errors_naming_the_param(plan_kw, params, message):
    with pytest.raises(ConfigError, match=message):
        ShardingPlan(TP, **plan_kw).shardings(params)


def test_init_rejects_a_bad_annotation_before_any_work():
    bad = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.ones, ("tensor", None)))
    with pytest.raises(ConfigError, match=r"param 'kernel' of shape \(8, 4\).*'tensor' is not an axis"):
        ShardingPlan(TP).init(lambda k, x: {"params": bad.init(k, x)["params"]}, jax.random.key(0), X[:2])


def test_plan_arguments_are_checked_up_front():
    assert hash(ShardingPlan(TP, param_rules=[("k", P("model"))])) == hash(
        ShardingPlan(TP, param_rules=[("k", P("model"))]))
    with pytest.raises(ConfigError, match=r"data axis 'batch' is not an axis of the mesh"):
        ShardingPlan(TP, data_axes=("batch",))
    with pytest.raises(ConfigError, match=r"rule \('mlp', 'tensor'\) maps to 'tensor'"):
        ShardingPlan(TP, rules=[("mlp", "tensor")])
    with pytest.raises(ConfigError, match=r"param_rules regex '\(' does not compile"):
        ShardingPlan(TP, param_rules=[("(", P())])
    with pytest.raises(ShapeError, match=r"leaf 'w' of shape \(6,\) does not fit sharding"):
        reshard({"w": np.zeros(6)}, {"w": NamedSharding(TP, P("model"))})
