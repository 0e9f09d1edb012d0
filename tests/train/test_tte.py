"""TTE_u head (`research.tte`) on toy hidden states built in code: L2 output, learning, layer choice."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from research.tte import (  # noqa: E402
    SELECT_BY,
    VIEWS,
    TTEConfig,
    TTEHead,
    choose_layer,
    scores,
    train_head,
)

N, D_LATENT, D_IN, D_OUT, LAYERS = 300, 8, 32, 16, 3
INFORMATIVE = 2  # the one layer whose states carry the product


def toy(seed: int = 0):
    """Products with a latent z; every view's informative states are a different linear map of z,
    the targets a fixed map of z (L2-normalised); the other layers are noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, D_LATENT))
    a = rng.standard_normal((D_LATENT, D_OUT))
    target = z @ a
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    emb = {v: target.astype(np.float32) for v in VIEWS}
    hidden = {}
    for v in VIEWS:
        h = rng.standard_normal((N, LAYERS + 1, D_IN))  # (N, L+1, d_in): noise everywhere ...
        h[:, INFORMATIVE] = z @ rng.standard_normal((D_LATENT, D_IN)) + 0.05 * rng.standard_normal((N, D_IN))
        hidden[v] = h.astype(np.float32)  # ... but in one layer
    keys = np.arange(N)  # every product its own title
    perm = rng.permutation(N)
    return hidden, emb, keys, np.sort(perm[:200]), np.sort(perm[200:])


pytestmark = pytest.mark.usefixtures("torch_one_thread")


CFG = TTEConfig(d_in=D_IN, d_hidden=64, d_out=D_OUT, epochs=25, batch_size=50, lr=5e-3, weight_decay=0.0,
                temperature=0.1)


def at(hidden, layer):
    return {v: hidden[v][:, layer] for v in VIEWS}


def test_head_output_is_l2_normalised():
    head = TTEHead(CFG)
    out = head(torch.randn(7, D_IN) * 5)
    assert out.shape == (7, D_OUT)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(7), atol=1e-5, rtol=0)


def test_training_beats_an_untrained_head_on_held_out_products():
    hidden, emb, keys, fit, held = toy()
    x = at(hidden, INFORMATIVE)
    torch.manual_seed(CFG.seed)
    untrained = TTEHead(CFG).eval()
    trained = train_head(CFG, x, emb, fit, keys)
    with torch.no_grad():
        before = scores(untrained, x, emb, keys, held)
        after = scores(trained, x, emb, keys, held)
    # 100 held-out products: chance R@10 is 0.1
    assert before[SELECT_BY] < 0.35, before
    assert after[SELECT_BY] > 0.8, after
    cos = "cosine to the embedder's vector (title view)"
    assert after[cos] > before[cos] + 0.5, (before[cos], after[cos])


def test_the_layer_is_chosen_by_the_held_out_score():
    hidden, emb, keys, fit, held = toy(1)
    lines = []
    layer, head, per_layer = choose_layer(CFG, hidden, emb, keys, fit, held, range(1, LAYERS + 1), log=lines.append)
    assert layer == INFORMATIVE, per_layer
    assert sorted(per_layer) == [1, 2, 3] and len(lines) == 3
    assert per_layer[layer][SELECT_BY] == max(s[SELECT_BY] for s in per_layer.values())
    assert all(per_layer[n][SELECT_BY] < 0.4 for n in (1, 3)), per_layer  # noise layers do not generalise
    with torch.no_grad():
        again = scores(head, at(hidden, layer), emb, keys, held)
    assert round(again[SELECT_BY], 4) == per_layer[layer][SELECT_BY]  # the returned head is the scored one
