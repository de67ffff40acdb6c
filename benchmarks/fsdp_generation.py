"""Generation from a model sharded with FSDP2: the shards gathered once (`rlhfkit.distributed.gathered`, what PPO,
RLOO and GRPO do for a rollout) against FSDP's default, one all-gather of every block at every token.

    python benchmarks/fsdp_generation.py [--model default] [--processes 2] [--prompts 8] [--new-tokens 32]

Launches `--processes` CPU processes (gloo) with torchrun; each shards the model by block (`shard_frozen`), samples
`--new-tokens` tokens (no early stop, so every process runs as many forward passes) for `--prompts` prompts, both
ways, after one warm-up each, and reports the wall time and the number of all-gathers of process 0, and whether the
two ways gave the same tokens (greedy). fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import contextlib, json, sys, time
import torch, torch.distributed as dist
from accelerate import Accelerator
from rlhfkit.distributed import enable_fsdp, gathered, shard_frozen
from rlhfkit.models import load_causal_lm, load_tokenizer

model_name, prompts, new_tokens, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
acc = Accelerator(cpu=True)
enable_fsdp(acc, "fp32")
tok = load_tokenizer(model_name, padding_side="left")
model = shard_frozen(acc, load_causal_lm(model_name, tok).eval())
texts = [f"Write one sentence about the number {i}." for i in range(prompts)]
batch = tok([tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts],
            return_tensors="pt", padding=True)
settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
gathers, original = [0], dist.all_gather_single
def counting(*a, **k):
    gathers[0] += 1
    return original(*a, **k)
dist.all_gather_single = counting
rows = {}
for way in ("per token", "gathered once"):
    for repeat in range(2):  # the first is a warm-up
        gathers[0] = 0
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad(), (gathered(acc, model) if way == "gathered once" else contextlib.nullcontext()):
            ids = model.generate(**batch, **settings)
        rows[way] = {"seconds": time.perf_counter() - t0, "all_gathers": gathers[0], "tokens": ids.tolist()}
if acc.is_main_process:
    same = rows["per token"]["tokens"] == rows["gathered once"]["tokens"]
    json.dump({way: {k: v for k, v in r.items() if k != "tokens"} | {"same_tokens": same} for way, r in rows.items()}, open(out, "w"))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per process")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args()
    model = args.model  # 'default': SmolLM2-135M-Instruct, as every step reads it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    with tempfile.TemporaryDirectory(prefix="fsdp-generation-") as tmp:
        worker, out = Path(tmp) / "worker.py", Path(tmp) / "result.json"
        worker.write_text(WORKER)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes), str(worker), model,
               str(args.prompts), str(args.new_tokens), str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        rows = json.loads(out.read_text())
    print(f"\nFSDP2 generation, {args.processes} CPU processes, {model}, {args.prompts} prompts x {args.new_tokens} tokens per process, fp32")
    print(f"{'way':<15} {'seconds':>8} {'all-gathers':>12}")
    for way, r in rows.items():
        print(f"{way:<15} {r['seconds']:>8.2f} {r['all_gathers']:>12}")
    per, once = rows["per token"], rows["gathered once"]
    print(f"gathered once: {per['seconds'] / once['seconds']:.2f}x faster, {per['all_gathers'] / max(once['all_gathers'], 1):.0f}x fewer all-gathers; "
          f"same tokens: {once['same_tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
