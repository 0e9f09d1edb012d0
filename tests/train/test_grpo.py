"""GRPO pieces on a tiny reasoner: log-probs, format check, reward terms, advantages, and an update
that raises a reward."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from research.grpo import (  # noqa: E402
    GRPOConfig,
    group_advantages,
    grpo_step,
    retrieval_margin,
    sample,
    shaping,
    token_logprobs,
    well_formed,
)
from sdk.train.reasoner_model import END_THINK, EOS, THINK, Reasoner, ReasonerConfig  # noqa: E402


def tiny(seed=0):
    torch.manual_seed(seed)
    return Reasoner(ReasonerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_len=40, n_visual=4,
                                   visual_dim=24, dropout=0.0)).eval()


def test_token_logprobs_match_step_by_step_scores():
    model = tiny()
    prompt = [1, 9, 10, 2]
    conts, ended = [[11, 12, 13], [14]], [True, False]
    lp, mask = token_logprobs(model, prompt, conts, ended)
    for i, (c, e) in enumerate(zip(conts, ended)):
        seq = prompt + c + ([EOS] if e else [])
        want = []
        for j in range(len(prompt), len(seq)):
            logits, _ = model(torch.tensor([seq[:j]]))
            want.append(logits[0, -1].log_softmax(-1)[seq[j]])
        got = lp[i][mask[i].bool()]
        torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_respects_the_budget():
    model = tiny()
    a, ea = sample(model, [1, 5, 2], 6, 7, 1.0, torch.Generator().manual_seed(3))
    b, eb = sample(model, [1, 5, 2], 6, 7, 1.0, torch.Generator().manual_seed(3))
    assert a == b and ea == eb and all(len(c) <= 7 for c in a)
    assert all(len(c) == 7 for c, e in zip(a, ea) if not e)


def test_well_formed_traces():
    assert well_formed([THINK, 9, END_THINK, 11])
    assert not well_formed([THINK, END_THINK, 11])  # empty reasoning
    assert not well_formed([THINK, 9, END_THINK])  # no summary
    assert not well_formed([9, THINK, 9, END_THINK, 11])


def test_shaping_is_format_reward_minus_length_penalty():
    cfg = GRPOConfig(format_weight=0.2, length_weight=0.002)
    conts = [[THINK, 9, END_THINK, 11], [9, 9], [], [THINK, END_THINK, 11, 12, 13]]
    # 0.2 x 1 - 0.002 x 4; 0 - 0.002 x 2; 0; 0.2 x 0 (empty reasoning) - 0.002 x 5
    want = torch.tensor([0.192, -0.004, 0.0, -0.010])
    torch.testing.assert_close(shaping(conts, cfg), want, atol=1e-7, rtol=0)
    torch.testing.assert_close(shaping(conts, GRPOConfig(format_weight=1.0, length_weight=0.0)),
                               torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_retrieval_margin_hand_computed_with_same_title_negatives_masked():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (G=2, D=2), unit vectors
    positive = torch.tensor([0.8, 0.6])
    negatives = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # (K=3, D)
    keys = np.array([7, 3, 5])  # the first negative shares the product's title (key 7)
    # q0: 0.8 - max(masked, 0.0, 0.6) = 0.2      (0.8 - 1.0 = -0.2 if the same-title one counted)
    # q1: 0.6 - max(masked, 1.0, 0.8) = -0.4
    got = retrieval_margin(q, positive, negatives, keys, 7)
    torch.testing.assert_close(got, torch.tensor([0.2, -0.4]), atol=1e-6, rtol=0)
    # nothing masked: the first negative is the hardest for q0
    torch.testing.assert_close(retrieval_margin(q, positive, negatives, keys, 9), torch.tensor([-0.2, -0.4]),
                               atol=1e-6, rtol=0)
    # every negative shares the title: the max is over nothing and counts as -2
    torch.testing.assert_close(retrieval_margin(q, positive, negatives, np.array([7, 7, 7]), 7),
                               torch.tensor([2.8, 2.6]), atol=1e-6, rtol=0)


def test_retrieval_margin_matches_the_expression_main_used_inline():
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    keys = np.random.default_rng(0).integers(0, 10, size=50)
    train_rows = np.arange(50)
    neg_idx, r = torch.arange(10, 40), 3
    # the reward in `main` before it moved into `retrieval_margin`, verbatim
    neg = gallery[neg_idx]
    neg_ok = torch.from_numpy(keys[train_rows[neg_idx.numpy()]] != keys[r])
    want = q @ gallery[r] - (q @ neg.T).masked_fill(~neg_ok[None, :], -2.0).max(1).values
    got = retrieval_margin(q, gallery[r], gallery[neg_idx], keys[train_rows[neg_idx.numpy()]], keys[r])
    assert torch.equal(got, want)


@pytest.mark.parametrize("rewards", [[0.1, 0.5, -0.2, 0.3], [1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [0.25, 0.25, 0.3, 0.25]])
def test_group_advantages_are_zero_mean_and_unit_std_per_group(rewards):
    reward = torch.tensor(rewards)
    adv = group_advantages(reward)
    assert abs(float(adv.mean())) < 1e-6
    if float(reward.std()) > 0:  # std defined: unit, up to the 1e-4 guard in the denominator
        assert abs(float(adv.std()) - 1.0) < 1e-2
        assert torch.equal(adv.argsort(), reward.argsort())  # a better sample gets a larger advantage
    else:  # one reward for the whole group: no signal
        assert torch.equal(adv, torch.zeros_like(reward))
    if rewards == [0.1, 0.5, -0.2, 0.3]:  # by hand: mean 0.175, unbiased std sqrt(0.2675 / 3) = 0.29861
        want = torch.tensor([-0.075, 0.325, -0.375, 0.125]) / (0.2986079 + 1e-4)
        torch.testing.assert_close(adv, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(adv, torch.tensor([-0.25108, 1.08802, -1.25541, 0.41847]), atol=1e-5, rtol=0)


def test_grpo_step_normalises_advantages_within_each_group(monkeypatch):
    """Two prompts with rewards on very different scales: each group is normalised on its own."""
    import research.grpo as grpo

    seen = []
    real = grpo.group_advantages

    def spy(reward):
        seen.append(real(reward))
        return seen[-1]

    monkeypatch.setattr(grpo, "group_advantages", spy)
    policy = tiny(2)
    cfg = GRPOConfig(group=4, max_new_tokens=4, lr=1e-4)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scale = {0: 1.0, 1: 100.0}

    def reward(key, conts):
        return scale[key] * torch.arange(len(conts), dtype=torch.float32)

    grpo_step(policy, copy.deepcopy(policy), opt, {0: [1, 5, 2], 1: [1, 6, 2]}, reward, cfg,
              torch.Generator().manual_seed(0))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], atol=1e-4, rtol=0)  # scale-free per group
    for adv in seen:
        assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std()) - 1.0) < 1e-3


def test_grpo_raises_the_reward_and_stays_near_the_reference():
    policy = tiny(1)
    ref = copy.deepcopy(policy)
    cfg = GRPOConfig(group=8, max_new_tokens=6, lr=3e-3, beta=0.01)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    prompts = {0: [1, 5, 6, 2], 1: [1, 7, 8, 2]}

    def reward(_key, conts):  # likes token 20
        return torch.tensor([sum(t == 20 for t in c) / max(1, len(c)) for c in conts], dtype=torch.float32)

    def mean_reward(model):
        g = torch.Generator().manual_seed(99)
        conts = [c for p in prompts.values() for c in sample(model, p, 64, 6, 1.0, g)[0]]
        return float(reward(None, conts).mean())

    before = mean_reward(policy)
    for _ in range(25):
        rec = grpo_step(policy, ref, opt, prompts, reward, cfg, gen)
    after = mean_reward(policy.eval())
    assert after > before + 0.1, (before, after)
    assert rec["kl"] >= 0.0
