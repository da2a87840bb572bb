"""The cohort trainer against plain single-configuration optax/flax loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sm2jax.cohort import group_into_cohorts
from sm2jax.compile_cache import count_compiles
from sm2jax.execute.batches import batch_indices
from sm2jax.execute.rows import PADDING_ID, chunk_rows, gather_rows, trial_keys
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.models import build_model
from sm2jax.space import Categorical, LogUniform, SearchSpace, make_config

STEPS = 12


def _single_cohort(configs):
    (cohort,) = group_into_cohorts(configs)
    return cohort


def _plain_loop(config, ds, steps):
    """One configuration trained alone: plain optax.adam, no inject_hyperparams, no vmap."""
    init_key, _, data_key = trial_keys(config["seed"], config.trial_id)
    model = build_model(config["model"], ds.input_shape, ds.num_outputs, key=init_key)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(config["learning_rate"])
    opt_state = tx.init(params)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    @jax.jit
    def step(params, opt_state, idx):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(x[idx], train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for t in range(steps):
        idx = batch_indices(data_key, jnp.int32(t), ds.num_train, config["batch_size"])
        params, opt_state, loss = step(params, opt_state, idx)
    return params, loss


def _row(tree, i):
    return jax.tree.map(lambda a: np.asarray(a)[i], tree)


@pytest.mark.slow
def test_cohort_of_8_learning_rates_matches_training_each_alone(digits):
    configs = SearchSpace({"learning_rate": LogUniform(1e-4, 3e-1, num=8), "batch_size": 32}).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=100)
    (chunk,) = trainer.init()
    state, metrics = trainer.train(chunk, STEPS)
    # Tolerance: float32 reassociation differs between the vmapped and the single program by
    # ~1e-7 in gradients. Adam divides by sqrt(v), so for a parameter whose gradient is ~0 (a dead
    # relu unit) that noise can move it by a fraction of the learning rate (observed: one element of
    # 4096 off by 2.7e-3 * lr). We therefore bound each parameter tensor's relative L2 error by
    # 2.5e-4 and the loss by 1e-4. Observed: <= 1e-5 for learning rates up to 0.03; at 0.096 the
    # 10-element head bias reaches 1.2e-4 (one element off by 7e-5), depending on the batch order.
    for i, config in enumerate(configs):
        params, loss = _plain_loop(config, digits, STEPS)
        for a, b in zip(jax.tree.leaves(_row(state.params, i)), jax.tree.leaves(params)):
            assert np.linalg.norm(a - b) <= 2.5e-4 * np.linalg.norm(b), (config["learning_rate"], np.linalg.norm(a - b))
        np.testing.assert_allclose(metrics.loss_last[i], loss, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(state.step) == STEPS)


@pytest.mark.parametrize(
    "model, shape",
    [
        ({"name": "mlp", "hidden": [32]}, (64,)),
        ({"name": "cnn", "channels": [4, 8]}, (8, 8, 1)),
        ({"name": "gru", "hidden": 8}, (6, 3)),
        pytest.param(
            {"name": "resnet18", "width": 4, "blocks": [1, 1, 1, 1]}, (8, 8, 3), marks=pytest.mark.slow
        ),  # batch statistics: model state
    ],
    ids=["mlp", "cnn", "gru", "resnet18"],
)
def test_init_rows_are_a_plain_build_model_bit_for_bit(model, shape):
    # The init program is built with its own XLA options on a CPU backend (INIT_COMPILE): they may
    # change how fast it compiles, never a bit of what it returns.
    from sm2jax.data import ArrayDataset

    x = np.zeros((4, *shape), np.float32)
    ds = ArrayDataset("zeros", "classification", x, np.zeros(4, np.int32), x, np.zeros(4, np.int32), 3)
    configs = SearchSpace(
        {"model": model, "learning_rate": Categorical([1e-3, 1e-2]), "batch_size": 2, "seed": 7}
    ).grid()
    rows = CohortTrainer(_single_cohort(configs), ds, schedule_steps=10).init_rows()
    for i, config in enumerate(configs):
        init_key = trial_keys(config["seed"], config.trial_id)[0]
        _, params, model_state = nnx.split(build_model(model, shape, 3, key=init_key), nnx.Param, ...)  # eager
        mine = _row(rows, i)
        for a, b in zip(
            jax.tree.leaves((mine.params, mine.model_state)), jax.tree.leaves((params, model_state)), strict=True
        ):
            assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b)), config


def test_no_recompilation_on_second_call_or_after_select(digits):
    # A model no other test uses, so that its programs are not in the process-wide table yet.
    configs = SearchSpace(
        {"model": {"name": "mlp", "hidden": [24]}, "learning_rate": LogUniform(1e-3, 1e-1, num=4)}
    ).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=100)
    (state,) = trainer.init()
    with count_compiles() as tally:
        state, _ = jax.block_until_ready(trainer.train(state, 3))
        trainer.evaluate(state)
        first = tally.requests
        assert first >= 2  # the listener sees the programs (train and eval; compiled or cache-loaded)
        state, _ = jax.block_until_ready(trainer.train(state, 5))  # another budget: num_steps is traced
        (state,) = chunk_rows(gather_rows([state], [3, 1, 0, 2]), 4)  # same width after select
        state, _ = jax.block_until_ready(trainer.train(state, 2))
        (fewer,) = chunk_rows(gather_rows([state], [1, 2]), 4)  # fewer survivors: padding, same program
        fewer, _ = jax.block_until_ready(trainer.train(fewer, 2))
        jax.block_until_ready(trainer.evaluate(fewer))
        assert tally.requests == first


def test_padding_rows_never_change_real_rows_and_take_no_step(digits):
    configs = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=4)}).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=100)
    rows = trainer.init_rows()
    (full,) = chunk_rows(rows, 4)  # row 3 is a real trial
    (padded,) = chunk_rows(jax.tree.map(lambda a: a[:3], rows), 4)  # row 3 is padding (a copy of row 0)
    assert list(np.asarray(padded.trial_id)) == [0, 1, 2, PADDING_ID] and not bool(padded.active[3])
    full, _ = trainer.train(full, 7)
    padded, metrics = trainer.train(padded, 7)
    for a, b in zip(jax.tree.leaves(_row(full, slice(0, 3))), jax.tree.leaves(_row(padded, slice(0, 3)))):
        np.testing.assert_array_equal(a, b)  # same program, same rows: bit for bit
    assert int(padded.step[3]) == 0 and np.isnan(float(metrics.loss_mean[3]))  # took no step
    before = _row(chunk_rows(jax.tree.map(lambda a: a[:3], rows), 4)[0], 3)
    for a, b in zip(jax.tree.leaves(_row(padded.params, 3)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)  # its parameters never moved
    np.testing.assert_array_equal(trainer.evaluate(full).score[:3], trainer.evaluate(padded).score[:3])
    # Gathering survivors never returns a padding row.
    assert list(np.asarray(gather_rows([padded], [2, 0]).trial_id)) == [2, 0]
    with pytest.raises(KeyError):
        gather_rows([padded], [PADDING_ID])


@pytest.mark.slow
def test_diverging_trial_is_frozen_and_others_are_bit_for_bit_unaffected(digits):
    healthy = [make_config(i, optimizer="sgd", learning_rate=lr) for i, lr in zip((0, 1, 3), (0.1, 0.03, 0.01))]
    bad = make_config(2, optimizer="sgd", learning_rate=1e20)
    with_bad = [healthy[0], healthy[1], bad, healthy[2]]
    trainer_a = CohortTrainer(_single_cohort(with_bad), digits, schedule_steps=100)
    trainer_b = CohortTrainer(_single_cohort(healthy), digits, schedule_steps=100)
    state_a, metrics_a = trainer_a.train(trainer_a.init()[0], 20)
    state_b, _ = trainer_b.train(trainer_b.init()[0], 20)

    assert list(np.asarray(state_a.active)) == [True, True, False, True]
    at = int(state_a.diverged_at[2])
    assert 0 <= at < 20 and int(state_a.step[2]) == at  # data position stopped at the bad step
    assert list(np.asarray(state_a.diverged_at)[[0, 1, 3]]) == [-1, -1, -1]
    # Frozen at its last finite values.
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_row(state_a.params, 2)))
    for ia, ib in zip((0, 1, 3), (0, 1, 2)):
        for a, b in zip(jax.tree.leaves(_row(state_a.params, ia)), jax.tree.leaves(_row(state_b.params, ib))):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(_row(state_a.opt_state, ia)), jax.tree.leaves(_row(state_b.opt_state, ib))):
            np.testing.assert_array_equal(a, b)
    assert np.isfinite(np.asarray(metrics_a.loss_mean)[[0, 1, 3]]).all()


@pytest.mark.slow
def test_survivors_continue_with_their_exact_state(digits):
    configs = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=4), "schedule": "cosine", "dropout": 0.2}).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=40)
    state, _ = trainer.train(trainer.init()[0], 10)
    (picked,) = chunk_rows(gather_rows([state], [2, 0]), 2)
    for row, source in ((0, 2), (1, 0)):
        for a, b in zip(jax.tree.leaves(_row(picked, row)), jax.tree.leaves(_row(state, source))):
            np.testing.assert_array_equal(a, b)  # params, optimizer state + hyperparameters, keys, step
    resumed, _ = trainer.train(picked, 10)

    straight = CohortTrainer(_single_cohort([configs[2], configs[0]]), digits, schedule_steps=40)
    direct, _ = straight.train(straight.init()[0], 20)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), resumed.params, direct.params)
    np.testing.assert_array_equal(resumed.step, [20, 20])


def test_width_changes_speed_not_results(digits):
    configs = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=4)}).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=100)
    rows = trainer.init_rows()
    by_width = {w: chunk_rows(jax.tree.map(lambda a: a[:w], rows), w)[0] for w in (1, 2, 4)}
    probe = trainer.probe_width(by_width, steps=2, repeats=1)
    assert set(probe.samples_per_second) == {1, 2, 4} and probe.chosen in (1, 2, 4)
    assert all(v > 0 for v in probe.samples_per_second.values())
    results = {}
    for w in (1, 4):  # four one-wide chunks vs one four-wide chunk
        chunks = [trainer.train(c, 6)[0] for c in chunk_rows(rows, w)]
        results[w] = gather_rows(chunks, [0, 1, 2, 3])
    # Float noise only: a one-wide chunk runs plain GEMMs, a four-wide one batched dots (different
    # summation order), amplified over 6 Adam steps at learning rates up to 0.1.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[1].params, results[4].params)


def test_dropout_keys_belong_to_the_trial_not_its_position(digits):
    a = make_config(5, dropout=0.5, learning_rate=0.01)
    b = make_config(6, dropout=0.5, learning_rate=0.01, seed=0)
    forward = CohortTrainer(_single_cohort([a, b]), digits, schedule_steps=10)
    backward = CohortTrainer(_single_cohort([b, a]), digits, schedule_steps=10)
    sf, _ = forward.train(forward.init()[0], 4)
    sb, _ = backward.train(backward.init()[0], 4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), _row(sf.params, 0), _row(sb.params, 1))
    leaves0, leaves1 = jax.tree.leaves(_row(sf.params, 0)), jax.tree.leaves(_row(sf.params, 1))
    assert any(not np.allclose(x, y) for x, y in zip(leaves0, leaves1))  # different trials, different init and masks


def test_batch_larger_than_the_data_is_rejected(digits):
    with pytest.raises(ValueError, match="batch_size 4096 exceeds"):
        CohortTrainer(_single_cohort([make_config(0, batch_size=4096)]), digits, schedule_steps=10)


def test_evaluate_reports_accuracy(digits):
    configs = SearchSpace({"learning_rate": Categorical([3e-3])}).grid()
    trainer = CohortTrainer(_single_cohort(configs), digits, schedule_steps=100)
    state, _ = trainer.train(trainer.init()[0], 150)
    metrics = trainer.evaluate(state)
    assert 0.8 < float(metrics.metric[0]) <= 1.0  # digits MLP learns quickly
    assert float(metrics.score[0]) == float(metrics.metric[0])
    # Binomial standard error of the accuracy over the split (Laplace-smoothed, never 0).
    n, p = len(digits.x_val), (float(metrics.metric[0]) * len(digits.x_val) + 1) / (len(digits.x_val) + 2)
    assert float(metrics.score_se[0]) == pytest.approx(np.sqrt(p * (1 - p) / n), rel=1e-6)


def test_one_eval_program_serves_a_test_split_of_any_length(digits):
    """The test split is cut into blocks of the validation block's shape: no second program, and a
    split made of the validation set twice gives the same accuracy with a sqrt(2) smaller error."""
    doubled = dataclasses.replace(
        digits, x_test=np.concatenate([digits.x_val] * 2), y_test=np.concatenate([digits.y_val] * 2)
    )
    trainer = CohortTrainer(
        _single_cohort(SearchSpace({"learning_rate": LogUniform(1e-3, 1e-2, num=2)}).grid()),
        doubled,
        schedule_steps=20,
        eval_batch_size=128,
    )
    state, _ = trainer.train(trainer.init()[0], 20)
    val = trainer.evaluate(state)
    with count_compiles() as tally:
        test = trainer.evaluate(state, "test")
    assert tally.backend_compiles == 0
    np.testing.assert_allclose(test.metric, val.metric, rtol=1e-6)
    np.testing.assert_allclose(test.loss, val.loss, rtol=1e-5)
    assert np.all(test.score_se < val.score_se) and np.all(test.score_se > val.score_se / 1.5)
    with pytest.raises(ValueError, match="no test split"):
        CohortTrainer(
            _single_cohort(SearchSpace({"learning_rate": 1e-3}).grid()),
            dataclasses.replace(digits, x_test=None, y_test=None),
            schedule_steps=5,
        ).evaluate(state, "test")


def test_crop_flip_is_a_padded_window_per_image_keyed_by_trial_and_step():
    from sm2jax.execute.batches import augment_batch, crop_flip

    images = jnp.asarray(np.random.default_rng(0).random((64, 8, 8, 3), dtype=np.float32))
    key = jax.random.PRNGKey(3)
    out = np.asarray(crop_flip(images, key, pad=2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    flipped = 0
    for i in range(64):  # every output is one 8x8 window of the padded image, maybe mirrored
        windows = [padded[i, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        plain = any(np.array_equal(out[i], w) for w in windows)
        mirror = any(np.array_equal(out[i], w[:, ::-1]) for w in windows)
        assert plain or mirror
        flipped += mirror and not plain
    assert 16 < flipped < 48  # about half are flipped
    data_key = jax.random.split(jax.random.PRNGKey(0), 2)
    a = augment_batch("crop_flip", images, data_key[0], jnp.int32(5))
    np.testing.assert_array_equal(a, augment_batch("crop_flip", images, data_key[0], jnp.int32(5)))  # reproducible
    assert not np.array_equal(a, augment_batch("crop_flip", images, data_key[1], jnp.int32(5)))  # per trial
    assert not np.array_equal(a, augment_batch("crop_flip", images, data_key[0], jnp.int32(6)))  # per step
    np.testing.assert_array_equal(augment_batch("none", images, data_key[0], jnp.int32(5)), images)


@pytest.mark.slow
def test_augmented_cohort_trains_per_trial_and_refuses_non_images(digits):
    from sm2jax.data import ArrayDataset

    model = {"name": "cnn", "channels": [4, 8]}
    twins = [
        make_config(0, model=model, learning_rate=0.05, augment=a) for a in ("none", "crop_flip")
    ]  # one trial, two pipelines
    cohorts = group_into_cohorts(twins)
    assert [c.signature.augment for c in cohorts] == ["none", "crop_flip"] and "crop_flip" in cohorts[1].name
    plain, augmented = (CohortTrainer(c, digits, schedule_steps=20) for c in cohorts)
    (s_plain,), (s_aug,) = plain.init(), augmented.init()
    for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_aug.params)):
        np.testing.assert_array_equal(a, b)  # same trial: same initial parameters and data order
    s_plain, _ = plain.train(s_plain, 5)
    s_aug, metrics = augmented.train(s_aug, 5)
    assert np.isfinite(np.asarray(metrics.loss_mean)).all()
    assert not np.allclose(
        np.asarray(jax.tree.leaves(s_plain.params)[0]), np.asarray(jax.tree.leaves(s_aug.params)[0])
    )  # the crops differ
    flat = ArrayDataset(
        "flat",
        "classification",
        np.zeros((64, 4), np.float32),
        np.zeros(64, np.int32),
        np.zeros((2, 4), np.float32),
        np.zeros(2, np.int32),
        2,
    )
    with pytest.raises(ValueError, match="needs image examples"):
        CohortTrainer(cohorts[1], flat, schedule_steps=5)


def test_a_programs_key_is_its_step_function_settings_and_argument_shapes(digits):
    """A program depends on what its step function reads and nothing else: batch size and a static
    dropout rate change the training program only, and cohorts with equal keys share one compiled
    program. (A model registered without traced dropout takes its rate static.)"""
    from sm2jax.models import MLP, register_model

    register_model(
        "static-dropout-mlp",
        lambda spec, shape, outputs, dropout, dtype, rngs: MLP(64, outputs, (8,), dropout, dtype, rngs=rngs),
    )
    model = {"name": "static-dropout-mlp"}
    space = SearchSpace({"model": model, "batch_size": Categorical([16, 32]), "dropout": Categorical([0.0, 0.2])})
    trainers = [CohortTrainer(c, digits, schedule_steps=10) for c in group_into_cohorts(space.grid())]
    assert len(trainers) == 4
    for kind in ("init", "eval"):
        assert len({t.program(kind, 1) for t in trainers}) == 1, kind
    train = [t.program("train", 1) for t in trainers]
    assert len(set(train)) == 4
    assert {(p.settings.batch_size, p.settings.draws_masks, p.settings.graphdef) for p in train} == {
        (16, False, trainers[0].graphdef),
        (32, False, trainers[0].graphdef),
        (16, True, trainers[1].graphdef),
        (32, True, trainers[1].graphdef),
    }
    assert trainers[0].program("train", 2) != train[0]  # the width is in the arguments' shapes
    chunk = trainers[0].init(1)[0]
    trainers[0].compile_eval(chunk)
    assert all(t.is_compiled("eval", 1) for t in trainers) and not trainers[1].is_compiled("train", 1)
    with count_compiles() as tally:
        for t in trainers[1:]:
            t.compile_eval(chunk)  # equal keys: the table answers, nothing is lowered or loaded
    assert tally.to_json()["backend_compiles"] == tally.to_json()["cache_hits"] == 0


def test_a_re_registered_model_gets_new_programs_only_where_it_changed(digits):
    from sm2jax.models import MLP, register_model

    class OtherMLP(MLP):  # another class: its graph, and so every program but init's data, differs
        pass

    def trainer(builder):
        register_model("re-registered-mlp", builder)
        space = SearchSpace({"model": {"name": "re-registered-mlp"}, "learning_rate": Categorical([1e-3])})
        return CohortTrainer(_single_cohort(space.grid()), digits, schedule_steps=10)

    def mlp(cls):
        return lambda spec, shape, outputs, dropout, dtype, rngs: cls(64, outputs, (8,), dropout, dtype, rngs=rngs)

    first, again, other = trainer(mlp(MLP)), trainer(mlp(MLP)), trainer(mlp(OtherMLP))
    assert first.program("init", 0) != again.program("init", 0)  # a new builder: a new init program
    assert first.program("eval", 1) == again.program("eval", 1)  # the same graph: the same program
    assert first.program("train", 1) == again.program("train", 1)
    assert first.program("eval", 1) != other.program("eval", 1) and first.program("train", 1) != other.program(
        "train", 1
    )
