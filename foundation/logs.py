"""Logging set-up shared by the CLI and the processes vLLM spawns (lowest layer: loader uses it too).

Our loggers (``attest``, ``loader``, ``server``, ``runtime``) get their own
handler and level instead of relying on the root logger: libraries imported by vLLM reset the
root level at import time (``model_hosting_container_standards`` sets it to ERROR), which would
silently drop our boot-stage lines.

With ``json_lines`` every line is one JSON object: ``{"ts", "level", "logger", "message",
"stage"}`` (``stage``: the boot stage at the time, from :func:`set_stage_provider`), plus
``exc_type`` for a logged exception — never its traceback text or arguments, which could carry
data. What is logged is the same operator-facing text as in text mode: no secrets, no prompts.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

__all__ = ["OUR_LOGGERS", "JsonFormatter", "configure_logging", "set_stage_provider"]

OUR_LOGGERS = ("attest", "loader", "server", "runtime")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _no_stage() -> str | None:
    return None


_stage_provider: Callable[[], str | None] = _no_stage


def set_stage_provider(provider: Callable[[], str | None]) -> None:
    """Name what JSON lines report as ``stage`` (the runtime passes its boot status)."""
    global _stage_provider
    _stage_provider = provider


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "stage": _stage_provider(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            body["exc_type"] = record.exc_info[0].__name__
        return json.dumps(body, ensure_ascii=False)


def configure_logging(
    *, verbose: bool = False, only_if_unconfigured: bool = False, json_lines: bool = False
) -> None:
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
            handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_FORMAT))
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
