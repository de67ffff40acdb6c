"""The GPU check: on one CUDA GPU, within about 8 minutes, everything rlhfkit has that only a GPU exercises.

    scripts/gpu_check.sh [--output-dir runs/gpu-check-<time>] [--trl-python .venv-trl/bin/python] [--dry-run]

Runs, each with its own time limit (they add up to under 8 minutes):
  cuda-tests      the tests marked `cuda` (bf16 autocast on CUDA, SDPA's flash kernel, torch.cuda.max_memory_allocated)
  sft-bench       benchmarks/sft_throughput.py at GPU sizes, with TRL's row (tokens/s, peak CUDA memory, ratios)
  reward-bench    benchmarks/reward_throughput.py likewise
  ppo-bench       benchmarks/ppo_throughput.py likewise (TRL's full layout as the reference row)
  fsdp2-sft       SFT through configs/accelerate/fsdp2.yaml on the GPU (FSDP2's bf16 / fp32-reduce policy on CUDA)
  zero3-sft       SFT through configs/accelerate/zero3.yaml (DeepSpeed ZeRO-3; skipped when deepspeed is not installed)
  pipeline        configs/gpu.yaml shortened (benchmarks/pipeline.py: time and peak memory per step)
and writes <output-dir>/gpu_check.json (every check: command, exit code, seconds, output tail, the benchmark's JSON
where it writes one) and <output-dir>/gpu_check.md (a table, then each benchmark's own table).

TRL's rows need the benchmark virtualenv (`make bench-env`, built while online, then copied along); without it the
benchmarks print rlhfkit's rows only. `--dry-run` (CPU, CI) runs nothing: it checks that every file exists, that
every benchmark accepts its arguments, that the configs load with their overrides, that accelerate reads its
configs, and that pytest collects the cuda tests.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
SFT_SMOKE = ["--max_steps", "10", "--eval_every", "0", "--checkpoint_every", "0", "--max_length", "512", "--batch_size", "8", "--grad_accum", "1"]
PIPELINE_SHORT = [
    "--sft.max_steps", "30", "--sft.eval_every", "0", "--sft.checkpoint_every", "0",
    "--reward.max_steps", "30", "--reward.eval_every", "0", "--reward.checkpoint_every", "0",
    "--judge.max_steps", "20", "--judge.eval_every", "0", "--judge.checkpoint_every", "0",
    "--ppo.max_steps", "3", "--ppo.checkpoint_every", "0",
    "--evaluate.max_prompts", "32", "--evaluate.max_comparisons", "64",
]  # fmt: skip


@dataclass
class Check:
    name: str
    argv: list[str]  # run from the repository root
    timeout_s: int
    what: str
    needs_module: str | None = None  # skipped (not failed) when this module is not installed
    config: tuple[str, str, list[str]] | None = None  # (config class, YAML, overrides) the dry run loads
    accelerate_config: str | None = None
    results_file: str | None = None  # a JSON the command writes, folded into the results
    files: list[str] = field(default_factory=list)  # must exist


def plan(out: Path, trl_python: str) -> list[Check]:
    py = sys.executable
    trl = ["--trl-python", trl_python]
    launch = [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file"]
    return [
        Check("cuda-tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"], 45,
              "tests marked cuda: bf16 autocast, SDPA flash kernel, CUDA peak memory"),
        Check("sft-bench", [py, "benchmarks/sft_throughput.py", *trl, "--batch", "16", "--length", "512", "--steps", "6", "--warmup", "2", "--precision", "bf16"], 60,
              "SFT tokens/s and peak CUDA memory, rlhfkit vs TRL SFTTrainer", files=["benchmarks/sft_throughput.py"]),
        Check("reward-bench", [py, "benchmarks/reward_throughput.py", *trl, "--batch", "16", "--length", "512", "--steps", "6", "--warmup", "2", "--precision", "bf16"], 60,
              "reward-model pairs/s and peak CUDA memory, rlhfkit vs TRL RewardTrainer", files=["benchmarks/reward_throughput.py"]),
        Check("ppo-bench", [py, "benchmarks/ppo_throughput.py", *trl, "--prompts", "64", "--response-length", "128", "--minibatch", "16", "--batch", "16",
                            "--iterations", "2", "--warmup", "1", "--layouts", "lora,full", "--trl-layouts", "full", "--results", str(out / "ppo_bench.json")], 100,
              "PPO s/iteration and peak CUDA memory, rlhfkit vs TRL PPOTrainer", files=["benchmarks/ppo_throughput.py"], results_file=str(out / "ppo_bench.json")),
        Check("fsdp2-sft", [*launch, "configs/accelerate/fsdp2.yaml", "-m", "rlhfkit.cli", "sft", "--config", "configs/sft.yaml", "--output_dir", str(out / "fsdp2-sft"), *SFT_SMOKE], 45,
              "SFT under FSDP2 on CUDA (bf16 params, fp32 reduce)", config=("SFTConfig", "configs/sft.yaml", SFT_SMOKE), accelerate_config="configs/accelerate/fsdp2.yaml"),
        Check("zero3-sft", [*launch, "configs/accelerate/zero3.yaml", "-m", "rlhfkit.cli", "sft", "--config", "configs/sft.yaml", "--output_dir", str(out / "zero3-sft"), *SFT_SMOKE], 45,
              "SFT under DeepSpeed ZeRO-3 (untested elsewhere)", needs_module="deepspeed", config=("SFTConfig", "configs/sft.yaml", SFT_SMOKE), accelerate_config="configs/accelerate/zero3.yaml"),
        Check("pipeline", [py, "benchmarks/pipeline.py", "--config", "configs/gpu.yaml", "--fresh", "--output-dir", str(out / "pipeline"), "--", *PIPELINE_SHORT], 120,
              "configs/gpu.yaml, shortened: time and peak memory per step", config=("PipelineConfig", "configs/gpu.yaml", PIPELINE_SHORT),
              files=["benchmarks/pipeline.py"], results_file=str(out / "pipeline" / "benchmark.json")),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- dry run


class _Parsed(Exception):
    pass


def arguments_parse(script: str, args: list[str]) -> str | None:
    """Run `script`'s own argument parser on `args` and stop right after it (nothing else runs); None if they parse."""
    import argparse as ap

    original, original_known, inside = ap.ArgumentParser.parse_args, ap.ArgumentParser.parse_known_args, []

    def parse_args(self, *a, **k):
        inside.append(1)
        original(self, *a, **k)  # unknown arguments are an error here
        raise _Parsed

    def parse_known_args(self, *a, **k):
        result = original_known(self, *a, **k)
        if not inside:  # the script takes unknown arguments on purpose (pipeline.py: config overrides)
            raise _Parsed
        return result

    saved = sys.argv
    ap.ArgumentParser.parse_args, ap.ArgumentParser.parse_known_args = parse_args, parse_known_args
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return f"{script} ran past its argument parser"
    except _Parsed:
        return None
    except SystemExit as e:  # argparse's error exit
        return f"{script} {shlex.join(args)}: arguments rejected (exit {e.code})"
    finally:
        ap.ArgumentParser.parse_args, ap.ArgumentParser.parse_known_args = original, original_known
        sys.argv = saved


def dry_run_problems(check: Check) -> list[str]:
    """Everything that would stop `check` before it computes anything."""
    problems = [f"{check.name}: missing file {f}" for f in check.files if not (ROOT / f).exists()]
    argv = check.argv
    if argv[1:3] == ["-m", "pytest"]:
        proc = subprocess.run([*argv, "--collect-only"], cwd=ROOT, capture_output=True, text=True, env=_env())
        if proc.returncode != 0:  # 5: no test is marked cuda
            problems.append(f"{check.name}: pytest does not collect the cuda tests: {proc.stdout[-500:]}{proc.stderr[-500:]}")
    elif argv[1].endswith(".py"):
        if (ROOT / argv[1]).exists():
            problem = arguments_parse(argv[1], argv[2:])
            if problem:
                problems.append(f"{check.name}: {problem}")
    if check.config:
        from rlhfkit import config as configs

        cls, path, overrides = check.config
        try:
            configs.load_config(getattr(configs, cls), ROOT / path, overrides)
        except Exception as e:  # noqa: BLE001 (any reason the config does not load is the finding)
            problems.append(f"{check.name}: {path} with {shlex.join(overrides)}: {e}")
    if check.accelerate_config:
        from accelerate.commands.config.config_args import load_config_from_file

        path = ROOT / check.accelerate_config
        if not path.exists():
            problems.append(f"{check.name}: missing file {check.accelerate_config}")
        else:
            try:
                load_config_from_file(str(path))
            except Exception as e:  # noqa: BLE001
                problems.append(f"{check.name}: accelerate cannot read {check.accelerate_config}: {e}")
    return problems


# ----------------------------------------------------------------------------- the run


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_check(check: Check, seconds_left: float) -> dict:
    result = {"name": check.name, "what": check.what, "command": shlex.join(check.argv)}
    if check.needs_module and subprocess.run([sys.executable, "-c", f"import {check.needs_module}"], capture_output=True).returncode:
        return {**result, "status": "skipped", "reason": f"{check.needs_module} is not installed"}
    limit = max(1, min(check.timeout_s, int(seconds_left)))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(check.argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=limit)
        status, rc, output = ("ok" if proc.returncode == 0 else "failed"), proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status, rc, output = "timeout", None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    result.update(status=status, returncode=rc, seconds=round(time.perf_counter() - t0, 1), limit_s=limit, output_tail=output[-6000:])
    if check.results_file and Path(check.results_file).exists():
        result["results"] = json.loads(Path(check.results_file).read_text())
    return result


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    return info


def table(env: dict, results: list[dict]) -> str:
    lines = [f"GPU check: {env.get('device', 'no CUDA device')} (torch {env['torch']}, CUDA {env['cuda']})", "",
             "| check | status | seconds | what |", "| --- | --- | ---: | --- |"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['name']} | {r['status']}{' (' + r['reason'] + ')' if r.get('reason') else ''} | {r.get('seconds', '')} | {r['what']} |")
    for r in results:
        if r["name"].endswith("-bench") or r["name"] == "pipeline":
            lines += ["", f"## {r['name']}", "", "```", *r.get("output_tail", "").strip().splitlines()[-25:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / time.strftime("gpu-check-%Y%m%d-%H%M%S")))
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"), help="interpreter with TRL (make bench-env)")
    parser.add_argument("--dry-run", action="store_true", help="check every path and argument; run nothing (CPU)")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    checks = plan(out, args.trl_python)

    if args.dry_run:
        problems = [p for check in checks for p in dry_run_problems(check)]
        for check in checks:
            print(f"{check.name:<13} {check.timeout_s:>4} s  {shlex.join(check.argv)}")
        print(f"limits add up to {sum(c.timeout_s for c in checks)} s of {BUDGET_S} s")
        if sum(c.timeout_s for c in checks) > BUDGET_S:
            problems.append(f"the checks' limits add up to more than {BUDGET_S} s")
        for p in problems:
            print("PROBLEM:", p, file=sys.stderr)
        print("dry run:", "ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0

    env = environment()
    if not env["cuda_available"]:
        print("no CUDA device (or a CPU build of torch): run with --dry-run on CPU", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for check in checks:
        left = BUDGET_S - (time.perf_counter() - start)
        if left < 5:
            results.append({"name": check.name, "what": check.what, "status": "skipped", "reason": "out of the 8-minute budget"})
            continue
        print(f"[{time.perf_counter() - start:5.0f} s] {check.name}: {check.what}", flush=True)
        results.append(run_check(check, left))
        print(f"        {results[-1]['status']} ({results[-1].get('seconds', 0)} s)", flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "checks": results}, indent=1))
    (out / "gpu_check.md").write_text(table(env, results))
    print(table(env, results))
    print(f"results: {out / 'gpu_check.json'}  table: {out / 'gpu_check.md'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
