"""Flax NNX models for the paper's tasks, built from a JSON-able spec.

Every model is called as ``model(x, train=..., key=..., dropout=...)``: ``train`` is a Python bool
(it selects dropout and batch-norm behaviour at trace time), ``key`` is the per-trial dropout key (a
raw ``uint32[2]`` PRNG key, or ``None`` when no dropout is active) and ``dropout`` the trial's rate, a
traced scalar in training (``None``: the rate the model was built with). Models hold no ``Rngs`` after
construction, so ``nnx.split(model, nnx.Param, ...)`` yields only parameters and batch statistics,
both of which stack cleanly on a trial axis.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sm2jax.registry import Registry


def dropout(x: jax.Array, rate, key: jax.Array | None, salt: int = 0) -> jax.Array:
    r"""Inverted dropout with an explicit key and a rate that may be traced.

    Keeps each element with probability :math:`q = 1 - r` and scales it by :math:`1/q`, so the
    expectation is unchanged (Srivastava et al., 2014); the mask is
    ``jax.random.bernoulli(fold_in(key, salt), q)``, the same draw as ``nnx.Dropout``. Because
    :math:`q` may be a traced scalar (a trial's own rate inside a vmapped step), configurations that
    differ only in their dropout rate share one program; rate 0 keeps every element exactly.
    Use it in your own models' ``__call__`` with the ``key`` and ``dropout`` they are given.

    Args:
      x: activations.
      rate: the dropout rate :math:`r \in [0, 1)`, a Python float or a traced scalar.
      key: the trial's dropout key for this step (``None``: no dropout, as in evaluation).
      salt: a distinct integer per dropout site, so sites draw independent masks.
    """
    if key is None or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(jax.random.fold_in(key, salt), keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def _dropout(rate, x: jax.Array, train: bool, key: jax.Array | None, salt: int) -> jax.Array:
    """:func:`dropout` in training, the identity in evaluation."""
    return dropout(x, rate, key, salt) if train else x


class MLP(nnx.Module):
    """Flattens the input and applies ``Linear -> relu`` blocks, then a linear head."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.head = nnx.Linear(sizes[-1], out_features, dtype=dtype, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = _dropout(rate, jax.nn.relu(layer(x)), train, key, i)
        return self.head(x)


class SmallCNN(nnx.Module):
    """Two 3x3 convolutions with average pooling and a linear head (MNIST/digits-sized inputs)."""

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        height: int,
        width: int,
        channels: Sequence[int] = (16, 32),
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        c1, c2 = channels
        self.conv1 = nnx.Conv(in_channels, c1, (3, 3), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(c2 * (height // 4) * (width // 4), out_features, dtype=dtype, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        x = _dropout(rate, x.reshape(x.shape[0], -1), train, key, 0)
        return self.head(x)


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, dtype, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, dtype=dtype, rngs=rngs)
        self.project = stride != 1 or cin != cout  # 1x1 projection shortcut when shapes change
        if self.project:
            self.shortcut = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, dtype=dtype, rngs=rngs)
            self.bn_short = nnx.BatchNorm(cout, dtype=dtype, rngs=rngs)

    def __call__(self, x, train: bool):
        avg = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=avg))
        y = self.bn2(self.conv2(y), use_running_average=avg)
        if self.project:
            x = self.bn_short(self.shortcut(x), use_running_average=avg)
        return jax.nn.relu(x + y)


class ResNet18(nnx.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), He et al. 2016.

    ``width`` scales the stage widths (64, 128, 256, 512); tests use a narrow net.
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, dtype=dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, dtype=dtype, rngs=rngs)
        layers, cin = [], width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for b in range(count):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1, dtype, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(cin, out_features, dtype=dtype, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout
        x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        x = _dropout(rate, x.mean(axis=(1, 2)), train, key, 0)
        return self.head(x)


class LSTMRegressor(nnx.Module):
    """An LSTM over ``[B, T, F]`` windows; a linear head on the last hidden state predicts ``[B, out]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.cell = nnx.OptimizedLSTMCell(in_features, hidden, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(hidden, out_features, dtype=dtype, rngs=rngs)
        self.hidden = hidden
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        carry = (zeros, zeros)  # (c, h), the zero state

        def step(carry, xt):
            carry, h = self.cell(carry, xt)
            return carry, h

        # A plain scan over time: the cell's parameters are closed over, not split per step.
        _, hs = jax.lax.scan(step, carry, jnp.swapaxes(x, 0, 1))
        return self.head(_dropout(rate, hs[-1], train, key, 0))


class CNN1D(nnx.Module):
    """1D convolutions over a sequence ``[B, L, C]`` (MNIST-1D: L = 40, C = 1), as in Greydanus &
    Kobak's MNIST-1D benchmark: ``Conv(k, stride 2) -> relu`` blocks, then a linear head on the
    flattened features."""

    def __init__(
        self,
        length: int,
        in_channels: int,
        out_features: int,
        channels: Sequence[int] = (32, 32, 32),
        kernel: int = 5,
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        sizes = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (kernel,), strides=2, padding="SAME", dtype=dtype, rngs=rngs)
                for a, b in itertools.pairwise(sizes)
            ]
        )
        for _ in channels:
            length = -(-length // 2)
        self.head = nnx.Linear(length * sizes[-1], out_features, dtype=dtype, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(_dropout(rate, x.reshape(x.shape[0], -1), train, key, 0))


class GRUClassifier(nnx.Module):
    """A GRU over ``[B, T, F]`` sequences; a linear head on the last hidden state gives class logits."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.cell = nnx.GRUCell(in_features, hidden, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(hidden, out_features, dtype=dtype, rngs=rngs)
        self.hidden = hidden
        self.dropout = dropout

    def __call__(self, x, *, train: bool = False, key=None, dropout=None):
        rate = self.dropout if dropout is None else dropout

        def step(h, xt):
            h, _ = self.cell(h, xt)
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], self.hidden), x.dtype), jnp.swapaxes(x, 0, 1))
        return self.head(_dropout(rate, h, train, key, 0))


class TransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dropout: float, dtype, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        self.dropout = dropout

    def __call__(self, x, mask, train: bool, key, salt: int, rate):
        x = x + _dropout(rate, self.attn(self.ln1(x), mask=mask, deterministic=True), train, key, 2 * salt)
        return x + _dropout(rate, self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))), train, key, 2 * salt + 1)


class TransformerLM(nnx.Module):
    """A small decoder-only (pre-LN, causal) Transformer language model over token ids ``[B, T]``."""

    def __init__(
        self,
        vocab_size: int,
        context: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        dtype=jnp.float32,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, dim, dtype=dtype, rngs=rngs)
        self.pos = nnx.Embed(context, dim, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(dim, heads, dropout, dtype, rngs=rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, *, train: bool = False, key=None, dropout=None):
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(jnp.arange(t))[None]
        mask = nnx.make_causal_mask(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, train, key, i, block.dropout if dropout is None else dropout)
        return self.head(self.ln(x))


def _build_mlp(spec, shape, outputs, dropout, dtype, rngs):
    size = 1
    for d in shape:
        size *= d
    return MLP(size, outputs, tuple(spec.get("hidden", (64,))), dropout, dtype, rngs=rngs)


def _build_cnn(spec, shape, outputs, dropout, dtype, rngs):
    h, w, c = shape
    return SmallCNN(c, outputs, h, w, tuple(spec.get("channels", (16, 32))), dropout, dtype, rngs=rngs)


def _build_cnn1d(spec, shape, outputs, dropout, dtype, rngs):
    length, channels = shape
    return CNN1D(
        length,
        channels,
        outputs,
        tuple(spec.get("channels", (32, 32, 32))),
        int(spec.get("kernel", 5)),
        dropout,
        dtype,
        rngs=rngs,
    )


def _build_gru(spec, shape, outputs, dropout, dtype, rngs):
    return GRUClassifier(shape[-1], outputs, int(spec.get("hidden", 64)), dropout, dtype, rngs=rngs)


def _build_resnet18(spec, shape, outputs, dropout, dtype, rngs):
    return ResNet18(
        shape[-1],
        outputs,
        int(spec.get("width", 64)),
        tuple(spec.get("blocks", (2, 2, 2, 2))),
        dropout,
        dtype,
        rngs=rngs,
    )


def _build_lstm(spec, shape, outputs, dropout, dtype, rngs):
    return LSTMRegressor(shape[-1], outputs, int(spec.get("hidden", 64)), dropout, dtype, rngs=rngs)


def _build_transformer(spec, shape, outputs, dropout, dtype, rngs):
    return TransformerLM(
        outputs,
        shape[0],
        int(spec.get("dim", 64)),
        int(spec.get("depth", 2)),
        int(spec.get("heads", 4)),
        dropout,
        dtype,
        rngs=rngs,
    )


BUILTIN_MODELS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "cnn1d": _build_cnn1d,
    "gru": _build_gru,
    "resnet18": _build_resnet18,
    "lstm": _build_lstm,
    "transformer": _build_transformer,
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A model a space names (``{"model": {"name": name, ...}}``): its ``build`` function and the
    traced ``hyperparameters`` it takes as keyword arguments in training (:func:`register_model`)."""

    name: str
    build: Callable[..., nnx.Module]
    hyperparameters: tuple[str, ...] = ()


MODELS: Registry[Model] = Registry("model", "sm2jax.register_model")
"""Every model by name (:mod:`sm2jax.registry`): the built-in ones (each takes its dropout rate
traced), then yours."""
for _name, _build in BUILTIN_MODELS.items():
    MODELS.register(Model(_name, _build, ("dropout",)))
MODELS.seal()


def register_model(name: str, builder: Callable[..., nnx.Module], hyperparameters: Sequence[str] = ()) -> None:
    """Makes ``builder`` available as model ``name`` (``{"model": {"name": name, ...}}`` in a space).

    ``builder(spec, input_shape, num_outputs, dropout, dtype, rngs)`` returns an ``nnx.Module``:
    ``spec`` is the model's dict from the configuration (its other keys are your options),
    ``input_shape`` the shape of one example, ``num_outputs`` the data set's classes, targets or
    vocabulary, ``dropout`` a static rate (0 where the rate is traced), ``dtype`` a ``jnp.dtype`` and
    ``rngs`` the ``nnx.Rngs`` to initialise parameters from. The module is called as
    ``model(x, train=..., key=...)`` on a batch: ``key`` is the trial's dropout key for the step
    (``None`` when no configuration of the cohort drops anything), to be used instead of stateful
    ``nnx.Dropout`` RNG streams, so each trial of a vmapped cohort draws its own masks. Non-parameter
    state (e.g. batch statistics) is carried per trial.

    ``hyperparameters`` names traced hyperparameters the module takes in training as keyword
    arguments (float32 scalars: the trial's own values), e.g. ``("dropout",)`` with
    ``model(x, train=True, key=key, dropout=rate)`` applied through :func:`dropout`: then
    configurations that differ only in those share one cohort and one program. Without
    ``"dropout"`` the rate is static (each rate its own cohort), as the builder takes it. Names
    other than ``dropout`` must be declared with :func:`sm2jax.register_hyperparameter`; they are
    not passed in evaluation.

    Registering a name again replaces the earlier builder (a re-run notebook cell): the builder is
    part of the init program's key, and the model's graph (its classes and static attributes) of
    the training and evaluation programs' keys, so programs compiled for the earlier one are reused
    only where they are the same program. Built-in names cannot be replaced.
    """
    from sm2jax.vocabulary import HYPERPARAMETERS

    MODELS.refuse_builtin(name)
    if not callable(builder):
        raise TypeError(f"register_model({name!r}, ...): the builder must be callable")
    unknown = [h for h in hyperparameters if h not in HYPERPARAMETERS]
    if unknown:
        raise ValueError(
            f"register_model({name!r}, ...): unknown hyperparameters {unknown}: declare them first with sm2jax.register_hyperparameter"
        )
    MODELS.register(Model(name, builder, tuple(hyperparameters)))


def model_hyperparameters(name: str) -> tuple[str, ...]:
    """The traced hyperparameters model ``name`` takes in training (none for an unknown name)."""
    model = MODELS.get(name, None)
    return () if model is None else model.hyperparameters


def traced_dropout(name: str) -> bool:
    """Whether model ``name`` takes its dropout rate traced, in training (see :func:`register_model`)."""
    return "dropout" in model_hyperparameters(name)


def build_model(
    spec: Mapping[str, Any],
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    dropout: float = 0.0,
    dtype: str = "float32",
    key: jax.Array,
) -> nnx.Module:
    """Builds the model named by ``spec['name']`` for per-example ``input_shape``.

    Args:
      spec: ``{"name": ..., **options}``; see the ``_build_*`` functions for options, and
        :func:`register_model` for your own.
      input_shape: shape of one example (no batch axis).
      num_outputs: classes, regression targets, or vocabulary size.
      dropout: static dropout rate.
      dtype: computation dtype name.
      key: PRNG key for parameter initialisation.
    """
    builder = model_builder(spec["name"])
    return builder(spec, tuple(input_shape), num_outputs, dropout, jnp.dtype(dtype), nnx.Rngs(params=key))


def model_builder(name: str) -> Callable[..., nnx.Module]:
    """The builder registered as model ``name`` (a re-registered name is another builder)."""
    return MODELS.get(name).build
