"""SFT throughput: rlhfkit vs TRL's SFTTrainer, same model, data, batch, length and precision.

    python benchmarks/sft_throughput.py [--trl-python .venv-trl/bin/python] [--steps 6] [--batch 8] [--length 256]

Every example is exactly `--length` tokens (a bundled prompt plus a response cut or repeated
to fill the rest), so tokens/s is exact and identical for both engines. Each engine runs in a
fresh subprocess (so peak memory is its own), takes `--warmup` steps, then `--steps` timed
steps. Peak memory: max RSS of the process on CPU, max allocated CUDA memory on GPU, read at the
end of the last training step (so neither engine's final checkpoint/model save counts).
Gradient checkpointing is set the same for both (`--gradient-checkpointing`, default on as in TRL).
TRL is installed only for this benchmark, in its own virtualenv (`make bench-env`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fixed_length_examples(tokenizer, n: int, length: int) -> list[tuple[list[int], int]]:
    """(token ids of exactly `length`, prompt length) from the bundled demonstrations."""
    from rlhfkit.data import load_demonstrations
    from rlhfkit.tokens import encode_prompt, encode_response

    out = []
    for demo in load_demonstrations(str(ROOT / "examples/data/sft_demos.jsonl")):
        prompt = encode_prompt(tokenizer, demo.messages)[-length // 2 :]
        response = encode_response(tokenizer, demo.response, add_eos=False)
        while len(prompt) + len(response) < length:
            response = response + response
        out.append((prompt + response[: length - len(prompt)], len(prompt)))
        if len(out) == n:
            break
    return out


def run_rlhfkit(args) -> dict:
    """The real `run_sft` loop; step times from its metrics.jsonl timestamps."""
    import torch

    from rlhfkit import sft as sft_module
    from rlhfkit.config import SFTConfig
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tokens import IGNORE_INDEX, Example
    from rlhfkit.training import read_metrics

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    examples = fixed_length_examples(tokenizer, args.batch * (args.steps + args.warmup), args.length)
    fixed = [Example(ids, [IGNORE_INDEX] * p + ids[p:], p, False) for ids, p in examples]
    workdir = tempfile.TemporaryDirectory(prefix="sft-bench-")  # removed when this process ends
    out = Path(workdir.name) / "run"
    cfg = SFTConfig(
        model=args.model, output_dir=str(out), batch_size=args.batch, grad_accum=1, max_steps=args.steps + args.warmup,
        precision=args.precision, max_length=args.length, eval_every=0, checkpoint_every=0, log_every=1,
        learning_rate=1e-5, warmup_ratio=0.0, gradient_checkpointing=args.gradient_checkpointing == "on",
    )  # fmt: skip
    sft_module.train_sft(cfg, tokenizer, fixed, fixed[:1])  # the real training loop on the fixed examples
    train = [m for m in read_metrics(out / "metrics.jsonl") if m["phase"] == "train"]
    seconds = train[-1]["time"] - train[args.warmup - 1]["time"]
    # Peak memory at the end of the last training step (before the final save), as for TRL.
    return {"tokens_per_s": args.batch * args.length * args.steps / seconds, "seconds_per_step": seconds / args.steps, "peak_mb": train[-1]["peak_memory_mb"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(args.threads)
    from rlhfkit.models import ensure_pad_token
    from rlhfkit.training import peak_memory_mb

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ensure_pad_token(tokenizer)
    examples = fixed_length_examples(tokenizer, args.batch * (args.steps + args.warmup), args.length)
    # Pre-tokenised prompt/completion, so TRL trains on exactly the same tokens (completion-only loss).
    data = Dataset.from_list([{"input_ids": ids, "completion_mask": [0] * p + [1] * (len(ids) - p)} for ids, p in examples])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    stamps, peaks = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())
            peaks.append(peak_memory_mb())

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sft-bench-"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps + args.warmup, learning_rate=1e-5, lr_scheduler_type="constant",
        bf16=args.precision == "bf16", max_length=args.length, completion_only_loss=True, packing=False, report_to=[],
        save_strategy="no", logging_steps=1000, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
        dataset_num_proc=None, gradient_checkpointing=args.gradient_checkpointing == "on",
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return {"tokens_per_s": args.batch * args.length * args.steps / seconds, "seconds_per_step": seconds / args.steps, "peak_mb": peaks[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["rlhfkit", "trl"], help="(internal) run one engine and print JSON")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"), help="interpreter with trl==1.12 installed")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="for both engines (TRL's SFTConfig defaults to on)")
    args = parser.parse_args()

    if args.engine == "rlhfkit":
        from rlhfkit.allocator import restart_under_mimalloc

        restart_under_mimalloc()  # as the `rlhfkit` command runs (RLHFKIT_ALLOCATOR=system: glibc's malloc)
    if args.engine:
        from rlhfkit.models import resolve_model

        args.model = resolve_model(args.model)
        result = run_rlhfkit(args) if args.engine == "rlhfkit" else run_trl(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    common = ["--model", args.model, "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--precision", args.precision, "--threads", str(args.threads),
              "--gradient-checkpointing", args.gradient_checkpointing]  # fmt: skip
    rows = {}
    engines = [("rlhfkit", sys.executable)]
    if Path(args.trl_python).exists():
        engines.append(("trl", args.trl_python))
    else:
        print(f"TRL row skipped: {args.trl_python} not found (build it with `make bench-env`)")
    for name, python in engines:
        proc = subprocess.run([python, __file__, "--engine", name, *common], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"})  # fmt: skip
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name} failed:\n{proc.stderr[-3000:]}")
            continue
        rows[name] = json.loads(line[0][len("RESULT "):])

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nSFT throughput - model {args.model}, batch {args.batch} x {args.length} tokens, {args.precision}, {device}, "
          f"gradient checkpointing {args.gradient_checkpointing}, {args.steps} timed steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'engine':<10} {'tokens/s':>10} {'s/step':>8} {'peak MB':>9}")
    for name, r in rows.items():
        print(f"{name:<10} {r['tokens_per_s']:>10.1f} {r['seconds_per_step']:>8.2f} {r['peak_mb']:>9.0f}")
    if len(rows) == 2:
        ours, peer = rows["rlhfkit"], rows["trl"]
        print(f"{'ratio':<10} {ours['tokens_per_s'] / peer['tokens_per_s']:>9.2f}x {'':>8} {ours['peak_mb'] / peer['peak_mb']:>8.2f}x"
              "   (speed: rlhfkit/TRL, higher is better; memory: rlhfkit/TRL, lower is better)")  # fmt: skip


if __name__ == "__main__":
    main()
