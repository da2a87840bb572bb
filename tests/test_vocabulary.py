"""An open vocabulary: your own optax optimizer, your own traced hyperparameters, traced dropout,
and cohort-aware sampling -- each searched in one cohort with one training program."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sm2jax
from sm2jax.cohort import TRACED_DROPOUT, group_into_cohorts
from sm2jax.compile_cache import count_compiles
from sm2jax.data import ArrayDataset
from sm2jax.execute.batches import batch_indices
from sm2jax.execute.rows import trial_keys
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.models import MLP, build_model, register_model
from sm2jax.sampling import cohort_sample, static_names, unit_points
from sm2jax.space import Categorical, LogUniform, SearchSpace, Uniform, make_config
from sm2jax.spec import StudySpec, read_spec, registering_modules
from sm2jax.study import Study
from sm2jax.tasks import Task, register_task
from sm2jax.vocabulary import HYPERPARAMETERS, OPTIMIZERS, register_hyperparameter, register_optimizer

STEPS = 10
MODEL = {"name": "mlp", "hidden": [16]}


def _plain_loop(config, ds, tx, loss=None, steps=STEPS):
    """One configuration alone: a plain optax transformation, no inject_hyperparams, no vmap."""
    loss = loss or (lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y))
    init_key, _, data_key = trial_keys(config["seed"], config.trial_id)
    model = build_model(config["model"], ds.input_shape, ds.num_outputs, key=init_key)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    @jax.jit
    def step(params, opt_state, idx):
        def loss_fn(p):
            return loss(nnx.merge(graphdef, p, rest)(x[idx], train=True), y[idx]).mean()

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for t in range(steps):
        params, opt_state, value = step(params, opt_state, batch_indices(data_key, jnp.int32(t), ds.num_train, 32))
    return params, value


def _train_alone_in_one_program(configs, ds):
    """Trains ``configs`` as one cohort at full width; returns (trainer, state, metrics, tally)."""
    (cohort,) = group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, ds, schedule_steps=100)
    (chunk,) = trainer.init()
    with count_compiles() as tally:
        state, metrics = trainer.train(chunk, STEPS)
        state, _ = trainer.train(state, 1)  # the same program again: nothing new
        state = jax.block_until_ready(state)
    return trainer, state, metrics, tally.to_json()


def _assert_rows_match(state, row, params):
    got = jax.tree.map(lambda a: np.asarray(a)[row], state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


@pytest.fixture
def lion():
    yield register_optimizer("lion-test", optax.lion)
    OPTIMIZERS.pop("lion-test")


def test_a_registered_optax_optimizer_searches_two_of_its_arguments_in_one_program(digits, lion):
    assert lion.defaults == {"b1": 0.9, "b2": 0.99, "weight_decay": 1e-3}  # its float arguments, traced
    space = SearchSpace(
        {
            "model": MODEL,
            "optimizer": "lion-test",
            "learning_rate": 3e-3,
            "b1": Categorical([0.8, 0.95]),
            "weight_decay": Categorical([0.0, 0.1]),
        }
    )
    configs = space.grid()
    assert [c["b2"] for c in configs] == [0.99] * 4  # the optimizer's own default, not adam's 0.999
    _, state, metrics, tally = _train_alone_in_one_program(configs, digits)
    assert tally["backend_compiles"] + tally["cache_hits"] == 1  # one training program, all four configurations
    assert set(state.opt_state.hyperparams) >= {"b1", "b2", "weight_decay"}
    np.testing.assert_allclose(np.asarray(state.opt_state.hyperparams["b1"]), [0.8, 0.8, 0.95, 0.95], rtol=1e-6)
    for row, config in enumerate(configs):
        tx = optax.lion(3e-3, b1=config["b1"], b2=0.99, weight_decay=config["weight_decay"])
        params, _ = _plain_loop(config, digits, tx, steps=STEPS + 1)
        _assert_rows_match(state, row, params)
    assert len({float(v) for v in np.asarray(metrics.loss_last)}) == 4  # the arguments did something


def test_registered_optimizer_errors_are_one_line_and_name_the_fix():
    with pytest.raises(ValueError, match="built in"):
        register_optimizer("adam", optax.adam)
    with pytest.raises(ValueError, match="must take a learning_rate"):
        register_optimizer("no-lr", lambda rate, b1=0.9: optax.sgd(rate))
    with pytest.raises(ValueError, match="has no argument 'beta'"):
        register_optimizer("typo", optax.lion, {"beta": 0.9})
    with pytest.raises(ValueError, match="default of 'b1' must be < 1"):
        register_optimizer("bad-default", lambda learning_rate, b1=1.5: optax.adam(learning_rate, b1))
    with pytest.raises(ValueError, match=r"unknown optimizer; known: .*register_optimizer"):
        make_config(0, optimizer="lion-not-registered")
    with pytest.raises(ValueError, match="register_hyperparameter"):
        SearchSpace({"label_smoothing_unknown": 0.1})


@pytest.fixture
def smoothing():
    register_hyperparameter("label_smoothing", 0.0, low=0.0, high=1.0)

    def smoothed(outputs, targets, label_smoothing):
        labels = optax.smooth_labels(jax.nn.one_hot(targets, outputs.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(outputs, labels)

    task = register_task(
        Task(
            "smoothed-test",
            smoothed,
            lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32),
            "accuracy",
            True,
            binary=True,
            majority_chance=True,
            hyperparameters=("label_smoothing",),
        )
    )
    yield task
    HYPERPARAMETERS.pop("label_smoothing")


def test_a_custom_traced_loss_hyperparameter_trains_each_trial_with_its_own_value(digits, smoothing):
    ds = ArrayDataset("digits-smoothed", "smoothed-test", *_arrays(digits), digits.num_outputs)
    values = [0.0, 0.1, 0.4]
    configs = [make_config(i, model=MODEL, learning_rate=1e-2, label_smoothing=v) for i, v in enumerate(values)]
    trainer, state, _, tally = _train_alone_in_one_program(configs, ds)
    assert tally["backend_compiles"] + tally["cache_hits"] == 1
    for row, value in enumerate(values):
        loss = lambda out, y, v=value: smoothing.loss(out, y, label_smoothing=v)
        params, _ = _plain_loop(configs[row], ds, optax.adam(1e-2), loss, steps=STEPS + 1)
        _assert_rows_match(state, row, params)
    # Validation loss at the default (no smoothing): the plain cross-entropy of each row.
    metrics = trainer.evaluate(state)
    for row in range(3):
        params = jax.tree.map(lambda a: a[row], state.params)
        out = nnx.merge(trainer.eval_settings.graphdef, params, jax.tree.map(lambda a: a[row], state.model_state))(
            jnp.asarray(ds.x_val)
        )
        plain = optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(ds.y_val)).mean()
        assert metrics.loss[row] == pytest.approx(float(plain), rel=1e-4)
    with pytest.raises(ValueError, match="must be <= 1"):
        make_config(0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        register_task(Task("t", smoothing.loss, smoothing.metric, "accuracy", True, hyperparameters=("nope",)))


def _arrays(ds):
    return ds.x_train, ds.y_train, ds.x_val, ds.y_val


def test_dropout_rates_share_one_program_and_rate_zero_is_exact(digits):
    rates = [0.0, 0.2, 0.5]
    configs = [make_config(i, model=MODEL, learning_rate=1e-2, dropout=r) for i, r in enumerate(rates)]
    (cohort,) = group_into_cohorts(configs)
    assert cohort.signature.dropout == TRACED_DROPOUT
    _, state, _, tally = _train_alone_in_one_program(configs, digits)
    assert tally["backend_compiles"] + tally["cache_hits"] == 1
    # Rate 0 among traced rates keeps every element: the same as a cohort that draws no masks.
    alone = [make_config(0, model=MODEL, learning_rate=1e-2)]
    assert group_into_cohorts(alone)[0].signature.dropout == 0.0
    _, plain, _, _ = _train_alone_in_one_program(alone, digits)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[0], state.params)), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, np.asarray(b)[0], atol=1e-6)
    leaves = [jax.tree.leaves(jax.tree.map(lambda a, r=r: a[r], state.params)) for r in range(3)]
    assert any(not np.allclose(a, b) for a, b in zip(leaves[0], leaves[2]))


def test_traced_dropout_keeps_each_element_with_its_trials_probability():
    rates = jnp.asarray([0.0, 0.25, 0.75])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))
    x = jnp.ones((3, 20000))
    out = jax.vmap(lambda x, r, k: sm2jax.dropout(x, r, k))(x, rates, keys)
    kept = np.mean(np.asarray(out) > 0, axis=1)
    np.testing.assert_allclose(kept, [1.0, 0.75, 0.25], atol=0.01)
    np.testing.assert_allclose(np.asarray(out).mean(axis=1), 1.0, atol=0.03)  # inverted: expectation kept
    row = x[0]
    assert sm2jax.dropout(row, 0.5, None) is row  # no key (evaluation): identity


def test_a_model_without_traced_dropout_keeps_one_cohort_per_rate():
    register_model(
        "static-dropout", lambda spec, shape, out, dropout, dtype, rngs: MLP(64, out, (8,), dropout, dtype, rngs=rngs)
    )
    space = SearchSpace({"model": {"name": "static-dropout"}, "dropout": Categorical([0.0, 0.1, 0.3])})
    assert [c.signature.dropout for c in group_into_cohorts(space.grid())] == [0.0, 0.1, 0.3]
    assert static_names(space) == ["model", "dropout"]
    assert static_names(SearchSpace({"model": MODEL, "dropout": Uniform(0.0, 0.5)})) == ["model"]


def test_cohort_sampling_fills_few_cohorts_in_multiples_of_the_width():
    space = SearchSpace(
        {
            "model": MODEL,
            "optimizer": Categorical(["sgd", "adam", "adamw"]),
            "batch_size": Categorical([32, 128]),
            "learning_rate": LogUniform(1e-4, 1e-1),
            "dropout": Uniform(0.0, 0.5),
            "weight_decay": LogUniform(1e-5, 1e-1),
        }
    )
    configs = cohort_sample(space, 96, seed=3, method="sobol", multiple=8)
    assert len(configs) == 96 and [c.trial_id for c in configs] == list(range(96))
    cohorts = group_into_cohorts(configs)
    assert len(cohorts) == 6 and all(c.size == 16 for c in cohorts)  # 6 static combinations, 2 blocks each
    independent = group_into_cohorts(space.sample(96, seed=3))
    assert len(independent) == 6 and sorted(c.size for c in independent) != [16] * 6  # uneven, not width multiples
    for c in configs:
        assert 1e-4 <= c["learning_rate"] <= 1e-1 and 0 <= c["dropout"] <= 0.5
    assert [c.values for c in configs] == [c.values for c in cohort_sample(space, 96, seed=3)]  # seeded
    assert [c.values for c in configs] != [c.values for c in cohort_sample(space, 96, seed=4)]
    # Fewer blocks than combinations: a seeded choice of combinations, one block each (rounded up).
    few = group_into_cohorts(cohort_sample(space, 20, seed=0, method="halton", multiple=8))
    assert len(few) == 3 and all(c.size == 8 for c in few)
    with pytest.raises(ValueError, match="unknown 'latin'"):
        cohort_sample(space, 8, method="latin")


def test_sobol_points_cover_the_traced_box_more_evenly_than_random_ones():
    from scipy.stats import qmc

    for seed in range(3):
        sobol = qmc.discrepancy(unit_points("sobol", 32, 3, seed))
        halton = qmc.discrepancy(unit_points("halton", 32, 3, seed))
        random = qmc.discrepancy(unit_points("cohort_random", 32, 3, seed))
        assert sobol < random and halton < random


@pytest.mark.slow  # a whole study
def test_the_run_command_samples_cohort_aware(tmp_path, capsys):
    from sm2jax.cli import main

    rc = main(
        [
            "run",
            "--quick",
            "--no-progress",
            "--json",
            "--samples",
            "16",
            "--dir",
            str(tmp_path / "s"),
            "--set",
            'space.optimizer=["adam", "sgd"]',
            "--set",
            'space.dropout={"type": "Uniform", "low": 0.0, "high": 0.5}',
        ]
    )
    assert rc == 0
    spec = read_spec(tmp_path / "s")
    assert spec.sampler == "sobol" and spec.num_samples == 16
    cohorts = group_into_cohorts(spec.configs())
    assert sum(c.size for c in cohorts) == 16 and all(c.size % 8 == 0 for c in cohorts)
    assert len({c["dropout"] for c in spec.configs()}) == 16


REGISTERING = """
import optax
import sm2jax

sm2jax.register_optimizer("lion-module", optax.lion)
sm2jax.register_hyperparameter("module_weight", 1.0, low=0.0)
"""


def test_the_modules_that_registered_an_optimizer_and_a_hyperparameter_are_recorded(tmp_path, monkeypatch):
    (tmp_path / "vocab_ext.py").write_text(REGISTERING)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("vocab_ext", None)
    import vocab_ext  # noqa: F401

    try:
        space = SearchSpace({"optimizer": "lion-module", "module_weight": 0.5}).to_json()
        spec = StudySpec(space=space, dataset="digits", explore_budget=0.0, min_budget=1, max_budget=1)
        assert registering_modules(spec, None) == {"vocab_ext"}
    finally:
        OPTIMIZERS.pop("lion-module")
        HYPERPARAMETERS.pop("module_weight")
        sys.modules.pop("vocab_ext", None)


@pytest.mark.slow
def test_a_study_searches_a_registered_optimizer_with_traced_dropout(tmp_path, lion):
    space = SearchSpace(
        {
            "model": MODEL,
            "optimizer": Categorical(["adam", "lion-test"]),
            "learning_rate": LogUniform(1e-3, 3e-2),
            "dropout": Uniform(0.0, 0.3),
            "batch_size": 32,
        }
    ).to_json()
    spec = StudySpec(
        space=space,
        dataset="digits",
        sampler="sobol",
        num_samples=16,
        min_budget=1,
        max_budget=3,
        eta=3,
        explore_budget=0.25,
        idle_seconds=0.0,
        energy_method="estimated",
        probe_width=False,
    )
    results = Study(tmp_path / "s", spec, progress=False).run()
    assert results["selected"]["metric"] > 0.85
    assert {t["config"]["optimizer"] for t in results["trials"]} == {"adam", "lion-test"}
    programs = results["compilation"]["programs"]  # two cohorts (one per optimizer), every dropout rate in each
    assert programs["jit(train_chunk)"] <= 2 * 2 and programs["jit(init_trial)"] <= 2, programs
