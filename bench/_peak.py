"""Run a Python script and write its peak resident memory (VmHWM) to a file at exit.

`bench/scale.py` measures peak RSS per run. ``wait4``'s ``ru_maxrss`` of a child is not
it: Linux carries the pre-``exec`` high-water mark into the child's, and a child forked
from a parent that once held a model starts at the parent's peak. VmHWM belongs to the
process image after ``exec``, so a child reporting its own is exact.

    python bench/_peak.py PEAK_FILE SCRIPT [ARGS...]
"""

from __future__ import annotations

import atexit
import re
import runpy
import sys
from pathlib import Path


def _report(path: Path) -> None:
    status = Path("/proc/self/status").read_text()
    path.write_text(str(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024))


if __name__ == "__main__":
    peak_file, script, *args = sys.argv[1:]
    atexit.register(_report, Path(peak_file))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
