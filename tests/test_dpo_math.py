"""DPO / IPO maths against hand computations: summed sequence log-probs with padding masked, the implicit reward, the
DPO loss (with label smoothing) and its gradient, the IPO loss, and the per-prompt pair weights of a batch."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rl.preference_math import implicit_reward, pair_statistics, preference_loss, sequence_logprobs


def test_sequence_logprobs_sums_response_tokens_and_ignores_padding():
    # two-token vocabulary; logits (0, ln 3) give p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [float("nan"), float("nan")]]], requires_grad=True)
    tokens = torch.tensor([[1, 0, -100]])  # the padded position holds an id out of range: never used
    mask = torch.tensor([[1, 1, 0]])
    out = sequence_logprobs(logits, tokens, mask)
    assert out.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 4), abs=1e-6)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2].abs().sum() == 0  # NaN padding: no gradient either
    # a mask of zeros gives 0, whatever the logits
    assert sequence_logprobs(torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)).abs().sum() == 0


def test_implicit_reward_is_beta_times_the_log_ratio():
    r = implicit_reward(torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0]), beta=0.5)
    assert r.tolist() == pytest.approx([0.5, -0.5])


def test_dpo_loss_by_hand_with_label_smoothing_and_its_gradient():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    # h_w - h_l = (-1 + 1.5) - (-2 + 1.5) = 1
    loss = preference_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)
    loss.backward()  # d/d log pi(y_w) = -beta * sigmoid(-beta * gap) (the paper's gradient)
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)), abs=1e-6)
    smoothed = preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * math.log1p(math.exp(-0.1)) + 0.2 * math.log1p(math.exp(0.1)), abs=1e-6)
    # at the start (policy = reference) every pair costs log 2
    same = torch.tensor([-3.0, -7.0])
    assert preference_loss(same, same.flip(0), same, same.flip(0), beta=0.3).tolist() == pytest.approx([math.log(2)] * 2)


def test_ipo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))  # gap 1
    assert preference_loss(pc, pr, rc, rr, beta=0.1, loss="ipo").item() == pytest.approx((1 - 5) ** 2)
    assert preference_loss(pc, pr, rc, rr, beta=0.5, loss="ipo").item() == pytest.approx(0.0)  # the gap is on its target 1/(2 beta)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(pc, pr, rc, rr, beta=0.1, loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown"):
        preference_loss(pc, pr, rc, rr, beta=0.1, loss="kto")


def test_pair_statistics_count_a_tie_half():
    s = pair_statistics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert s["accuracy_sum"] == 1.5 and s["accuracy_count"] == 3
    assert s["margin_sum"] == pytest.approx(0.0) and s["reward_chosen_sum"] == pytest.approx(3.0)


def test_batch_loss_weights_every_prompt_the_same():
    """A K=3 ranking (3 pairs, weight 1/3 each) and a single pair: the batch loss is the sum of the two prompts' means."""
    from rlhfkit.config import DPOConfig
    from rlhfkit.rl.dpo import PreferenceItem, dpo_batch_loss

    cfg = DPOConfig(beta=1.0)
    items = [
        PreferenceItem(0, rows=[None] * 3, pairs=[(0, 1), (0, 2), (1, 2)], weights=[1 / 3] * 3),
        PreferenceItem(1, rows=[None] * 2, pairs=[(1, 0)], weights=[1.0]),
    ]
    policy = torch.tensor([0.0, -1.0, -3.0, -2.0, -1.0])
    reference = torch.zeros(5)
    loss_sum, stats = dpo_batch_loss(policy, reference, items, cfg)

    def pair(w, l):
        return math.log1p(math.exp(-(w - l)))

    first = (pair(0, -1) + pair(0, -3) + pair(-1, -3)) / 3
    assert loss_sum.item() == pytest.approx(first + pair(-1, -2), abs=1e-6)
    assert stats["loss_count"] == 2 and stats["accuracy_sum"] == 4 and stats["accuracy_count"] == 4


def test_response_logprobs_equal_a_full_forward_and_padding_changes_nothing(tiny_model_dir):
    """The module computes logits only at response positions; it must equal log_softmax of the full forward, and a
    row's value must not depend on the longer rows padded beside it."""
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.rl.dpo import ResponseLogprobs, batch_of
    from rlhfkit.tokens import encode_example

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tok).eval()
    rows = [encode_example(tok, [{"role": "user", "content": p}], r, 64) for p, r in (("hi there", "yes"), ("a much longer prompt here", "the good apple river day"))]
    module = ResponseLogprobs(model)
    with torch.no_grad():
        together = module(**batch_of(rows, tok.pad_token_id, "cpu"))
        alone = torch.cat([module(**batch_of([r], tok.pad_token_id, "cpu")) for r in rows])
        for i, row in enumerate(rows):
            ids = torch.tensor([row.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            expected = logp[row.prompt_length - 1 :].sum()
            assert together[i].item() == pytest.approx(expected.item(), abs=1e-4)
    assert torch.allclose(together, alone, atol=1e-4)
