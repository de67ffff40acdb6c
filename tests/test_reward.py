"""Step 2, the reward model: pairs and weights, the score position, learning, normalisation,
resume, save/load, and the score / reward-eval commands. Tiny random Llama only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.config import LoraSettings, RewardConfig
from rlhfkit.data import Comparison, load_comparisons, split_by_prompt
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.training import read_metrics
from rlhfkit.reward import (
    RewardModel,
    build_reward_model,
    comparison_loss,
    encode_comparison,
    encode_pair_text,
    evaluate_reward_model,
    expand_comparison,
    load_reward_model,
    pack_comparisons,
    pair_terms,
    rows_to_batch,
    run_reward,
    save_reward_model,
    score,
    spread_responses,
)

from conftest import WORDS

MARKER = "banana"
PLAIN = [w for w in WORDS if w != MARKER]


def user(text):
    return [{"role": "user", "content": text}]


def sentence(rng, lo=3, hi=8, marker=False):
    words = [rng.choice(PLAIN) for _ in range(rng.randint(lo, hi))]
    if marker:
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def write_synthetic(path: Path, n: int = 320, seed: int = 0) -> Path:
    """Comparisons where a response containing the marker word beats those without it: mostly pairs,
    every fourth prompt a K-wise ranking of 3-4 responses (the marked one first, the rest tied)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = f"{sentence(rng)} {i}"
            if i % 4:
                record = {"prompt": prompt, "chosen": sentence(rng, marker=True), "rejected": sentence(rng)}
            else:
                k = rng.randint(3, 4)
                responses = [sentence(rng, marker=True)] + [sentence(rng) for _ in range(k - 1)]
                order = list(range(k))
                rng.shuffle(order)
                responses = [responses[j] for j in order]
                best = order.index(0)
                record = {"prompt": prompt, "responses": responses, "ranking": [best, [j for j in range(k) if j != best]]}
            record["source"] = "pairs" if i % 4 else "kwise"
            f.write(json.dumps(record) + "\n")
    return path


def tiny_config(tmp: Path, model_dir: Path, data: Path, **fields) -> RewardConfig:
    base = dict(
        output_dir=str(tmp / "run"),
        model=str(model_dir),
        data=str(data),
        precision="fp32",
        eval_fraction=0.2,
        max_length=64,
        batch_size=8,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        epochs=1,
        eval_every=0,
        checkpoint_every=0,
        seed=0,
    )
    base.update(fields)
    return RewardConfig(**base)


# ----------------------------------------------------------------------------- pairs and weights


def test_kwise_ranking_expands_to_pairs_with_per_prompt_weights(tiny_model_dir):
    c = Comparison(user("q"), ["a b", "c d", "e f", "g h"], [[2], [0, 3], [1]])
    pairs, weights, margins = expand_comparison(c)
    assert sorted(pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])  # no pair inside the tie
    assert sum(weights) == pytest.approx(1.0) and len(set(weights)) == 1
    assert margins == [0.0] * 5

    tokenizer = load_tokenizer(str(tiny_model_dir))
    enc = encode_comparison(tokenizer, c, max_length=64, max_prompt_share=0.5)
    assert len(enc.rows) == 4  # one forward row per response, not two per pair
    assert enc.pairs == pairs and sum(enc.weights) == pytest.approx(1.0)
    # A repeated response text is encoded once.
    dup = encode_comparison(tokenizer, Comparison(user("q"), ["same", "other", "same"], [[0], [1], [2]]), 64, 0.5)
    assert len(dup.rows) == 2 and dup.pairs == [(0, 1), (0, 0), (1, 0)]

    # Per-prompt averaging: a 6-pair prompt and a 1-pair prompt weigh the same.
    big = encode_comparison(tokenizer, Comparison(user("x"), ["a", "b", "c", "d"], [[0], [1], [2], [3]]), 64, 0.5)
    small = encode_comparison(tokenizer, Comparison(user("y"), ["a", "b"], [[1], [0]]), 64, 0.5)
    scores = torch.tensor([0.5, 0.0, -1.0, 2.0, 0.3, -0.2])
    loss, stats = comparison_loss(scores, pair_terms([big, small]))
    ls = torch.nn.functional.logsigmoid
    big_mean = torch.stack([-ls(scores[b] - scores[w]) for b, w in big.pairs]).mean()
    small_mean = -ls(scores[4 + 1] - scores[4 + 0])
    assert loss.item() == pytest.approx((big_mean + small_mean).item(), rel=1e-6)
    assert stats["loss_count"] == 2 and stats["accuracy_count"] == 7


def test_ratings_with_ties_give_only_strict_pairs_and_margins(tmp_path):
    path = tmp_path / "ratings.jsonl"
    lines = [("p", "r0", 5), ("p", "r1", 7), ("p", "r2", 5), ("p", "r3", 2), ("q", "s0", 4), ("q", "s1", 4), ("q", "s2", 1)]
    path.write_text("".join(json.dumps({"prompt": p, "response": r, "score": s}) + "\n" for p, r, s in lines))
    first, second = load_comparisons(str(path))
    pairs, weights, margins = expand_comparison(first, margin_scale=0.5)
    assert sorted(pairs) == sorted([(1, 0), (1, 2), (1, 3), (0, 3), (2, 3)])  # r0 and r2 tie: no pair
    assert all(first.scores[b] > first.scores[w] for b, w in pairs)
    assert sum(weights) == pytest.approx(1.0)
    assert margins == [0.5 * (first.scores[b] - first.scores[w]) for b, w in pairs]
    assert sorted(expand_comparison(second)[0]) == [(0, 2), (1, 2)]


# ----------------------------------------------------------------------------- the score position


def test_score_at_last_real_token_whatever_the_padding(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    rm = build_reward_model(str(tiny_model_dir), tokenizer).eval()
    rows = [encode_pair_text(tokenizer, user(f"question {i}"), " ".join(WORDS[: 3 + 5 * i]), 64, 0.5) for i in range(4)]
    assert all(r[-1] == tokenizer.eos_token_id for r in rows)
    with torch.no_grad():
        alone = torch.cat([rm(**rows_to_batch([r], tokenizer.pad_token_id)) for r in rows])
        right = rm(**rows_to_batch(rows, tokenizer.pad_token_id, side="right"))
        left = rm(**rows_to_batch(rows, tokenizer.pad_token_id, side="left"))
        noisy = rows_to_batch(rows, tokenizer.pad_token_id, side="left")
        pad_positions = noisy["attention_mask"] == 0
        noisy["input_ids"][pad_positions] = torch.randint(3, 300, (int(pad_positions.sum()),))
        noisy_scores = rm(**noisy)
        longer = rows_to_batch(rows + [rows[-1] + [5] * 7], tokenizer.pad_token_id)  # more padding on every row
        more_pad = rm(**longer)[:4]
    assert right.dtype == torch.float32 and right.shape == (4,)
    assert len(set(alone.tolist())) == 4  # the rows really differ
    for other in (right, left, noisy_scores, more_pad):
        torch.testing.assert_close(other, alone, atol=1e-5, rtol=1e-5)


def test_shared_prompt_rows_keep_one_truncated_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    long_prompt = user(" ".join(WORDS * 3))
    c = Comparison(long_prompt, ["a b", " ".join(WORDS[:20]), "c"], [[1], [0], [2]])
    alone = encode_comparison(tokenizer, c, 48, 0.5)
    shared = encode_comparison(tokenizer, c, 48, 0.5, share_prompt=True)
    prompt = shared.rows[0][: shared.prompt_tokens]
    assert 0 < shared.prompt_tokens and all(r[: shared.prompt_tokens] == prompt for r in shared.rows)
    # The prompt is what the longest response leaves (its row is the same either way); the others lose context.
    assert shared.rows[1] == alone.rows[1] and len(shared.rows[1]) == 48
    assert [len(r) for r in shared.rows] < [len(r) for r in alone.rows]
    assert shared.pairs == alone.pairs and shared.truncated == 3
    assert shared.packed_tokens == len(prompt) + sum(len(r) - len(prompt) for r in shared.rows) < shared.tokens
    short = encode_comparison(tokenizer, Comparison(user("q"), ["a", "b"], [[0], [1]]), 48, 0.5, share_prompt=True)
    assert short.rows == encode_comparison(tokenizer, Comparison(user("q"), ["a", "b"], [[0], [1]]), 48, 0.5).rows


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_comparisons_score_as_their_rows_do(tiny_model_dir, precision):
    """One packed row per comparison (the prompt once, each response attending to it and to itself) gives each
    row's score and gradient as a batch of separate rows does."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    rm = build_reward_model(str(tiny_model_dir), tokenizer)
    rng = random.Random(0)
    comparisons = [
        Comparison(user(" ".join(WORDS * 2)), [sentence(rng, 20, 30), sentence(rng)], [[0], [1]]),  # prompt cut
        Comparison(user("q"), [sentence(rng), sentence(rng), sentence(rng, 1, 2)], [[2], [0, 1]]),  # K-wise, a tie
        Comparison(user(sentence(rng)), [sentence(rng, 1, 1), sentence(rng)], [[1], [0]]),
    ]
    items = [encode_comparison(tokenizer, c, 40, 0.5, share_prompt=True) for c in comparisons]
    packed = pack_comparisons(items, tokenizer.pad_token_id)
    assert packed["input_ids"].shape == (3, max(e.packed_tokens for e in items))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    scores, grads = [], []
    for batch in (rows_to_batch([r for e in items for r in e.rows], tokenizer.pad_token_id), packed):
        rm.zero_grad()
        with autocast:
            s = rm(**batch)
        loss, _ = comparison_loss(s, pair_terms(items))
        loss.backward()
        scores.append(s.detach())
        grads.append(torch.cat([p.grad.flatten() for p in rm.parameters() if p.grad is not None]))
    assert len(set(scores[0].tolist())) == 7  # the rows really differ
    tol = 1e-5 if precision == "fp32" else 3e-2
    torch.testing.assert_close(scores[1], scores[0], atol=tol, rtol=tol)
    torch.testing.assert_close(grads[1], grads[0], atol=tol, rtol=tol if precision == "fp32" else 0.1)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One full training run on the synthetic preference, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("reward-run")
    data = write_synthetic(tmp / "marker.jsonl")
    cfg = tiny_config(tmp, tiny_model_dir, data)
    final = run_reward(cfg)
    return cfg, final, data


def test_learns_a_synthetic_preference(trained):
    cfg, final, data = trained
    rm, tokenizer, stats = load_reward_model(final)
    _, held_out = split_by_prompt(load_comparisons(str(data)), cfg.eval_fraction, seed=cfg.seed)
    assert len(held_out) >= 40
    result = evaluate_reward_model(rm, tokenizer, held_out, batch_size=32)
    assert result["accuracy"] > 0.9, result
    assert set(result["by_source"]) == {"pairs", "kwise"}
    assert result["pairs"] == sum(len(c.pairs()) for c in held_out)
    assert sum(row["count"] for row in result["calibration"]) == result["pairs"]
    assert stats["eval"]["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)  # what training logged at the end
    metrics = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "tokens_per_s"} <= set(metrics[1]) and metrics[-1]["phase"] == "eval"


def test_normalisation_centres_the_reference_responses(trained):
    cfg, final, data = trained
    rm, tokenizer, stats = load_reward_model(final)
    assert {"mean", "std", "mean_measured_on", "std_measured_on", "base_model", "lora", "max_length"} <= set(stats)
    assert stats["lora"] is False and stats["max_length"] == cfg.max_length and stats["std"] > 0
    train, _ = split_by_prompt(load_comparisons(str(data)), cfg.eval_fraction, seed=cfg.seed)
    refs = [(c.messages, c.responses[i]) for c in train for i in c.ranking[0]]
    assert "best responses" in stats["mean_measured_on"]
    raw = score(rm, tokenizer, [m for m, _ in refs], [r for _, r in refs], normalise=False)
    assert sum(raw) / len(raw) == pytest.approx(stats["mean"], abs=1e-4) and abs(stats["mean"]) > 1e-3
    normalised = score(rm, tokenizer, [m for m, _ in refs], [r for _, r in refs])
    assert abs(sum(normalised) / len(normalised)) < 1e-4
    # The scale comes from all training responses, good and bad: their normalised std is 1.
    every = spread_responses(cfg, train)  # the same sample normalisation used
    assert len({r for _, r in every}) > len({r for _, r in refs})
    spread = score(rm, tokenizer, [m for m, _ in every], [r for _, r in every])
    assert torch.tensor(spread).std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)


def test_reference_data_sets_the_zero(trained, tmp_path, tiny_model_dir):
    """With reference_data, the demonstrations of training prompts are what scores 0 on average."""
    cfg, final, data = trained
    train, _ = split_by_prompt(load_comparisons(str(data)), cfg.eval_fraction, seed=cfg.seed)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": c.messages + [{"role": "assistant", "content": "yes " + c.responses[-1]}]}) + "\n" for c in train[:30]))
    run_cfg = tiny_config(tmp_path, tiny_model_dir, data, reference_data=str(demos), max_steps=2)
    rm, tokenizer, stats = load_reward_model(run_reward(run_cfg))
    normalised = score(rm, tokenizer, [c.messages for c in train[:30]], ["yes " + c.responses[-1] for c in train[:30]])
    assert abs(sum(normalised) / len(normalised)) < 1e-4 and "30 demonstrations" in stats["mean_measured_on"]


def test_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_synthetic(tmp_path / "marker.jsonl", n=80)
    fields = dict(max_steps=6, checkpoint_every=2, batch_size=4)
    straight = load_reward_model(run_reward(tiny_config(tmp_path / "a", tiny_model_dir, data, **fields)))[0]
    cfg = tiny_config(tmp_path / "b", tiny_model_dir, data, **fields)
    assert run_reward(cfg, stop_after=4) == Path(cfg.output_dir)  # "crashed" after step 4
    assert not (Path(cfg.output_dir) / "final").exists()
    resumed = load_reward_model(run_reward(cfg))[0]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    steps = [json.loads(l)["step"] for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip(tiny_model_dir, tmp_path, lora):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    rm = build_reward_model(str(tiny_model_dir), tokenizer, lora=LoraSettings(enabled=lora, r=4)).eval()
    if lora:  # make the adapters do something
        with torch.no_grad():
            for name, p in rm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        assert rm.head.weight.requires_grad  # peft trains the score head in full (modules_to_save)
    prompts = [user(f"question {i}") for i in range(5)]
    responses = [" ".join(WORDS[i : i + 6]) for i in range(5)]
    stats = {"mean": 0.25, "std": 2.0, "base_model": str(tiny_model_dir), "lora": lora, "max_length": 64, "max_prompt_share": 0.5}
    rm.stats.update(stats)
    before = score(rm, tokenizer, prompts, responses)
    out = save_reward_model(rm, tokenizer, tmp_path / "rm", stats)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "reward_head.safetensors").exists() and not (out / "adapter_config.json").exists()  # LoRA merged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    loaded, tok2, stats2 = load_reward_model(out)
    assert stats2 == config["reward_stats"] == {**stats, "input_layout": "prompt+response+eos"}
    assert not any(m.training for m in loaded.modules())
    after = score(loaded, tok2, prompts, responses)
    if lora:  # merged weights: equal up to float rounding
        assert after == pytest.approx(before, abs=1e-5)
    else:
        assert after == before
    assert score(loaded, tok2, prompts, responses, normalise=False) == pytest.approx([s * 2.0 + 0.25 for s in after], abs=1e-5)


def test_train_top_layers_freezes_the_lower_layers(tiny_model_dir, tmp_path):
    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, max_steps=2, train_top_layers=1)
    trained = load_reward_model(run_reward(cfg))[0].lm.state_dict()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    start = load_causal_lm(str(tiny_model_dir), tokenizer).state_dict()
    vocab = len(tokenizer) - 1  # the added pad row (the mean embedding) is never trained
    body = [k for k in start if k in trained]
    assert len(body) == len(trained) - 1 and "score.weight" in trained  # the body, and the head
    changed = {k for k in body if not torch.equal(start[k][:vocab], trained[k][:vocab])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed


def test_bf16_runs_hold_the_frozen_matrices_in_bf16_with_the_same_numbers(tiny_model_dir, tmp_path, monkeypatch):
    """precision bf16: the frozen blocks' linear weights are stored in bf16 (what autocast multiplies in); the scores,
    losses and trained weights are bitwise those of fp32 storage, and the saved folder is float32 throughout."""
    import rlhfkit.reward.training as training
    from rlhfkit.models import store_frozen_linear_weights_as

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rm = build_reward_model(str(tiny_model_dir), tokenizer, train_top_layers=1).eval()
    batch = rows_to_batch([[5, 6, 7, 8, 9], [10, 11, 12]], tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = rm(**batch)
        assert store_frozen_linear_weights_as(rm.lm, torch.bfloat16) > 0
        assert torch.equal(rm(**batch), before)
    dtypes = {name: p.dtype for name, p in rm.lm.named_parameters()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    kept = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight", "score.weight"]
    assert all(dtypes[k] == torch.float32 for k in kept)  # trained, norms, embeddings, head

    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    stored = []
    monkeypatch.setattr(training, "store_frozen_linear_weights_as", lambda m, d: stored.append(store_frozen_linear_weights_as(m, d)))
    runs = {}
    for bf16_storage in (True, False):
        if not bf16_storage:
            monkeypatch.setattr(training, "store_frozen_linear_weights_as", lambda m, d: None)
        cfg = tiny_config(tmp_path / str(bf16_storage), tiny_model_dir, data, precision="bf16", train_top_layers=1, epochs=2, log_every=1)
        folder = run_reward(cfg)
        losses = [json.loads(l)["loss"] for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
        runs[bf16_storage] = load_reward_model(folder)[0].lm.state_dict(), losses
    assert stored and stored[0] > 0
    (bf16, bf16_losses), (fp32, fp32_losses) = runs[True], runs[False]
    assert len(bf16_losses) >= 4 and bf16_losses == fp32_losses
    assert all(t.dtype == torch.float32 for t in bf16.values())
    for k in fp32:  # trained: the same; frozen matrices: their bf16 values
        expected = fp32[k].bfloat16().float() if k.startswith("model.layers.0.") and k.endswith("proj.weight") else fp32[k]
        assert torch.equal(bf16[k], expected), k


def count_rows_through_lower_block(monkeypatch) -> list[int]:
    """A counter ([n]) of the rows that go through block 0 of a tiny Llama from now on (reset it by hand)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    rows, original = [0], LlamaDecoderLayer.forward

    def counting(self, *args, **kwargs):
        if self.self_attn.layer_idx == 0:
            rows[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting)
    return rows


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cached_frozen_features_give_the_same_losses_and_update(tiny_model_dir, tmp_path, monkeypatch, lora):
    """train_top_layers + cache_frozen_features: the lower block runs on each training row once instead of once per
    epoch, and every step's loss and the trained weights are those of the uncached run."""
    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    rows_through_lower_block = count_rows_through_lower_block(monkeypatch)
    runs = {}
    for cached in (False, True):
        rows_through_lower_block[0] = 0
        cfg = tiny_config(tmp_path / str(cached), tiny_model_dir, data, epochs=3, train_top_layers=1, cache_frozen_features=cached,
                          log_every=1, lora=LoraSettings(enabled=lora, r=4))  # fmt: skip
        weights = load_reward_model(run_reward(cfg))[0].state_dict()
        losses = [json.loads(l)["loss"] for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
        runs[cached] = weights, losses, rows_through_lower_block[0]
    (plain, plain_losses, plain_rows), (fast, fast_losses, fast_rows) = runs[False], runs[True]
    assert len(plain_losses) == len(fast_losses) >= 6 and fast_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    start = build_reward_model(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir))).state_dict()
    assert not torch.equal(plain["lm.model.layers.1.mlp.up_proj.weight"], start["lm.model.layers.1.mlp.up_proj.weight"])  # it trained
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], atol=1e-5, rtol=1e-5, msg=k)
    train, _ = split_by_prompt(load_comparisons(str(data)), 0.2, seed=0)
    train_rows = sum(len(set(c.responses)) for c in train if c.pairs())
    # Each epoch visits 24 of the 30 comparisons (whole batches only); revisits skip block 0, which the first
    # step runs once more to check the cache against the whole network: about one epoch of rows saved here.
    assert plain_rows - fast_rows >= 0.75 * train_rows, (plain_rows, fast_rows, train_rows)


def test_shared_prompt_training_gives_the_same_losses_update_and_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    """share_prompt packs each comparison into one row: on data no row of which is truncated, every step's loss, the
    trained weights and the held-out evaluation are those of training on separate rows, from fewer tokens through
    the model; with train_top_layers + cache_frozen_features the cache holds the packed rows."""
    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    rows_through_lower_block = count_rows_through_lower_block(monkeypatch)
    runs = {}
    for shared, cached in ((False, False), (True, False), (True, True)):
        rows_through_lower_block[0] = 0
        cfg = tiny_config(tmp_path / f"{shared}-{cached}", tiny_model_dir, data, epochs=2, share_prompt=shared, train_top_layers=1,
                          cache_frozen_features=cached, log_every=1, eval_every=3)  # fmt: skip
        weights = load_reward_model(run_reward(cfg))[0].state_dict()
        lines = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
        train = [(m["loss"], m["tokens"]) for m in lines if m.get("phase") == "train"]
        evals = [(m["accuracy"], round(m["loss"], 5)) for m in lines if m.get("phase") == "eval"]
        runs[shared, cached] = weights, train, evals, rows_through_lower_block[0]
    plain, packed, cached = runs[False, False], runs[True, False], runs[True, True]
    assert len(plain[1]) >= 4 and len(plain[2]) >= 2
    for run in (packed, cached):
        assert [loss for loss, _ in run[1]] == pytest.approx([loss for loss, _ in plain[1]], rel=1e-5, abs=1e-6)
        assert all(mine < theirs for (_, mine), (_, theirs) in zip(run[1], plain[1]))  # fewer tokens a step
        assert run[2] == plain[2]
        for k in plain[0]:
            torch.testing.assert_close(run[0][k], plain[0][k], atol=1e-4, rtol=1e-4, msg=k)  # Adam rescales rounding-size gradients
    assert cached[3] < packed[3] < plain[3]  # packed rows through the lower block; cached: once


def test_cached_held_out_features_give_the_same_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    """cache_eval_features: the lower block runs on the held-out rows at the first evaluation only, and every
    evaluation (accuracy, loss, margin) is that of the whole network."""

    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    rows_through_lower_block = count_rows_through_lower_block(monkeypatch)
    runs = {}
    for cached in (False, True):
        rows_through_lower_block[0] = 0
        cfg = tiny_config(tmp_path / str(cached), tiny_model_dir, data, max_steps=3, eval_every=1, train_top_layers=1,
                          cache_eval_features=cached)  # fmt: skip
        run_reward(cfg)
        evals = [m for m in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if m.get("phase") == "eval"]
        runs[cached] = evals, rows_through_lower_block[0]
    (plain, plain_rows), (fast, fast_rows) = runs[False], runs[True]
    assert [m["step"] for m in fast] == [m["step"] for m in plain] == [0, 1, 2, 3]
    assert len({m["loss"] for m in plain}) > 1  # the model changed between evaluations
    for p, f in zip(plain, fast):
        for key in ("accuracy", "loss", "mean_margin"):
            assert f[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), (key, p["step"])
    _, heldout = split_by_prompt(load_comparisons(str(data)), 0.2, seed=0)
    heldout_rows = sum(len(set(c.responses)) for c in heldout if c.pairs())
    # Evaluations 2-4 skip block 0; the first batch runs it once more to check the cache.
    assert plain_rows - fast_rows >= 2 * heldout_rows, (plain_rows, fast_rows, heldout_rows)


def test_a_single_evaluation_keeps_no_held_out_cache(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Evaluated at the end only, the held-out rows are scored once: no cache is built for them (its memory would buy
    nothing); evaluated more than once, it is."""
    import logging

    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    for eval_every, eval_at_start, kept in ((0, False, False), (2, False, True), (0, True, True)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rlhfkit.reward"):
            cfg = tiny_config(tmp_path / f"{eval_every}{eval_at_start}", tiny_model_dir, data, max_steps=3, train_top_layers=1,
                              eval_every=eval_every, eval_at_start=eval_at_start)  # fmt: skip
            run_reward(cfg)
        assert ("held-out feature cache" in caplog.text) == kept, (eval_every, eval_at_start)


def test_max_train_comparisons_trains_on_a_seeded_sample_of_the_training_prompts(tiny_model_dir, tmp_path):
    """A sample of exactly max_train_comparisons training comparisons, the same for the same seed, another for
    another seed, never a held-out one; the held-out set does not change."""
    from rlhfkit.reward.training import load_reward_data

    data = write_synthetic(tmp_path / "marker.jsonl", n=60)
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def prompts(**fields):
        loaded = load_reward_data(tiny_config(tmp_path / str(len(fields)) / str(fields.get("seed", 0)), tiny_model_dir, data, **fields), tokenizer)
        return [tuple(e.rows[0]) for e in loaded.train], [json.dumps(c.messages) for c in loaded.eval_comparisons]

    every, heldout = prompts()
    sample, heldout_too = prompts(max_train_comparisons=10)
    again, _ = prompts(max_train_comparisons=10)
    other, _ = prompts(max_train_comparisons=10, seed=1)
    assert len(every) > 10 and len(sample) == 10 and heldout_too == heldout
    assert set(sample) <= set(every) and sample == again
    assert len(other) == 10 and other != prompts(seed=1)[0][:10]  # a sample, not the first rows


def test_frozen_feature_cache_is_switched_off_when_it_would_change_the_numbers(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A body that is more than embed + blocks + norm (simulated: features that are off) fails the first-step
    check: the run warns and trains (and evaluates) the whole network, as without the cache."""
    from rlhfkit.reward.frozen_features import FrozenFeatureCache

    data = write_synthetic(tmp_path / "marker.jsonl", n=24)
    plain = load_reward_model(run_reward(tiny_config(tmp_path / "a", tiny_model_dir, data, max_steps=2, train_top_layers=1)))[0].state_dict()
    original = FrozenFeatureCache.batch
    monkeypatch.setattr(FrozenFeatureCache, "batch", lambda self, *a: original(self, *a) * 1.5)
    cfg = tiny_config(tmp_path / "b", tiny_model_dir, data, max_steps=2, train_top_layers=1, cache_frozen_features=True)
    with caplog.at_level("WARNING", logger="rlhfkit.reward"):
        fast = load_reward_model(run_reward(cfg))[0].state_dict()
    assert "cache_frozen_features is switched off" in caplog.text
    assert "cache_eval_features is switched off" in caplog.text  # the held-out rows' cache checks itself too
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], atol=1e-6, rtol=1e-6, msg=k)


# ----------------------------------------------------------------------------- commands


def test_score_and_reward_eval_commands(trained, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    cfg, final, data = trained
    runner = CliRunner()
    out = tmp_path / "scores.jsonl"
    result = runner.invoke(app, ["score", "--reward-model", cfg.output_dir, "--input", str(data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 320 and all(len(l["rewards"]) == len(l["responses"]) for l in lines)

    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "hi", "response": "banana the"}) + "\n" + json.dumps({"prompt": "hi", "response": "the a"}) + "\n")
    result = runner.invoke(app, ["score", "--reward-model", str(final), "--input", str(demos), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rewards = [json.loads(l)["reward"] for l in out.read_text().splitlines()]
    assert len(rewards) == 2 and rewards[0] > rewards[1]

    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["reward-eval", "--reward-model", str(final), "--data", str(data), "--output", str(report)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    assert metrics["accuracy"] > 0.9 and metrics["length_baseline_accuracy"] < 0.8
    assert "length" in result.output.lower() and "kwise" in result.output


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tiny_model_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) = single process on the same global batch of prompts,
    with K-wise comparisons of different K in it (per-prompt averaging survives the split)."""
    import os
    import subprocess
    import sys

    data = write_synthetic(tmp_path / "marker.jsonl", n=64)
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--max_steps", "3", "--eval_every", "0",
              "--checkpoint_every", "0", "--precision", "fp32", "--learning_rate", "3e-3", "--max_length", "64",
              "--eval_fraction", "0.2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "rlhfkit.cli", "reward", "--output_dir", str(tmp_path / "one"), "--batch_size", "4", "--grad_accum", "2", *common]
    subprocess.run(single, check=True, capture_output=True, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhfkit.cli", "reward",
              "--output_dir", str(tmp_path / "two"), "--batch_size", "2", "--grad_accum", "2", *common]  # fmt: skip
    proc = subprocess.run(launch, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (load_reward_model(tmp_path / name)[0].state_dict() for name in ("one", "two"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-3, atol=1e-4, msg=k)  # summation order differs
    evals = [[json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if '"eval"' in l] for n in ("one", "two")]
    assert evals[0][-1]["accuracy"] == pytest.approx(evals[1][-1]["accuracy"])  # eval gathered from both processes


@pytest.mark.parametrize("at_start", [True, False])
def test_eval_at_start_decides_whether_the_untrained_model_is_evaluated(tiny_model_dir, tmp_path, at_start):
    from rlhfkit.training import read_metrics

    data = write_synthetic(tmp_path / "marker.jsonl", n=40)
    cfg = tiny_config(tmp_path, tiny_model_dir, data, max_steps=2, eval_at_start=at_start)
    run_reward(cfg)
    eval_steps = [m["step"] for m in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if m.get("phase") == "eval"]
    assert eval_steps == ([0, 2] if at_start else [2])
