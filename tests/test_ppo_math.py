"""Unit tests for rlhfkit.rl.math (PPO part) against numbers computed by hand.

Most examples use two rows of different lengths (3 and 2 valid tokens, T = 3), so that
padding is exercised, and check that garbage (huge values, NaN) in padded positions
changes no output.
"""

import math

import pytest
import torch

from rlhfkit.rl.math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    first_eos_mask,
    gae,
    kl_penalty,
    last_valid_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rewards_with_kl,
    value_loss,
)

# two rows: 3 valid tokens, then 2 valid tokens + 1 padding
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
PAD = MASK == 0
GARBAGE = (1e6, -1e6, float("nan"), float("inf"))


def with_garbage(x, value):
    """x with the padded positions of MASK overwritten by `value`."""
    return x.masked_fill(PAD, value)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- log-probs


def manual_logprob(row, k, temperature=1.0):
    z = [v / temperature for v in row]
    return z[k] - math.log(sum(math.exp(v) for v in z))


LOGITS = [
    [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]],
    [[2.0, 2.0, 2.0], [-0.5, 1.5, 0.0]],
]
TOKENS = [[1, 2], [0, 1]]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_logprobs_match_manual_softmax(temperature):
    out = logprobs_from_logits(t(LOGITS), torch.tensor(TOKENS), temperature=temperature)
    expected = [
        [manual_logprob(LOGITS[b][s], TOKENS[b][s], temperature) for s in range(2)]
        for b in range(2)
    ]
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, t(expected))
    # uniform logits: -log 3 whatever the temperature
    assert out[1, 0].item() == pytest.approx(-math.log(3.0), abs=1e-6)


def test_logprobs_hand_value():
    # softmax([0, log 3]) = [1/4, 3/4]; at temperature 2 the logits are [0, log(3)/2]:
    # p = [1, sqrt 3] / (1 + sqrt 3)
    logits = t([[[0.0, math.log(3.0)]]])
    tok = torch.tensor([[1]])
    assert logprobs_from_logits(logits, tok).item() == pytest.approx(math.log(0.75), abs=1e-6)
    p = math.sqrt(3.0) / (1.0 + math.sqrt(3.0))
    assert logprobs_from_logits(logits, tok, temperature=2.0).item() == pytest.approx(
        math.log(p), abs=1e-6
    )


def test_logprobs_bf16_upcast_matches_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 64) * 3
    tokens = torch.randint(0, 64, (2, 5))
    bf16 = logits.to(torch.bfloat16)
    out_bf16 = logprobs_from_logits(bf16, tokens, temperature=0.7)
    assert out_bf16.dtype == torch.float32  # upcast
    # same numbers as fp32 maths on the same (bf16-rounded) logits
    torch.testing.assert_close(
        out_bf16, logprobs_from_logits(bf16.float(), tokens, temperature=0.7), rtol=0, atol=1e-6
    )
    # and close to the unrounded fp32 logits (bf16 rounding of the logits only)
    torch.testing.assert_close(
        out_bf16, logprobs_from_logits(logits, tokens, temperature=0.7), rtol=0, atol=0.05
    )


def test_logprobs_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(
        lambda x: logprobs_from_logits(x, tokens, temperature=0.8), (logits,)
    )


def test_entropy_matches_manual():
    out = entropy_from_logits(t(LOGITS))
    expected = []
    for b in range(2):
        row = []
        for s in range(2):
            z = LOGITS[b][s]
            total = sum(math.exp(v) for v in z)
            p = [math.exp(v) / total for v in z]
            row.append(-sum(pi * math.log(pi) for pi in p))
        expected.append(row)
    torch.testing.assert_close(out, t(expected))
    assert out[1, 0].item() == pytest.approx(math.log(3.0), abs=1e-6)  # uniform
    # bf16 is upcast too
    torch.testing.assert_close(
        entropy_from_logits(t(LOGITS).bfloat16()), entropy_from_logits(t(LOGITS).bfloat16().float())
    )


def test_logprobs_and_entropy_over_a_support_match_manual():
    """Ids outside the support (the pad id, rows past the tokenizer) are renormalised away, as the sampler does."""
    support = torch.tensor([True, False, True])
    out = logprobs_from_logits(t(LOGITS), torch.tensor(TOKENS), temperature=0.7, support=support)
    ent = entropy_from_logits(t(LOGITS), temperature=0.7, support=support)
    for b in range(2):
        for s in range(2):
            kept = [LOGITS[b][s][v] for v in (0, 2)]
            k = TOKENS[b][s]
            if k == 1:
                assert out[b, s].item() == float("-inf")  # cannot have been sampled
            else:
                assert out[b, s].item() == pytest.approx(manual_logprob(kept, k // 2, 0.7), abs=1e-6)
            p = [math.exp(manual_logprob(kept, i, 0.7)) for i in range(2)]
            assert ent[b, s].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)


def test_a_token_outside_the_support_on_padding_leaves_the_gradient_finite():
    """Padding holds the pad id (log-prob -inf); the losses zero padded positions first, so gradients stay finite."""
    logits = torch.randn(2, 3, 4, requires_grad=True)
    support = torch.tensor([True, True, True, False])
    tokens = torch.tensor([[0, 1, 2], [2, 1, 3]])  # row 2 ends with the unsupported id on padding
    logprobs = logprobs_from_logits(logits, tokens, support=support)
    assert logprobs[1, 2].item() == float("-inf")
    loss, _ = policy_loss(logprobs, logprobs.detach(), torch.ones(2, 3), MASK)
    (loss - entropy_from_logits(logits, support=support).mean()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_no_grad_chunks_give_the_same_numbers(monkeypatch):
    import rlhfkit.rl.logprobs as ppo_math

    torch.manual_seed(0)
    logits, tokens = torch.randn(5, 4, 11), torch.randint(0, 11, (5, 4))
    whole = logprobs_from_logits(logits, tokens, 0.8), entropy_from_logits(logits, 0.8)
    monkeypatch.setattr(ppo_math, "_NO_GRAD_CHUNK_ELEMENTS", 2 * 4 * 11)  # two rows a chunk
    assert len(ppo_math._row_chunks(logits)) == 3
    with torch.no_grad():
        torch.testing.assert_close(logprobs_from_logits(logits, tokens, 0.8), whole[0], rtol=0, atol=0)
        torch.testing.assert_close(entropy_from_logits(logits, 0.8), whole[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- masks


def test_last_valid_index():
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert last_valid_index(mask).tolist() == [2, 1, 0, -1]
    assert last_valid_index(mask.bool()).tolist() == [2, 1, 0, -1]


def test_first_eos_mask():
    eos, pad = 2, 0
    tokens = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1: the second EOS and what follows are dropped
            [5, 6, 7, 8],  # no EOS, cut at the length limit: all valid
            [2, 0, 0, 0],  # immediate EOS
            [5, 6, 0, 0],  # no EOS, right-padded: trailing pads are padding
            [5, 0, 6, 2],  # a pad id before the EOS is an ordinary token
        ]
    )
    mask, has_eos = first_eos_mask(tokens, eos_token_id=eos, pad_token_id=pad)
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    assert has_eos.tolist() == [True, False, True, False, True]


# ----------------------------------------------------------------------------- masked stats

# valid entries: 1, 2, 3, 4, 5 -> mean 3, squared deviations 4+1+0+1+4 = 10
X = t([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])


def test_masked_mean_var():
    assert masked_mean(X, MASK).item() == pytest.approx(3.0)
    assert masked_mean(X, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])
    assert masked_var(X, MASK).item() == pytest.approx(10.0 / 4)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(10.0 / 5)
    for value in GARBAGE:
        assert masked_mean(with_garbage(X, value), MASK).item() == pytest.approx(3.0)
        assert masked_mean(with_garbage(X, value), MASK.bool(), dim=1).tolist() == pytest.approx(
            [2.0, 4.5]
        )
        assert masked_var(with_garbage(X, value), MASK).item() == pytest.approx(2.5)


def test_masked_mean_empty_row_is_zero_and_var_needs_entries():
    mask = t([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(X, mask, dim=1).tolist() == pytest.approx([1.5, 0.0])
    with pytest.raises(ValueError):
        masked_var(X, torch.zeros_like(MASK))
    with pytest.raises(ValueError):
        masked_var(X, t([[1, 0, 0], [0, 0, 0]]))  # one entry, unbiased
    assert masked_var(X, t([[1, 0, 0], [0, 0, 0]]), unbiased=False).item() == 0.0


def test_masked_whiten():
    std = math.sqrt(2.5 + 1e-8)
    expected = t([[-2 / std, -1 / std, 0.0], [1 / std, 2 / std, 0.0]])
    for value in (0.0,) + GARBAGE:
        out = masked_whiten(with_garbage(X, value), MASK)
        torch.testing.assert_close(out, expected)
        valid = [out[b, s].item() for b in range(2) for s in range(3) if MASK[b, s]]
        mean = sum(valid) / len(valid)
        var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
        assert mean == pytest.approx(0.0, abs=1e-6)
        assert var == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False keeps the mean (TRL convention)
    out = masked_whiten(X, MASK, shift_mean=False)
    torch.testing.assert_close(out, torch.where(MASK.bool(), expected + 3.0, 0.0))


# ----------------------------------------------------------------------------- KL

LP = t([-1.0, -2.0, -0.3])
REF = t([-1.5, -1.0, -0.3])


def test_kl_penalty_hand_values():
    # log pi - log pi_ref = 0.5, -1.0, 0.0 ;  log r = ref - lp = -0.5, 1.0, 0.0
    torch.testing.assert_close(kl_penalty(LP, REF, "k1"), t([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(LP, REF), t([0.5, -1.0, 0.0]))  # default k1
    k3 = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0, 0.0]
    assert k3[0] == pytest.approx(0.10653066, abs=1e-8)
    assert k3[1] == pytest.approx(0.71828183, abs=1e-8)
    torch.testing.assert_close(kl_penalty(LP, REF, "k3"), t(k3))
    torch.testing.assert_close(kl_penalty(LP, REF, "abs"), t([0.5, 1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(LP, REF, "mse"), t([0.125, 0.5, 0.0]))
    with pytest.raises(ValueError):
        kl_penalty(LP, REF, "k2")


def test_kl_direction():
    # swapping the arguments flips the sign of k1
    torch.testing.assert_close(kl_penalty(REF, LP, "k1"), -kl_penalty(LP, REF, "k1"))
    # k3 is >= 0 everywhere and exactly 0 where the log-probs are equal
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(b, a, "k3") >= 0).all()
    assert (kl_penalty(a, a.clone(), "k3") == 0).all()
    # the direction: the expectation under pi (first argument) of k1 and k3 is
    # KL(pi || pi_ref), not KL(pi_ref || pi).
    pi, ref = [0.9, 0.05, 0.05], [0.2, 0.4, 0.4]
    kl_pi_ref = sum(p * math.log(p / q) for p, q in zip(pi, ref))
    kl_ref_pi = sum(q * math.log(q / p) for p, q in zip(pi, ref))
    assert abs(kl_pi_ref - kl_ref_pi) > 0.1
    lp, lref = t([math.log(p) for p in pi]), t([math.log(q) for q in ref])
    for kind in ("k1", "k3"):
        expectation = (t(pi) * kl_penalty(lp, lref, kind)).sum().item()
        assert expectation == pytest.approx(kl_pi_ref, abs=1e-6)


def test_rewards_with_kl():
    logprobs = t([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.7, -2.0, 0.0]])
    # k1 = lp - ref: row 0 = 0.5, -1.0, 0.0 ; row 1 = 0.5, -1.0, (pad)
    scores = t([1.0, -2.0])
    beta = 0.1
    expected_kl = t([[0.5, -1.0, 0.0], [0.5, -1.0, 0.0]])
    expected_rewards = t(
        [
            [-0.05, 0.1, -0.0 + 1.0],  # score on token 2 (last of row 0)
            [-0.05, 0.1 - 2.0, 0.0],  # score on token 1 (last of row 1), 0 on padding
        ]
    )
    for value in (0.0,) + GARBAGE:
        rewards, kl = rewards_with_kl(
            scores, with_garbage(logprobs, value), with_garbage(ref, -value), MASK, beta
        )
        torch.testing.assert_close(kl, expected_kl)
        torch.testing.assert_close(rewards, expected_rewards)

    # k3 flavour: kl = (r - 1) - log r with log r = ref - lp
    k3 = lambda lr: (math.exp(lr) - 1) - lr  # noqa: E731
    rewards, kl = rewards_with_kl(scores, logprobs, ref, MASK.bool(), beta, kind="k3")
    expected_kl = t([[k3(-0.5), k3(1.0), 0.0], [k3(-0.5), k3(1.0), 0.0]])
    torch.testing.assert_close(kl, expected_kl)
    expected = -beta * expected_kl
    expected[0, 2] += 1.0
    expected[1, 1] += -2.0
    torch.testing.assert_close(rewards, expected)

    # any response length: the score lands on the last valid token of each row
    mask = t([[1, 0, 0], [1, 1, 1]])
    rewards, _ = rewards_with_kl(scores, logprobs, logprobs, mask, beta)
    torch.testing.assert_close(rewards, t([[1.0, 0, 0], [0, 0, -2.0]]))
    with pytest.raises(ValueError):
        rewards_with_kl(scores, logprobs, ref, t([[1, 1, 0], [0, 0, 0]]), beta)


# ----------------------------------------------------------------------------- GAE


def gae_double_loop(rewards, values, lengths, gamma, lam):
    """Reference GAE, one row at a time, from the definition
    A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, with V = 0 after the last token."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        v = values[b][:n] + [0.0]
        deltas = [rewards[b][s] + gamma * v[s + 1] - v[s] for s in range(n)]
        for s in range(n):
            adv[b][s] = sum((gamma * lam) ** l * deltas[s + l] for l in range(n - s))
    ret = [[adv[b][s] + values[b][s] if s < lengths[b] else 0.0 for s in range(T)] for b in range(B)]
    return adv, ret


def test_gae_hand_computed_3_steps():
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72
    # row 0 (3 tokens): r = [0, 0.1, 1], V = [0.5, 0.4, 0.6]
    #   A2 = 1 + 0 - 0.6                         = 0.4
    #   A1 = (0.1 + 0.9*0.6 - 0.4) + 0.72*0.4    = 0.24 + 0.288 = 0.528
    #   A0 = (0 + 0.9*0.4 - 0.5) + 0.72*0.528    = -0.14 + 0.38016 = 0.24016
    # row 1 (2 tokens + padding): r = [0.2, -1], V = [0.3, -0.5]
    #   A1 = -1 + 0 + 0.5                        = -0.5
    #   A0 = (0.2 + 0.9*(-0.5) - 0.3) + 0.72*(-0.5) = -0.55 - 0.36 = -0.91
    rewards = t([[0.0, 0.1, 1.0], [0.2, -1.0, 0.0]])
    values = t([[0.5, 0.4, 0.6], [0.3, -0.5, 0.0]])
    expected_adv = t([[0.24016, 0.528, 0.4], [-0.91, -0.5, 0.0]])
    expected_ret = t([[0.74016, 0.928, 1.0], [-0.61, -1.0, 0.0]])
    for value in (0.0,) + GARBAGE:
        adv, ret = gae(with_garbage(rewards, value), with_garbage(values, value), MASK, 0.9, 0.8)
        torch.testing.assert_close(adv, expected_adv)
        torch.testing.assert_close(ret, expected_ret)


def test_gae_matches_double_loop_random_lengths():
    torch.manual_seed(0)
    B, T = 5, 7
    lengths = [7, 1, 4, 6, 2]
    mask = torch.tensor([[1.0 if s < n else 0.0 for s in range(T)] for n in lengths])
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        exp_adv, exp_ret = gae_double_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
        torch.testing.assert_close(adv, t(exp_adv))
        torch.testing.assert_close(ret, t(exp_ret))
    # gamma = lam = 1: returns are the plain sum of future rewards (Monte Carlo)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        for s in range(n):
            assert ret[b, s].item() == pytest.approx(rewards[b, s:n].sum().item(), abs=1e-5)


def test_gae_outputs_detached_and_checks_padding_side():
    values = torch.zeros(2, 3, requires_grad=True)
    adv, ret = gae(torch.ones(2, 3), values, MASK)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.ones(2, 3), torch.zeros(2, 3), t([[0, 1, 1], [1, 1, 0]]))


# ----------------------------------------------------------------------------- losses

# (ratio, advantage) per valid token, clip_range 0.2:
#   (1.5, +1): max(-1.5, -1.2) = -1.2   clipped branch chosen
#   (1.5, -1): max( 1.5,  1.2) =  1.5
#   (0.5, +1): max(-0.5, -0.8) = -0.5
#   (0.5, -1): max( 0.5,  0.8) =  0.8   clipped branch chosen
#   (1.0, +2): max(-2.0, -2.0) = -2.0
RATIOS = t([[1.5, 1.5, 0.5], [0.5, 1.0, 3.0]])  # last one is padding
ADVANTAGES = t([[1.0, -1.0, 1.0], [-1.0, 2.0, 5.0]])


def test_policy_loss_hand_values():
    old = t([[-1.0, -2.0, -0.5], [-1.2, -0.7, -0.1]])
    for value in (0.0,) + GARBAGE:
        logprobs = (old + torch.log(RATIOS)).masked_fill(PAD, value).requires_grad_(True)
        loss, stats = policy_loss(
            logprobs, with_garbage(old, -value), with_garbage(ADVANTAGES, value), MASK, 0.2
        )
        assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.0) / 5, abs=1e-6)
        assert stats["clipfrac"].item() == pytest.approx(2 / 5)
        assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.0) / 5)
        k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
        assert stats["approx_kl"].item() == pytest.approx(
            (2 * k3(1.5) + 2 * k3(0.5) + k3(1.0)) / 5, abs=1e-6
        )
        assert all(not v.requires_grad for v in stats.values())
        # d/dlogp of -A * r is -A * r; zero where the clipped branch is chosen and on padding
        loss.backward()
        expected_grad = t([[0.0, 1.5 / 5, -0.5 / 5], [0.0, -2.0 / 5, 0.0]])
        torch.testing.assert_close(logprobs.grad, expected_grad)


def test_value_loss_hand_values():
    # (v, old, R), c = 0.2:
    #   (1.0, 0.5, 1.0): v_clip 0.7  errors 0,    0.09 -> 0.09  clipped larger
    #   (0.6, 0.5, 0.0): v_clip 0.6  errors 0.36, 0.36 -> 0.36
    #   (0.0, 0.5, 0.0): v_clip 0.3  errors 0,    0.09 -> 0.09  clipped larger
    #   (0.0, 0.5, 1.0): v_clip 0.3  errors 1,    0.49 -> 1.0
    #   (2.0, 1.0, 3.0): v_clip 1.2  errors 1,    3.24 -> 3.24  clipped larger
    # 5 valid tokens: loss = 0.5 * (0.09 + 0.36 + 0.09 + 1 + 3.24) / 5 = 0.478
    v = t([[1.0, 0.6, 0.0], [0.0, 2.0, 9.0]])
    old = t([[0.5, 0.5, 0.5], [0.5, 1.0, -9.0]])
    ret = t([[1.0, 0.0, 0.0], [1.0, 3.0, 4.0]])
    for value in (0.0,) + GARBAGE:
        values = with_garbage(v, value).requires_grad_(True)
        loss, stats = value_loss(values, with_garbage(old, value), with_garbage(ret, value), MASK)
        assert loss.item() == pytest.approx(0.478, abs=1e-6)
        assert stats["clipfrac"].item() == pytest.approx(3 / 5)
        loss.backward()
        # gradient only through unclipped errors: 0.5 * 2 (v - R) / 5
        expected_grad = t([[0.0, 0.6 / 5, 0.0], [-1.0 / 5, 0.0, 0.0]])
        torch.testing.assert_close(values.grad, expected_grad)


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    values = t([[1.0, 1.0, 3.0], [4.0, 5.0, 0.0]])
    # residual R - V = [0, 1, 0, 0, 0]: mean 0.2, var (biased) 0.8 / 5 = 0.16
    # Var[R] (biased) = 10 / 5 = 2  ->  ev = 1 - 0.16 / 2 = 0.92
    for value in (0.0,) + GARBAGE:
        ev = explained_variance(with_garbage(values, value), with_garbage(returns, value), MASK)
        assert ev.item() == pytest.approx(0.92, abs=1e-6)
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, torch.ones(2, 3), MASK).item())


# ----------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(0.05)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=10000)
    # kl 9.0: error = clip(9/6 - 1 = 0.5) = 0.2; beta = 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.201024, rel=1e-12)
    # kl 6.6: error = 0.1; beta *= 1 + 0.1 * 0.0256 = 1.00256
    ctl.update(torch.tensor(6.6, dtype=torch.float64), 256)  # tensors accepted
    assert ctl.value == pytest.approx(0.20153862144, rel=1e-12)
    state = ctl.state_dict()
    # kl 0: error = clip(-1) = -0.2; beta *= 1 - 0.2 * 512 / 10000 = 0.98976
    ctl.update(0.0, 512)
    assert ctl.value == pytest.approx(0.1994748659564544, rel=1e-12)
    # kl 6.0 (on target): unchanged
    ctl.update(6.0, 512)
    assert ctl.value == pytest.approx(0.1994748659564544, rel=1e-12)

    # resume from the saved state: beta restored exactly, same trajectory afterwards
    resumed = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == state["value"]
    resumed.update(0.0, 512)
    resumed.update(6.0, 512)
    assert resumed.value == ctl.value
    # the state survives a round trip through torch.save (checkpoints)
    import io

    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    buf.seek(0)
    again = AdaptiveKLController(0.1, 6.0, 10000)
    again.load_state_dict(torch.load(buf))
    assert again.value == ctl.value
