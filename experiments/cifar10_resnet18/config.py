"""SM2 for ResNet-18 (CIFAR stem) on CIFAR-10, as in the paper's first experiment.

Run (needs the TFDS download of cifar10 and a GPU)::

    pip install -e '.[gpu]'
    sm2jax run --preset cifar10 --dir runs/cifar10-sm2
    sm2jax run --preset cifar10 --mode sh --dir runs/cifar10-sh   # baseline on identical work

Expected: hours on one H100-class GPU; ~93-95 % validation accuracy for the selected configuration
at 27 epochs; energy from ``nvml-counter``. Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import cifar10_resnet18


def get_config():
    return cifar10_resnet18()
