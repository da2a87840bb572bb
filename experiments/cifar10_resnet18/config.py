"""SM2 for ResNet-18 (CIFAR stem) on CIFAR-10, as in the paper's first experiment.

Run (a GPU for the full study)::

    pip install -e '.[gpu]'
    sm2jax prepare cifar10            # once: downloads, or says where to place cifar-10-binary.tar.gz
    sm2jax run --config experiments/cifar10_resnet18/config.py --dir runs/cifar10-sm2
    sm2jax run --config experiments/cifar10_resnet18/config.py --mode sh --dir runs/cifar10-sh
    sm2jax compare runs/cifar10-sm2 runs/cifar10-sh
    sm2jax run --config experiments/cifar10_resnet18/config.py --quick   # small: minutes on a CPU
    sm2jax run --config experiments/cifar10_resnet18/config.py --set max_budget=9   # any field

Expected: hours on one H100-class GPU; ~93-95 % validation accuracy for the selected configuration
at 27 epochs; energy from ``nvml-counter``. Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import cifar10_resnet18


def get_config(quick: bool = False):
    return cifar10_resnet18(quick=quick)
