"""Own models, data sets and losses, registered from Python, through a whole study, a kill and a resume."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kill import kill_mid_phase

import sm2jax

# A user's module: a model of their own (a residual MLP with a learned gate), a data set (Gaussian
from sm2jax.cli import main
from sm2jax.execute.rows import chunk_rows
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.space import LogUniform, SearchSpace
from sm2jax.spec import StudySpec, read_spec, registering_modules
from sm2jax.study import Study

# blobs, made offline) and a loss (multi-class hinge, scored by accuracy).
EXTENSION = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import sm2jax


    class GatedNet(nnx.Module):
        def __init__(self, inputs, outputs, hidden, dtype, rngs):
            self.inp = nnx.Linear(inputs, hidden, dtype=dtype, rngs=rngs)
            self.gate = nnx.Param(jnp.zeros((hidden,), dtype))
            self.out = nnx.Linear(hidden, outputs, dtype=dtype, rngs=rngs)

        def __call__(self, x, *, train=False, key=None):
            h = jax.nn.gelu(self.inp(x.reshape(x.shape[0], -1)))
            return self.out(h + jax.nn.sigmoid(self.gate[...])[None] * h * h)


    def build_gated(spec, input_shape, num_outputs, dropout, dtype, rngs):
        return GatedNet(int(np.prod(input_shape)), num_outputs, int(spec.get("hidden", 16)), dtype, rngs)


    def multiclass_hinge(outputs, targets):
        correct = jnp.take_along_axis(outputs, targets[:, None], axis=-1)
        margins = jnp.maximum(0.0, 1.0 + outputs - correct)
        return margins.sum(-1) - 1.0  # the correct class contributes max(0, 1) = 1


    def blobs(n=600, classes=3, seed=0):
        rng = np.random.default_rng(seed)
        centres = rng.normal(0, 2.5, (classes, 8))
        y = rng.integers(0, classes, n).astype(np.int32)
        x = (centres[y] + rng.normal(0, 1.0, (n, 8))).astype(np.float32)
        a, b = int(n * 0.6), int(n * 0.8)
        return sm2jax.ArrayDataset("blobs", "multiclass_hinge", x[:a], y[:a], x[a:b], y[a:b], classes, x[b:], y[b:])


    sm2jax.register_model("gated", build_gated)
    sm2jax.register_task(sm2jax.Task(
        "multiclass_hinge", loss=multiclass_hinge,
        metric=lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32),
        metric_name="accuracy", higher_is_better=True, binary=True, majority_chance=True))
    sm2jax.register_dataset("blobs", blobs)
""")


@pytest.fixture
def extension(tmp_path, monkeypatch):
    (tmp_path / "byo_ext.py").write_text(EXTENSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("byo_ext", None)
    import byo_ext

    yield byo_ext
    sys.modules.pop("byo_ext", None)


def _spec(**overrides):
    space = SearchSpace(
        {"model": {"name": "gated", "hidden": 16}, "learning_rate": LogUniform(1e-3, 3e-1, num=4), "batch_size": 16}
    ).to_json()
    base = dict(
        space=space,
        dataset="blobs",
        dataset_options={"n": 600},
        explore_budget=0.25,
        min_budget=1,
        max_budget=3,
        eta=3,
        idle_seconds=0.0,
        probe_width=False,
        energy_method="estimated",
        steps_per_window=2,
    )
    return StudySpec(**{**base, **overrides})


def _decisions(results):
    return [(d["phase"], d["trial_id"], d["kept"]) for d in results["decisions"]]


@pytest.mark.slow
def test_own_model_data_and_loss_run_are_killed_and_resume(tmp_path, extension):
    spec = _spec()
    reference = Study(tmp_path / "ref", spec, progress=False).run()
    assert reference["metric_name"] == "accuracy" and reference["selected"]["metric"] > 0.8  # three blobs: learnable
    assert read_spec(tmp_path / "ref").imports == ["byo_ext"]  # recorded, so another process finds them

    killed = tmp_path / "killed"
    Study(killed, spec, progress=False)  # writes spec.json
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    kill_mid_phase(killed, env=env)
    assert (killed / "progress" / "phase-1.json").exists() and not (killed / "progress" / "phase-2.json").exists()

    resumed = Study(killed, progress=False).run()
    assert resumed["attempts"] == 2
    assert _decisions(resumed) == _decisions(reference)
    assert resumed["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert resumed["selected"]["metric"] == pytest.approx(reference["selected"]["metric"], abs=1e-6)


@pytest.mark.slow
def test_the_registered_loss_is_what_trains_and_evaluates(extension):
    ds = extension.blobs()
    configs = SearchSpace(
        {"model": {"name": "gated", "hidden": 16}, "learning_rate": LogUniform(1e-2, 1e-1, num=2), "batch_size": 16}
    ).grid()
    (cohort,) = sm2jax.group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, ds, schedule_steps=50)
    (chunk,) = chunk_rows(trainer.init_rows(), 2)
    chunk, _ = trainer.train(chunk, 2)  # early: the hinge is still far from 0
    got = trainer.evaluate(chunk)
    assert (got.loss > 0.1).all()
    for row in range(2):
        params = jax.tree.map(lambda a: a[row], chunk.params)
        model = sm2jax.models.build_model({"name": "gated", "hidden": 16}, ds.input_shape, 3, key=jax.random.PRNGKey(0))
        from flax import nnx

        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        out = nnx.merge(graphdef, params, rest)(jnp.asarray(ds.x_val))
        hinge = float(np.mean(extension.multiclass_hinge(out, jnp.asarray(ds.y_val))))
        accuracy = float(np.mean(np.argmax(out, -1) == ds.y_val))
        assert got.loss[row] == pytest.approx(hinge, rel=1e-5)
        assert got.metric[row] == pytest.approx(accuracy) and got.score[row] == pytest.approx(accuracy)


@pytest.mark.slow
def test_in_memory_data_is_recorded_and_required_to_resume(tmp_path, extension):
    ds = extension.blobs()
    spec = _spec(dataset="digits", dataset_options={})  # the name passed is replaced by the data set's
    Study(tmp_path / "s", spec, dataset=ds, progress=False)
    held = read_spec(tmp_path / "s")
    assert held.dataset == "blobs" and held.dataset_fingerprint == ds.fingerprint()
    with pytest.raises(ValueError, match="pass it again"):
        Study(tmp_path / "s", progress=False)
    other = extension.blobs(seed=1)
    with pytest.raises(ValueError, match="differs from the one this study ran on"):
        Study(tmp_path / "s", dataset=other, progress=False)
    Study(tmp_path / "s", dataset=ds, progress=False)  # the same arrays: accepted
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "pass it again" in out.stderr


@pytest.mark.slow
def test_missing_registrations_are_one_line_errors(tmp_path, extension, monkeypatch):
    Study(tmp_path / "s", _spec(), progress=False)
    # Another process without the module on its path: the error names the module and the fix.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-m", "sm2jax.cli", "resume", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path.parent),
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "byo_ext" in out.stderr and "PYTHONPATH" in out.stderr
    # Registered from a notebook (__main__): not importable elsewhere, so not recorded.
    monkeypatch.setattr(extension.build_gated, "__module__", "__main__")
    monkeypatch.setattr(extension.blobs, "__module__", "__main__")
    assert registering_modules(_spec(), None) == set()
    # Built-in names stay built in.
    with pytest.raises(ValueError, match="built in"):
        sm2jax.register_model("mlp", extension.build_gated)
    with pytest.raises(ValueError, match="built in"):
        sm2jax.register_dataset("digits", extension.blobs)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*register_task"):
        sm2jax.ArrayDataset("x", "nope", np.zeros((2, 1)), np.zeros(2), np.zeros((2, 1)), np.zeros(2), 2)


TINY = textwrap.dedent("""
    import numpy as np
    from flax import nnx

    import sm2jax


    class Tiny(nnx.Module):
        def __init__(self, inputs, outputs, rngs):
            self.lin = nnx.Linear(inputs, outputs, rngs=rngs)

        def __call__(self, x, *, train=False, key=None):
            return self.lin(x.reshape(x.shape[0], -1))


    sm2jax.register_model(
        "tiny", lambda spec, shape, outputs, dropout, dtype, rngs: Tiny(int(np.prod(shape)), outputs, rngs)
    )
""")


@pytest.mark.slow
def test_a_study_registered_in_a_script_resumes_with_import_and_then_without(tmp_path):
    """Registered in a script (``__main__``, not recorded): ``resume`` names the fix, ``--import``
    with the module beside the user is not "a different spec" and is recorded, and the next resume
    finds it from the current folder alone."""
    (tmp_path / "byo_reg.py").write_text(TINY)
    (tmp_path / "script.py").write_text(
        "exec(open('byo_reg.py').read())\n"
        "import sm2jax\n"
        "space = sm2jax.SearchSpace({'model': {'name': 'tiny'}, 'learning_rate': sm2jax.LogUniform(1e-2, 1e-1, num=2)})\n"
        "spec = sm2jax.StudySpec(space=space.to_json(), max_budget=1, min_budget=1, explore_budget=0, idle_seconds=0)\n"
        "sm2jax.Study('S1', spec, progress=False).run()\n"
    )
    run = lambda *args: subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, check=False)
    made = run(sys.executable, "script.py")
    assert made.returncode == 0, made.stderr[-3000:]
    assert json.loads((tmp_path / "S1" / "spec.json").read_text())["imports"] == []  # __main__ is not importable
    cli = [sys.executable, "-m", "sm2jax.cli", "resume", "S1", "--no-progress"]
    bare = run(*cli)
    assert bare.returncode == 2 and "unknown model" in bare.stderr and "--import" in bare.stderr, bare.stderr
    named = run(*cli, "--import", "byo_reg")
    assert named.returncode == 0, named.stderr[-3000:]
    assert json.loads((tmp_path / "S1" / "spec.json").read_text())["imports"] == ["byo_reg"]
    again = run(*cli)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_a_registered_task_trains_on_a_built_in_data_set(tmp_path):
    traced = []

    def hinge(outputs, targets):
        traced.append(outputs.shape)  # at trace time: the task's loss is what the programs were built from
        correct = jnp.take_along_axis(outputs, targets[:, None], axis=-1)
        return jnp.maximum(0.0, 1.0 + outputs - correct).sum(-1) - 1.0

    accuracy = lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32)
    sm2jax.register_task(sm2jax.Task("digits-hinge", hinge, accuracy, "hinge_accuracy", True, binary=True))
    spec = StudySpec(
        space=SearchSpace({"learning_rate": LogUniform(1e-2, 1e-1, num=2)}).to_json(),
        dataset="digits",
        task="digits-hinge",
        explore_budget=0,
        min_budget=1,
        max_budget=1,
        idle_seconds=0,
        probe_width=False,
        energy_method="estimated",
    )
    results = Study(tmp_path / "s", spec, progress=False).run()
    assert traced and results["metric_name"] == "hinge_accuracy" and results["data"]["task"] == "digits-hinge"
    assert results["selected"]["test"]["metric"] > 0.5  # a real digits classifier, trained on the hinge loss


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("task=nope", ["unknown task 'nope'", "register_task"]),
        ("space.momentum=[0.8, 0.9]", ["'momentum' is searched but no configuration uses it", "optimizer sgd"]),
        ("space.label_smoothing=0.1", ["'label_smoothing' is searched", "task 'classification'"]),
    ],
)
def test_a_task_not_known_or_a_name_nothing_uses_is_one_line_before_anything_is_written(
    tmp_path, capsys, assignment, words
):
    sm2jax.register_hyperparameter("label_smoothing", 0.0, low=0.0, high=1.0)
    folder = tmp_path / "s"
    assert (
        main(["run", "--quick", "--no-progress", "--idle-seconds", "0", "--dir", str(folder), "--set", assignment]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not folder.exists()


def test_a_data_set_not_prepared_leaves_no_folder_behind(tmp_path, capsys):
    folder = tmp_path / "s"
    args = ["run", "--preset", "cifar10", "--quick", "--no-progress", "--dir", str(folder)]
    assert main([*args, "--data-dir", str(tmp_path / "no-data")]) == 2
    assert "sm2jax prepare cifar10" in capsys.readouterr().err
    assert not folder.exists()
