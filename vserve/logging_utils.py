"""Process-aware logging for every vserve process.

Every line names the process that wrote it, so that the interleaved output of the supervisor,
the API servers, the engines and the coordinator on one terminal stays readable::

    INFO 11-21 19:30:00 (ApiServer_1 pid=123) [api_server.py:42] message

Invariants:
- One handler per process, installed on the ``vserve`` logger (and on any extra logger names
  passed to :func:`init_logging`, e.g. ``uvicorn``); calling :func:`init_logging` again only
  updates the process name and level, it never adds a second handler.
- ``vserve`` loggers do not propagate to the root logger, so a library that configures the root
  logger cannot print our lines twice.
- No environment variable is read: the level comes from the caller (the CLI).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

ROOT_LOGGER = "vserve"
_FORMAT = (
    "%(levelname)s %(asctime)s (%(vserve_process)s pid=%(process)d) "
    "[%(filename)s:%(lineno)d] %(message)s"
)
_DATEFMT = "%m-%d %H:%M:%S"
# Marks our handler so that a second init_logging() call finds and reuses it.
_HANDLER_ATTR = "_vserve_handler"


class _ProcessFormatter(logging.Formatter):
    """Adds the process name given to :func:`init_logging` to every record it formats.

    A formatter (not a filter) so that records from any logger routed to our handler get the
    field, including third-party loggers such as uvicorn's.
    """

    def __init__(self, process_name: str) -> None:
        super().__init__(fmt=_FORMAT, datefmt=_DATEFMT)
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        record.vserve_process = self.process_name
        return super().format(record)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def init_logging(
    process_name: str, level: str | int = "INFO", extra_loggers: Sequence[str] = ()
) -> None:
    """Route ``vserve.*`` (and ``extra_loggers``) to stderr with this process's name and pid.

    Idempotent: a later call (e.g. after a child learns its index) renames the process and
    changes the level without duplicating output.
    """
    lvl = _level(level)
    for name in (ROOT_LOGGER, *extra_loggers):
        logger = logging.getLogger(name)
        handler = next((h for h in logger.handlers if getattr(h, _HANDLER_ATTR, False)), None)
        if handler is None:
            handler = logging.StreamHandler(sys.stderr)
            setattr(handler, _HANDLER_ATTR, True)
            logger.addHandler(handler)
        handler.setFormatter(_ProcessFormatter(process_name))
        logger.setLevel(lvl)
        logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A logger inside the ``vserve`` hierarchy.

    ``__main__`` (a module run with ``python -m``) and foreign names are placed under
    ``vserve.`` so that :func:`init_logging`'s handler sees them.
    """
    if name == ROOT_LOGGER or name.startswith(ROOT_LOGGER + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


class RateLimitedWarning:
    """A warning that may repeat without bound (a peer sending garbage): logged the first
    time, then at most once every ``interval`` seconds with how many occurred in between, so
    a misbehaving or hostile peer cannot flood the log. Thread-safe enough: a race may log
    one extra line, never lose the count for long."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self.count = 0
        self._suppressed = 0
        self._last = float("-inf")

    def __call__(self, msg: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more like it in the last {self.interval:.0f}s)"
        self._last, self._suppressed = now, 0
        self.logger.warning(msg, *args, stacklevel=2)
