"""JAX's persistent compilation cache, on by default, and a tally of what compilation cost.

A study compiles a handful of XLA programs (init, train and eval per cohort signature). On a small
model they cost more than the training itself, and they are the same every time the study is re-run
or resumed. JAX's persistent cache stores compiled executables on disk keyed by the program, the
compiler options and the backend, so a re-run or resumed study loads them instead of compiling.

Location (one setting moves or disables it):

* ``SM2JAX_COMPILE_CACHE=/some/dir``: use that directory;
* ``SM2JAX_COMPILE_CACHE=off`` (or ``0``, ``false``, ``none``): leave JAX's cache alone;
* otherwise ``$XDG_CACHE_HOME/sm2jax/xla`` (default ``~/.cache/sm2jax/xla``).

A cache directory already configured through JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update("jax_compilation_cache_dir", ...)``) is respected and never overridden. JAX's
thresholds are lowered so that small programs are cached too (by default it skips programs that
compile in under a second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax

ENV = "SM2JAX_COMPILE_CACHE"
_OFF = {"off", "0", "false", "none", "no", ""}

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"
CACHE_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sm2jax", "xla")


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns the directory in use (``None``: off).

    Args:
      path: directory to use; default from ``SM2JAX_COMPILE_CACHE`` or :func:`default_cache_dir`.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:  # the user configured JAX directly: theirs wins
        return current
    if path is None:
        setting = os.environ.get(ENV)
        if setting is not None and setting.strip().lower() in _OFF:
            return None
        path = setting or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    _check_cache_dir(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def _check_cache_dir(path: str) -> None:
    """Creates the cache directory, or raises one line naming the compile cache and the fix (a path
    that is a file, or a folder that cannot be created or written)."""
    fix = f"point {ENV} (or --compile-cache) at a writable directory, or set it to off"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"the XLA compile cache {path} is a file, not a directory: {fix}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"the XLA compile cache {path} cannot be created ({err.strerror or err}): {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the XLA compile cache {path} is not writable: {fix}")


@dataclasses.dataclass
class CompileTally:
    """XLA compilations and persistent-cache hits observed through JAX's monitoring events.

    JAX records its backend-compile event around ``compile_or_get_cached``, so a program loaded
    from the persistent cache fires it too, together with a cache-hit event: real compilations are
    the requests that were not hits.
    """

    requests: int = 0  # programs JAX handed to the backend (compiled or loaded from the cache)
    request_seconds: float = 0.0
    cache_hits: int = 0
    cache_saved_seconds: float = 0.0  # compile time the cache hits saved (JAX's own estimate)
    programs: dict[str, int] = dataclasses.field(default_factory=dict)  # requests per function name

    @property
    def backend_compiles(self) -> int:
        """Real XLA backend compilations (cache hits excluded)."""
        return self.requests - self.cache_hits

    def _duration(self, event: str, seconds: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE:
            self.requests += 1
            self.request_seconds += seconds
            name = str(kwargs.get("fun_name", "?"))
            self.programs[name] = self.programs.get(name, 0) + 1
        elif event == CACHE_SAVED:
            self.cache_saved_seconds += max(seconds, 0.0)

    def _event(self, event: str, **_: Any) -> None:
        if event == CACHE_HIT:
            self.cache_hits += 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "backend_compiles": self.backend_compiles}


@contextlib.contextmanager
def count_compiles():
    """``with count_compiles() as tally: ...`` counts real XLA backend compiles and cache hits."""
    tally = CompileTally()
    jax.monitoring.register_event_duration_secs_listener(tally._duration)
    jax.monitoring.register_event_listener(tally._event)
    try:
        yield tally
    finally:
        jax.monitoring.unregister_event_duration_listener(tally._duration)
        jax.monitoring.unregister_event_listener(tally._event)
