"""RLOO and GRPO (`rlhfkit ppo --algorithm rloo|grpo`) with tiny random models: no critic in memory, k responses
per prompt grouped, the advantages of the algorithm, the first-epoch ratio, the EOS penalty, resume after a kill,
the NaN guard, two processes, the CLI and the config refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.rl import GRPOTrainer, RLOOTrainer, make_trainer, run_ppo
from rlhfkit.rl.math import grpo_advantages, rloo_advantages
from rlhfkit.training import NonFiniteError, read_metrics
from test_ppo import LORA, _rollout_by_hand, one_thread, ppo_config, prompts_file, reward_dir  # noqa: F401 (fixtures)

CRITIC_FREE = {"rloo": RLOOTrainer, "grpo": GRPOTrainer}


def critic_free_config(tiny_model_dir, reward_dir, prompts_file, out, algorithm: str, **overrides) -> PPOConfig:
    fields = dict(algorithm=algorithm, samples_per_prompt=2, prompts_per_iteration=4, minibatch_size=4)
    return ppo_config(tiny_model_dir, reward_dir, prompts_file, out, **{**fields, **overrides})


@pytest.mark.parametrize("algorithm", list(CRITIC_FREE))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_no_critic_k_responses_per_prompt_and_the_algorithms_advantages(tiny_model_dir, reward_dir, prompts_file, tmp_path, algorithm, lora):
    cfg = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", algorithm, max_steps=1,
                             init_kl_coef=0.3, missing_eos="none", **({"lora": LORA} if lora else {}))  # fmt: skip
    trainer = make_trainer(cfg)
    assert type(trainer) is CRITIC_FREE[algorithm]
    ac, nets = trainer.ac, trainer.nets
    # no value network in memory: no value head, no critic body or adapter, no critic parameters
    assert ac.value_head is None and ac.critic_backbone is None and not trainer.critic_params
    assert not any(".critic." in n or n.startswith(("value_head", "critic_backbone")) for n, _ in ac.named_parameters())
    if lora:
        assert list(ac.policy.peft_config) == ["policy"] and nets.reward_base_peft is None and nets.reference is None
    else:  # the trained module is the policy alone
        assert sum(p.numel() for p in ac.parameters()) == sum(p.numel() for p in nets.reference.parameters())

    torch.manual_seed(0)
    metrics = trainer.iteration(0)
    rollout = trainer.last_rollout
    assert len(rollout) == cfg.prompts_per_iteration * 2
    for group in range(len(rollout) // 2):  # a prompt's k responses are consecutive rows
        rows = slice(2 * group, 2 * group + 2)
        assert rollout.messages[rows][0] == rollout.messages[rows][1]
        assert torch.equal(rollout.prompt_ids[rows][0], rollout.prompt_ids[rows][1])
    assert len({json.dumps(m) for m in rollout.messages}) == cfg.prompts_per_iteration
    assert torch.equal(rollout.old_logprobs, rollout.ref_logprobs) and metrics["kl"] == 0.0
    # RLOO: the KL (0 here) in the reward; GRPO: the score alone (KL in the loss)
    rewards = rollout.scores - 0.3 * rollout.kl.sum(1) if algorithm == "rloo" else rollout.scores
    expected = rloo_advantages(rewards, 2) if algorithm == "rloo" else grpo_advantages(rewards, 2)
    torch.testing.assert_close(trainer.last_targets["advantages"], expected)
    assert expected.abs().sum() > 0
    for key in ("score", "kl", "reward", "policy_loss", "policy_clipfrac", "approx_kl", "ratio", "entropy", "response_length",
                "eos_share", "beta", "time/generation", "time/scoring", "time/training", "grad_norm_policy"):  # fmt: skip
        assert key in metrics, key
    assert "value_loss" not in metrics and "grad_norm_critic" not in metrics
    assert ("kl_loss" in metrics) == (algorithm == "grpo")


@pytest.mark.parametrize("algorithm,variant", [("rloo", "grpo"), ("grpo", "grpo"), ("grpo", "dr_grpo")])
def test_first_minibatch_has_ratio_one(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch, algorithm, variant):
    """As for PPO: the old log-probs come from the very micro-batches the first epoch trains on."""
    import rlhfkit.rl.trainer as trainer_module
    from rlhfkit.rl.math import clipped_surrogate

    calls = []

    def recording(logprobs, old_logprobs, advantages, mask, clip_range):
        out = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
        calls.append((logprobs.detach() - old_logprobs)[mask].abs().max().item())
        return out

    monkeypatch.setattr(trainer_module, "clipped_surrogate", recording)
    cfg = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", algorithm, grpo_variant=variant, max_steps=1, missing_eos="none",
                             batch_size=2, generation={"max_new_tokens": 12, "temperature": 1.0, "batch_size": 8})  # fmt: skip
    trainer = make_trainer(cfg)
    torch.manual_seed(0)
    trainer.iteration(0)
    assert len(calls) == cfg.ppo_epochs * trainer.n_minibatches * trainer.micro_per_minibatch == 8
    assert max(calls[: trainer.micro_per_minibatch]) <= 1e-6
    assert max(calls) > 1e-4


def test_missing_eos_penalty_enters_the_group_rewards(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    trainer = make_trainer(critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", "rloo", kl_in="reward"))
    tok = trainer.tokenizer
    words = tok("yes banana apple", add_special_tokens=False)["input_ids"][:3]
    rollout = trainer.experience(_rollout_by_hand(trainer, [words + [tok.eos_token_id], words, words[:2] + [tok.eos_token_id], words[:1]], 6))
    assert rollout.scores[[1, 3]].tolist() == [-1.0, -1.0]  # cut: -missing_eos_penalty
    rewards = trainer.sequence_rewards(rollout, 0.0)
    torch.testing.assert_close(rloo_advantages(rewards, 2)[[0, 2]], rollout.rm_scores[[0, 2]] + 1.0)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("algorithm,extra", [("rloo", {}), ("grpo", {"lora": LORA}), ("grpo", {"grpo_variant": "dr_grpo", "kl_in": "reward"})],
                         ids=["rloo-full", "grpo-lora", "dr_grpo-full"])  # fmt: skip
def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, reward_dir, prompts_file, tmp_path, algorithm, extra):
    fields = dict(max_steps=4, checkpoint_every=2, adaptive_kl=True, target_kl=0.01, kl_horizon=20, init_kl_coef=0.1,
                  missing_eos="none", **extra)  # fmt: skip
    straight = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "a", algorithm, **fields)
    run_ppo(straight)
    broken = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "b", algorithm, **fields)
    run_ppo(broken, stop_after=3)  # "killed" after iteration 3, before its checkpoint (every 2)
    assert not (tmp_path / "b" / "final").exists()
    run_ppo(broken)  # the same command again resumes from iteration 2
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    state_a, state_b = (json.loads((tmp_path / x / "ppo_state.json").read_text()) for x in "ab")
    assert state_a["algorithm"] == algorithm and state_a["beta"] != 0.1
    assert state_b["beta"] == pytest.approx(state_a["beta"], rel=1e-9)
    assert [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]
    samples = [json.loads(l)["iteration"] for l in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(3) == 2
    # the policy trained (the SFT weights moved) and checkpoints hold no critic
    from safetensors.torch import load_file

    sft = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.allclose(a[k], sft[k]) for k in a if k in sft and a[k].shape == sft[k].shape)
    ckpt = load_file(str(next((tmp_path / "b" / "checkpoints").iterdir()) / "model.safetensors"))
    assert not any("value_head" in k or "critic" in k for k in ckpt)


def test_nan_reward_stops_and_keeps_last_good_checkpoint(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch):
    from rlhfkit.reward import RewardModel

    real_head, state = RewardModel.score_hidden, {"iteration": 0}
    real_iteration = GRPOTrainer.iteration

    def iteration(self, it):
        state["iteration"] = it
        return real_iteration(self, it)

    monkeypatch.setattr(GRPOTrainer, "iteration", iteration)
    monkeypatch.setattr(RewardModel, "score_hidden", lambda self, last: real_head(self, last) * (float("nan") if state["iteration"] == 1 else 1.0))
    cfg = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", "grpo", max_steps=3)
    with pytest.raises(NonFiniteError, match=r"reward-model score is nan at step 2.*last good checkpoint is kept"):
        run_ppo(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000001"]


def test_cli_runs_dr_grpo(tiny_model_dir, reward_dir, prompts_file, demos_file, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"algorithm: grpo\ngrpo_variant: dr_grpo\nsamples_per_prompt: 3\npolicy_model: {tiny_model_dir}\nreward_model: {reward_dir}\n"
        f"prompts: {prompts_file}\noutput_dir: {tmp_path / 'run'}\nprecision: fp32\nprompts_per_iteration: 4\nminibatch_size: 6\n"
        "batch_size: 3\nppo_epochs: 1\nmax_steps: 1\ngeneration:\n  max_new_tokens: 6\n"
    )
    result = CliRunner().invoke(app, ["ppo", "--config", str(config), "--ptx_data", str(demos_file), "--entropy_coef", "0.01"])
    assert result.exit_code == 0, result.output
    (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert m["ptx_loss"] > 0 and m["kl_loss"] >= 0.0 and m["response_length"] > 0
    assert json.loads((tmp_path / "run" / "final" / "ppo_state.json").read_text())["algorithm"] == "grpo"
    assert sum(1 for _ in (tmp_path / "run" / "samples.jsonl").open()) == 4  # samples_per_log


@pytest.mark.parametrize("yaml, field, message", [
    ("algorithm: rloo\nsamples_per_prompt: 1", "samples_per_prompt", "rloo needs k >= 2"),
    ("algorithm: grpo\nsamples_per_prompt: 1", "samples_per_prompt", "grpo needs k >= 2"),
    ("algorithm: reinforce", "algorithm", "ppo"),
    ("grpo_variant: dapo", "grpo_variant", "dr_grpo"),
    ("kl_in: both", "kl_in", "reward"),
])  # fmt: skip
def test_config_refusals_name_file_line_and_field(tmp_path, yaml, field, message):
    path = tmp_path / "rl.yaml"
    path.write_text(f"seed: 1\n{yaml}\n")
    with pytest.raises(ConfigError, match=rf"rl.yaml:\d+: field '{field}': .*{message}"):
        load_config(PPOConfig, path)


def test_defaults_resolve_per_algorithm():
    assert (PPOConfig().responses_per_prompt, PPOConfig().kl_placement) == (1, "reward")
    assert (PPOConfig(algorithm="rloo").responses_per_prompt, PPOConfig(algorithm="rloo").kl_placement) == (4, "reward")
    assert (PPOConfig(algorithm="grpo").responses_per_prompt, PPOConfig(algorithm="grpo").kl_placement) == (4, "loss")
    assert PPOConfig(algorithm="grpo", kl_in="reward", samples_per_prompt=8).kl_placement == "reward"
    for name in ("algorithm", "samples_per_prompt", "grpo_variant", "kl_in"):
        assert PPOConfig.model_fields[name].description


GRPO_DDP_WORKER = r'''
"""GRPO on a hand-made rollout of 4 prompts x 2 responses: 1 process takes all, 2 processes 2 prompts each."""
import contextlib, sys, torch
from dataclasses import replace
from rlhfkit.config import PPOConfig
from handmade_rollout import hand_made_rollout
from rlhfkit.rl import make_trainer
from rlhfkit.rl.math import grpo_advantages, per_token, token_weights
from rlhfkit.rl.trainer import Means

policy, reward, prompts, out = sys.argv[1:5]
cfg = PPOConfig(policy_model=policy, reward_model=reward, prompts=prompts, output_dir=out, precision="fp32", algorithm="grpo",
                samples_per_prompt=2, prompts_per_iteration=4, minibatch_size=8, batch_size=2, ppo_epochs=1, max_steps=2,
                entropy_coef=0.01, init_kl_coef=0.2, generation={"max_new_tokens": 6, "temperature": 1.0}, checkpoint_every=1)
tr = make_trainer(cfg)
acc = tr.accelerator
batch, _ = hand_made_rollout(tr, group=2)
batch = replace(batch, ref_logprobs=batch.ref_logprobs - 0.05)  # a KL term that is not 0
advantages = grpo_advantages(tr.sequence_rewards(batch, 0.2), 2)  # each process's groups are whole
weights, units = token_weights(batch.mask, "sequence")
targets = {"advantages": per_token(advantages, batch.mask), "weights": weights, "units": units}
local = units.sum().double().reshape(1)
global_units = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).item()
micros = torch.arange(len(batch)).split(cfg.batch_size)
for i, r in enumerate(micros):
    sync = i == len(micros) - 1 or acc.num_processes == 1
    with contextlib.nullcontext() if sync else acc.no_sync(tr.model):
        tr.micro_step(batch.micro(r, **targets), 0, global_units, None, 0.0, tr.policy_gradient_loss, Means())
grads = torch.cat([p.grad.flatten() for p in tr.policy_params])
if acc.is_main_process:
    torch.save(grads, out + ".grads.pt")
tr.optimizer.zero_grad()
tr.train()  # and the whole loop: k responses per prompt on each process, checkpoints, final/
'''


def test_grpo_two_processes_give_the_single_process_gradient(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """Under `accelerate launch` with 2 CPU processes, GRPO's per-response mean over a minibatch split over the
    processes (and its k3 term) gives the single-process gradient; the whole loop runs."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(GRPO_DDP_WORKER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, (Path(__file__).parents[1], Path(__file__).parent)))}
    args = [str(tiny_model_dir), str(reward_dir), str(prompts_file)]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    two = subprocess.run([*launch, str(script), *args, str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    g1, g2 = torch.load(tmp_path / "one.grads.pt"), torch.load(tmp_path / "two.grads.pt")
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "two" / "final" / "config.json").exists()
    assert [m["step"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("algorithm", list(CRITIC_FREE))
def test_train_top_layers_cache_changes_no_number(tiny_model_dir, reward_dir, prompts_file, tmp_path, algorithm):
    """The frozen blocks' output computed once per rollout serves the policy and the reference without a critic too."""
    runs = []
    for cache in (False, True):
        cfg = critic_free_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / f"cache{cache}", algorithm, max_steps=1,
                                 train_top_layers=1, cache_frozen_activations=cache, missing_eos="none")  # fmt: skip
        trainer = make_trainer(cfg)
        torch.manual_seed(0)
        metrics = trainer.iteration(0)
        runs.append((trainer, metrics, [p.detach().clone() for p in trainer.policy_params]))
    (t0, m0, w0), (t1, m1, w1) = runs
    assert t0.ac.policy_split == 0 and t1.ac.policy_split == 1 and t1.last_rollout.policy_frozen is not None
    for key in ("policy_loss", "score", "kl", "approx_kl"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_means_weigh_and_total():
    from types import SimpleNamespace

    from rlhfkit.rl.trainer import Means

    stats = Means()
    stats.add("loss", 2.0, 3.0)  # a mean of 2 over 3 tokens
    stats.add("loss", 4.0, 1.0)
    stats.add("empty", 5.0, 0.0)
    stats.total("tokens", 7)
    stats.total("tokens", 5)
    out = stats.reduce(SimpleNamespace(device=torch.device("cpu"), num_processes=1))  # one process
    assert out["loss"] == pytest.approx((2 * 3 + 4) / 4) and out["tokens"] == 12.0
    assert out["empty"] != out["empty"]  # NaN: nothing weighed


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_adamw_with_a_group_per_role(tiny_model_dir, reward_dir, prompts_file, tmp_path, weight_decay):
    """PPO: one optimiser and one schedule; the policy and the critic are its parameter groups (split by weight decay
    only when there is some), with their own learning rates, scaled alike by the schedule."""
    from rlhfkit.rl import PPOTrainer

    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", learning_rate=1e-3, critic_learning_rate=5e-3,
                     weight_decay=weight_decay, warmup_ratio=0.5)  # fmt: skip
    trainer = PPOTrainer(cfg)
    groups = trainer.optimizer.param_groups
    assert len(groups) == (2 if weight_decay == 0 else 4)
    policy, critic = {id(p) for p in trainer.policy_params}, {id(p) for p in trainer.critic_params}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= policy or ids <= critic
        assert group["initial_lr"] == (1e-3 if ids <= policy else 5e-3)
        assert group["weight_decay"] == (weight_decay if all(p.ndim >= 2 for p in group["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(policy) + len(critic)
    trainer.optimizer.step()  # no gradients yet: nothing moves
    trainer.scheduler.step()  # the one schedule scales both roles' rates by the same factor
    factor = {g["lr"] / g["initial_lr"] for g in groups}
    assert len(factor) == 1 and 0 < factor.pop() < 1
