"""GRPO pieces on a tiny reasoner: log-probs, format check, and an update that raises a reward."""

import copy

import pytest

torch = pytest.importorskip("torch")

from sdk.train.grpo import GRPOConfig, grpo_step, sample, token_logprobs, well_formed  # noqa: E402
from sdk.train.reasoner import END_THINK, EOS, THINK, Reasoner, ReasonerConfig  # noqa: E402


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
