"""Logging set-up shared by the CLI and the processes vLLM spawns (lowest layer: loader uses it too).

Our loggers (``attest``, ``loader``, ``server``, ``runtime``) get their own
handler and level instead of relying on the root logger: libraries imported by vLLM reset the
root level at import time (``model_hosting_container_standards`` sets it to ERROR), which would
silently drop our boot-stage lines.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["OUR_LOGGERS", "configure_logging"]

OUR_LOGGERS = ("attest", "loader", "server", "runtime")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(*, verbose: bool = False, only_if_unconfigured: bool = False) -> None:
    """Give our loggers a stderr handler and a level that survive changes to the root logger.

    With ``only_if_unconfigured`` (vLLM worker processes), loggers that already have handlers
    are left alone.
    """
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler | None = None
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if only_if_unconfigured and logger.handlers:
            continue
        if handler is None:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT))
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
