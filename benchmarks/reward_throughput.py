"""Reward-model training throughput: rlhfkit vs TRL's RewardTrainer, same model, data, batch,
length and precision.

    python benchmarks/reward_throughput.py [--trl-python .venv-trl/bin/python] [--steps 6] [--batch 8] [--length 256]
    python benchmarks/reward_throughput.py --recipes     # today's HH recipe against the new one, each engine

`--train-top-layers N` trains only the top N blocks and the head (both engines freeze the same lower
blocks), `--epochs E` passes E times over the pairs, `--cache-frozen-features` (rlhfkit only; TRL has
nothing like it) runs the frozen blocks once per row instead of once per epoch, and `--share-prompt`
(rlhfkit only) packs each pair into one row that holds the prompt once. `--recipes` runs three settings
for each engine: the HH recipe as it was (top 12 blocks, 1 epoch), the same with a shared prompt (what
`configs/reward_hh.yaml` runs now; TRL's row is its plain one again) and the demo's (top 2 blocks, 3 epochs,
rlhfkit with the cache and a shared prompt), gradient checkpointing off as in those configs.
"s / 1k pairs" is the time the setting takes for 1,000 pairs of data, all its epochs included.

The data are bundled HH-RLHF pairs whose chosen and rejected rows are both longer than
`--length` tokens, so after truncation (the rlhfkit rule) every row is exactly `--length` tokens:
one pair is two rows, pairs/s and tokens/s are exact and identical for both engines. The parent
process tokenises once and hands the same token ids to both: rlhfkit trains on the JSONL through
its real `run_reward` path (which re-tokenises to the same ids), TRL gets them pre-tokenised
(`chosen_ids` / `rejected_ids`). With a shared prompt the rows are cut by rlhfkit's shared rule (the
prompt the longer response leaves, for both): the same pairs, fewer tokens. Each engine runs in a fresh subprocess (so peak memory is its
own), takes `--warmup` steps, then `--steps` timed steps. Peak memory: max RSS of the process on
CPU, max allocated CUDA memory on GPU. TRL is installed only for this benchmark, in its own
virtualenv (`make bench-env`); without it only the rlhfkit row is printed. Gradient checkpointing is set
the same for both (`--gradient-checkpointing`, default on as in TRL's RewardConfig).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples/data/hh_pairs.jsonl"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocator_in_use() -> str:
    """Which malloc serves this engine (rlhfkit.allocator's test, inlined: TRL's side imports nothing of rlhfkit)."""
    return "mimalloc" if "libmimalloc" in Path("/proc/self/maps").read_text() else "system"


def prepare(args, workdir: Path) -> dict:
    """Pick the pairs, write them as JSONL (for rlhfkit) and as token ids (for TRL), save the tokenizer."""
    from rlhfkit.data import comparison_to_json, load_comparisons
    from rlhfkit.models import load_tokenizer, resolve_model
    from rlhfkit.reward import encode_pair_text

    tokenizer = load_tokenizer(args.model)
    need = args.batch * (args.steps + args.warmup)  # the pairs of one epoch
    picked, ids = [], []
    for c in load_comparisons(str(DATA)):
        rows = [encode_pair_text(tokenizer, c.messages, r, args.length + 1, 0.5) for r in c.responses]
        if all(len(r) > args.length for r in rows):  # both sides will be cut to exactly --length
            picked.append(c)
            ids.append([encode_pair_text(tokenizer, c.messages, r, args.length, 0.5) for r in c.responses])
        if len(picked) == need:
            break
    if len(picked) < need:
        raise SystemExit(f"only {len(picked)} bundled pairs are longer than {args.length} tokens; need {need}")
    assert all(len(r) == args.length for pair in ids for r in pair)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(comparison_to_json(c, pairs_form=True)) + "\n" for c in picked))
    (workdir / "eval.jsonl").write_text(json.dumps(comparison_to_json(picked[0], pairs_form=True)) + "\n")
    (workdir / "ids.json").write_text(json.dumps(ids))
    tokenizer.save_pretrained(workdir / "tokenizer")
    return {"model_path": resolve_model(args.model)}


def run_rlhfkit(args) -> dict:
    """The real `run_reward` loop (full fine-tuning); step times from its metrics.jsonl timestamps."""
    import torch

    from rlhfkit.config import RewardConfig
    from rlhfkit.reward import run_reward
    from rlhfkit.training import read_metrics

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    out = Path(tempfile.mkdtemp(dir=work)) / "run"
    cfg = RewardConfig(
        model=args.model, output_dir=str(out), data=str(work / "pairs.jsonl"), eval_data=str(work / "eval.jsonl"),
        batch_size=args.batch, grad_accum=1, epochs=args.epochs, precision=args.precision,
        max_length=args.length, max_prompt_share=0.5, eval_every=0, checkpoint_every=0, log_every=1,
        learning_rate=1e-5, warmup_ratio=0.0, max_reference_examples=1, seed=0,
        gradient_checkpointing=args.gradient_checkpointing == "on", train_top_layers=args.train_top_layers,
        cache_frozen_features=args.cache_frozen_features, share_prompt=args.share_prompt,
    )  # fmt: skip
    run_reward(cfg)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if m["phase"] == "train"]
    seconds = steps[-1]["time"] - steps[args.warmup - 1]["time"]
    return result(args, seconds, tokens=sum(m["tokens"] for m in steps[args.warmup :]))  # a shared prompt: fewer


def run_trl(args) -> dict:
    """TRL's RewardTrainer on the same token ids (imports nothing from rlhfkit)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    ids = json.loads((work / "ids.json").read_text())
    data = Dataset.from_list([{"chosen_ids": c, "rejected_ids": r} for c, r in ids])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=1, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.train_top_layers:  # the same trained set as rlhfkit's train_top_layers: top blocks, final norm, head
        model.requires_grad_(False)
        for module in [*model.model.layers[-args.train_top_layers :], model.model.norm, model.score]:
            module.requires_grad_(True)
    stamps = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    config = RewardConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_train_epochs=args.epochs, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        bf16=args.precision == "bf16", max_length=args.length, report_to=[], save_strategy="no", logging_steps=1000,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0, remove_unused_columns=False,
        gradient_checkpointing=args.gradient_checkpointing == "on",  # TRL's RewardConfig default is on
    )  # fmt: skip
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return result(args, seconds)


def timed_steps(args) -> int:
    """Every step of every epoch but the first `warmup`."""
    return args.epochs * (args.steps + args.warmup) - args.warmup


def result(args, seconds: float, tokens: float | None = None) -> dict:
    pairs = args.batch * timed_steps(args)
    return {
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": (pairs * 2 * args.length if tokens is None else tokens) / seconds,
        "seconds_per_step": seconds / timed_steps(args),
        "seconds_per_1k_pairs": 1000 * args.epochs * seconds / pairs,
        "peak_mb": peak_memory_mb(),
        "allocator": allocator_in_use(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["rlhfkit", "trl"], help="(internal) run one engine and print JSON")
    parser.add_argument("--workdir", help="(internal) folder with the prepared data")
    parser.add_argument("--model-path", help="(internal) resolved model folder")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"), help="interpreter with trl==1.12 installed")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimiser step")
    parser.add_argument("--length", type=int, default=256, help="tokens per row (prompt + response)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                        help="set equally for both engines (TRL's RewardConfig turns it on by default)")
    parser.add_argument("--train-top-layers", type=int, default=0, help="train only the top N blocks and the head (0: all)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    parser.add_argument("--cache-frozen-features", action="store_true", help="rlhfkit: run the frozen blocks once per row")
    parser.add_argument("--share-prompt", action="store_true", help="rlhfkit: one packed row per pair, the prompt once")
    parser.add_argument("--recipes", action="store_true", help="the HH recipe as it was, with a shared prompt, and the demo's, for each engine")
    args = parser.parse_args()

    if args.engine == "rlhfkit":
        from rlhfkit.allocator import restart_under_mimalloc

        restart_under_mimalloc()  # as the `rlhfkit` command runs (RLHFKIT_ALLOCATOR=system: glibc's malloc)
    if args.engine:
        out = run_rlhfkit(args) if args.engine == "rlhfkit" else run_trl(args)
        print("RESULT " + json.dumps(out), flush=True)
        return

    workdir = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    prepared = prepare(args, workdir)
    common = ["--workdir", str(workdir), "--model", args.model, "--model-path", prepared["model_path"], "--batch", str(args.batch),
              "--length", str(args.length), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--precision", args.precision, "--threads", str(args.threads)]  # fmt: skip
    if args.recipes:
        settings = {
            "today": ["--train-top-layers", "12", "--epochs", "1", "--gradient-checkpointing", "off"],
            "shared": ["--train-top-layers", "12", "--epochs", "1", "--gradient-checkpointing", "off", "--share-prompt"],
            "new": ["--train-top-layers", "2", "--epochs", "3", "--cache-frozen-features", "--share-prompt", "--gradient-checkpointing", "off"],
        }
    else:
        settings = {"": ["--train-top-layers", str(args.train_top_layers), "--epochs", str(args.epochs),
                         "--gradient-checkpointing", args.gradient_checkpointing]
                        + (["--cache-frozen-features"] if args.cache_frozen_features else [])
                        + (["--share-prompt"] if args.share_prompt else [])}  # fmt: skip
    engines = [("rlhfkit", sys.executable)]
    why_no_trl = None
    if not Path(args.trl_python).exists():
        why_no_trl = f"{args.trl_python} not found (build it with `make bench-env`)"
    else:
        check = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
        if check.returncode:
            why_no_trl = f"trl is not importable by {args.trl_python}: {check.stderr.strip().splitlines()[-1] if check.stderr.strip() else '?'}"
        else:
            engines.append(("trl", args.trl_python))
    rows = {}
    for setting, flags in settings.items():
        for name, python in engines:
            if name == "trl" and "--share-prompt" in flags and setting != "new":
                continue  # TRL has no shared prompt: its row is the plain setting's
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run([python, __file__, "--engine", name, *common, *flags], capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{name} {setting} failed:\n{proc.stderr[-3000:]}")
                continue
            rows[(name, setting)] = json.loads(line[0][len("RESULT ") :])

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    what = ("settings: today = top 12 blocks, 1 epoch; shared = the same with a shared prompt (TRL has none: ratio to its "
            "today row); new = top 2 blocks, 3 epochs (rlhfkit: frozen-feature cache, shared prompt); "
            "gradient checkpointing off" if args.recipes else
            f"{'top ' + str(args.train_top_layers) + ' blocks' if args.train_top_layers else 'full fine-tuning'}, "
            f"{args.epochs} epoch(s){', frozen-feature cache' if args.cache_frozen_features else ''}"
            f"{', shared prompt' if args.share_prompt else ''}, "
            f"gradient checkpointing {args.gradient_checkpointing}")  # fmt: skip
    print(f"\nReward-model training throughput - model {args.model}, {what}; batch {args.batch} pairs "
          f"(= {2 * args.batch} rows) x {args.length} tokens, {args.precision}, {device}; "
          f"{args.batch * (args.steps + args.warmup)} pairs, every step timed but the first {args.warmup}")  # fmt: skip
    print(f"{'engine':<16} {'pairs/s':>9} {'tokens/s':>10} {'s/step':>8} {'s / 1k pairs':>13} {'peak MB':>9}  allocator")
    for (name, setting), r in rows.items():
        print(f"{(name + ' ' + setting).strip():<16} {r['pairs_per_s']:>9.2f} {r['tokens_per_s']:>10.1f} {r['seconds_per_step']:>8.2f} "
              f"{r['seconds_per_1k_pairs']:>13.0f} {r['peak_mb']:>9.0f}  {r['allocator']}")  # fmt: skip
    for setting in settings:
        ours, peer = rows.get(("rlhfkit", setting)), rows.get(("trl", "today" if setting == "shared" else setting))
        if ours and peer:
            print(f"{('ratio ' + setting).strip():<16} {ours['pairs_per_s'] / peer['pairs_per_s']:>8.2f}x {'':>10} {'':>8} {'':>13} "
                  f"{ours['peak_mb'] / peer['peak_mb']:>8.2f}x   (rlhfkit/TRL: speed higher is better, memory lower is better)")  # fmt: skip
    for setting in ("shared", "new"):
        if args.recipes and ("rlhfkit", "today") in rows and ("rlhfkit", setting) in rows:
            today, other = rows[("rlhfkit", "today")], rows[("rlhfkit", setting)]
            print(f"{setting} against today's (rlhfkit): {today['seconds_per_1k_pairs'] / other['seconds_per_1k_pairs']:.2f}x faster "
                  f"for the same data, {other['peak_mb'] / today['peak_mb']:.2f}x the memory")  # fmt: skip
    if why_no_trl:
        print(f"TRL row skipped: {why_no_trl}")
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
