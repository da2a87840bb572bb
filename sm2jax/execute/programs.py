"""Compiled programs: the process-wide table, their XLA options, and what XLA says they cost.

A :class:`Program` is a module-level step function of :mod:`sm2jax.execute.steps`, its static settings (a
frozen, hashable dataclass: everything the function reads besides its arrays), the shapes and
dtypes of its arguments, and its XLA options. That tuple is exactly what ``jax.jit`` traces and
compiles, and it is the program's key in the table: a program cannot depend on anything its key
does not name, and two cohorts or studies with equal keys share one compiled program. JAX's
persistent compilation cache (:mod:`sm2jax.compile_cache`) carries them across processes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax

QUICK_COMPILE = {"xla_cpu_use_fusion_emitters": False}
"""XLA options of a quick-compiling training program on a CPU backend: XLA's CPU compiler without
its fusion emitters compiles in about half the time, and steps up to about twice as slow (figures:
``experiments/bench/compile_time.py`` and the README). Its results differ from the optimised
program's by float rounding, as another width's do."""

INIT_COMPILE = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
"""XLA options of the init program on a CPU backend. Initialisation runs once per trial, so how fast
XLA's code runs matters little; how long XLA takes to compile it is paid by every study. Its cost is
the random number generation every parameter's initializer traces (a threefry hash per draw, an
``erf_inv`` polynomial per truncated normal), which LLVM optimises for seconds at ``-O2``. The
parameters are the same bits as a plain ``build_model``: ``-O1`` keeps the floating-point
contractions that ``-O0`` drops (at ``-O0`` ``erf_inv`` differs by one ulp), and the fusion emitters
only change how loops are generated. ``tests/test_trainer.py`` asserts the equality for the
built-in models; compile times are in the README."""

_TABLE: dict[Program, tuple[Any, float]] = {}


def program_options(kind: str, quick: bool = False) -> tuple[tuple[str, Any], ...]:
    """XLA options of a ``kind`` program (``init``, ``train``, ``eval``) on this process's backend:
    :data:`QUICK_COMPILE` for a quick training build (CPU backends only), :data:`INIT_COMPILE` for
    init on a CPU backend, else none (XLA's defaults)."""
    if quick:
        if jax.default_backend() != "cpu":
            raise ValueError(
                f"quick programs are compiled on a CPU backend only (this one is {jax.default_backend()!r})"
            )
        return tuple(sorted(QUICK_COMPILE.items()))
    if kind == "init" and jax.default_backend() == "cpu":
        return tuple(sorted(INIT_COMPILE.items()))
    return ()


def signature(tree: Any) -> Any:
    """The shapes and dtypes of a tree of arrays (or ``ShapeDtypeStruct``s), hashable."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's key: ``fn(settings, *args)`` jitted, for arguments of ``signature``,
    with XLA ``options`` and the argument positions in ``donate`` donated.

    ``settings`` must hold everything ``fn`` reads besides its arguments (and nothing else), so
    that equal keys are equal programs.
    """

    fn: Callable[..., Any]
    settings: Hashable
    signature: Any
    options: tuple[tuple[str, Any], ...] = ()
    donate: tuple[int, ...] = ()

    def compile(self, *args: Any) -> Any:
        """The compiled program from the process-wide table, lowered for ``args`` and compiled on a
        miss (with the table recording how long compilation took)."""
        if self not in _TABLE:
            t0 = time.perf_counter()
            lowered = self.lower(*args)
            compiled = lowered.compile(compiler_options=dict(self.options)) if self.options else lowered.compile()
            _TABLE[self] = (compiled, time.perf_counter() - t0)
        return _TABLE[self][0]

    def lower(self, *args: Any) -> Any:
        """The program traced and lowered for ``args`` (not compiled, not in the table)."""
        return jax.jit(functools.partial(self.fn, self.settings), donate_argnums=self.donate).lower(*args)

    @property
    def is_compiled(self) -> bool:
        return self in _TABLE

    @property
    def compile_seconds(self) -> float | None:
        """Seconds its compilation took (or loading it from the persistent cache); ``None`` before."""
        entry = _TABLE.get(self)
        return None if entry is None else entry[1]


def is_oom(err: Exception) -> bool:
    """Whether ``err`` says a device ran out of memory."""
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def compiled_memory_bytes(compiled) -> int | None:
    """Bytes a compiled program needs (arguments + outputs + temporaries), if XLA reports them."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def program_bytes(compile_program: Callable[[], Any]) -> float | None:
    """Bytes a program needs, compiling it: XLA's memory analysis, ``inf`` when compiling runs out
    of memory, ``None`` when the backend reports nothing."""
    try:
        return compiled_memory_bytes(compile_program())
    except Exception as err:
        if not is_oom(err):
            raise
        return math.inf


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis, if reported."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def memory_limit_bytes(device: jax.Device | None = None) -> int | None:
    """Bytes the device can hold: the allocator's limit on accelerators, physical RAM on CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
