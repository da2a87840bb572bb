"""Study presets for the paper's tasks and the offline default (used by the CLI and experiments/)."""

from __future__ import annotations

from sm2jax.space import Categorical, LogUniform, SearchSpace
from sm2jax.study import StudySpec


def digits(quick: bool = False) -> StudySpec:
    """Offline default: an MLP on scikit-learn's 8x8 digits, 6 learning rates x 3 batch sizes (3 cohorts).

    SM2 explores for a quarter epoch, then halves (eta 3) at 1, 3 and 9 epochs. About 1-2 minutes on a
    2-core CPU; the winner reaches ~0.97 validation accuracy. ``quick``: 2 x 2 configurations, rungs
    at 1 and 3 epochs (tests).
    """
    if quick:
        space = SearchSpace({"learning_rate": LogUniform(3e-3, 3e-2, num=2), "batch_size": Categorical([32, 64])})
        return StudySpec(
            space=space.to_json(),
            dataset="digits",
            explore_budget=0.25,
            min_budget=1,
            max_budget=3,
            eta=3,
            idle_seconds=0.2,
        )
    space = SearchSpace({"learning_rate": LogUniform(1e-4, 1.0, num=6), "batch_size": Categorical([16, 64, 256])})
    return StudySpec(
        space=space.to_json(),
        dataset="digits",
        explore_budget=0.25,
        min_budget=1,
        max_budget=9,
        eta=3,
        idle_seconds=2.0,
    )


def mnist1d(quick: bool = False) -> StudySpec:
    """MNIST-1D (Greydanus & Kobak 2020; generated offline by the ``mnist1d`` package): architecture
    x learning rate x batch size -- an MLP 256x256, a 1D CNN and a GRU, 4 Adam learning rates, batch
    32 and 128 (6 cohorts, 24 configurations), rungs at 1, 3, 9 epochs of 4,000 training sequences.

    The offline workload with several architectures: about 40 s on a 2-core CPU with a cold
    compilation cache (6 cohorts: compilation is ~22 s of it, training ~10 s). Measured: it selects
    the 1D CNN (batch 32, lr 6.5e-3) at 0.85 validation / 0.875 test accuracy. Published test
    accuracies for these families with longer training: MLP ~68%, CNN ~94%, GRU ~91%. ``quick``:
    2 models x 2 learning rates, batch 64, 2,000 samples, rungs at 1 and 3 epochs.
    """
    if quick:
        space = SearchSpace(
            {
                "model": Categorical([{"name": "mlp", "hidden": [64]}, {"name": "cnn1d", "channels": [16, 16]}]),
                "learning_rate": LogUniform(3e-3, 3e-2, num=2),
                "batch_size": 64,
            }
        )
        return StudySpec(
            space=space.to_json(),
            dataset="mnist1d",
            dataset_options={"num_samples": 2000},
            explore_budget=0.25,
            min_budget=1,
            max_budget=3,
            eta=3,
            idle_seconds=0.2,
        )
    models = [
        {"name": "mlp", "hidden": [256, 256]},
        {"name": "cnn1d", "channels": [32, 32, 32]},
        {"name": "gru", "hidden": 64},
    ]
    space = SearchSpace(
        {
            "model": Categorical(models),
            "learning_rate": LogUniform(3e-4, 3e-2, num=4),
            "batch_size": Categorical([32, 128]),
        }
    )
    return StudySpec(
        space=space.to_json(),
        dataset="mnist1d",
        dataset_options={"num_samples": 5000},
        explore_budget=0.25,
        min_budget=1,
        max_budget=9,
        eta=3,
    )


def cifar10_resnet18(quick: bool = False) -> StudySpec:
    """ResNet-18 (CIFAR stem) on CIFAR-10, SGD with momentum and cosine decay, random crops (4-pixel
    padding) and horizontal flips inside the jitted step: 4 learning rates x 3 batch sizes.
    Exploration 0.1 epoch, rungs at 1, 3, 9, 27 epochs. Needs `sm2jax prepare cifar10` and a GPU
    (hours on one H100-class device). ``quick``: a width-8 ResNet-18, 2 learning rates at batch 64,
    the first 2,048 training and 512 validation images, rungs at 1 and 3 epochs (minutes on a CPU)."""
    common = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "augment": "crop_flip"}
    if quick:
        space = SearchSpace(
            {
                **common,
                "model": {"name": "resnet18", "width": 8},
                "learning_rate": LogUniform(0.05, 0.2, num=2),
                "batch_size": 64,
            }
        )
        return StudySpec(
            space=space.to_json(),
            dataset="cifar10",
            max_train_examples=2048,
            max_val_examples=512,
            explore_budget=0.25,
            min_budget=1,
            max_budget=3,
            eta=3,
        )
    space = SearchSpace(
        {
            **common,
            "model": {"name": "resnet18"},
            "learning_rate": LogUniform(1e-2, 0.4, num=4),
            "batch_size": Categorical([128, 256, 512]),
        }
    )
    return StudySpec(space=space.to_json(), dataset="cifar10", explore_budget=0.1, min_budget=1, max_budget=27, eta=3)


def household_lstm(quick: bool = False) -> StudySpec:
    """An LSTM forecasting next-hour household power from 24 hours of history (UCI data set, our TFDS
    builder; `sm2jax prepare household_power`): Adam, 5 learning rates x 3 batch sizes, rungs at 1, 3,
    9 epochs. ``quick``: hidden 16, 2 learning rates at batch 64, the first 4,096 windows, rungs at 1
    and 3 epochs."""
    if quick:
        space = SearchSpace(
            {"model": {"name": "lstm", "hidden": 16}, "learning_rate": LogUniform(1e-3, 1e-2, num=2), "batch_size": 64}
        )
        return StudySpec(
            space=space.to_json(),
            dataset="household_power",
            max_train_examples=4096,
            max_val_examples=1024,
            explore_budget=0.25,
            min_budget=1,
            max_budget=3,
            eta=3,
        )
    space = SearchSpace(
        {
            "model": {"name": "lstm", "hidden": 64},
            "learning_rate": LogUniform(1e-4, 1e-1, num=5),
            "batch_size": Categorical([32, 128, 512]),
        }
    )
    return StudySpec(
        space=space.to_json(), dataset="household_power", explore_budget=0.1, min_budget=1, max_budget=9, eta=3
    )


def wikitext2_transformer(quick: bool = False) -> StudySpec:
    """A small decoder-only Transformer on byte-level WikiText-2 (our TFDS builder; `sm2jax prepare
    wikitext2`): AdamW with warm-up and cosine decay, 4 learning rates x 2 batch sizes, rungs at 1, 3,
    9 epochs. ``quick``: dim 32, depth 1, 2 learning rates at batch 32, context 64, the first 2,048
    training chunks, rungs at 1 and 3 epochs."""
    common = {
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "warmup_fraction": 0.05,
        "schedule": "cosine",
        "max_grad_norm": 1.0,
    }
    if quick:
        space = SearchSpace(
            {
                **common,
                "model": {"name": "transformer", "dim": 32, "depth": 1, "heads": 2},
                "learning_rate": LogUniform(3e-4, 3e-3, num=2),
                "batch_size": 32,
            }
        )
        return StudySpec(
            space=space.to_json(),
            dataset="wikitext2",
            dataset_options={"context": 64},
            max_train_examples=2048,
            max_val_examples=512,
            explore_budget=0.25,
            min_budget=1,
            max_budget=3,
            eta=3,
        )
    space = SearchSpace(
        {
            **common,
            "model": {"name": "transformer", "dim": 128, "depth": 4, "heads": 4},
            "learning_rate": LogUniform(1e-4, 3e-3, num=4),
            "batch_size": Categorical([32, 128]),
        }
    )
    return StudySpec(
        space=space.to_json(),
        dataset="wikitext2",
        dataset_options={"context": 128},
        explore_budget=0.05,
        min_budget=1,
        max_budget=9,
        eta=3,
    )


PRESETS = {
    "digits": digits,
    "mnist1d": mnist1d,
    "cifar10": cifar10_resnet18,
    "household_power": household_lstm,
    "wikitext2": wikitext2_transformer,
}
