"""Memory of SFT's data path on a large file: Python lists (load_demonstrations + split_by_prompt + encode_all)
against the arrow path (`sft.load_sft_examples`: records streamed to an arrow file, tokenised by `Dataset.map`,
memory-mapped, an Example built per micro-batch).

    python benchmarks/data_memory.py [--rows 200000] [--model default]

Writes `--rows` short demonstrations (a JSONL file in a temporary folder), then runs each path in a fresh
process: read, split by prompt, tokenise, build the data plan (grouped by length) and gather its first step.
Reported per path: seconds, and the growth of the process's resident memory over what it held once its
imports and the tokenizer were loaded (peak, and after the step, with the training set still held). The
arrow path's RSS counts the pages of the memory-mapped files it touched; the kernel can drop them at will.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "the a is to of and in that it for on with as you do at this we say or will one all would there what so up out".split()


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def child(path: str, out: str, model: str, way: str) -> None:
    import datasets  # noqa: F401 (imported before measuring, by both paths: its import alone is ~80 MB)
    from rlhfkit.config import SFTConfig
    from rlhfkit.data import load_demonstrations, split_by_prompt
    from rlhfkit.models import load_tokenizer
    from rlhfkit.sft import encode_all, item_lengths, load_sft_examples
    from rlhfkit.training import DataPlan

    tokenizer = load_tokenizer(model)
    cfg = SFTConfig(model=model, data=path, output_dir=out, eval_fraction=0.01, max_eval_examples=64, max_length=128)
    start, t0 = rss_mb(), time.perf_counter()
    if way == "lists":
        train, evaluation = split_by_prompt(load_demonstrations(path), cfg.eval_fraction, seed=cfg.seed)
        examples = encode_all(tokenizer, train, cfg)[0]
    else:
        examples = load_sft_examples(cfg, tokenizer)[0]
    plan = DataPlan(items=examples, batch_size=8, grad_accum=1, num_processes=1, process_index=0, seed=0, lengths=item_lengths(examples))
    plan.step(0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"path": way, "examples": len(examples), "seconds": round(time.perf_counter() - t0, 1),
              "peak_rss_growth_mb": round(peak - start, 1), "rss_growth_after_mb": round(rss_mb() - start, 1)}  # fmt: skip
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--model", default="default", help="whose tokenizer (a model name or folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child[:2], args.model, args.child[2])
    with tempfile.TemporaryDirectory() as tmp:
        rng, path = random.Random(0), Path(tmp) / "demos.jsonl"
        with path.open("w") as f:
            for i in range(args.rows):
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
                f.write(json.dumps({"prompt": f"{prompt} {i}", "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))}) + "\n")
        for way in ("lists", "arrow"):
            command = [sys.executable, __file__, "--model", args.model, "--child", str(path), str(Path(tmp) / way), way]
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
