"""Bounded retries with exponential backoff for remote services (MLflow server, S3).

A flaky network should cost a few seconds, an unreachable endpoint a clear error naming the
service and the last failure, never an endless hang nor a lost checkpoint (callers retry only
the remote call; local artifacts are written before it).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from qbert.config import Config

T = TypeVar("T")
log = logging.getLogger(__name__)


class RetryConfig(Config):
    """Retry budget for one remote call: ``attempts`` tries, delays ``base_delay * 2**k`` capped."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0


class RemoteUnavailableError(RuntimeError):
    """A remote service stayed unreachable after the whole retry budget."""


def backoff_delays(cfg: RetryConfig) -> list[float]:
    """The sleeps between attempts (one fewer than ``attempts``)."""
    return [min(cfg.max_delay, cfg.base_delay * (2**k)) for k in range(max(cfg.attempts - 1, 0))]


_TRANSIENT_TEXT = ("connection", "timed out", "timeout", "max retries exceeded", "temporarily unavailable",
                   "service unavailable", "bad gateway", "too many requests", "endpoint url", "reset by peer",
                   "broken pipe", "name or service not known", "database is locked", "502", "503", "504", "429")


def is_transient(e: BaseException) -> bool:
    """Network-shaped failures are worth retrying; a bad request (wrong name, bad value) is not."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                "RequestException", "ConnectionError", "Timeout"}:
        return True
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return True
    text = str(e).lower()
    return any(t in text for t in _TRANSIENT_TEXT)


def with_retries(fn: Callable[[], T], what: str, cfg: RetryConfig | None = None,
                 retry_if: Callable[[BaseException], bool] = is_transient,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` until it succeeds or the budget is spent, then raise :class:`RemoteUnavailableError`.

    Only errors for which ``retry_if`` holds are retried; others propagate at once unchanged.
    """
    cfg = cfg or RetryConfig()
    if cfg.attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {cfg.attempts}")
    delays = backoff_delays(cfg)
    last: BaseException | None = None
    for attempt in range(cfg.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: PERF203 - the loop is the retry
            if not retry_if(e):
                raise
            last = e
            if attempt < len(delays):
                log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt + 1, cfg.attempts,
                            _short(e), delays[attempt])
                sleep(delays[attempt])
    raise RemoteUnavailableError(
        f"{what} failed after {cfg.attempts} attempts (backoff {sum(delays):.1f}s in total): {_short(last)}"
    ) from last


def _short(e: BaseException | None) -> str:
    text = f"{type(e).__name__}: {e}" if e is not None else "unknown error"
    return text if len(text) <= 500 else text[:497] + "..."
