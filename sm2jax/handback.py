"""Hand back what a study found: the trained model of its selection, or of any finalist, as a Flax
model with its configuration and scores, and an export that loads without the study folder.

A study's last checkpoint keeps every finalist's trained rows (its cohort's row of parameters,
model state, optimizer state and keys). :func:`load_selected` restores that checkpoint into the
shapes the cohort's programs use (traced, nothing computed), takes the trial's row and merges it
with the model's graph, built at dropout 0 as evaluation builds it::

    trained = sm2jax.load_selected("runs/my-study")           # relative paths work
    trained.model(x, train=False)                             # the Flax NNX model
    trained.config, trained.scores                            # its values; validation and test
    trained.evaluate(x_test, y_test)                          # the study's metric, as it computed it
    sm2jax.export("runs/my-study", "winner")                  # Orbax + JSON; load_selected("winner")

Any finalist loads with ``trial_id=``; a study from before finalists were kept has only its
selection's rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sm2jax.cohort import Signature, group_into_cohorts, traced_names
from sm2jax.execute.batches import EVAL_BATCH_SIZE, eval_blocks
from sm2jax.execute.steps import task_loss
from sm2jax.execute.trainer import abstract_model, abstract_rows, init_settings
from sm2jax.execute.workload import study_data
from sm2jax.phases import StudyState
from sm2jax.proposals import study_proposals
from sm2jax.space import Config
from sm2jax.spec import import_modules, read_spec
from sm2jax.store.folder import StudyDir, read_json, write_json
from sm2jax.tasks import get_task

EXPORT = "sm2jax-export.json"
"""The JSON of an export (its configuration, scores, signature and data shapes); its parameters are
the Orbax checkpoint in ``state/`` beside it."""


@dataclasses.dataclass
class TrainedModel:
    """A configuration's trained model, handed back.

    Attributes:
      model: the Flax NNX model with the trained parameters (call it with ``train=False``).
      trial_id: the configuration's trial id in its study.
      config: its hyperparameter values.
      selected: whether the study selected it.
      scores: ``{"phase", "samples", "validation": {"score", "score_se", "metric"}, "test"}`` as the
        study reported them (``test``: the selection's held-out figures, ``None`` for a finalist
        the study never evaluated on the test split).
      task: the task's name (its loss and metric, :func:`sm2jax.tasks.get_task`).
      metric_name: what the task calls its metric.
      input_shape, num_outputs: what the model takes and gives.
      source: the study (or export) folder it was loaded from.
    """

    model: nnx.Module
    trial_id: int
    config: dict[str, Any]
    selected: bool
    scores: dict[str, Any]
    task: str
    metric_name: str
    input_shape: tuple[int, ...]
    num_outputs: int
    source: str

    def __call__(self, x: Any) -> jax.Array:
        return self.model(x, train=False)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
        """The task's loss, metric and score over ``(x, y)`` computed as the study computes them:
        masked blocks of ``batch_size`` examples summed in float32 in one scan, then the task's
        reported metric of the mean (``score`` is higher-is-better)."""
        task = get_task(self.task)
        batch = min(batch_size, len(x))
        [(xs, ys, mask)] = eval_blocks(np.asarray(x), np.asarray(y), batch, -(-len(x) // batch))
        graphdef, state = nnx.split(self.model)

        @jax.jit
        def sums(state, xs, ys, mask):
            model = nnx.merge(graphdef, state)

            def body(carry, block):
                xb, yb, m = block
                loss, metric = task_loss(task, model(xb, train=False), yb)
                return (carry[0] + (loss * m).sum(), carry[1] + (metric * m).sum()), None

            zero = np.float32(0)
            return jax.lax.scan(body, (zero, zero), (xs, ys, mask))[0]

        loss_sum, metric_sum = (float(np.float64(v)) for v in jax.device_get(sums(state, xs, ys, mask)))
        mean = metric_sum / len(x)
        return {
            "loss": loss_sum / len(x),
            "metric": float(task.reported(mean)),
            "score": mean if task.higher_is_better else -mean,
        }


def load_selected(directory: str | os.PathLike, trial_id: int | None = None, *, dataset: Any = None) -> TrainedModel:
    """The trained model of the configuration a finished study selected (or of finalist ``trial_id``).

    Args:
      directory: a study folder (relative paths work), a folder of a Hyperband run of the
        earlier layout (its winning bracket's study), or a folder written by :func:`export`.
      trial_id: a finalist to load instead of the selection.
      dataset: for a study that ran on an in-memory :class:`~sm2jax.data.ArrayDataset` and
        recorded no data shapes (an older study): that data set.

    Raises:
      FileNotFoundError: no finished study (or export) in ``directory``.
      ValueError: ``trial_id`` has no trained parameters there (it was dropped before the last
        phase), or the study selected nothing.
    """
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(path, EXPORT)):
        return _load_export(path, trial_id)
    folder = StudyDir(path)
    results = folder.results()
    if folder.bracket_run():
        if results.get("selected") is None:
            raise ValueError(f"the Hyperband run in {path} selected no configuration: there is no model to load")
        folder = folder.bracket(results["selected"]["bracket"])
        results = folder.results()
    spec = read_spec(folder.path)
    import_modules(spec.imports)
    want = trial_id if trial_id is not None else (results.get("selected") or {}).get("trial_id")
    if want is None:
        raise ValueError(f"the study in {folder.path} selected no configuration: there is no model to load")
    saved = folder.saved_phases()
    state = StudyState.from_json(folder.load_progress(saved[-1]))
    proposals, _ = study_proposals(folder, spec)
    # Where its rows are kept: the last phase's finalists, or those of the round that trained it.
    phase, alive = saved[-1], state.alive
    for r in state.rounds:
        if any(want in ids for ids in r["alive"].values()):
            phase, alive = r["phase"], r["alive"]
    round_ = proposals.round_of().get(want, 1)
    cohorts = {c.name: c for c in group_into_cohorts(proposals.of_round(round_))}
    where = next((name for name, ids in alive.items() if want in ids), None)
    if where is None:
        kept = sorted(
            {t for m in [state.alive, *(r["alive"] for r in state.rounds)] for ids in m.values() for t in ids}
        )
        raise ValueError(
            f"trial {want} has no trained parameters in {folder.path}: the study keeps trial(s) {kept} (the finalists of each round; a study from before finalists were kept: its selection only)"
        )
    data = results.get("data") or _data_shapes(spec, dataset)
    abstract = {name: _on_one_device(_abstract(cohorts[name].signature, data, len(ids))) for name, ids in alive.items()}
    checkpoints = folder.checkpoints()
    try:
        rows = checkpoints.restore(phase, abstract)[where]
    finally:
        checkpoints.close()
    row = alive[where].index(want)
    params, model_state = jax.tree.map(lambda a: np.asarray(a[row]), (rows.params, rows.model_state))
    config = next(c for c in cohorts[where].configs if c.trial_id == want)
    return _trained(cohorts[where].signature, data, params, model_state, config, _scores(results, want), folder.path)


def export(directory: str | os.PathLike, out: str | os.PathLike, trial_id: int | None = None) -> str:
    """Writes the selection (or finalist ``trial_id``) of the study in ``directory`` to ``out``: its
    parameters and model state as an Orbax checkpoint (``out/state``) and its configuration, scores,
    signature and data shapes as ``out/sm2jax-export.json``, which :func:`load_selected` reads
    without the study. ``out`` must not exist or be empty (nothing is overwritten); returns it."""
    trained = load_selected(directory, trial_id)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder: export into a new folder")
    _, params, model_state = nnx.split(trained.model, nnx.Param, ...)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "state"), {"params": params, "model_state": model_state})
    checkpointer.wait_until_finished()
    checkpointer.close()
    write_json(
        os.path.join(out, EXPORT),
        {
            "format": 1,
            "trial_id": trained.trial_id,
            "config": {"trial_id": trained.trial_id, "values": trained.config},
            "selected": trained.selected,
            "scores": trained.scores,
            "data": {
                "task": trained.task,
                "metric_name": trained.metric_name,
                "input_shape": list(trained.input_shape),
                "num_outputs": trained.num_outputs,
            },
            "imports": _study_imports(trained.source),
            "study": trained.source,
        },
    )
    return out


# ---------------------------------------------------------------------------------------- internals


def _study_imports(path: str) -> list[str]:
    blob = StudyDir(path).spec_blob() or {}
    return list(blob.get("imports", []))


def data_shapes(dataset: Any) -> dict[str, Any]:
    """What a trained model of ``dataset`` takes and gives: the task, its metric's name, the example
    shape and the outputs (a study records them in ``results.json`` as ``data``)."""
    task = get_task(dataset.task)
    return {
        "task": dataset.task,
        "metric_name": task.metric_name,
        "input_shape": list(dataset.input_shape),
        "num_outputs": int(dataset.num_outputs),
    }


def _data_shapes(spec: Any, dataset: Any) -> dict[str, Any]:
    """:func:`data_shapes` of a study that recorded none (an older one): its data set is loaded."""
    if dataset is None and spec.dataset_fingerprint is not None:
        raise ValueError(
            f"this study ran on the in-memory data set {spec.dataset!r}: pass it again, load_selected(..., dataset=...)"
        )
    return data_shapes(study_data(spec, dataset))


def _on_one_device(tree: Any) -> Any:
    """Restore targets of ``tree``'s shapes on this process's first device (each process reads every row)."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), tree)


def _model_of(signature: Signature, data: dict[str, Any]) -> nnx.Module:
    """The model of ``signature`` as shapes, built at dropout 0 as evaluation builds it."""
    return abstract_model(init_settings(signature, data["input_shape"], data["num_outputs"]))


def _abstract(signature: Signature, data: dict[str, Any], k: int) -> Any:
    settings = init_settings(signature, data["input_shape"], data["num_outputs"])
    return abstract_rows(settings, traced_names(signature, get_task(data["task"]).hyperparameters), k)


def _trained(
    signature: Signature,
    data: dict[str, Any],
    params: Any,
    model_state: Any,
    config: Config,
    scores: dict[str, Any],
    source: str,
) -> TrainedModel:
    """The model of ``signature`` built at dropout 0 (as evaluation builds it) with ``params``."""
    graphdef = nnx.split(_model_of(signature, data), nnx.Param, ...)[0]
    model = nnx.merge(graphdef, jax.device_put(params), jax.device_put(model_state))
    return TrainedModel(
        model=model,
        trial_id=config.trial_id,
        config=config.to_json()["values"],
        selected=bool(scores.pop("selected")),
        scores=scores,
        task=data["task"],
        metric_name=data.get("metric_name") or get_task(data["task"]).metric_name,
        input_shape=tuple(data["input_shape"]),
        num_outputs=int(data["num_outputs"]),
        source=source,
    )


def _scores(results: dict[str, Any], trial_id: int) -> dict[str, Any]:
    row = next((t for t in results.get("trials", []) if t["trial_id"] == trial_id), {})
    selected = (results.get("selected") or {}).get("trial_id") == trial_id
    return {
        "selected": selected,
        "phase": row.get("last_phase"),
        "samples": row.get("samples"),
        "validation": {k: row.get(k) for k in ("score", "score_se", "metric")},
        "test": results["selected"].get("test") if selected else None,
    }


def _load_export(path: str, trial_id: int | None) -> TrainedModel:
    blob = read_json(os.path.join(path, EXPORT))
    if trial_id is not None and trial_id != blob["trial_id"]:
        raise ValueError(f"{path} holds trial {blob['trial_id']} only (exported from {blob['study']}), not {trial_id}")
    import_modules(blob.get("imports", []))
    config = Config.from_json(blob["config"])
    signature = Signature.of(config)
    data = blob["data"]
    _, params, model_state = nnx.split(_model_of(signature, data), nnx.Param, ...)
    target = _on_one_device({"params": params, "model_state": model_state})
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(os.path.join(path, "state"), target)
    finally:
        checkpointer.close()
    scores = {**blob["scores"], "selected": blob["selected"]}
    return _trained(signature, data, state["params"], state["model_state"], config, scores, path)


def describe(trained: TrainedModel) -> str:
    """One line: which configuration, from where, and its validation (and test) figures."""
    v, t = trained.scores["validation"], trained.scores.get("test")
    test = f", test {trained.metric_name} {t['metric']:.4f}" if t and t.get("metric") is not None else ""
    metric = "n/a" if v.get("metric") is None else f"{v['metric']:.4f}"
    role = "selected" if trained.selected else "finalist"
    return f"trial {trained.trial_id} ({role}) of {trained.source}: validation {trained.metric_name} {metric}{test}; {json.dumps(trained.config, sort_keys=True, default=str)}"
