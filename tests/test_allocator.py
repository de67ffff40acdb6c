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


def _resident_kib_of_file(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) and /proc are Linux's")
def test_replaced_weights_hand_the_files_pages_back_and_keep_their_values(tmp_path):
    """models.replace_data: a parameter that read a mapped file gets new memory, and the file's pages it read leave
    this process's resident set at once (they would stay while any view of the file is left); nothing is lost."""
    import torch

    from rlhfkit.models import replace_data

    path = tmp_path / "weights.bin"
    values = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MiB
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=values.numel(), dtype=torch.float32)
    weight = torch.nn.Parameter(mapped, requires_grad=False)
    assert torch.equal(weight, values) and _resident_kib_of_file(path) > 15 * 1024  # read: resident
    replace_data(weight, weight.data.to(torch.bfloat16))
    assert _resident_kib_of_file(path) < 1024, _resident_kib_of_file(path)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight.float(), values.bfloat16().float())
    assert torch.equal(mapped, values)  # the old view still reads the file


def test_frozen_matrices_in_bf16_leave_no_weight_on_the_checkpoint_file(tiny_model_dir):
    """After store_frozen_linear_weights_as every parameter has memory of its own (none is a view of the
    safetensors file transformers mapped), with the values it had."""
    import torch

    from rlhfkit.models import _file_mappings, _inside, load_causal_lm, load_tokenizer, store_frozen_linear_weights_as

    model = load_causal_lm(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), train_top_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(_inside(p, _file_mappings()) for p in model.parameters())  # loaded as views of the file
    assert store_frozen_linear_weights_as(model, torch.bfloat16) > 0
    assert not any(_inside(p, _file_mappings()) for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), before[k].to(v.dtype).float()), k
