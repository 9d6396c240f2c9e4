"""flax examples/imagenet: the program's ResNet (``tests/programs_models/imagenet.py``;
shrunk to stages [1, 1] of ``ResNetBlock``, 4 filters, 3 classes, bf16 compute
``dtype=jnp.bfloat16``) with BatchNorm statistics, its cross-entropy plus the L2 penalty on
the params being differentiated (``ctx.params``), the source's warmup-cosine schedule and
nesterov SGD; against the source's ``train_step`` and ``eval_step`` (verbatim but for the
``lax.pmean`` collectives and the dynamic-scale branch, which runs only with float16 on GPU;
float16 loss scaling is ``tests/test_programs_fp16.py``).

Glue beyond the program's model and loss: 4 lines — ``def loss(model, batch, ctx)``, the
model call (jaxfit fills ``train`` and keeps ``batch_stats`` mutable in training), the
penalty on ``ctx.params`` in training only (the source's eval metrics have none) and the
accuracy of ``compute_metrics``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import common_utils, train_state

from jaxfit import Trainer
from tests.programs_models import imagenet as models
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args

NUM_CLASSES, STEPS_PER_EPOCH = 3, 3


def model():
    return models.ResNet(stage_sizes=[1, 1], block_cls=models.ResNetBlock, num_classes=NUM_CLASSES, num_filters=4,
                         dtype=jnp.bfloat16)


# -- the source's pieces (examples/imagenet/train.py) --------------------------------------
def cross_entropy_loss(logits, labels):
    one_hot_labels = common_utils.onehot(labels, num_classes=NUM_CLASSES)
    xentropy = optax.softmax_cross_entropy(logits=logits, labels=one_hot_labels)
    return jnp.mean(xentropy)


def compute_metrics(logits, labels):
    loss = cross_entropy_loss(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return {'loss': loss, 'accuracy': accuracy}  # (the source pmeans them over devices)


def create_learning_rate_fn(base_learning_rate, steps_per_epoch, warmup_epochs=1, num_epochs=2):
    warmup_fn = optax.linear_schedule(init_value=0.0, end_value=base_learning_rate,
                                      transition_steps=warmup_epochs * steps_per_epoch)
    cosine_epochs = max(num_epochs - warmup_epochs, 1)
    cosine_fn = optax.cosine_decay_schedule(init_value=base_learning_rate, decay_steps=cosine_epochs * steps_per_epoch)
    return optax.join_schedules(schedules=[warmup_fn, cosine_fn], boundaries=[warmup_epochs * steps_per_epoch])


class TrainState(train_state.TrainState):
    batch_stats: dict


def train_step(state, batch, learning_rate_fn):
    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats}, batch['image'], mutable=['batch_stats'])
        loss = cross_entropy_loss(logits, batch['label'])
        weight_penalty_params = jax.tree_util.tree_leaves(params)
        weight_decay = 0.0001
        weight_l2 = sum(jnp.sum(x**2) for x in weight_penalty_params if x.ndim > 1)
        weight_penalty = weight_decay * 0.5 * weight_l2
        loss = loss + weight_penalty
        return loss, (new_model_state, logits)

    lr = learning_rate_fn(state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    aux, grads = grad_fn(state.params)
    new_model_state, logits = aux[1]
    metrics = compute_metrics(logits, batch['label'])
    metrics['learning_rate'] = lr
    metrics['train_loss'] = aux[0]
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state['batch_stats'])
    return new_state, metrics


@jax.jit
def eval_step(state, batch):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits = state.apply_fn(variables, batch['image'], train=False, mutable=False)
    return compute_metrics(logits, batch['label'])


def loss(model, batch, ctx):  # the glue
    logits = model(batch['image'])
    value = cross_entropy_loss(logits, batch['label'])
    if ctx.train:  # the source's L2 penalty, on the params being differentiated
        value = value + 0.0001 * 0.5 * sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(ctx.params) if x.ndim > 1)
    return value, {"accuracy": compute_metrics(logits, batch['label'])["accuracy"]}


def tx():
    return optax.sgd(learning_rate=create_learning_rate_fn(0.1, STEPS_PER_EPOCH), momentum=0.9, nesterov=True)


def data(n, seed=0):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, 16, 16, 3)).astype(np.float32),
            "label": r.integers(0, NUM_CLASSES, n).astype(np.int32)}


def test_resnet_bf16_batchnorm_and_l2_match_the_source_step():
    ds, val, bs, epochs = data(STEPS_PER_EPOCH * 4), data(8, 1), 4, 2
    variables = jax.jit(model().init)({'params': jax.random.key(0)}, jnp.ones((1, 16, 16, 3), jnp.bfloat16))
    params, batch_stats = variables['params'], variables['batch_stats']  # the source's initialize
    trainer = Trainer(optimizer=tx(), loss=loss)
    history = trainer.fit(model(), ds, validation_data=val, epochs=epochs, batch_size=bs, initial_params=params,
                          **fit_args())

    step = jax.jit(functools.partial(train_step, learning_rate_fn=create_learning_rate_fn(0.1, STEPS_PER_EPOCH)))
    state = TrainState.create(apply_fn=model().apply, params=params, tx=tx(), batch_stats=batch_stats)
    for epoch in range(epochs):
        loss_m, acc_m = EpochMean(), EpochMean()
        for b in batches(ds, bs):
            state, m = step(state, b)
            loss_m.add_scalar(m["train_loss"], bs)
            acc_m.add_scalar(m["accuracy"], bs)
            assert m["train_loss"].dtype == jnp.float32  # bf16 logits, a float32 loss
        # Another XLA program than the hand step (bf16 convolutions): the loss may differ in
        # the last float32 bit.
        np.testing.assert_allclose(history.history["loss"][epoch], loss_m.value, rtol=1e-6)
        assert history.history["accuracy"][epoch] == acc_m.value
        ms = [eval_step(state, b) for b in batches(val, bs)]
        np.testing.assert_allclose(history.history["val_loss"][epoch], np.mean([float(m["loss"]) for m in ms]),
                                   rtol=1e-6)
    assert_changed(state.params, params)
    assert_bitwise(trainer.params, state.params)
    assert_bitwise(trainer.model_state["batch_stats"], state.batch_stats, "batch_stats")


@pytest.mark.slow
def test_resnet_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=tx(), loss=loss), model(), data(12), epochs=2, batch_size=4)
