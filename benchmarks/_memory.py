"""Shared by the benchmarks: the memory of this process and every process it started (Ray workers)."""

from __future__ import annotations

import os


def process_tree() -> dict[int, tuple[str, int]]:
    """``{pid: (command line, PSS bytes)}`` of this process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = {}, [os.getpid()]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline") as fh:
                name = fh.read().replace("\0", " ").strip()
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                pss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
        out[pid] = (name, pss)
    return out


def tree_pss() -> int:
    """Summed PSS (bytes) of the process tree: memory shared between workers counted once."""
    return sum(p for _, p in process_tree().values())
