"""Quieting the ``absl`` logger that TFDS and Orbax write through, for a known, handled condition."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_absl(level: int = logging.ERROR):
    """Raises the ``absl`` logger's threshold to ``level`` inside the block, then restores it."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
