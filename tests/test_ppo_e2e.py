"""The whole RLHF pipeline with tiny models and a known ("gold") preference.

A scripted annotator prefers responses that contain the word "banana" (a word the tiny
tokenizer knows). We SFT a tiny random model on demonstrations where ~20% of the responses
contain it, sample K candidates per prompt from the SFT policy, rank them with the annotator
(K-wise, with ties), train a reward model on those rankings with step 2's code, run PPO with
this code, and check on held-out prompts that the share of responses with the word (the gold
score) rises clearly over the SFT policy's while the KL to the SFT policy stays under a bound
set by the adaptive controller's target.

The test can fail: with `init_kl_coef` huge and `adaptive_kl` off, or a learning rate of ~0, the
gold score does not rise (run `python tests/test_ppo_e2e.py --init_kl_coef 20 --adaptive_kl false`).
The same check runs for RLOO and GRPO (`--algorithm rloo|grpo --samples_per_prompt 4 --prompts_per_iteration 8`
in manual runs).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WORDS, build_tiny_model, build_tiny_tokenizer  # noqa: E402

GOLD_WORD = "banana"
RESPONSE_WORDS = "yes no sure here the good apple river day time people work".split()
TARGET_KL = 3.0  # nats per response


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run best on one thread; two threads on a busy 2-core machine spin-wait (~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gold(text: str) -> bool:
    """The scripted annotator's preference."""
    return GOLD_WORD in text


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


def _demonstration_response(rng: random.Random) -> str:
    words = [rng.choice(RESPONSE_WORDS) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.2:
        words[rng.randrange(len(words))] = GOLD_WORD
    return " ".join(words)


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def gold_share_and_kl(policy_dir: Path, sft_dir: Path, prompts: list[str], seed: int = 123) -> tuple[float, float]:
    """Share of sampled responses with the gold word, and the mean KL(policy || SFT) per response
    (k1, summed over the response tokens, on the policy's own samples)."""
    from rlhfkit.config import GenerationSettings
    from rlhfkit.generate import generate_responses, load_for_inference
    from rlhfkit.models import load_causal_lm
    from rlhfkit.tokens import encode_prompt

    gen = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=64, seed=seed)
    model, tok = load_for_inference(str(policy_dir), "fp32")
    samples = [s for group in generate_responses(model, tok, [messages(p) for p in prompts], gen, num_samples=2, progress=False) for s in group]
    share = sum(gold(s.text) for s in samples) / len(samples)
    reference = load_causal_lm(str(sft_dir / "final"), tok).eval()
    kls = []
    with torch.no_grad():
        for prompt, s in zip([p for p in prompts for _ in range(2)], samples):
            p = encode_prompt(tok, messages(prompt))
            ids = torch.tensor([p + s.token_ids])

            def logprobs(m):
                logits = m(ids).logits[0, len(p) - 1 : -1]
                return torch.log_softmax(logits, -1).gather(-1, ids[0, len(p) :, None]).squeeze(-1)

            kls.append((logprobs(model) - logprobs(reference)).sum().item())
    return share, sum(kls) / len(kls)


def run_pipeline(root: Path, **ppo_overrides) -> dict:
    """SFT -> candidates ranked by the annotator -> reward model -> PPO. Returns what the test checks."""
    return {**prepare_sft_and_reward(root), **run_step3(root, **ppo_overrides)}


def prepare_sft_and_reward(root: Path) -> dict:
    """SFT -> candidates ranked by the annotator -> reward model, in ``root``; held-out prompts in held_out.json."""
    from rlhfkit.config import GenerationSettings, RewardConfig, SFTConfig
    from rlhfkit.data import Comparison, comparison_to_json, write_jsonl
    from rlhfkit.generate import generate_responses, load_for_inference
    from rlhfkit.reward import run_reward
    from rlhfkit.sft import run_sft
    from rlhfkit.training import read_metrics

    root.mkdir(parents=True, exist_ok=True)
    base = root / "tiny"
    base.mkdir(exist_ok=True)
    tok = build_tiny_tokenizer(base)
    build_tiny_model(base, vocab_size=len(tok))
    assert tok.decode(tok(GOLD_WORD, add_special_tokens=False)["input_ids"]) == GOLD_WORD

    rng = random.Random(0)
    demos = [{"prompt": _prompt(rng), "response": _demonstration_response(rng)} for _ in range(300)]
    write_jsonl(root / "demos.jsonl", demos)
    train_prompts = [_prompt(rng) for _ in range(200)]
    held_out = [_prompt(rng) for _ in range(64)]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    (root / "held_out.json").write_text(json.dumps(held_out))

    # 1. SFT
    sft_cfg = SFTConfig(
        model=str(base), data=str(root / "demos.jsonl"), output_dir=str(root / "sft"), precision="fp32",
        batch_size=16, max_steps=100, learning_rate=1e-2, eval_every=0, checkpoint_every=0, max_length=64,
    )  # fmt: skip
    run_sft(sft_cfg)

    # 2. K candidates per prompt from the SFT policy, ranked by the scripted annotator (K-wise, ties kept)
    K = 4
    gen = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=64, seed=1)
    model, ptok = load_for_inference(str(root / "sft"), "fp32")
    candidates = generate_responses(model, ptok, [messages(p) for p in train_prompts[:150]], gen, num_samples=K, progress=False)
    comparisons = []
    for prompt, group in zip(train_prompts, candidates):
        texts = list(dict.fromkeys(s.text for s in group if s.text))  # distinct, non-empty
        complete = {s.text for s in group if s.has_eos}
        best = [i for i, t in enumerate(texts) if gold(t) and t in complete]
        rest = [i for i in range(len(texts)) if i not in best]
        if best and rest:
            comparisons.append(Comparison(messages(prompt), texts, [best, rest], source="scripted-annotator"))
    write_jsonl(root / "comparisons.jsonl", [comparison_to_json(c) for c in comparisons])

    # 3. reward model (step 2's code), normalised on the demonstrations
    rm_cfg = RewardConfig(
        model=str(root / "sft"), data=str(root / "comparisons.jsonl"), output_dir=str(root / "reward"), precision="fp32",
        batch_size=8, max_steps=100, learning_rate=1e-3, eval_every=0, checkpoint_every=0, eval_fraction=0.15,
        max_length=64, reference_data=str(root / "demos.jsonl"),
    )  # fmt: skip
    run_reward(rm_cfg)
    rm_evals = [m for m in read_metrics(root / "reward" / "metrics.jsonl") if m["phase"] == "eval"]
    return {"comparisons": len(comparisons), "rm_accuracy": rm_evals[-1]["accuracy"]}


def run_step3(root: Path, out: str = "ppo", **ppo_overrides) -> dict:
    """4. PPO (or RLOO, GRPO: `algorithm` among the overrides) from root's SFT policy and reward model, into root/out;
    the gold share and KL of SFT and of the tuned policy on the held-out prompts, and the training metrics."""
    from rlhfkit.config import PPOConfig
    from rlhfkit.rl import run_ppo
    from rlhfkit.training import read_metrics

    held_out = json.loads((root / "held_out.json").read_text())
    fields = dict(
        policy_model=str(root / "sft"), reward_model=str(root / "reward"), prompts=str(root / "prompts.jsonl"),
        output_dir=str(root / out), precision="fp32", prompts_per_iteration=32, minibatch_size=16, batch_size=16,
        ppo_epochs=4, max_steps=12, learning_rate=5e-4, init_kl_coef=0.1, adaptive_kl=True, target_kl=TARGET_KL,
        kl_horizon=100, generation={"max_new_tokens": 12, "temperature": 1.0, "batch_size": 64},
        checkpoint_every=0, sample_every=4,
    )  # fmt: skip
    fields.update(ppo_overrides)
    run_ppo(PPOConfig(**fields))
    ppo_metrics = read_metrics(root / out / "metrics.jsonl")

    sft_share, sft_kl = gold_share_and_kl(root / "sft", root / "sft", held_out)
    ppo_share, ppo_kl = gold_share_and_kl(root / out, root / "sft", held_out)
    return {
        "sft_gold": sft_share,
        "ppo_gold": ppo_share,
        "sft_kl": sft_kl,
        "ppo_kl": ppo_kl,
        "train_kl": [m["kl"] for m in ppo_metrics],
        "train_score": [m["score"] for m in ppo_metrics],
        "eos_share": [m["eos_share"] for m in ppo_metrics],
    }


def test_rlhf_raises_gold_score_within_kl_bound(tmp_path):
    r = run_pipeline(tmp_path)
    print(json.dumps(r, indent=1))
    assert r["comparisons"] >= 50
    assert r["rm_accuracy"] >= 0.9  # the reward model learned the annotator's preference
    assert r["sft_kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.05 <= r["sft_gold"] <= 0.4  # the SFT policy says the word sometimes
    # the gold score rises clearly on held-out prompts
    assert r["ppo_gold"] >= r["sft_gold"] + 0.3, r
    assert r["train_score"][-1] > r["train_score"][0] + 0.5
    # ... while the KL to the SFT policy stays bounded (the adaptive controller's target, with slack
    # for its lag), during training and on held-out prompts
    assert max(r["train_kl"]) < 2 * TARGET_KL, r["train_kl"]
    assert r["ppo_kl"] < 2 * TARGET_KL, r["ppo_kl"]
    assert min(r["eos_share"]) >= 0.8  # no gaming by running to the length limit (it was >= 0.94)


# RLOO and GRPO: k = 4 responses to each of 8 prompts, so an iteration holds as many responses (32) as PPO's
CRITIC_FREE = {
    "rloo": dict(algorithm="rloo", samples_per_prompt=4, prompts_per_iteration=8),
    "grpo": dict(algorithm="grpo", samples_per_prompt=4, prompts_per_iteration=8),
    "dr_grpo": dict(algorithm="grpo", grpo_variant="dr_grpo", samples_per_prompt=4, prompts_per_iteration=8),
}


@pytest.fixture(scope="module")
def sft_and_reward(tmp_path_factory) -> Path:
    """One SFT policy and one reward model for the critic-free methods."""
    root = tmp_path_factory.mktemp("e2e")
    prepare_sft_and_reward(root)
    return root


@pytest.mark.parametrize("method", list(CRITIC_FREE))
def test_critic_free_methods_raise_gold_score_within_kl_bound(sft_and_reward, method):
    """The same gold-preference check for RLOO, GRPO and Dr. GRPO (no critic). Each can fail, e.g.
    `python tests/test_ppo_e2e.py --algorithm grpo --samples_per_prompt 4 --prompts_per_iteration 8 --learning_rate 1e-9`."""
    r = run_step3(sft_and_reward, out=method, **CRITIC_FREE[method])
    print(method, json.dumps(r, indent=1))
    assert r["sft_kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0.05 <= r["sft_gold"] <= 0.4
    assert r["ppo_gold"] >= r["sft_gold"] + 0.3, r
    assert r["train_score"][-1] > r["train_score"][0] + 0.5
    assert max(r["train_kl"]) < 2 * TARGET_KL, r["train_kl"]
    assert r["ppo_kl"] < 2 * TARGET_KL, r["ppo_kl"]
    assert min(r["eos_share"]) >= 0.8


if __name__ == "__main__":  # manual runs, e.g. to see it fail:  --init_kl_coef 20 --adaptive_kl false
    import tempfile

    from rlhfkit.config import parse_overrides

    overrides = parse_overrides(sys.argv[1:])
    print(json.dumps(run_pipeline(Path(tempfile.mkdtemp(prefix="rlhf-e2e-")), **overrides), indent=1))
