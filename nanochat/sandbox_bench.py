"""Cost of one sandboxed run per isolation mode, in milliseconds (docs/SECURITY.md quotes these).

    python -m nanochat.sandbox_bench [--rounds 20]

Prints one JSON line per mode: the median and 90th percentile wall time of `execute_code` on a trivial program
and on a HumanEval-style one (imports typing/math, runs a check), next to the cost of starting a bare
interpreter (`python -I -S -c pass`), the floor every mode pays twice (the child runs in two stages). Modes are
interleaved round by round, so a busy machine slows them alike; on a shared 2-core machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

from nanochat import execution

TRIVIAL = "print(1)\n"
HUMANEVAL_LIKE = """
from typing import List
import math

def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])

assert has_close_elements([1.0, 2.8, 3.0, 4.0], 0.3) and not has_close_elements([1.0, 2.0], 0.5)
assert math.isclose(sum([0.1] * 10), 1.0)
"""


def modes() -> dict[str, tuple[str, bool]]:
    """name -> (isolation, python_only); bwrap only where it works here."""
    found = {"process": ("process", False), "python-only": ("process", True)}
    if execution._bwrap_problem() is None:
        found = {"bwrap": ("bwrap", False), **found}
    return found


def bare_interpreter_ms() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    timings: dict[tuple[str, str], list[float]] = {}
    bare = []
    for _ in range(args.rounds):
        bare.append(bare_interpreter_ms())
        for name, (isolation, python_only) in modes().items():
            for program_name, program in (("trivial", TRIVIAL), ("humaneval_like", HUMANEVAL_LIKE)):
                start = time.perf_counter()
                result = execution._execute(program, 5.0, 256 * 1024 * 1024, isolation, python_only)
                timings.setdefault((name, program_name), []).append((time.perf_counter() - start) * 1000)
                if not result.success:
                    raise SystemExit(f"{name}/{program_name} failed: {result.error}")
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    for (name, program_name), values in timings.items():
        values.sort()
        line = {"figure": "sandbox_run_ms", "mode": name, "program": program_name, "rounds": args.rounds,
                "median_ms": round(statistics.median(values), 1), "p90_ms": round(values[int(0.9 * len(values))], 1),
                "bare_interpreter_ms": round(statistics.median(bare), 1), **machine}  # fmt: skip
        print(json.dumps(line))


if __name__ == "__main__":
    main()
