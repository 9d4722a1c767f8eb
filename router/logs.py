"""The log lines of every ``specroute`` command and of the sidecar's child processes:
text (the default), or one JSON object a line (``specroute --log-format json ...``, or
``SPECROUTE_LOG_FORMAT=json``) for a log collector (Loki, Elasticsearch, Cloud Logging),
with ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message`` fields, and a
traceback inside its record's ``exc_info`` rather than over many lines."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

#: Read by the sidecar's child processes, which inherit it from the command.
LOG_FORMAT_ENV = "SPECROUTE_LOG_FORMAT"
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s"
JSON_NAMES = {"levelname": "level", "name": "logger"}
# Progress bars (tqdm, which reads TQDM_* variables) redraw at most this often where
# stderr is not a terminal (a log file, CI, `docker logs`): every redraw is kept there,
# about 1,400 for a default world build at tqdm's own pace.
PROGRESS_INTERVAL_OFF_TERMINAL_S = "30"


def configure_logging(level: int, log_format: LogFormat) -> None:
    """Log to stderr at ``level`` in ``log_format``; child processes started from here on
    log in the same format. Off a terminal, progress bars redraw every
    ``PROGRESS_INTERVAL_OFF_TERMINAL_S`` at most (unless ``TQDM_MININTERVAL`` says); with
    JSON logs there are none (before transformers is imported: it reads this once)."""
    os.environ[LOG_FORMAT_ENV] = log_format
    if log_format == "json":  # a progress bar's lines broke the stream of JSON objects
        os.environ.setdefault("TQDM_DISABLE", "1")  # ours
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' shards
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", PROGRESS_INTERVAL_OFF_TERMINAL_S)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])


def configure_child_logging(level: int) -> None:
    """A child process's logging, in the format its parent command logs in."""
    chosen = os.environ.get(LOG_FORMAT_ENV, "text")
    configure_logging(level, "json" if chosen == "json" else "text")


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        # "time": ISO 8601 in UTC, to the microsecond.
        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES, timestamp="time")
    return logging.Formatter(TEXT_FORMAT)
