"""PPO computes what the maths assumes (issue 11): the critic's gradient under activation checkpointing, the
sampled distribution (no logits processor but the temperature; one sampling support for the sampler and the
log-probs), the first-epoch ratio, cut responses scored as cut, the reward statistics' precision, config refusals."""

from __future__ import annotations

import random
import shutil
import statistics

import pytest
import torch

from conftest import WORDS
from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.rl import PPOTrainer
from rlhfkit.rl.math import first_eos_mask, policy_loss, value_loss
from rlhfkit.rl.networks import model_inputs as _model_batch
from rlhfkit.rl.rollout import Rollout, Samples
from rlhfkit.tokens import encode_prompt, pad
from test_generate import capture_sampler_logprobs, with_generation_config, with_padded_vocabulary
from test_ppo import LORA, _rollout_by_hand, one_thread, ppo_config, prompts_file, reward_dir  # noqa: F401 (fixtures)


def _prepared(trainer: PPOTrainer, samples: Samples, beta: float = 0.1) -> tuple[Rollout, dict]:
    """Steps 2-4 of an iteration on given samples: frozen blocks, scores, log-probs and values, rewards, advantages."""
    rollout = trainer.experience(samples)
    advantages, returns = trainer.advantages(rollout, trainer.kl_rewards(rollout, beta))
    return rollout, {"advantages": advantages, "returns": returns}


# ----------------------------------------------------------------------------- 1. critic under checkpointing


@pytest.mark.parametrize("critic_init", ["reward", "policy"])
@pytest.mark.parametrize("top", [0, 1], ids=["all-layers", "top-layer"])
def test_critic_gradient_is_the_same_with_activation_checkpointing(tiny_model_dir, reward_dir, prompts_file, tmp_path, critic_init, top):
    """Every LoRA layout: checkpointing recomputes each block in the backward pass through the adapter it ran
    with, so the critic's (and the policy's) gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / f"gc{checkpointing}", lora=LORA,
                         critic_init=critic_init, train_top_layers=top, gradient_checkpointing=checkpointing)  # fmt: skip
        trainer = PPOTrainer(cfg)
        torch.manual_seed(5)  # adapters start with B = 0 (policy and critic alike): make them differ
        for name, p in trainer.ac.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0.0, 0.3)
        trainer.iteration_index = 0
        tok = trainer.tokenizer
        words = tok("sure banana apple river the yes", add_special_tokens=False)["input_ids"][:5]
        batch, targets = _prepared(trainer, _rollout_by_hand(trainer, [words + [tok.eos_token_id], words[:3], words[1:4] + [tok.eos_token_id]], 8))
        trainer.ac.train()
        micro = batch.micro(torch.arange(len(batch)), **targets)
        logprobs, values, _, _, _ = trainer.model(**_model_batch(micro), **trainer.frozen_inputs(micro))
        pg, _ = policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], micro["mask"])
        vf, _ = value_loss(values, micro["values"], micro["returns"], micro["mask"])
        (pg + vf).backward()
        assert trainer.ac.policy.active_adapter == "policy"
        policy_names, critic_names = trainer.nets.trainable_names()
        params = dict(trainer.ac.named_parameters())
        grads.append({n: params[n].grad.clone() for n in policy_names + critic_names})
        assert any(".critic." in n and grads[-1][n].abs().sum() > 0 for n in critic_names)  # the critic adapter learns
    off, on = grads
    assert off.keys() == on.keys()
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- 2-3. the sampled distribution


def _sampler_and_recomputed_logprobs(trainer: PPOTrainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    store: list = []
    capture_sampler_logprobs(trainer.ac.policy, store)
    torch.manual_seed(0)
    samples = trainer.sample(trainer.prompts[:8])
    trainer.iteration_index = 0
    batch = trainer.experience(samples)
    (sampled,) = store  # one generation batch
    T = batch.response_ids.shape[1]
    return sampled[:, :T][batch.mask], batch.old_logprobs[batch.mask], batch.response_ids[batch.mask]


def test_rollout_logprobs_are_the_samplers_although_the_generation_config_meddles(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """A model whose generation_config.json sets repetition_penalty 1.5, no_repeat_ngram_size 2 (and more):
    the rollouts' per-token log-probs equal the sampler's own (from its processed scores)."""
    policy = with_generation_config(tiny_model_dir, tmp_path / "policy", **{"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 4})
    cfg = ppo_config(policy, reward_dir, prompts_file, tmp_path / "run", generation={"max_new_tokens": 16, "temperature": 0.7, "batch_size": 8})
    sampler, recomputed, _ = _sampler_and_recomputed_logprobs(PPOTrainer(cfg))
    torch.testing.assert_close(recomputed, sampler, rtol=1e-4, atol=1e-4)


def test_sampler_and_logprobs_share_the_support(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """A vocabulary padded past the tokenizer, its extra ids and the pad id with large logits: the sampler never
    draws them, and the recomputed log-prob of each sampled token equals the sampler's."""
    policy = with_padded_vocabulary(tiny_model_dir, tmp_path / "policy")
    cfg = ppo_config(policy, reward_dir, prompts_file, tmp_path / "run", critic_init="policy",
                     generation={"max_new_tokens": 16, "temperature": 1.0, "batch_size": 8})  # fmt: skip
    trainer = PPOTrainer(cfg)
    assert trainer.ac.policy.get_output_embeddings().weight.shape[0] > len(trainer.tokenizer)
    sampler, recomputed, tokens = _sampler_and_recomputed_logprobs(trainer)
    torch.testing.assert_close(recomputed, sampler, rtol=1e-4, atol=1e-4)
    assert (tokens < len(trainer.tokenizer)).all() and (tokens != trainer.tokenizer.pad_token_id).all()


# ----------------------------------------------------------------------------- 4. first-epoch ratio


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_minibatch_of_the_first_epoch_has_ratio_one(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch, precision, lora):
    """The old log-probs are computed on the very micro-batches the first epoch trains on (same rows, padding and
    shapes): before the first update the ratio is 1 and approx_kl 0, to 1e-6, in fp32 and in bf16."""
    import rlhfkit.rl.ppo as ppo

    calls = []

    def recording(logprobs, old_logprobs, advantages, mask, clip_range):
        loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
        calls.append(((logprobs.detach() - old_logprobs)[mask].abs().max().item(), stats))
        return loss, stats

    monkeypatch.setattr(ppo, "policy_loss", recording)
    extra = {"lora": LORA} if lora else {}
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, precision=precision,
                     generation={"max_new_tokens": 12, "temperature": 1.0, "batch_size": 8}, **extra)  # fmt: skip
    trainer = PPOTrainer(cfg)
    torch.manual_seed(0)
    trainer.iteration(0)
    first = calls[: trainer.micro_per_minibatch]
    assert len(first) == 2 and len(calls) == cfg.ppo_epochs * trainer.n_minibatches * trainer.micro_per_minibatch
    for max_difference, stats in first:
        assert max_difference <= 1e-6
        assert abs(stats["ratio_mean"].item() - 1) <= 1e-6 and abs(stats["approx_kl"].item()) <= 1e-6
    assert max(d for d, _ in calls) > 1e-4  # later minibatches do see the updated policy


# ----------------------------------------------------------------------------- 5. cut responses


def test_a_cut_response_scores_the_same_through_ids_and_through_text(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """The text path (a reward model with another vocabulary) adds the EOS only to responses that ended."""
    trainer = PPOTrainer(ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run"))
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    a, b, c = (tok(text, add_special_tokens=False)["input_ids"] for text in ("yes banana apple", "the river", "sure"))
    batch = _rollout_by_hand(trainer, [a, b + [tok.eos_token_id], c], width=max(map(len, (a, b, c))) + 1)
    assert batch.has_eos.tolist() == [False, True, False]
    through_ids = trainer.experience(batch).rm_scores.clone()
    trainer.nets.same_vocab = False  # the path of a reward model with another vocabulary
    torch.testing.assert_close(trainer.experience(batch).rm_scores, through_ids, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 6. settings that can only be mistakes


@pytest.mark.parametrize(
    "yaml_line, field, message",
    [
        ("init_kl_coef: 0", "init_kl_coef", "stays 0 for ever"),
        ("missing_eos_penalty: -1", "missing_eos_penalty", "greater than or equal to 0"),
        ("grad_accum: 4", "grad_accum", "grad_accum would do nothing"),
        ("generation:\n  top_p: 0.9", "generation.top_p", "the ratio would be wrong"),
        ("generation:\n  top_k: 40", "generation.top_k", "the ratio would be wrong"),
    ],
)
def test_settings_that_can_only_be_mistakes_are_refused(tmp_path, yaml_line, field, message):
    path = tmp_path / "ppo.yaml"
    path.write_text(f"seed: 1\n{yaml_line}\n")
    with pytest.raises(ConfigError, match=rf"ppo.yaml:\d+: field '{field}': .*{message}"):
        load_config(PPOConfig, path)


def test_the_same_settings_are_fine_where_they_mean_something():
    assert load_config(PPOConfig, None, ["--init_kl_coef", "0", "--adaptive_kl", "false"]).init_kl_coef == 0  # no KL penalty
    assert load_config(PPOConfig, None, ["--missing_eos_penalty", "0"]).missing_eos_penalty == 0
    cfg = load_config(PPOConfig, None, ["--generation.top_p", "1.0", "--generation.top_k", "0"])
    assert PPOConfig.model_validate(cfg.model_dump()) == cfg  # a dumped config (as the pipeline passes it) validates


# ----------------------------------------------------------------------------- 7. reward statistics' precision


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_reference_responses_score_zero_on_average(tiny_model_dir, prompts_file, tmp_path, precision):
    """reward_stats.json measured as step 2 does in bf16 (fp32 weights, bf16 autocast): PPO, in bf16 or fp32,
    scores the same reference responses at 0 on average (normalised). A 16-block body, where a bf16 residual
    stream drifts (by -0.03 here when the reward model is stored in bf16)."""
    from conftest import build_tiny_model
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import build_reward_model, save_reward_model, score

    base = tmp_path / "deep"
    shutil.copytree(tiny_model_dir, base)
    tok = load_tokenizer(str(base))
    build_tiny_model(base, vocab_size=len(tok) - 1, layers=16)  # the tokenizer's pad token is added on loading
    torch.manual_seed(1)
    rm = build_reward_model(str(base), tok)
    rng = random.Random(7)
    messages = [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))}] for _ in range(32)]
    responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for _ in messages]
    raw = score(rm, tok, messages, responses, 8, normalise=False, precision="bf16")
    stats = {"mean": statistics.fmean(raw), "std": statistics.pstdev(raw), "precision": "bf16", "max_length": 512,
             "max_prompt_share": 0.5, "base_model": str(base), "lora": False}  # fmt: skip
    rm_dir = save_reward_model(rm, tok, tmp_path / "rm", stats)

    trainer = PPOTrainer(ppo_config(tiny_model_dir, rm_dir, prompts_file, tmp_path / "run", precision=precision))
    trainer.iteration_index = 0
    ptok = trainer.tokenizer
    ids = [encode_prompt(ptok, m) for m in messages]
    response_ids = pad([ptok(r, add_special_tokens=False)["input_ids"] + [ptok.eos_token_id] for r in responses], ptok.pad_token_id)
    mask, has_eos = first_eos_mask(response_ids, ptok.eos_token_id, ptok.pad_token_id)
    prompt_ids, prompt_mask = pad(ids, ptok.pad_token_id, side="left"), pad([[1] * len(i) for i in ids], 0, side="left")
    batch = trainer.experience(Samples(messages, prompt_ids, prompt_mask, response_ids, mask, has_eos))
    assert abs(batch.rm_scores.mean().item()) < 0.02


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_reward_model_measured_in_bf16_keeps_its_scores_with_its_matrices_in_bf16(tiny_model_dir, prompts_file, tmp_path, monkeypatch, lora):
    """precision bf16 and a reward model measured in bf16: its frozen matrices are stored in bf16 (it is read under
    bf16 autocast, which multiplies in bf16 anyway), embeddings, norms and head stay fp32, and the scores, values
    and log-probs of a rollout are bitwise those of a reward model kept in fp32 (critic on its base)."""
    import rlhfkit.rl.networks as networks
    from rlhfkit.models import load_tokenizer, transformer_blocks
    from rlhfkit.reward import build_reward_model, save_reward_model

    tok = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    stats = {"mean": 0.05, "std": 0.5, "precision": "bf16", "base_model": str(tiny_model_dir), "lora": False}
    rm_dir = save_reward_model(build_reward_model(str(tiny_model_dir), tok), tok, tmp_path / "rm", stats)
    extra = {"lora": LORA} if lora else {"train_top_layers": 1}
    batches = {}
    for matrices_in_bf16 in (True, False):
        if not matrices_in_bf16:
            monkeypatch.setattr(networks, "store_frozen_linear_weights_as", lambda model, dtype: 0)
        cfg = ppo_config(tiny_model_dir, rm_dir, prompts_file, tmp_path / str(matrices_in_bf16), precision="bf16", critic_init="reward", **extra)
        trainer = PPOTrainer(cfg)
        rm = trainer.nets.reward_model
        block = transformer_blocks(rm.lm)[0]
        expected = torch.bfloat16 if matrices_in_bf16 else torch.float32
        assert block.mlp.down_proj.weight.dtype == block.self_attn.o_proj.weight.dtype == expected
        assert block.input_layernorm.weight.dtype == rm.lm.get_input_embeddings().weight.dtype == rm.head.weight.dtype == torch.float32
        trainer.iteration_index = 0
        batches[matrices_in_bf16] = trainer.experience(_rollout_by_hand(trainer, [[5, 6, 7, tok.eos_token_id], [8, 9], [10, 11, 12]], 6))
    stored, kept = batches[True], batches[False]
    for field in ("rm_scores", "values", "old_logprobs", "ref_logprobs"):
        assert torch.equal(getattr(stored, field), getattr(kept, field)), field
