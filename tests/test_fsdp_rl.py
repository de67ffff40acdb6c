"""Step 3 under FSDP2 (configs/accelerate/fsdp2.yaml), 2 CPU processes (gloo), tiny models.

PPO (full and LoRA) and GRPO: the synced gradient of a hand-made rollout split over 2 sharded processes equals
the single-process gradient; the whole loop then runs sharded (rollouts inside `gathered`, distributed
checkpoints, the final policy gathered whole, loadable by `from_pretrained`), and a run stopped after one
iteration resumes from its sharded checkpoint to the uninterrupted run's weights. DPO: a sharded run equals a
single-process run on the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp import ENV, FSDP2, REPO, assert_same_weights, run_fsdp2, single
from test_ppo import prompts_file, reward_dir  # noqa: F401  (fixtures)

WORKER = r'''
"""A hand-made rollout of 8 responses: 1 process takes all, 2 sharded processes 4 each; save the synced gradient,
then run the loop (or stop after `stop_after` iterations, or resume)."""
import contextlib, json, sys, torch
from dataclasses import replace
from handmade_rollout import hand_made_rollout
from rlhfkit.config import PPOConfig
from rlhfkit.rl import make_trainer
from rlhfkit.rl.trainer import Means

fields, mode = json.loads(sys.argv[1]), sys.argv[2]
cfg = PPOConfig(**fields)
tr = make_trainer(cfg)
acc = tr.accelerator
if mode == "grad":
    tr.iteration_index = 0
    batch, rows = hand_made_rollout(tr, group=tr.k)
    batch = replace(batch, ref_logprobs=batch.ref_logprobs - 0.05, scores=torch.linspace(-1, 1, 8)[rows])
    if cfg.algorithm == "ppo":
        targets = dict(zip(("advantages", "returns"), tr.advantages(batch, tr.kl_rewards(batch, 0.1))))
        units, loss = batch.mask.sum(1), tr.loss
    else:
        from rlhfkit.rl.math import grpo_advantages, per_token, token_weights
        weights, units = token_weights(batch.mask, "sequence", cfg.generation.max_new_tokens)
        targets = {"advantages": per_token(grpo_advantages(tr.sequence_rewards(batch, 0.1), tr.k), batch.mask), "weights": weights, "units": units}
        loss = tr.policy_gradient_loss
    local = units.sum().double().reshape(1)
    global_units = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).item()
    micros = torch.arange(len(batch)).split(cfg.batch_size)
    for i, r in enumerate(micros):
        sync = i == len(micros) - 1 or acc.num_processes == 1
        with contextlib.nullcontext() if sync else acc.no_sync(tr.model):
            tr.micro_step(batch.micro(r, **targets), 0, global_units, None, 0.0, loss, Means())
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded gradient, gathered
    grads = torch.cat([whole(p.grad).flatten() for p in tr.policy_params + tr.critic_params])
    if acc.is_main_process:
        torch.save(grads, cfg.output_dir + ".grads.pt")
    tr.optimizer.zero_grad()
    tr.iteration_index = 0
tr.train(stop_after=int(mode[len("stop"):]) if mode.startswith("stop") else None)
with open(f"{cfg.output_dir}.result{acc.process_index}.json", "w") as f:  # a file each: printed lines may interleave
    json.dump({"sharded": tr.sharded, "layout": tr.nets.layout}, f)
from rlhfkit.cli import leave_finished_process
leave_finished_process()  # as the rlhfkit command leaves: exit handlers, then no teardown (see its docstring)
'''


def config(tiny_model_dir, reward_dir, prompts_file, out: Path, lora: bool, **extra) -> dict:  # noqa: F811
    fields = dict(policy_model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts_file), output_dir=str(out),
                  precision="fp32", prompts_per_iteration=8, minibatch_size=8, batch_size=2, ppo_epochs=1, max_steps=2, vf_coef=0.5,
                  entropy_coef=0.01, generation={"max_new_tokens": 6, "temperature": 1.0}, checkpoint_every=1, seed=3)  # fmt: skip
    if lora:
        fields.update(lora={"enabled": True, "r": 4, "alpha": 8}, learning_rate=3e-3)
    return {**fields, **extra}


def run_worker(tmp_path: Path, fields: dict, mode: str, processes: int) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(script), json.dumps(fields), mode]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", str(processes), *args]
    env = {**ENV, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests")))}  # the worker imports handmade_rollout
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{fields['output_dir']}.result{rank}.json").read_text()) for rank in range(processes)]


CASES = {
    "ppo-full": dict(lora=False),
    "ppo-lora": dict(lora=True),
    "ppo-lora-shared-critic": dict(lora=True, critic_init="policy", train_top_layers=1),
    "grpo-full": dict(lora=False, algorithm="grpo", samples_per_prompt=2, prompts_per_iteration=4),
}


# the default run keeps the LoRA PPO case; the other layouts are in the slow set
@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == "ppo-lora" else [pytest.mark.slow]) for c in CASES])
def test_fsdp2_step3_gradient_equals_single_process_and_the_loop_runs_sharded(case, tiny_model_dir, reward_dir, prompts_file, tmp_path):  # noqa: F811
    extra = dict(CASES[case])
    fields = {name: config(tiny_model_dir, reward_dir, prompts_file, tmp_path / name, **extra) for name in ("one", "two")}
    one = run_worker(tmp_path, fields["one"], "grad", 1)
    two = run_worker(tmp_path, fields["two"], "grad", 2)
    assert [r["sharded"] for r in one] == [False] and [r["sharded"] for r in two] == [True, True]
    g1, g2 = torch.load(tmp_path / "one.grads.pt"), torch.load(tmp_path / "two.grads.pt")
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    run = tmp_path / "two"
    ckpt = run / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").open())] == [1, 2]
    from transformers import AutoModelForCausalLM

    final, unsharded = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").state_dict() for name in ("two", "one"))
    assert {n: p.shape for n, p in final.items()} == {n: p.shape for n, p in unsharded.items()}  # gathered whole (LoRA merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [n for n, p in final.items() if p.shape == base[n].shape and not torch.equal(p, base[n])]
    assert changed, "the final policy is the SFT policy: the gathered weights did not reach final/"


@pytest.mark.slow
def test_fsdp2_ppo_stopped_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(tiny_model_dir, reward_dir, prompts_file, tmp_path):  # noqa: F811
    straight = config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "straight", lora=True)
    stopped = config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "stopped", lora=True)
    run_worker(tmp_path, straight, "run", 2)
    run_worker(tmp_path, stopped, "stop1", 2)
    assert not (tmp_path / "stopped" / "final").exists()
    run_worker(tmp_path, stopped, "run", 2)  # resumes at iteration 1 from the distributed checkpoint
    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("straight", "stopped"))
    assert_same_weights(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_fsdp2_dpo_equals_single_process(tiny_model_dir, tmp_path):
    from test_reward import write_synthetic

    data = write_synthetic(tmp_path / "marker.jsonl", n=48)
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--max_steps", "3", "--eval_every", "2", "--checkpoint_every", "2",
            "--precision", "fp32", "--learning_rate", "3e-3", "--max_length", "64", "--eval_fraction", "0.2", "--grad_accum", "2"]  # fmt: skip
    single("dpo", tmp_path / "one", args)
    run_fsdp2("dpo", tmp_path / "two", args)
    one, two = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("one", "two"))
    assert_same_weights(one, two, rtol=1e-4, atol=1e-5)
    acc1, acc2 = (json.loads((tmp_path / run / "heldout_accuracy.json").read_text()) for run in ("one", "two"))
    assert acc2["accuracy"] == pytest.approx(acc1["accuracy"])  # held-out over both processes' shares
