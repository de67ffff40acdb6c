"""Unit tests for the critic-free maths of rlhfkit.rl.math (RLOO, GRPO, Dr. GRPO) against hand computations.

Rewards of two prompts with k = 2 responses each, or one prompt with k = 4; per-token tensors use two rows of
3 and 2 valid tokens (T = 3) with garbage (huge values, NaN, inf) in the padded position.
"""

import math

import pytest
import torch

from rlhfkit.rl.math import (
    aggregate,
    clipped_surrogate,
    grpo_advantages,
    k3_in_loss,
    kl_penalty,
    per_token,
    policy_loss,
    rloo_advantages,
    rloo_baseline,
    token_weights,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
PAD = MASK == 0
GARBAGE = (1e6, -1e6, float("nan"), float("inf"))
REWARDS = torch.tensor([1.0, 2.0, 3.0, 6.0])


# ----------------------------------------------------------------------------- RLOO


def test_rloo_baseline_is_the_mean_of_the_other_responses():
    # k = 2: each response's baseline is the other one's reward
    assert rloo_baseline(REWARDS, 2).tolist() == [2.0, 1.0, 6.0, 3.0]
    # k = 4, one prompt: (12 - R_i) / 3
    torch.testing.assert_close(rloo_baseline(REWARDS, 4), torch.tensor([11 / 3, 10 / 3, 3.0, 2.0]))


def test_rloo_advantages_by_hand():
    assert rloo_advantages(REWARDS, 2).tolist() == [-1.0, 1.0, -3.0, 3.0]
    # k = 4: R_i - (12 - R_i) / 3 = 4/3 (R_i - 3)
    torch.testing.assert_close(rloo_advantages(REWARDS, 4), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    # the groups are the consecutive rows: swapping two prompts' groups swaps their advantages
    assert rloo_advantages(REWARDS[[2, 3, 0, 1]], 2).tolist() == [-3.0, 3.0, -1.0, 1.0]
    # a group of equal rewards learns nothing
    assert rloo_advantages(torch.tensor([0.5, 0.5, 0.5]), 3).tolist() == [0.0, 0.0, 0.0]


def test_rloo_baseline_does_not_depend_on_the_response_itself():
    r = REWARDS.clone().requires_grad_(True)
    b = rloo_baseline(r, 4)
    assert not b.requires_grad  # a constant: the REINFORCE estimate stays unbiased
    changed = REWARDS.clone()
    changed[0] = 100.0
    assert rloo_baseline(changed, 4)[0] == rloo_baseline(REWARDS, 4)[0]


# ----------------------------------------------------------------------------- GRPO and Dr. GRPO


def test_grpo_group_normalisation_by_hand():
    # one group of 4: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3)
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(REWARDS, 4), expected)
    # two groups of 2: (R - mean) / (|R_1 - R_2| / sqrt(2) + eps) within each group
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 1.5 / (math.sqrt(4.5) + 1e-4)
    torch.testing.assert_close(grpo_advantages(REWARDS, 2), torch.tensor([-a, a, -b, b]))
    # each group is normalised on its own: mean 0 and std ~1 in every group
    adv = grpo_advantages(torch.tensor([0.0, 1.0, 5.0, 100.0, 7.0, 7.5, 8.0, 9.0]), 4).view(2, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1), torch.ones(2), atol=1e-3, rtol=0)


def test_dr_grpo_does_not_divide_by_the_std():
    assert grpo_advantages(REWARDS, 4, scale_by_std=False).tolist() == [-2.0, -1.0, 0.0, 3.0]
    assert grpo_advantages(REWARDS, 2, scale_by_std=False).tolist() == [-0.5, 0.5, -1.5, 1.5]
    # the std division weighs a group of near-equal rewards up; Dr. GRPO keeps its small advantages small
    close = torch.tensor([1.0, 1.01])
    assert grpo_advantages(close, 2).abs().max().item() == pytest.approx(0.005 / (0.01 / math.sqrt(2) + 1e-4), rel=1e-4)
    assert grpo_advantages(close, 2, scale_by_std=False).abs().max() == pytest.approx(0.005)


def test_equal_rewards_give_zero_advantages_not_nan():
    same = torch.full((4,), 2.5)
    assert grpo_advantages(same, 4).tolist() == [0.0] * 4
    assert grpo_advantages(same, 4, scale_by_std=False).tolist() == [0.0] * 4


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages, rloo_baseline])
def test_groups_need_k_at_least_2_and_whole_groups(fn):
    with pytest.raises(ValueError, match="k >= 2"):
        fn(REWARDS, 1)
    with pytest.raises(ValueError, match="multiple of k"):
        fn(REWARDS, 3)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        fn(REWARDS.view(2, 2), 2)


# ----------------------------------------------------------------------------- masking of padding


@pytest.mark.parametrize("garbage", GARBAGE)
def test_per_response_advantages_on_valid_tokens_only(garbage):
    out = per_token(torch.tensor([2.0, -1.0]), MASK)
    assert out.tolist() == [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]
    # NaN in an advantage of a fully valid row would show; padding never carries one
    assert per_token(torch.tensor([garbage, -1.0]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))[0].tolist() == [0.0, 0.0]


def test_token_weights_by_hand():
    w, u = token_weights(MASK, "token")
    assert w.tolist() == MASK.tolist() and u.tolist() == [3.0, 2.0]
    w, u = token_weights(MASK, "sequence")
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]]))
    assert u.tolist() == [1.0, 1.0]
    w, u = token_weights(MASK, "constant", max_tokens=4)
    assert w.tolist() == [[0.25, 0.25, 0.25], [0.25, 0.25, 0.0]] and u.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="max_tokens"):
        token_weights(MASK, "constant")
    with pytest.raises(ValueError, match="unknown aggregation"):
        token_weights(MASK, "mean")


@pytest.mark.parametrize("garbage", GARBAGE)
def test_aggregations_by_hand_ignore_padding(garbage):
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]).masked_fill(PAD, garbage)
    assert aggregate(losses, MASK, "token").item() == pytest.approx(15 / 5)  # PPO / RLOO: mean over tokens
    assert aggregate(losses, MASK, "sequence").item() == pytest.approx((6 / 3 + 9 / 2) / 2)  # GRPO: 1/|o_i| sum_t, then mean
    assert aggregate(losses, MASK, "constant", max_tokens=4).item() == pytest.approx(15 / (2 * 4))  # Dr. GRPO
    # gradients reach valid tokens only, with the weights of the aggregation
    x = losses.clone().requires_grad_(True)
    aggregate(x, MASK, "sequence").backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 6, 1 / 6, 1 / 6], [0.25, 0.25, 0.0]]))


def test_sequence_mean_weighs_short_responses_up_and_dr_grpo_does_not():
    """The length bias Dr. GRPO removes: with a negative advantage a long response's per-token loss is diluted
    by 1/|o_i| under GRPO's mean, not under the constant normaliser."""
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    x = torch.ones(2, 4, requires_grad=True)
    aggregate(x, mask, "sequence").backward()
    assert x.grad[0, 0] == 4 * x.grad[1, 0]  # the short response's token weighs 4x
    x.grad = None
    aggregate(x, mask, "constant", max_tokens=4).backward()
    assert x.grad[0, 0] == x.grad[1, 0]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_clipped_surrogate_is_the_per_token_policy_loss(garbage):
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]).masked_fill(PAD, garbage)
    old = torch.tensor([[-1.1, -1.5, -0.5], [-0.3, -2.0, 0.0]]).masked_fill(PAD, garbage)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]]).masked_fill(PAD, garbage)
    per_tok, stats = clipped_surrogate(logprobs, old, adv, MASK, 0.2)
    assert per_tok[1, 2] == 0  # padding
    # by hand: ratio e^{0.1} = 1.105 (A = 1: -1.105); e^{-0.5} = 0.607 (A = 1: -0.607); 1 (A = 1: -1);
    # 1 (A = -2: 2); e^{0.8} = 2.226 (A = -2: max(4.451, 2 * 1.2 = 2.4) = 4.451)
    expected = torch.tensor([[-math.exp(0.1), -math.exp(-0.5), -1.0], [2.0, 2 * math.exp(0.8), 0.0]])
    torch.testing.assert_close(per_tok, expected)
    mean, _ = policy_loss(logprobs, old, adv, MASK, 0.2)
    torch.testing.assert_close(mean, expected.sum() / 5)
    assert stats["clipfrac"].item() == 0.0  # the only clipped ratio (2.226 > 1.2, A < 0) is on the harmless side


@pytest.mark.parametrize("garbage", GARBAGE)
def test_k3_in_the_loss_by_hand_with_padding(garbage):
    """GRPO's KL term: r - log r - 1 with r = pi_ref / pi_theta; -inf (or other garbage) log-probs on padding
    (the pad id is outside the sampling support) give 0 there and a finite gradient."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]).masked_fill(PAD, garbage).requires_grad_(True)
    ref = torch.tensor([[-1.5, -2.0, -0.1], [-0.3, -0.2, 0.0]])
    k3 = k3_in_loss(logprobs, ref, MASK)
    r = lambda d: math.exp(d) - d - 1  # noqa: E731  d = log pi_ref - log pi_theta
    expected = torch.tensor([[r(-0.5), 0.0, r(0.4)], [0.0, r(1.0), 0.0]])
    torch.testing.assert_close(k3, expected)
    torch.testing.assert_close(k3[MASK.bool()], kl_penalty(logprobs, ref, "k3")[MASK.bool()])
    aggregate(k3, MASK, "sequence").backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[1, 2] == 0
    # d k3 / d log pi_theta = 1 - r: by hand for the first token (weight 1/3 in its response, 2 responses)
    assert logprobs.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 6)
