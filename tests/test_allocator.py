"""The `rlhfkit` command restarts itself under mimalloc (rlhfkit/allocator.py), once, unless told not to."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.allocator import SWITCH, allocator_environment, mimalloc_library

LIB = Path("/site/cmeel.prefix/lib/libmimalloc.so")


def test_the_environment_preloads_mimalloc_and_keeps_its_freed_memory():
    env = allocator_environment({"PATH": "/bin"}, LIB, platform="linux")
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(LIB), "MIMALLOC_PURGE_DELAY": "-1"}


def test_a_preload_and_a_purge_delay_of_the_users_are_kept():
    env = allocator_environment({"LD_PRELOAD": "/x/libfoo.so", "MIMALLOC_PURGE_DELAY": "100"}, LIB, platform="linux")
    assert env["LD_PRELOAD"] == f"{LIB} /x/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "100"


@pytest.mark.parametrize(
    "environ, library, platform",
    [
        ({SWITCH: "system"}, LIB, "linux"),  # asked for glibc's malloc
        ({"LD_PRELOAD": str(LIB)}, LIB, "linux"),  # restarted already: never a second time
        ({}, None, "linux"),  # cmeel-mimalloc not installed
        ({}, LIB, "darwin"),  # LD_PRELOAD is Linux's
    ],
)
def test_no_restart_when_it_is_not_wanted_or_not_possible(environ, library, platform):
    assert allocator_environment(environ, library, platform=platform) is None


def test_an_unknown_choice_names_the_variable():
    with pytest.raises(ValueError, match=f"{SWITCH}='jemalloc'.*mimalloc, system"):
        allocator_environment({SWITCH: "jemalloc"}, LIB, platform="linux")


# The real thing: a child that runs the CLI's entry function, restarts itself and says which allocator served it.
PROBE = (
    "import atexit, sys; from rlhfkit.allocator import allocator_in_use; "
    "atexit.register(lambda: print('allocator', allocator_in_use(), flush=True)); "
    "sys.argv = ['rlhfkit', 'config-doc', 'sft']; from rlhfkit.cli import main; main()"
)


@pytest.mark.skipif(not sys.platform.startswith("linux") or mimalloc_library() is None, reason="needs cmeel-mimalloc on Linux")
@pytest.mark.parametrize("choice", ["mimalloc", "system"])
def test_the_command_runs_under_the_chosen_allocator(choice):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**env, SWITCH: choice}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate" in proc.stdout  # the command itself ran, once
    assert proc.stdout.count("allocator ") == 1
    assert f"allocator {choice}" in proc.stdout
