"""Peer of benchmarks/ppo_throughput.py: TRL 1.12's `trl.experimental.ppo.PPOTrainer` at the same
configuration. Run by the benchmark with the TRL virtualenv's interpreter (`make bench-env`);
it imports nothing from rlhfkit (that venv need not have rlhfkit's dependencies).

    .venv-trl/bin/python benchmarks/peers/trl_ppo.py --policy DIR --prompt-ids ids.json --out DIR [same knobs]

Models: policy and reference from `--policy` (the folder the benchmark prepared: SmolLM2 with a
pad token distinct from EOS); reward and value models are `AutoModelForSequenceClassification`
of the same folder (random scalar heads, like rlhfkit's side). No stop token, so every response is
exactly `--response-length` tokens. Prints `RESULT {json}` with seconds per PPO iteration (the time
between TRL's `on_step_end` callbacks, one per PPO update) and peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--prompt-ids", required=True, help="JSON list of token-id lists (already chat-templated)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--train-top-layers", type=int, default=0,
                        help="train only the top N blocks of policy and value model (with --lora: adapters there only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = json.loads(open(args.prompt_ids).read())
    total = args.prompts * (args.iterations + args.warmup)
    train = Dataset.from_dict({"input_ids": ids[:total]})
    evaluation = Dataset.from_dict({"input_ids": ids[: args.batch]})

    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    ref = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1, dtype=torch.float32)
    for m in (reward, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    top = args.train_top_layers
    if top:  # as rlhfkit's train_top_layers: the top N blocks and the final norm (and the value head) train
        for m in (policy, value):
            body = m.model
            keep = {id(q) for block in body.layers[-top:] for q in block.parameters()} | {id(q) for q in body.norm.parameters()}
            keep |= {id(q) for q in getattr(m, "score", torch.nn.Identity()).parameters()}
            for q in m.parameters():
                q.requires_grad_(id(q) in keep)

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    wanted = dict(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.prompts // args.batch,
        num_mini_batches=args.prompts // args.minibatch, num_ppo_epochs=args.ppo_epochs, total_episodes=total,
        local_rollout_forward_batch_size=args.batch, response_length=args.response_length, stop_token=None,
        temperature=0.7, learning_rate=1e-6, kl_coef=0.05, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2,
        gamma=1.0, lam=0.95, missing_eos_penalty=None, num_sample_generations=0, gradient_checkpointing=False,
        bf16=args.precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(), report_to=[],
        save_strategy="no", logging_steps=1000, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant",
    )  # fmt: skip
    known = {f.name for f in dataclasses.fields(PPOConfig)}
    dropped = sorted(set(wanted) - known)
    if dropped:
        print(f"note: this TRL's PPOConfig has no {dropped}; left at its defaults", flush=True)
    config = PPOConfig(**{k: v for k, v in wanted.items() if k in known})
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        n = policy.config.num_hidden_layers
        linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear of a Llama block
        peft_config = (
            LoraConfig(r=16, lora_alpha=32, target_modules=linear, layers_to_transform=list(range(n - top, n)), task_type="CAUSAL_LM")
            if top else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        )  # fmt: skip
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        train_dataset=train, value_model=value, eval_dataset=evaluation, callbacks=[Timer()], peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    per_iteration = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
    result = {"seconds_per_iteration": sum(per_iteration) / len(per_iteration), "peak_mb": peak_memory_mb(),
              "iterations_timed": len(per_iteration)}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
