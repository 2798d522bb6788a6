"""What a benchmark records about the machine it ran on, so that its numbers can be read in context."""

from __future__ import annotations

from pathlib import Path


def cpu_model(default: str) -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``default`` where that is not available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default
