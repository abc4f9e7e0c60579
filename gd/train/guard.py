"""The non-finite guard: decides once per optimizer step whether the update is skipped, and stops a diverged run.

Both sides of the decision live here. Before the step's last ``engine.step()`` the trainer :meth:`arm`\\ s the guard
with whether any rank saw a non-finite loss (read in the step's one host sync); :class:`GuardedAdamW` then skips the
update without looking, or checks the gradients itself. After the step, :meth:`settle` reads what happened,
counts skipped steps and raises :class:`NonFiniteError` after ``max_in_a_row`` of them in a row.
"""
from __future__ import annotations

import logging
from typing import Any

from gd.train.engine import GuardedAdamW

log = logging.getLogger("gd.train")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class NonFiniteGuard:
    """Skip bookkeeping for one run; ``skipped_total`` is checkpointed by the trainer."""

    def __init__(self, optimizer: GuardedAdamW, max_in_a_row: int, skipped_total: int = 0,
                 verbose: bool = True) -> None:
        self.optimizer = optimizer
        self.max_in_a_row = int(max_in_a_row)
        self.skipped_total = int(skipped_total)
        self.in_a_row = 0
        self.verbose = verbose

    def arm(self, non_finite_loss: bool) -> None:
        """Set before the update: skip it outright when a loss was non-finite (same value on every rank)."""
        self.optimizer.force_skip = bool(non_finite_loss)
        self.optimizer.last_skipped = False

    def settle(self, engine: Any, step: int) -> bool:
        """After the update of ``step`` (1-based): whether it was skipped; raises after too many in a row."""
        skipped = self.optimizer.last_skipped or not engine.was_step_applied()
        if not skipped:
            self.in_a_row = 0
            return False
        self.skipped_total += 1
        self.in_a_row += 1
        if self.verbose:
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive steps (up to step {step}) had a NaN/inf loss or gradient "
                f"(train.max_nonfinite={self.max_in_a_row}); stopping. The last checkpoint is intact: "
                f"lower train.lr, check the data, or raise train.max_nonfinite")
        return True
