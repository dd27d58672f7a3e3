"""Retries with exponential backoff and full jitter, for idempotent I/O."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    """Total tries, the first included; 1 means no retry."""
    base_delay_s: float = 0.5
    """Delay bound before the second try; it doubles for each further try."""
    max_delay_s: float = 20.0
    """Upper bound of any single delay."""

    def delay(self, attempt: int, rng: random.Random) -> float:
        bound = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return rng.uniform(0, bound)


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, retrying only errors ``is_transient`` accepts.

    The last error is re-raised with a note saying how many tries were made.
    """
    rng = random.Random()
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err) or attempt == policy.max_attempts:
                if attempt > 1:
                    err.add_note(f"{what}: gave up after {attempt} tries")
                raise
            wait = policy.delay(attempt, rng)
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what,
                        type(err).__name__, err, attempt, policy.max_attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")
