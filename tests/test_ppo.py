"""Step 3 (PPO) with tiny random models: rollout truncation and the missing-EOS penalty, shapes
and masking, the reference equals the policy at the start, resume after a kill, the NaN guard,
the final policy folder, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS
from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.rl import PPOTrainer, run_ppo
from rlhfkit.rl.math import first_eos_mask
from rlhfkit.rl.networks import policy_logprobs
from rlhfkit.rl.rollout import Samples
from rlhfkit.training import NonFiniteError, read_metrics

LORA = {"enabled": True, "r": 4, "alpha": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run best on one thread; two threads on a busy 2-core machine spin-wait (~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model on the tiny LM with a random head, saved by step 2's code."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import build_reward_model, save_reward_model

    tok = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    rm = build_reward_model(str(tiny_model_dir), tok)
    out = tmp_path_factory.mktemp("rm") / "final"
    return save_reward_model(rm, tok, out, {"mean": 0.05, "std": 0.5, "base_model": str(tiny_model_dir), "lora": False})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + f" {i}"}) + "\n")
    return path


def ppo_config(tiny_model_dir, reward_dir, prompts_file, out, **overrides) -> PPOConfig:
    fields = dict(
        policy_model=str(tiny_model_dir),
        reward_model=str(reward_dir),
        prompts=str(prompts_file),
        output_dir=str(out),
        precision="fp32",
        prompts_per_iteration=8,
        minibatch_size=4,
        batch_size=2,
        ppo_epochs=2,
        max_steps=2,
        learning_rate=1e-3,
        generation={"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8},
        checkpoint_every=1,
        sample_every=1,
        samples_per_log=2,
    )
    fields.update(overrides)
    return PPOConfig(**fields)


def _rollout_by_hand(trainer: PPOTrainer, responses: list[list[int]], width: int) -> Samples:
    """A rollout whose responses we choose (right-padded with pad to `width`)."""
    tok = trainer.tokenizer
    messages = [[{"role": "user", "content": f"say something {i}"}] for i in range(len(responses))]
    from rlhfkit.tokens import encode_prompt, pad

    ids = [encode_prompt(tok, m) for m in messages]
    prompt_ids, prompt_mask = pad(ids, tok.pad_token_id, side="left"), pad([[1] * len(i) for i in ids], 0, side="left")
    raw = pad(responses, tok.pad_token_id, length=width)
    mask, has_eos = first_eos_mask(raw, tok.eos_token_id, tok.pad_token_id)
    return Samples(messages, prompt_ids, prompt_mask, raw.masked_fill(~mask, tok.pad_token_id), mask, has_eos)


def test_rollout_truncates_after_first_eos(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch):
    import rlhfkit.rl.rollout as ppo

    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", generation={"max_new_tokens": 6, "temperature": 1.0})
    trainer = PPOTrainer(cfg)
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    E, P = tok.eos_token_id, tok.pad_token_id
    a, b, c = tok("yes banana apple", add_special_tokens=False)["input_ids"][:3]
    # what a sampler may return: EOS then more tokens, no EOS at all, EOS first, stopped early and padded
    sampled = torch.tensor([[a, b, E, c, E, a], [a, b, c, a, b, c], [E, a, b, c, a, b], [a, E, P, P, P, P]])
    seen = {}

    def fake_sample_ids(model, prompt_ids, attention_mask, gen, eos_id, pad_id, **kwargs):
        seen["prompt"] = (prompt_ids, attention_mask)
        return sampled[:, :5] if prompt_ids.shape[0] == 4 else sampled  # a shorter output gets padded

    monkeypatch.setattr(ppo, "sample_ids", fake_sample_ids)
    batch = trainer.sample(trainer.prompts[:4])
    assert batch.has_eos.tolist() == [True, False, True, True]
    assert batch.mask.sum(1).tolist() == [3, 5, 1, 2]
    assert batch.response_ids.tolist() == [[a, b, E, P, P], [a, b, c, a, b], [E, P, P, P, P], [a, E, P, P, P]]
    assert batch.response_ids.shape[1] == 5  # trimmed to the longest response
    prompt_ids, prompt_mask = seen["prompt"]
    assert (prompt_mask[:, -1] == 1).all() and (prompt_mask[:, 0] == 1).any()  # left-padded, no all-pad column

    # real sampling: every row is valid up to its first EOS and padding after it
    monkeypatch.undo()
    torch.manual_seed(0)
    batch = trainer.sample(trainer.prompts[:8])
    T = batch.response_ids.shape[1]
    for row, m, has in zip(batch.response_ids.tolist(), batch.mask.tolist(), batch.has_eos.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (T - n)
        assert all(t == P for t in row[n:])
        assert (row[n - 1] == E) == has and E not in row[: n - 1]


def test_missing_eos_penalty_and_score_clip(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run"))
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    eos = tok.eos_token_id
    words = tok("yes banana apple", add_special_tokens=False)["input_ids"][:3]
    responses = [words + [eos], words, words[:1] + [eos, *words], words[:2]]  # with EOS, cut, EOS mid-way, cut
    batch = _rollout_by_hand(trainer, responses, width=6)
    assert batch.has_eos.tolist() == [True, False, True, False]
    assert batch.mask.sum(1).tolist() == [len(words) + 1, len(words), 2, 2]
    samples = batch
    batch = trainer.experience(samples)
    # replace (default): a response without EOS scores -missing_eos_penalty = -1 after normalisation
    assert batch.scores[1].item() == -1.0 and batch.scores[3].item() == -1.0
    assert torch.equal(batch.scores[[0, 2]], batch.rm_scores[[0, 2]])

    trainer.cfg.missing_eos = "subtract"
    trainer.cfg.missing_eos_penalty = 0.5
    trainer.cfg.score_clip = 0.1
    batch = trainer.experience(samples)
    clipped = batch.rm_scores.clamp(-0.1, 0.1)
    torch.testing.assert_close(batch.scores, clipped - 0.5 * (~batch.has_eos).float())


def test_reward_model_reads_policy_ids_like_text(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """Same vocabulary: the token ids are reused; the score equals step 2's text-based `score`."""
    from rlhfkit.reward import score

    trainer = PPOTrainer(ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run"))
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    assert trainer.nets.same_vocab
    texts = ["yes banana apple", "the river", "no"]
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    batch = trainer.experience(_rollout_by_hand(trainer, responses, width=8))
    expected = score(trainer.nets.reward_model, trainer.nets.rm_tokenizer, batch.messages, texts, 4, normalise=True)
    torch.testing.assert_close(batch.rm_scores, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_reward_model_with_another_vocabulary_reads_text(tiny_model_dir, prompts_file, tmp_path):
    """Another vocabulary: responses are decoded and re-tokenised; the critic cannot come from that reward model."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward import build_reward_model, save_reward_model, score

    tok = load_tokenizer(str(tiny_model_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|rm-only|>"]})
    torch.manual_seed(3)
    other = save_reward_model(build_reward_model(str(tiny_model_dir), tok), tok, tmp_path / "rm", {"mean": 0.0, "std": 2.0})
    with pytest.raises(ValueError, match="critic_init: policy"):
        PPOTrainer(ppo_config(tiny_model_dir, other, prompts_file, tmp_path / "a"))
    trainer = PPOTrainer(ppo_config(tiny_model_dir, other, prompts_file, tmp_path / "b", critic_init="policy"))
    trainer.iteration_index = 0
    assert not trainer.nets.same_vocab
    ptok = trainer.tokenizer
    texts = ["yes banana apple", "the river"]
    batch = trainer.experience(_rollout_by_hand(trainer, [ptok(t, add_special_tokens=False)["input_ids"] + [ptok.eos_token_id] for t in texts], 6))
    expected = score(trainer.nets.reward_model, trainer.nets.rm_tokenizer, batch.messages, texts, 4, normalise=True)
    torch.testing.assert_close(batch.rm_scores, torch.tensor(expected))


def test_shapes_masking_and_rewards(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run"))
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    words = tok("sure banana apple river the", add_special_tokens=False)["input_ids"][:5]
    responses = [words + [tok.eos_token_id], words[:2] + [tok.eos_token_id], words[:3]]
    real = trainer.experience_of.logprobs_and_values

    def perturbed(*args, **kwargs):  # perturb the reference so the KL is not zero
        old, ref, entropy, values = real(*args, **kwargs)
        return old, ref - 0.1 * torch.arange(ref.shape[1]), entropy, values

    trainer.experience_of.logprobs_and_values = perturbed
    batch = trainer.experience(_rollout_by_hand(trainer, responses, width=7))
    beta = 0.3
    rewards = trainer.kl_rewards(batch, beta)
    advantages, returns = trainer.advantages(batch, rewards)
    computed = {"old_logprobs": batch.old_logprobs, "ref_logprobs": batch.ref_logprobs, "values": batch.values, "entropy": batch.entropy,
                "rewards": rewards, "kl": batch.kl, "advantages": advantages, "returns": returns}  # fmt: skip
    B, T = batch.response_ids.shape
    for name, value in computed.items():
        assert value.shape == (B, T), name
    pad = ~batch.mask
    for name in ("rewards", "kl", "advantages", "returns"):
        assert (computed[name][pad] == 0).all(), f"{name} is not 0 on padding"
    lengths = batch.mask.sum(1)
    for b in range(B):
        last = lengths[b] - 1
        expected = -beta * batch.kl[b, last] + batch.scores[b]
        torch.testing.assert_close(rewards[b, last], expected)
        torch.testing.assert_close(rewards[b, :last], -beta * batch.kl[b, :last])
    # whitened over valid tokens only
    valid = advantages[batch.mask]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-3

    # a row's log-probs and values do not depend on the padding around it (other rows, trimming)
    alone = batch.micro(slice(1, 2))
    lp, v, _, _, _ = trainer.ac(**{k: alone[k] for k in ("prompt_ids", "prompt_mask", "response_ids", "mask")})
    n = int(lengths[1])
    torch.testing.assert_close(lp[0, :n], batch.old_logprobs[1, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v[0, :n], batch.values[1, :n], rtol=1e-4, atol=1e-5)


def test_recomputed_logprobs_match_sampling_distribution(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """The rollout-policy log-probs are those of the distribution the tokens were sampled from
    (softmax of logits / temperature over the ids the sampler may draw: not the pad id), even with
    left-padded prompts of different lengths."""
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", generation={"max_new_tokens": 6, "temperature": 0.7})
    trainer = PPOTrainer(cfg)
    trainer.iteration_index = 0
    tok = trainer.tokenizer
    batch = trainer.experience(trainer.sample(trainer.prompts[:4]))
    policy = trainer.ac.policy
    for b in range(4):  # the generation logits of each row, fed one token at a time without padding
        prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()][None]
        resp = batch.response_ids[b][batch.mask[b]]
        with torch.no_grad():
            logits = policy(input_ids=torch.cat([prompt[0], resp])[None]).logits[0, prompt.shape[1] - 1 : -1]
        logits[:, tok.pad_token_id] = float("-inf")  # never sampled
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, resp[:, None]).squeeze(-1)
        torch.testing.assert_close(batch.old_logprobs[b, : len(resp)], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "lora, critic_init",
    [(False, "reward"), (True, "reward"), (True, "policy")],
    ids=["full", "lora-critic-from-reward", "lora-shared-base"],
)
def test_reference_equals_policy_at_start_and_final_policy_loads(tiny_model_dir, reward_dir, prompts_file, tmp_path, lora, critic_init):
    extra = {"lora": LORA} if lora else {}
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, critic_init=critic_init, **extra)
    trainer = PPOTrainer(cfg)
    nets = trainer.nets
    if lora:
        assert nets.reference is None  # the reference is the policy's base with the adapter off
        n_base = sum(p.numel() for p in trainer.ac.parameters() if not p.requires_grad)
        n_policy_lm = sum(p.numel() for p in trainer.ac.policy.get_base_model().parameters() if not p.requires_grad)
        # one frozen copy of the SFT base (+ the reward model's base for the critic, which IS the reward model)
        assert n_base == n_policy_lm * (2 if critic_init == "reward" else 1)
        if critic_init == "reward":
            rm_params = {id(p) for p in nets.reward_model.parameters()}
            assert all(id(p) in rm_params for p in trainer.ac.critic_backbone.parameters())
    metrics = trainer.iteration(0)
    batch = trainer.last_rollout
    assert torch.equal(batch.old_logprobs, batch.ref_logprobs)  # bit-identical before any update
    assert (batch.kl_k1 == 0).all() and metrics["kl"] == 0.0
    assert trainer.policy_params and trainer.critic_params
    # after the update the policy moved away from the reference, and the reference did not move
    trainer.iteration_index = 1
    batch = trainer.experience(batch)
    assert not torch.equal(batch.old_logprobs, batch.ref_logprobs)
    with trainer.nets.reference_active() as ref:
        again = policy_logprobs(ref, batch.micro(slice(None)), 1.0, support=trainer.ac.support)[0]
    T = again.shape[1]
    torch.testing.assert_close(again[batch.mask[:, :T]], batch.ref_logprobs[:, :T][batch.mask[:, :T]])

    trainer.save_final()
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # merged, plain transformers
    assert not (tmp_path / "run" / "final" / "adapter_config.json").exists()
    lp = policy_logprobs(final, batch.micro(slice(None)), 1.0, support=trainer.ac.support)[0]
    torch.testing.assert_close(lp[batch.mask[:, :T]], batch.old_logprobs[:, :T][batch.mask[:, :T]], rtol=1e-4, atol=1e-4)


def test_train_top_layers_shares_the_frozen_blocks_stored_in_bf16(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """Full fine-tuning of the top block only: the block below is ONE tensor set shared by policy and
    reference (and by critic and reward model) and never updated; the policy's is stored in bf16, the reward
    model's stays in the fp32 its statistics were measured with; trained weights stay fp32."""
    from rlhfkit.models import load_causal_lm, load_tokenizer, save_model, transformer_blocks

    # norm weights that bf16 cannot hold exactly: a reference stored in bf16 would then differ from the policy
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tok)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.1)
    policy_dir = save_model(model, tok, tmp_path / "policy")
    cfg = ppo_config(policy_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, train_top_layers=1, precision="bf16")
    trainer = PPOTrainer(cfg)
    nets, ac = trainer.nets, trainer.ac
    policy_blocks, reference_blocks = transformer_blocks(ac.policy), transformer_blocks(nets.reference)
    critic_blocks, rm_blocks = ac.critic_backbone.layers, transformer_blocks(nets.reward_model.lm)
    for shared_a, shared_b, dtype in ((policy_blocks[0], reference_blocks[0], torch.bfloat16), (critic_blocks[0], rm_blocks[0], torch.float32)):
        for a, b in zip(shared_a.parameters(), shared_b.parameters(), strict=True):
            assert a is b and not a.requires_grad and a.dtype == dtype
    for own_a, own_b, frozen_dtype in ((policy_blocks[1], reference_blocks[1], torch.float32), (critic_blocks[1], rm_blocks[1], torch.float32)):
        for a, b in zip(own_a.parameters(), own_b.parameters(), strict=True):
            assert a is not b and a.requires_grad and a.dtype == torch.float32
            assert not b.requires_grad and b.dtype == frozen_dtype  # the reference's own blocks stay as the policy's
    assert all(p.dtype == torch.float32 for p in trainer.policy_params + trainer.critic_params)
    assert nets.reward_model.head.weight.dtype == torch.float32  # scores are not rounded to bf16
    before = {name: p.detach().clone() for name, p in nets.reference.named_parameters()}
    top_before = [p.detach().clone() for p in policy_blocks[1].parameters()]

    trainer.iteration(0)
    batch = trainer.last_rollout
    assert torch.equal(batch.old_logprobs, batch.ref_logprobs)  # same weights, same dtypes, same path
    for name, p in nets.reference.named_parameters():
        assert torch.equal(p, before[name]), name  # neither the shared nor the copied blocks moved
    assert any(not torch.equal(p, q) for p, q in zip(policy_blocks[1].parameters(), top_before))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_changes_no_number(tiny_model_dir, reward_dir, prompts_file, tmp_path, lora):
    """Recomputing activations in the backward pass gives the same iteration (same losses, same update)."""
    extra = {"lora": LORA} if lora else {}
    results = []
    for gc in (False, True):
        cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / f"gc{gc}", max_steps=1, gradient_checkpointing=gc, **extra)
        trainer = PPOTrainer(cfg)
        assert trainer.ac.policy.is_activation_checkpointing == gc
        torch.manual_seed(0)
        metrics = trainer.iteration(0)
        results.append((metrics, [p.detach().clone() for p in trainer.policy_params]))
    (m0, w0), (m1, w1) = results
    for key in ("policy_loss", "value_loss", "score", "approx_kl"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lora_policy_base_is_stored_in_bf16(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, lora=LORA, precision="bf16")
    trainer = PPOTrainer(cfg)
    frozen = [p for p in trainer.ac.policy.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # the critic's base is the reward model's, kept in the fp32 its statistics were measured with
    assert all(p.dtype == torch.float32 for p in trainer.ac.critic_backbone.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.policy_params + trainer.critic_params)
    trainer.iteration(0)
    batch = trainer.last_rollout
    assert torch.equal(batch.old_logprobs, batch.ref_logprobs)


def test_running_the_upper_blocks_from_the_lower_blocks_output_is_the_whole_forward(tiny_model_dir):
    from rlhfkit.models import backbone_and_head, load_causal_lm, transformer_blocks
    from rlhfkit.rl.networks import frozen_hidden, sequence_hidden

    backbone = backbone_and_head(load_causal_lm(str(tiny_model_dir)))[0]
    blocks = transformer_blocks(backbone)
    batch = {"prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "response_ids": torch.tensor([[10, 11], [12, 0]]), "mask": torch.tensor([[True, True], [True, False]])}  # fmt: skip
    with torch.no_grad():
        whole = sequence_hidden(backbone, batch)
        lower = frozen_hidden(backbone, batch, 1)
        upper = sequence_hidden(backbone, batch, lower, 1)
    valid = torch.cat([batch["prompt_mask"].bool(), batch["mask"]], 1)
    torch.testing.assert_close(upper[valid], whole[valid])
    assert not torch.allclose(lower[valid], whole[valid])  # the lower output is not yet the final one
    assert transformer_blocks(backbone) is blocks and len(blocks) == 2  # the blocks are put back


def _one_iteration(cfg: PPOConfig):
    trainer = PPOTrainer(cfg)
    torch.manual_seed(0)
    metrics = trainer.iteration(0)
    return trainer, metrics, [p.detach().clone() for p in trainer.policy_params + trainer.critic_params]


@pytest.mark.parametrize("lora,critic_init", [(False, "reward"), (False, "policy"), (True, "reward"), (True, "policy")],
                         ids=["full", "full-critic-from-policy", "lora", "lora-shared-base"])  # fmt: skip
def test_cached_frozen_blocks_change_no_number(tiny_model_dir, reward_dir, prompts_file, tmp_path, lora, critic_init):
    """train_top_layers: starting the upper block from the frozen block's output, computed once per rollout,
    gives the same scores, log-probs, values, losses and update as running the whole networks every time."""
    extra = {"lora": LORA} if lora else {}
    runs = {}
    for cache in (False, True):
        cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / f"cache{cache}", max_steps=1, train_top_layers=1,
                         cache_frozen_activations=cache, critic_init=critic_init, **extra)  # fmt: skip
        runs[cache] = _one_iteration(cfg)
    (t0, m0, w0), (t1, m1, w1) = runs[False], runs[True]
    assert t0.ac.policy_split == 0 and t1.ac.policy_split == 1  # the tiny model has 2 blocks
    assert t1.nets.reward_split == (1 if critic_init == "reward" else 0)
    batch = t1.last_rollout
    assert batch.policy_frozen is not None and (batch.reward_frozen is not None) == (critic_init == "reward")
    for key in ("policy_loss", "value_loss", "score", "kl", "approx_kl", "value_mean"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(t0.last_rollout.values, batch.values, rtol=1e-5, atol=1e-6)
    for a, b in zip(w0, w1, strict=True):  # Adam's first step is ~lr * sign(grad): float noise shows at 1e-6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if lora:  # adapters only on the top block: the block below computes what the reference computes
        names = [n for n, p in t1.ac.named_parameters() if ".lora_" in n]
        assert names and all(".layers.1." in n for n in names), names


def test_frozen_cache_is_switched_off_when_it_would_change_the_numbers(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch, caplog):
    """A body that does more than run its blocks (here: a wrong frozen output) fails the first-rollout check."""
    import rlhfkit.rl.frozen_cache as ppo

    right = ppo.frozen_hidden
    monkeypatch.setattr(ppo, "frozen_hidden", lambda backbone, batch, split: right(backbone, batch, split) * 1.5)
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, train_top_layers=1)
    trainer, metrics, _ = _one_iteration(cfg)
    assert "switched off" in caplog.text
    assert trainer.ac.policy_split == trainer.ac.critic_split == trainer.nets.reward_split == 0
    _, expected, _ = _one_iteration(cfg.model_copy(update={"cache_frozen_activations": False, "output_dir": str(tmp_path / "x")}))
    assert metrics["policy_loss"] == pytest.approx(expected["policy_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_frozen_cache_stays_on_in_bf16(tiny_model_dir, reward_dir, prompts_file, tmp_path, caplog, lora):
    """The first-rollout check compares the two paths on a micro-batch the cache was computed on. On other rows
    (another grouping, other padding widths) bf16 rounds differently, so the check failed on real models and
    switched the cache off (found on SmolLM2: 0.19 nats apart, PPO 1.7x slower)."""
    extra = {"lora": LORA} if lora else {}
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1, train_top_layers=1, precision="bf16",
                     **extra)  # fmt: skip
    trainer, metrics, _ = _one_iteration(cfg)
    assert "switched off" not in caplog.text
    assert trainer.ac.policy_split == 1 and trainer.last_rollout.policy_frozen is not None
    assert metrics["kl"] == 0.0  # first rollout: the policy is the reference, through the cached blocks too


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, reward_dir, prompts_file, tmp_path, lora):
    extra = dict(
        max_steps=4, checkpoint_every=2, adaptive_kl=True, target_kl=0.01, kl_horizon=20, init_kl_coef=0.1,
        ptx_data=None, **({"lora": LORA, "critic_init": "policy"} if lora else {}),
    )  # fmt: skip
    straight = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "a", **extra)
    run_ppo(straight)
    broken = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "b", **extra)
    run_ppo(broken, stop_after=3)  # "killed" after iteration 3, before its checkpoint (every 2)
    assert not (tmp_path / "b" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000002"]
    run_ppo(broken)  # the same command again resumes from iteration 2
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    state_a = json.loads((tmp_path / "a" / "ppo_state.json").read_text())
    state_b = json.loads((tmp_path / "b" / "ppo_state.json").read_text())
    assert state_a["beta"] != 0.1  # the controller moved beta
    assert state_b["beta"] == pytest.approx(state_a["beta"], rel=1e-9)
    steps = [m["step"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # redone iterations are not logged twice
    ma, mb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["score"] for m in mb] == pytest.approx([m["score"] for m in ma], rel=1e-4, abs=1e-5)
    samples = [json.loads(l)["iteration"] for l in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and samples.count(3) == 2  # samples_per_log, not repeated
    # checkpoints hold only trainable weights (with LoRA: adapters + value head, no frozen base)
    ckpt = load_file(str(next((tmp_path / "b" / "checkpoints").iterdir()) / "model.safetensors"))
    assert all((".lora_" in k or k.startswith("value_head.")) for k in ckpt) == lora


def test_nan_reward_stops_and_keeps_last_good_checkpoint(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch):
    from rlhfkit.reward import RewardModel

    real_head = RewardModel.score_hidden
    state = {"iteration": 0}
    real_iteration = PPOTrainer.iteration

    def iteration(self, it):
        state["iteration"] = it
        return real_iteration(self, it)

    def score_hidden(self, last):
        out = real_head(self, last)
        return out * float("nan") if state["iteration"] == 1 else out

    monkeypatch.setattr(PPOTrainer, "iteration", iteration)
    monkeypatch.setattr(RewardModel, "score_hidden", score_hidden)
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=3)
    with pytest.raises(NonFiniteError, match=r"reward-model score is nan at step 2.*last good checkpoint is kept"):
        run_ppo(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000001"] and not (tmp_path / "run" / "final").exists()


def test_nan_loss_stops(tiny_model_dir, reward_dir, prompts_file, tmp_path, monkeypatch):
    import rlhfkit.rl.ppo as ppo

    real = ppo.value_loss
    monkeypatch.setattr(ppo, "value_loss", lambda *a, **k: (lambda l, s: (l * float("inf"), s))(*real(*a, **k)))
    cfg = ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "run", max_steps=1)
    with pytest.raises(NonFiniteError, match="value loss is inf at step 1"):
        run_ppo(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_checks(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        PPOTrainer(ppo_config(tiny_model_dir, reward_dir, prompts_file, tmp_path / "x", prompts_per_iteration=6, minibatch_size=4))
    with pytest.raises(ConfigError, match="generation.temperature"):
        load_config(PPOConfig, None, ["--generation.temperature", "0"])
    cfg = load_config(PPOConfig, None, ["--generation.max_new_tokens", "9"])
    assert cfg.generation.top_p == 1.0 and cfg.generation.max_new_tokens == 9  # PPO sampling defaults kept


def test_cli_runs_with_options(tiny_model_dir, reward_dir, prompts_file, demos_file, tmp_path):
    """`rlhfkit ppo` with PPO-ptx, the k3 estimator, an entropy bonus and the subtract EOS penalty."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    config = tmp_path / "ppo.yaml"
    config.write_text(
        f"policy_model: {tiny_model_dir}\nreward_model: {reward_dir}\nprompts: {prompts_file}\n"
        f"output_dir: {tmp_path / 'run'}\nprecision: fp32\nprompts_per_iteration: 4\nminibatch_size: 4\n"
        "batch_size: 2\nppo_epochs: 1\nmax_steps: 1\ngeneration:\n  max_new_tokens: 6\n"
    )
    result = CliRunner().invoke(
        app,
        ["ppo", "--config", str(config), "--ptx_data", str(demos_file), "--ptx_coef", "0.5", "--kl_estimator", "k3",
         "--entropy_coef", "0.01", "--missing_eos", "subtract", "--critic_init", "policy"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (m,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for key in ("score", "kl", "total_reward", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac",
                "approx_kl", "entropy", "explained_variance", "response_length", "eos_share", "beta", "ptx_loss",
                "entropy_train", "time/generation", "time/scoring", "time/training", "tokens_per_s/generation",
                "tokens_per_s/scoring", "tokens_per_s/training"):  # fmt: skip
        assert key in m, key
    assert m["ptx_loss"] > 0 and m["kl"] == 0.0
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "run" / "ppo_state.json").exists()
    assert (tmp_path / "run" / "final" / "ppo_state.json").exists()
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert {"prompt", "response", "score", "kl"} <= sample.keys()
    # a finished run is not redone
    again = CliRunner().invoke(app, ["ppo", "--config", str(config)])
    assert again.exit_code == 0 and "final" in again.output


DDP_WORKER = r'''
"""Hand-made rollout of 8 responses: 1 process takes all, 2 processes 4 each; save the synced gradients."""
import contextlib, sys, torch
from dataclasses import replace
from handmade_rollout import hand_made_rollout
from rlhfkit.config import PPOConfig
from rlhfkit.rl import PPOTrainer
from rlhfkit.rl.trainer import Means

policy, reward, prompts, out = sys.argv[1:5]
cfg = PPOConfig(policy_model=policy, reward_model=reward, prompts=prompts, output_dir=out, precision="fp32",
                prompts_per_iteration=8, minibatch_size=8, batch_size=2, ppo_epochs=1, max_steps=2, vf_coef=0.5,
                entropy_coef=0.01, generation={"max_new_tokens": 6, "temperature": 1.0}, checkpoint_every=1)
tr = PPOTrainer(cfg)
acc = tr.accelerator
tr.iteration_index = 0
batch, _ = hand_made_rollout(tr)
batch = replace(batch, ref_logprobs=batch.ref_logprobs - 0.05)
rewards = tr.kl_rewards(batch, 0.1)
advantages, returns = tr.advantages(batch, rewards)  # whitened over both processes' tokens
local = batch.mask.sum().double().reshape(1)
global_tokens = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).item()
micros = torch.arange(len(batch)).split(cfg.batch_size)
for i, r in enumerate(micros):
    sync = i == len(micros) - 1 or acc.num_processes == 1
    with contextlib.nullcontext() if sync else acc.no_sync(tr.model):
        tr.micro_step(batch.micro(r, advantages=advantages, returns=returns), 0, global_tokens, None, 0.0, tr.loss, Means())
grads = torch.cat([p.grad.flatten() for p in tr.policy_params + tr.critic_params])
if acc.is_main_process:
    torch.save(grads, out + ".grads.pt")
tr.optimizer.zero_grad()
tr.train()  # and the whole loop: rollouts per process, checkpoints, final/
'''


def test_two_processes_give_the_single_process_gradient(tiny_model_dir, reward_dir, prompts_file, tmp_path):
    """Under `accelerate launch` with 2 CPU processes, the synced gradient of a minibatch split over
    the processes equals the single-process gradient (global whitening, token-weighted losses)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(map(str, (Path(__file__).parents[1], Path(__file__).parent)))}
    args = [str(tiny_model_dir), str(reward_dir), str(prompts_file)]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    two = subprocess.run([*launch, str(script), *args, str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    g1, g2 = torch.load(tmp_path / "one.grads.pt"), torch.load(tmp_path / "two.grads.pt")
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "two" / "final" / "config.json").exists()
    assert (tmp_path / "two" / "checkpoints" / "step-0000002" / "random_states_1.pkl").exists()  # one RNG state per process
    assert [m["step"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [1, 2]


def test_every_ppo_config_field_is_documented():
    from rlhfkit.cli import CONFIGS
    from rlhfkit.config import PPOConfig, RolloutSettings

    for cls in (PPOConfig, RolloutSettings):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
    assert CONFIGS["ppo"] == "PPOConfig"
