"""Runs a comfy_*_check.py script with the real ComfyUI's python and returns its JSON report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_check_script(script: str, env, models: Path, checkpoint: Path, work: Path, timeout: int) -> dict:
    """Run tests/nodes/SCRIPT (a comfy_*_check.py) with the real ComfyUI's python; its JSON report.

    The script prints the report as its last JSON line; a failed run shows the end of its stderr.
    """
    proc = subprocess.run(
        [str(env.python), str(Path(__file__).with_name(script)), str(env.comfy_dir), str(REPO)]
        + [str(models), str(checkpoint), str(work)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{script} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])
