"""Peak memory per process, DDP against FSDP2, for SFT, the reward step, PPO and DPO (2 CPU processes by default).

    python benchmarks/distributed_memory.py [--model default] [--processes 2] [--steps 3] [--max-length 256]
                                            [--batch 2] [--layouts ddp,fsdp2] [--steps-to-run sft,reward,ppo,dpo]
                                            [--lora] [--output-dir runs/bench-distributed-memory] [--results FILE]

Each (step, layout) is the real command, `accelerate launch --config_file configs/accelerate/<layout>.yaml
--num_processes N -m rlhfkit.cli <step> ...`, for `--steps` optimiser steps on the bundled data. Each worker's
peak resident set (the kernel's VmHWM of that process, read every 0.1 s while it runs) is its peak memory; the
share of the model's parameters each process holds comes from the step's own log line ("process i holds X MB
of trained and Y MB of frozen parameters": a shard under FSDP2). Gradients and AdamW's two moments follow the
trained parameters, so under FSDP2 each process holds about 1/N of 4x the trained weights' bytes; activations,
the Python/torch runtime (~0.4 GB) and, at the end, the whole model gathered on process 0 for saving are not
sharded. PPO (`--steps` iterations of `--batch` prompts per process, `--max-new-tokens`, a stand-in reward model
on the same backbone with a random head, critic from it) holds the policy, critic, reference and reward model;
under FSDP2 the reward model stays whole and each rollout phase gathers the sharded networks whole. DPO computes
its reference log-probs with a whole SFT copy before sharding (as without FSDP), then trains sharded. fp32 throughout (bf16 halves the working copies but not the fp32 master weights and optimiser state).
Smoke test: `--model <tiny model folder> --steps 1 --max-length 32`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HELD = re.compile(r"process (\d+) holds ([\d.]+) MB of trained and ([\d.]+) MB of frozen parameters")
DATA = {"sft": "examples/data/sft_demos.jsonl", "reward": "examples/data/hh_pairs.jsonl", "ppo": "examples/data/prompts.jsonl",
        "dpo": "examples/data/hh_pairs.jsonl"}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set so far (Linux VmHWM; the current RSS elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def stand_in_reward_model(args, out: Path) -> Path:
    """PPO's reward model: the backbone with a random scalar head (memory does not depend on what it learned)."""
    import torch

    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import build_reward_model, save_reward_model

    folder = out / "stand-in-reward-model"
    if not (folder / "config.json").exists():
        tokenizer = load_tokenizer(args.model)
        torch.manual_seed(0)
        save_reward_model(build_reward_model(args.model, tokenizer), tokenizer, folder, {"mean": 0.0, "std": 1.0, "base_model": args.model, "lora": False})
    return folder


def step_args(step: str, args, out: Path) -> list[str]:
    common = ["--output_dir", str(out), "--max_steps", str(args.steps), "--precision", "fp32", "--checkpoint_every", "0"]
    if step == "ppo":
        prompts = args.batch * args.processes
        return common + [
            "--policy_model", args.model, "--reward_model", str(stand_in_reward_model(args, out.parent)), "--prompts", str(ROOT / DATA[step]),
            "--prompts_per_iteration", str(prompts), "--minibatch_size", str(prompts), "--batch_size", str(args.batch), "--ppo_epochs", "1",
            "--generation.max_new_tokens", str(args.max_new_tokens), "--generation.max_prompt_length", str(args.max_length),
        ]  # fmt: skip
    return common + ["--model", args.model, "--data", str(ROOT / DATA[step]), "--batch_size", str(args.batch), "--grad_accum", "1",
                     "--max_length", str(args.max_length), "--eval_every", "0", "--eval_fraction", "0.01"]  # fmt: skip


def run_one(step: str, layout: str, args, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{layout}.yaml"),
           "--num_processes", str(args.processes), "-m", "rlhfkit.cli", step, *step_args(step, args, out / f"{step}-{layout}")]  # fmt: skip
    if step == "reward":
        cmd += ["--max_eval_comparisons", "4", "--max_reference_examples", "8"]
    if step == "dpo":
        cmd += ["--max_eval_comparisons", "4"]
    if step == "sft":
        cmd += ["--max_eval_examples", "4"]
    if args.lora:
        cmd += ["--lora.enabled", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryFile("w+") as log:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks: dict[int, int] = {}
        while launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                peaks[child.pid] = max(peaks.get(child.pid, 0), peak_rss_bytes(child.pid))
            time.sleep(0.1)
        log.seek(0)
        text = log.read()
    if launcher.returncode != 0:
        raise RuntimeError(f"{step} under {layout} failed (exit {launcher.returncode}):\n{text[-3000:]}")
    held = {int(m[0]): (float(m[1]), float(m[2])) for m in HELD.findall(text)}
    workers = sorted(peaks, key=lambda pid: pid)[-args.processes :]  # the launcher's workers, in start order
    return [
        {"step": step, "layout": layout, "process": i, "peak_rss_gb": peaks[pid] / 2**30,
         "trained_params_mb": held.get(i, (float("nan"),) * 2)[0], "frozen_params_mb": held.get(i, (float("nan"),) * 2)[1]}
        for i, pid in enumerate(workers)
    ]  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [f"{'step':<7} {'layout':<6} {'process':>7} {'peak RSS GB':>12} {'trained params MB':>18} {'frozen params MB':>17}"]
    for r in rows:
        lines.append(f"{r['step']:<7} {r['layout']:<6} {r['process']:>7} {r['peak_rss_gb']:>12.2f} {r['trained_params_mb']:>18.1f} {r['frozen_params_mb']:>17.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="rows (SFT), comparisons (reward) or prompts (PPO) per process per step")
    parser.add_argument("--layouts", default="ddp,fsdp2", help="accelerate configs in configs/accelerate/")
    parser.add_argument("--steps-to-run", default="sft,reward,ppo,dpo")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="PPO: tokens sampled per response")
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--output-dir", default=None, help="run folders (default: a temporary folder, deleted)")
    parser.add_argument("--results", help="also write the rows as JSON to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="distributed-memory-") as tmp:
        out = Path(args.output_dir or tmp)
        rows = []
        for step in args.steps_to_run.split(","):
            for layout in args.layouts.split(","):
                rows += run_one(step, layout, args, out)
                print("\n".join(table(rows[-args.processes :]).splitlines()[1:]), flush=True)
    print()
    print(f"peak memory per process, {args.processes} CPU processes, model {args.model}, {args.steps} steps, fp32{', LoRA' if args.lora else ''}:")
    print(table(rows))
    for step in args.steps_to_run.split(","):
        by = {r["layout"]: r for r in rows if r["step"] == step and r["process"] == 0}
        if {"ddp", "fsdp2"} <= by.keys() and by["ddp"]["trained_params_mb"]:
            print(f"{step}: FSDP2 holds {by['fsdp2']['trained_params_mb'] / by['ddp']['trained_params_mb']:.2f} of DDP's trained parameters per process; "
                  f"peak RSS {by['fsdp2']['peak_rss_gb'] / by['ddp']['peak_rss_gb']:.2f} of DDP's")  # fmt: skip
    if args.results:
        Path(args.results).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
