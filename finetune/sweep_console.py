"""What a sweep prints: one line per trial event and a table of the trials' states.

Tune's own reporter dumps every result dict; for hundreds of runs a user wants to see
which trial started where, which finished with what test Dice, which failed and why, and
now and then where the whole sweep stands.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from finetune.sweep_config import Trial


def _key(trial: Any) -> str:
    return Trial(**trial.config["run"]["trial"]).key


def _last_error_line(trial: Any) -> str:
    """The last line of the trial's latest error (Tune writes it to the driver's local
    copy of the trial folder first, and to storage later)."""
    text = ""
    with contextlib.suppress(Exception):
        path = trial.error_file
        text = Path(path).read_text() if path else (trial.get_error() or "")
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "(no error text)"


class SweepConsole(Callback):
    """Tune callback printing trial events and, every ``table_every`` seconds and at the
    end, a table of running, finished and failed trials."""

    def __init__(self, total: int, to_run: int, table_every: float = 60.0,
                 max_failures: int = 0, stream: TextIO | None = None) -> None:
        self.total = total  # trials in the sweep
        self.to_run = to_run  # trials handed to Tune (it creates them as slots free up)
        self.table_every = table_every
        self.max_failures = max_failures
        self._stream = stream  # None: this process's stdout (Tune pickles the callback)
        self.started = self.last_table = time.monotonic()

    def setup(self, stop: Any = None, num_samples: int | None = None,
              total_num_samples: int | None = None, **info: Any) -> None:
        # also runs when a restored experiment starts again, in a new driver process
        self.started = self.last_table = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None}

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def _print(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {text}", file=self.stream, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"start    {_key(trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"retry    {_key(trial)} (failure {trial.num_failures} of at most "
                    f"{self.max_failures + 1}): {_last_error_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"FAILED   {_key(trial)}: {_last_error_line(trial)}"
                    + (f" (log: {trial.error_file})" if trial.error_file else ""))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        dice = result.get("test_dice")
        dice_text = f"test Dice {dice:.3f}" if isinstance(dice, float) else "test Dice n/a"
        done = sum(t.status == "TERMINATED" or t is trial for t in trials)
        self._print(f"done     {_key(trial)}: {dice_text}, {result.get('epoch', '?')} epochs "
                    f"({done}/{max(len(trials), self.to_run)} done)")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.table_every > 0 and time.monotonic() - self.last_table >= self.table_every:
            self.last_table = time.monotonic()
            print(self.table(trials), file=self.stream, flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        print(self.table(trials), file=self.stream, flush=True)

    def table(self, trials: list) -> str:
        """Counts per state, then one row per running or failed trial."""
        counts = Counter(t.status for t in trials)
        scheduled = max(len(trials), self.to_run)
        waiting = counts.get("PENDING", 0) + scheduled - len(trials)
        lines = [f"trials: {counts.get('RUNNING', 0)} running, {waiting} pending, "
                 f"{counts.get('TERMINATED', 0)} finished, {counts.get('ERROR', 0)} failed "
                 f"(of {scheduled} run here, {self.total} in the sweep)"]
        rows = [t for t in trials if t.status in ("RUNNING", "ERROR")]
        if rows:
            lines.append(f"  {'trial':<40} {'state':<8} {'epoch':>5} {'val Dice':>8}")
            for trial in sorted(rows, key=_key):
                result = trial.last_result or {}
                dice = result.get("val_dice")
                lines.append(f"  {_key(trial):<40} {trial.status:<8} "
                             f"{result.get('epoch', '-')!s:>5} "
                             f"{(f'{dice:.3f}' if isinstance(dice, float) else '-'):>8}")
        return "\n".join(lines)
