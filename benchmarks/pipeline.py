"""Time and peak memory of each pipeline step (the demo config by default).

    python benchmarks/pipeline.py [--config configs/demo.yaml] [--output-dir runs/bench-pipeline] [--fresh]
                                  [-- any pipeline override, e.g. --ppo.max_steps 4]

Each step runs in its own subprocess (`rlhfkit pipeline --steps <step>` on the same run folder), so its
peak memory is its own: the peak resident set size of that process, read from `wait4` (the kernel's
ru_maxrss of exactly that child, not a max over all children). On a GPU the steps also log CUDA memory:
PPO's metrics.jsonl has `memory/peak_gb`. Startup (Python, torch and transformers imports, ~5-10 s on a
small CPU) is included in each step's time, as a user running the steps one by one would see it.

Finished steps are skipped by the pipeline, so benchmark a fresh run folder: the default is a new
runs/bench-pipeline-<time>; `--fresh` deletes an existing --output-dir first. Results are printed as a
table and written to <output-dir>/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_step(config: Path, output_dir: Path, step: str, overrides: list[str], log: Path) -> dict:
    cmd = [sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(config), "--output_dir", str(output_dir), "--steps", step, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        out.write(f"\n=== {' '.join(cmd)}\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    return {"step": step, "seconds": seconds, "peak_rss_gb": rss / 2**30, "cpu_seconds": usage.ru_utime + usage.ru_stime, "returncode": proc.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/bench-pipeline-<time>)")
    parser.add_argument("--fresh", action="store_true", help="delete --output-dir first")
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]

    from rlhfkit.config import PipelineConfig, load_config
    from rlhfkit.pipeline import plan_pipeline

    config = Path(args.config).resolve()
    out = Path(args.output_dir or ROOT / "runs" / time.strftime("bench-pipeline-%Y%m%d-%H%M%S")).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    cfg = load_config(PipelineConfig, config, overrides + ["--output_dir", str(out)])
    plan = plan_pipeline(cfg)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "benchmark.log"
    print(f"config {config}, run folder {out}, steps {' -> '.join(plan.steps)} (each in its own process; log: {log})", flush=True)

    results = []
    for step in plan.steps:
        r = run_step(config, out, step, overrides, log)
        results.append(r)
        print(f"  {step:<9} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_gb']:5.2f} GiB   (CPU {r['cpu_seconds']:.0f} s)", flush=True)
        if r["returncode"] != 0:
            print(f"step {step} failed (exit {r['returncode']}); see {log}", file=sys.stderr)
            break

    import torch

    summary = {
        "config": str(config),
        "output_dir": str(out),
        "overrides": overrides,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "python": platform.python_version()},
        "steps": results,
        "total_seconds": sum(r["seconds"] for r in results),
    }
    eval_json = plan.dirs["evaluate"] / "eval.json"
    if eval_json.exists():
        ev = json.loads(eval_json.read_text())
        summary["evaluation"] = {
            "sft_score": ev["policies"]["sft"]["score"],
            "rlhf_score": ev["policies"]["rlhf"]["score"],
            "win_rate": ev["win_rate"]["reward_model"]["rate"],
            "kl_from_sft": ev["policies"]["rlhf"]["kl_from_sft"],
        }
    ppo_metrics = plan.dirs["ppo"] / "metrics.jsonl"
    if ppo_metrics.exists():
        peaks = [json.loads(l).get("memory/peak_gb") for l in ppo_metrics.read_text().splitlines() if l.strip()]
        peaks = [p for p in peaks if p is not None]
        if peaks:
            summary["ppo_cuda_peak_gb"] = max(peaks)
    (out / "benchmark.json").write_text(json.dumps(summary, indent=1))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline steps: {config.name} ({os.cpu_count()} CPUs{', ' + summary['machine']['cuda'] if summary['machine']['cuda'] else ''})")
    for col in ("step", "time", "share", "peak RSS", "CPU time"):
        table.add_column(col, justify="left" if col == "step" else "right")
    total = summary["total_seconds"]

    def dur(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    for r in results:
        table.add_row(r["step"], dur(r["seconds"]), f"{r['seconds'] / total:.0%}", f"{r['peak_rss_gb']:.2f} GiB", dur(r["cpu_seconds"]))
    table.add_row("total", dur(total), "", f"{max(r['peak_rss_gb'] for r in results):.2f} GiB", dur(sum(r["cpu_seconds"] for r in results)), style="bold")
    Console().print(table)
    if "evaluation" in summary:
        e = summary["evaluation"]
        print(f"evaluation: reward-model score SFT {e['sft_score']:+.3f} -> RLHF {e['rlhf_score']:+.3f}, "
              f"win rate {e['win_rate']:.2f}, KL {e['kl_from_sft']:.2f} nats")  # fmt: skip
    if "ppo_cuda_peak_gb" in summary:
        print(f"PPO peak CUDA memory: {summary['ppo_cuda_peak_gb']:.1f} GiB")
    print(f"results: {out / 'benchmark.json'}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
