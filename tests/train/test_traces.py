"""Batched trace generation for the trace modality: equal to the reasoner's own greedy decoding."""

import pytest

torch = pytest.importorskip("torch")

from sdk.train.reasoner_model import TASKS, Reasoner, ReasonerConfig, encode_example  # noqa: E402
from sdk.train.traces import catalog_traces, generate_batch, pooled_hidden  # noqa: E402
from tests.tiny_models import tiny_reasoner_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def reasoner():
    torch.manual_seed(0)
    model = Reasoner(ReasonerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64, n_visual=4,
                                    visual_dim=24, dropout=0.0)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.fill_(0.8)  # adapters on: the photo changes the text
    return model


def test_batch_equals_one_by_one_with_and_without_photos(reasoner):
    torch.manual_seed(1)
    prompts = torch.randint(6, 300, (5, 7)).tolist()
    deep = torch.randn(5, 49, 24)
    deep[2] = 0  # a product without a photo inside a photo batch
    got = generate_batch(reasoner, prompts, deep, max_new_tokens=20)
    for i, p in enumerate(prompts):
        assert got[i] == reasoner.generate(p, None if i == 2 else deep[i], max_new_tokens=20), i
    assert generate_batch(reasoner, prompts, None, 20) == [reasoner.generate(p, None, 20) for p in prompts]
    assert got != generate_batch(reasoner, prompts, None, 20)  # the photos were used


def test_pooled_states_from_generation_equal_a_fresh_pass(reasoner):
    import numpy as np

    torch.manual_seed(2)
    prompts = torch.randint(6, 300, (4, 5)).tolist()
    deep = torch.randn(4, 49, 24)
    for budget in (3, 30):  # budget-stopped rows and (likely) <eos>-stopped ones
        pooled = np.zeros((4, 3, 32), np.float32)
        gen = generate_batch(reasoner, prompts, deep, budget, pooled)
        ref = pooled_hidden(reasoner, [p + g for p, g in zip(prompts, gen)], deep)
        np.testing.assert_allclose(pooled, ref, atol=1e-5)


def test_batch_needs_one_prompt_length(reasoner):
    with pytest.raises(ValueError, match="one length"):
        generate_batch(reasoner, [[1, 7, 8], [1, 7]], None, 4)


def test_pooled_hidden_is_the_masked_mean_of_each_layer(reasoner):
    seqs = [[1, 9, 10, 11, 12], [1, 20, 21]]
    pooled = pooled_hidden(reasoner, seqs, None)
    assert pooled.shape == (2, 3, 32)
    for i, s in enumerate(seqs):
        for n in (1, 2):
            _, _, h = reasoner(torch.tensor([s]), return_hidden=n)
            torch.testing.assert_close(torch.from_numpy(pooled[i, n]), h[0].mean(0), atol=1e-5, rtol=1e-5)


def test_catalog_traces_keep_row_order(reasoner):
    tok = tiny_reasoner_tokenizer()
    titles = ["red shoe", "blue shirt black watch", "red shoe", "title"]
    deep = torch.randn(4, 49, 24).numpy()
    has = [True, True, False, True]
    import numpy as np

    texts, counts, hidden = catalog_traces(reasoner, tok, titles, deep, np.array(has), "photo+title", batch=2,
                                           max_new_tokens=6)
    assert hidden.shape == (4, 3, 32) and len(texts) == len(counts) == 4
    for i, t in enumerate(titles):
        prompt = encode_example(tok, TASKS["trace"], None, t)[0]
        ref = reasoner.generate(prompt, torch.from_numpy(deep[i]) if has[i] else None, max_new_tokens=6)
        assert counts[i] == len(ref)


def test_field_accuracy_reads_the_stated_fields():
    from sdk.train.traces import field_accuracy

    recs = [{"article_type": "Tshirts", "base_colour": "Navy Blue", "gender": "Men"},
            {"article_type": "Watches", "base_colour": "Black", "gender": "Women"}]
    texts = ["<think> the article type is Tshirts; the colour is Navy Blue; the gender is Women </think> x",
             "<think> the article type is Tshirts; the gender is Women </think> y"]
    assert field_accuracy(texts, recs) == {"article type": 0.5, "colour": 0.5, "gender": 0.5}


def test_score_reads_the_split_and_parts_training_from_validation(tmp_path):
    import json

    from sdk.train.traces import score

    recs = [{"id": 10, "title": "Blue Shirt", "article_type": "Shirts", "base_colour": "Blue", "gender": "Men"},
            {"id": 11, "title": "blue shirt", "article_type": "Shirts", "base_colour": "Blue", "gender": "Men"},
            {"id": 13, "title": "Red Shoe", "article_type": "Shoes", "base_colour": "Red", "gender": "Women"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    folder = tmp_path / "traces"
    folder.mkdir()
    traces = {10: "the article type is shirts; the colour is blue", 11: "the article type is shirts; the colour is red",
              13: "the article type is shoes; the gender is women"}
    (folder / "title.jsonl").write_text("".join(json.dumps({"id": i, "trace": t}) + "\n" for i, t in traces.items()))
    got = score(folder, str(tmp_path))
    # 11 shares 10's design, so it is validation too; 13 alone trains
    assert got["title validation"] == {"article type": 1.0, "colour": 0.5, "gender": 0.0}
    assert got["title train"] == {"article type": 1.0, "colour": 0.0, "gender": 1.0}
