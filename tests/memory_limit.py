"""Run a snippet in a child process with a capped address space, so a test of a memory bomb that regresses fails
with an allocation error instead of taking the machine down."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADROOM_GIB = 2.0  # beyond what the imports map (torch's libraries alone map ~3 GiB of address space)

_PRELUDE = """\
import resource, sys
import torch, gd.models, gd.sample
torch.set_num_threads(1)
with open("/proc/self/status") as fh:
    mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + int({headroom} * 2**30), resource.RLIM_INFINITY))
"""


def run_capped(code: str, *args: str, headroom_gib: float = HEADROOM_GIB,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c <imports, cap, code> args...`` from the repository root; the address space is capped at what the
    imports mapped plus ``headroom_gib`` before ``code`` runs. Returns the finished process (text output)."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _PRELUDE.format(headroom=headroom_gib) + code, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
