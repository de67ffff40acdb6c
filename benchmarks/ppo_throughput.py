"""PPO throughput: seconds per PPO iteration and peak memory, rlhfkit vs TRL 1.12's
`trl.experimental.ppo.PPOTrainer`, at one fixed configuration; and rlhfkit's RLOO and GRPO beside its PPO.

    python benchmarks/ppo_throughput.py [--trl-python .venv-trl/bin/python] [--prompts 16] [--response-length 64]
                                        [--ppo-epochs 4] [--minibatch 8] [--batch 8] [--iterations 3]
                                        [--layouts lora,lora8,full,top8] [--trl-layouts full,lora8,top8]
                                        [--algorithms ppo,rloo,grpo] [--samples-per-prompt 4]

Algorithms (`--algorithms`, rlhfkit rows): `ppo` rows are named by their layout (`rlhfkit lora`); `rloo` and
`grpo` rows (`rlhfkit grpo lora`) run the same layout without a critic (no value network in memory, no value
passes). They sample `--samples-per-prompt` (k) responses to each of `--prompts` / k prompts, so every row
generates, scores and trains on the same number of responses (`--prompts`) of the same length, from the same
prompt tokens.

Layouts (one row each): `lora` - rlhfkit's shared-base LoRA layout (policy adapter on the SFT base,
reference = adapter off; critic adapter on the reward model's base, reward model = adapter off: two
base networks, frozen in bf16); `loraN` - the same with adapters on the top N blocks only, so the
output of the frozen blocks below is computed once per rollout and reused by every pass and epoch
(`train_top_layers` + `cache_frozen_activations`); `full` - full fine-tuning, four networks; `topN` -
full fine-tuning of the top N blocks only, lower blocks shared and their output cached.
TRL's `full` is its PPOTrainer with policy, reference, value and reward models as four separate
networks (the peer as the issue names it); its `lora` puts a LoRA adapter on the policy (reference =
adapter off; the value model stays a full network, as TRL does); its `topN` / `loraN` train only the
top N blocks of policy and value model (LoRA: adapters on those blocks of the policy), with the lower
blocks frozen, so autograd skips them, but run again in every pass (TRL keeps no activations).
Ratios compare every rlhfkit row with TRL's first row, and with TRL's row of the same layout if run.

Same work for both engines:
* the same policy (`--model`, default SmolLM2-135M-Instruct, with the pad token rlhfkit adds), reference,
  a reward model and a value model of the same size (random scalar heads: only speed is measured);
* the same prompts, pre-tokenised by the parent: bundled prompts of at least `--prompt-length` tokens,
  cut to exactly `--prompt-length` (the newest tokens, rlhfkit's rule);
* every response exactly `--response-length` tokens: TRL runs with no stop token, rlhfkit with EOS
  suppressed until the limit (`min_new_tokens`), so neither stops early;
* `--prompts` responses per iteration, `--ppo-epochs` passes over `--minibatch`-response minibatches,
  micro-batches (and no-grad / generation batches) of `--batch`, bf16 autocast, no gradient checkpointing.

Each engine runs in a fresh subprocess (its peak memory is its own: max RSS on CPU, max allocated
CUDA memory on GPU), runs `--warmup` iterations, then `--iterations` timed ones. rlhfkit's times per
phase (generation; scoring = reward model + reference + rollout log-probs + values; training) come
from its metrics.jsonl; TRL does not report phases. TRL is installed only for benchmarks, in its
own virtualenv (`make bench-env`); the peer script is benchmarks/peers/trl_ppo.py. Without it
only the rlhfkit row is printed, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEER = Path(__file__).resolve().parent / "peers" / "trl_ppo.py"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args, work: Path) -> dict:
    """Policy folder (pad token added), reward-model folder, fixed-length prompts: shared by both engines."""
    import torch

    from rlhfkit.data import load_prompts, write_jsonl
    from rlhfkit.models import load_causal_lm, load_tokenizer, save_model
    from rlhfkit.reward import build_reward_model, save_reward_model
    from rlhfkit.tokens import encode_prompt

    policy_dir, reward_dir = work / "policy", work / "reward"
    tokenizer = load_tokenizer(args.model)
    if not (policy_dir / "config.json").exists():
        save_model(load_causal_lm(args.model, tokenizer), tokenizer, policy_dir)
    if not (reward_dir / "config.json").exists():
        torch.manual_seed(0)
        rm = build_reward_model(str(policy_dir), tokenizer)
        # As if `rlhfkit reward` had trained it at the benchmark's precision (the pipeline runs every step in one
        # precision): PPO scores a reward model in the precision its statistics were measured in.
        stats = {"mean": 0.0, "std": 1.0, "base_model": args.model, "lora": False, "precision": args.precision}
        save_reward_model(rm, tokenizer, reward_dir, stats)
    needed = args.prompts * (args.iterations + args.warmup)
    prompts, ids = [], []
    for messages in load_prompts(str(ROOT / "examples/data/prompts.jsonl")):
        encoded = encode_prompt(tokenizer, messages)
        if len(encoded) >= args.prompt_length:
            prompts.append(messages)
            ids.append(encoded[-args.prompt_length :])
        if len(prompts) == needed:
            break
    if len(prompts) < needed:
        raise SystemExit(f"only {len(prompts)} bundled prompts have >= {args.prompt_length} tokens; lower --prompt-length or --prompts")
    write_jsonl(work / "prompts.jsonl", [{"messages": m} for m in prompts])
    (work / "prompt_ids.json").write_text(json.dumps(ids))
    return {"policy": str(policy_dir), "reward": str(reward_dir), "prompts": str(work / "prompts.jsonl"), "prompt_ids": str(work / "prompt_ids.json")}


def run_rlhfkit(args, paths: dict, work: Path) -> dict:
    """The real PPO loop (`PPOTrainer.train`) with responses forced to the full length."""
    import torch

    import rlhfkit.rl.rollout as rollout
    from rlhfkit.config import PPOConfig
    from rlhfkit.rl import make_trainer
    from rlhfkit.training import read_metrics

    torch.set_num_threads(args.threads)

    @torch.no_grad()
    def full_length(model, prompt_ids, attention_mask, gen, eos_id, pad_id, num_samples=1, num_tokens=None):
        out = model.generate(
            input_ids=prompt_ids, attention_mask=attention_mask, max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.max_new_tokens, do_sample=True, temperature=gen.temperature, top_p=1.0, top_k=None,
            eos_token_id=eos_id, pad_token_id=pad_id, num_return_sequences=num_samples,
        )  # fmt: skip
        return out[:, prompt_ids.shape[1] :]

    rollout.sample_ids = full_length
    layout = ("lora" if args.lora else "top" if args.train_top_layers else "full") + str(args.train_top_layers or "")
    out = work / f"rlhfkit-run-{args.algorithm}-{layout}"  # a fresh run folder per algorithm and layout
    k = 1 if args.algorithm == "ppo" else args.samples_per_prompt
    if args.prompts % k:
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of --samples-per-prompt {k}")
    cfg = PPOConfig(
        algorithm=args.algorithm, samples_per_prompt=k,
        policy_model=paths["policy"], reward_model=paths["reward"], prompts=paths["prompts"], output_dir=str(out),
        precision=args.precision, prompts_per_iteration=args.prompts // k, minibatch_size=args.minibatch, batch_size=args.batch,
        ppo_epochs=args.ppo_epochs, max_steps=args.iterations + args.warmup, learning_rate=1e-6, resume=False,
        generation={"max_new_tokens": args.response_length, "temperature": 0.7, "batch_size": args.batch,
                    "max_prompt_length": args.prompt_length},
        checkpoint_every=0, sample_every=0, critic_init="reward",
        **({"lora": {"enabled": True, "r": 16, "alpha": 32}} if args.lora else {}),
        train_top_layers=args.train_top_layers,
    )  # fmt: skip
    make_trainer(cfg).train()
    rows = read_metrics(out / "metrics.jsonl")[args.warmup :]
    stamps = [m["time"] for m in read_metrics(out / "metrics.jsonl")]
    seconds = (stamps[-1] - stamps[args.warmup - 1]) / args.iterations if args.warmup else sum(
        m["time/generation"] + m["time/scoring"] + m["time/training"] for m in rows) / len(rows)  # fmt: skip
    phases = {p: sum(m[f"time/{p}"] for m in rows) / len(rows) for p in ("generation", "scoring", "training")}
    return {"seconds_per_iteration": seconds, "phases": phases, "peak_mb": peak_memory_mb(),
            "response_length": sum(m["response_length"] for m in rows) / len(rows)}  # fmt: skip


def layout_flags(layout: str, option: str) -> list[str]:
    """lora | loraN | full | topN -> the engine's flags (--lora, --train-top-layers N)."""
    kind, top = layout.rstrip("0123456789"), layout[len(layout.rstrip("0123456789")) :]
    if not ((kind in ("lora", "full") and not top) or (kind in ("lora", "top") and top)):
        raise SystemExit(f"{option}: unknown layout {layout!r} (lora, loraN, full or topN)")
    return (["--lora"] if kind == "lora" else []) + (["--train-top-layers", top] if top else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["rlhfkit"], help="(internal) run rlhfkit and print JSON")
    parser.add_argument("--work", help="(internal) prepared folder")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"), help="interpreter with trl==1.12 installed")
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (= responses) per PPO iteration")
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--layouts", default="lora,lora8,full", help="rlhfkit rows: comma-separated lora | loraN | full | topN")
    parser.add_argument("--trl-layouts", default="full", help="TRL rows: comma-separated full | lora | loraN | topN (the first is the reference)")
    parser.add_argument("--algorithms", default="ppo,rloo,grpo", help="rlhfkit rows: comma-separated ppo | rloo | grpo (each with every layout)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="k of the RLOO and GRPO rows (they roll out --prompts / k prompts)")
    parser.add_argument("--algorithm", default="ppo", choices=["ppo", "rloo", "grpo"], help="(internal) the rlhfkit row's algorithm")
    parser.add_argument("--lora", action="store_true", help="(internal) LoRA r=16 on policy and critic")
    parser.add_argument("--train-top-layers", type=int, default=0, help="(internal) rlhfkit: train the top N blocks only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, run folders; several GB) for inspection")
    parser.add_argument("--results", help="also write the rows as JSON to this file")
    args = parser.parse_args()

    if args.engine:
        from rlhfkit.allocator import restart_under_mimalloc

        restart_under_mimalloc()  # as the `rlhfkit` command runs (RLHFKIT_ALLOCATOR=system: glibc's malloc)
        work = Path(args.work)
        result = run_rlhfkit(args, json.loads((work / "paths.json").read_text()), work)
        print("RESULT " + json.dumps(result), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    try:
        paths = prepare(args, work)
        (work / "paths.json").write_text(json.dumps(paths))
        common = ["--prompts", str(args.prompts), "--prompt-length", str(args.prompt_length), "--response-length",
                  str(args.response_length), "--ppo-epochs", str(args.ppo_epochs), "--minibatch", str(args.minibatch),
                  "--batch", str(args.batch), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                  "--precision", args.precision, "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1"}
        runs = []
        for algorithm in args.algorithms.split(","):
            for layout in args.layouts.split(","):
                name = f"rlhfkit {layout}" if algorithm == "ppo" else f"rlhfkit {algorithm} {layout}"
                runs.append((name, [sys.executable, __file__, "--engine", "rlhfkit", "--work", str(work), *common, "--algorithm", algorithm,
                                    "--samples-per-prompt", str(args.samples_per_prompt), *layout_flags(layout, "--layouts")]))  # fmt: skip
        if Path(args.trl_python).exists():
            for layout in args.trl_layouts.split(","):
                runs.append((f"trl {layout}", [args.trl_python, str(PEER), "--policy", paths["policy"], "--prompt-ids",
                                               paths["prompt_ids"], "--out", str(work / f"trl-run-{layout}"), *common,
                                               *layout_flags(layout, "--trl-layouts")]))  # fmt: skip
        else:
            print(f"TRL rows skipped: {args.trl_python} not found (build it with `make bench-env`, or pass --trl-python)")
        rows = {}
        for name, command in runs:
            print(f"running {name} ...", flush=True)
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                continue
            rows[name] = json.loads(line[0][len("RESULT ") :])

        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {args.threads} threads)"
        print(
            f"\nOne iteration - model {args.model}, {args.prompts} responses (PPO: 1 per prompt; RLOO/GRPO: {args.samples_per_prompt} per prompt) x "
            f"({args.prompt_length} prompt + {args.response_length} response tokens), {args.ppo_epochs} epochs of "
            f"{args.minibatch}-response minibatches, micro-batch {args.batch}, {args.precision}, {device}; "
            f"{args.iterations} timed iterations after {args.warmup} warm-up"
        )
        print(f"{'engine':<20} {'s/iter':>8} {'generate':>9} {'score':>8} {'train':>8} {'peak MB':>9}")
        for name, r in rows.items():
            ph = r.get("phases") or {}
            cell = lambda p: f"{ph[p]:>8.2f}" if p in ph else f"{'n/a':>8}"  # noqa: E731
            print(f"{name:<20} {r['seconds_per_iteration']:>8.2f} {cell('generation'):>9} {cell('scoring')} {cell('training')} {r['peak_mb']:>9.0f}")
        peers = [n for n in rows if n.startswith("trl")]
        if peers:
            peer = rows[peers[0]]
            print(f"\nagainst {peers[0]} (speed-up: its s/iter / ours, higher is better; memory: ours / its, lower is better)")
            for name in (n for n in rows if n.startswith("rlhfkit")):
                ours = rows[name]
                same = rows.get("trl " + name.split(" ", 1)[1])  # TRL with the same layout, where it ran
                like = (f"   same layout: speed-up {same['seconds_per_iteration'] / ours['seconds_per_iteration']:>5.2f}x, "
                        f"memory {ours['peak_mb'] / same['peak_mb']:>5.2f}x") if same and same is not peer else ""  # fmt: skip
                print(f"{name:<20} speed-up {peer['seconds_per_iteration'] / ours['seconds_per_iteration']:>5.2f}x   "
                      f"memory {ours['peak_mb'] / peer['peak_mb']:>5.2f}x{like}")  # fmt: skip
        if args.results:
            Path(args.results).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
            print(f"results: {args.results}")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
