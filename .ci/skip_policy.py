"""CI skip policy: fail when a pytest log shows a test skipped for a reason CI does not allow.

Usage: python .ci/skip_policy.py LOG [ALLOWED_REASON...]

Reads the short test summary of a pytest run made with ``-rs`` (or ``-ra``), which prints
one line ``SKIPPED [n] path:line: reason`` per distinct skip. Each reason must equal one of
the allowed reasons exactly: a reworded reason is a new reason, to be reviewed. The lines
must account for every skip counted on the final ``== ... N skipped ... in Xs ==`` line, so
a summary this cannot read (no ``-r s``, ``--no-fold-skipped``, a new pytest format) fails
rather than passing unchecked. Exit status: 0 policy holds, 1 it does not, 2 usage error.
Standard library only, so any Python can run it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # in case the log was written with colours forced
# "SKIPPED [3] tests/test_x.py:46: needs a CUDA device"; the location has no ": " in it,
# the reason may ("could not import 'nvidia.dali': No module named 'nvidia'").
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (.+?): (.*)$")
# "===== 300 passed, 3 skipped, 9 deselected in 95.20s (0:01:35) ====="
STATS_LINE = re.compile(r"^=+ (.*) in \d+(?:\.\d+)?s\b.*=+$")


def check(log: str, allowed: list[str]) -> list[str]:
    """The policy's violations in ``log`` (pytest's output), one message each."""
    lines = [ANSI.sub("", line).rstrip() for line in log.splitlines()]
    stats = [m.group(1) for line in lines if (m := STATS_LINE.match(line))]
    if not stats:
        return ["no pytest summary line (== ... in Xs ==) in the log"]
    counted = re.search(r"\b(\d+) skipped\b", stats[-1])
    expected = int(counted.group(1)) if counted else 0

    problems, listed = [], 0
    for line in lines:
        if m := SKIP_LINE.match(line):
            listed += int(m.group(1))
            if m.group(3) not in allowed:
                hint = (" (an installed test dependency failed to import?)"
                        if m.group(3).startswith("could not import") else "")
                problems.append(f"skip not allowed in CI: {line}{hint}")
    if listed != expected:
        problems.append(f"the summary counts {expected} skipped but lists {listed} "
                        "(run pytest with -rs and folded skips)")
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    problems = check(Path(argv[0]).read_text(errors="replace"), argv[1:])
    for problem in problems:
        print(f"ci: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
