"""The memory allocator under every `rlhfkit` process: mimalloc, on Linux, where it is installed.

Why: glibc's malloc keeps the freed pieces of tensors whose shapes change from batch to batch (every batch of
`group_by_length` has its own length) and rarely hands them back, so a training process's resident set grows
all through a run: the HH-RLHF reward recipe reaches 15.9 GB, still growing at its last step. mimalloc reuses
those pieces for the next batch's tensors: the same recipe levels off at 7.6 GB, a step no slower (README,
"Measured on this 2-core CPU").

How: an allocator must be in place before the first allocation, so the `rlhfkit` command restarts itself once,
at once, with mimalloc in `LD_PRELOAD` (the library comes from the `cmeel-mimalloc` wheel, a dependency on
Linux). `MIMALLOC_PURGE_DELAY=-1` keeps freed memory for reuse instead of returning it to the system after 10 ms:
returning it and faulting it back in at the next step made a step 40% slower here.
`RLHFKIT_ALLOCATOR=system` keeps the system's malloc. Python code that imports rlhfkit (a notebook, pytest)
keeps whatever allocator its interpreter started with.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Mapping

SWITCH = "RLHFKIT_ALLOCATOR"
CHOICES = ("mimalloc", "system")


def mimalloc_library() -> Path | None:
    """The shared library of the installed `cmeel-mimalloc` wheel, or None where there is none."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for file in sorted(files, key=lambda f: len(f.name)):  # libmimalloc.so before libmimalloc.so.3.4
        if file.name.startswith("libmimalloc.so"):
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    return None


def allocator_environment(environ: Mapping[str, str], library: Path | None, platform: str = sys.platform) -> dict[str, str] | None:
    """The environment to restart this process in so that mimalloc serves its memory; None: go on as it is
    (the system allocator was asked for, there is no mimalloc here, or it is preloaded already)."""
    choice = environ.get(SWITCH, "mimalloc").strip().lower() or "mimalloc"
    if choice not in CHOICES:
        raise ValueError(f"{SWITCH}={environ[SWITCH]!r}: expected one of {', '.join(CHOICES)}")
    if choice == "system" or library is None or not platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "libmimalloc" in preload:
        return None
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), "MIMALLOC_PURGE_DELAY": environ.get("MIMALLOC_PURGE_DELAY", "-1")}


def restart_under_mimalloc() -> None:
    """Replace this process by the same command with mimalloc preloaded, when `allocator_environment` says so."""
    env = allocator_environment(os.environ, mimalloc_library())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def allocator_in_use() -> str:
    """'mimalloc' when it serves this process's memory, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"
