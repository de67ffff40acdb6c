"""scripts/gpu_check.sh: its dry run passes on CPU and catches what would stop the real run; the cuda-marked
tests it runs on a GPU (skipped here without one)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
gpu_check = runpy.run_path(str(REPO / "scripts" / "gpu_check.py"))  # a script, not a package module
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_dry_run_checks_every_command_and_passes_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "dry run: ok" in proc.stdout
    for name in ("cuda-tests", "sft-bench", "reward-bench", "ppo-bench", "fsdp2-sft", "zero3-sft", "pipeline"):
        assert f"\n{name} " in "\n" + proc.stdout


def test_dry_run_reports_a_rejected_argument_a_bad_override_and_a_missing_file(tmp_path):
    Check, problems = gpu_check["Check"], gpu_check["dry_run_problems"]
    py = sys.executable
    bad_arg = Check("x", [py, "benchmarks/sft_throughput.py", "--batch", "many"], 1, "")
    assert "arguments rejected" in " ".join(problems(bad_arg))
    unknown = Check("x", [py, "benchmarks/reward_throughput.py", "--no-such-flag"], 1, "")
    assert "arguments rejected" in " ".join(problems(unknown))
    assert problems(Check("x", [py, "benchmarks/sft_throughput.py", "--batch", "4"], 1, "")) == []
    bad_override = Check("x", [py, "-c", "pass"], 1, "", config=("PipelineConfig", "configs/gpu.yaml", ["--ppo.max_stepz", "3"]))
    assert "max_stepz" in " ".join(problems(bad_override))
    missing = Check("x", [py, "-c", "pass"], 1, "", accelerate_config="configs/accelerate/nothing.yaml", files=["benchmarks/nothing.py"])
    assert len(problems(missing)) == 2


@pytest.mark.cuda
@needs_cuda
def test_bf16_autocast_and_the_flash_sdpa_kernel_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot run here
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(flash.float(), math, rtol=2e-2, atol=2e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (torch.randn(8, 8, device="cuda") @ torch.randn(8, 8, device="cuda")).dtype == torch.bfloat16


@pytest.mark.cuda
@needs_cuda
def test_sft_on_cuda_in_bf16_logs_the_cuda_peak_memory(tiny_model_dir, demos_file, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.config import SFTConfig
    from rlhfkit.sft import run_sft
    from rlhfkit.training import read_metrics

    torch.cuda.reset_peak_memory_stats()
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(demos_file), output_dir=str(tmp_path / "run"), batch_size=4, max_steps=3,
                    eval_every=0, checkpoint_every=0, precision="bf16", max_length=64)  # fmt: skip
    run_sft(cfg)
    train = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["phase"] == "train"]
    peak = torch.cuda.max_memory_allocated() / 2**20
    assert 0 < train[-1]["peak_memory_mb"] <= peak + 1e-6  # CUDA memory, not the process's RSS
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
