"""The product reasoner (decoder + PUMGPT adapters), its tasks and tokenizer, on tiny models built in code."""

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from sdk.train.reasoner_model import (  # noqa: E402
    BOS,
    END_THINK,
    EOS,
    SEP,
    SPECIALS,
    TASKS,
    THINK,
    Reasoner,
    ReasonerConfig,
    copy_half,
    decode,
    encode_example,
    examples,
    format_attributes,
    load_reasoner,
    parse_attributes,
    record_attributes,
    save_reasoner,
    trace_target,
    train_tokenizer,
)

RECORD = {
    "id": 11, "title": "Quechua Men Sweat Proof Blue T-shirt", "brand": "Quechua", "gender": "Men",
    "article_type": "Tshirts", "sub_category": "Topwear", "base_colour": "Blue", "season": "Fall", "usage": "Sports",
    "attributes": {"Pattern": "Solid", "Fabric": "Polyester", "Neck": "Round Neck", "Wash Care": "Machine Wash"},
}
TINY = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, max_len=64, visual_dim=24, n_visual=4, dropout=0.0)


def tiny(seed=0, gate=None):
    torch.manual_seed(seed)
    m = Reasoner(ReasonerConfig(**TINY)).eval()
    if gate is not None:
        with torch.no_grad():
            for layer in m.layers:
                layer.gate.fill_(gate)
    return m


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    records = [dict(RECORD, id=i, title=f"{c} {t} {i}", base_colour=c) for i, (c, t) in
               enumerate((c, t) for c in ("Blue", "Red", "Black", "White") for t in ("Shirt", "Shoe", "Watch"))]
    corpus = [*TASKS.values()]
    for r in records:
        corpus += [r["title"], format_attributes(record_attributes(r)), trace_target(r)]
        corpus += [p for _, p, _, _ in examples(r, rng)]
    return train_tokenizer(corpus * 3, vocab_size=300)


def test_config_validates():
    with pytest.raises(ValueError, match="divisible"):
        ReasonerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="special tokens"):
        ReasonerConfig(vocab_size=4)


def test_kv_cache_decoding_equals_full_recompute():
    m = tiny(gate=0.7)
    deep = torch.randn(9, 24)
    prompt = [BOS, 10, 11, 12, SEP]
    for d in (None, deep):
        with_cache = m.generate(prompt, d, max_new_tokens=20)
        assert with_cache == m.generate(prompt, d, max_new_tokens=20, use_cache=False)
        assert with_cache == m.generate(prompt, d, max_new_tokens=20)  # deterministic
        assert len(with_cache) <= 20


def test_cached_logits_equal_full_forward():
    m = tiny(gate=0.5)
    ids = torch.randint(6, 300, (2, 12))
    deep = torch.randn(2, 9, 24)
    vm = torch.tensor([1.0, 0.0])
    full, _ = m(ids, deep, vm)
    a, past = m(ids[:, :7], deep, vm)
    b, past = m(ids[:, 7:], deep, vm, past=past)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
    assert past[0][0].shape[2] == 12  # visual tokens do not lengthen the text sequence


def test_adapters_start_inert_and_photo_matters_once_gated():
    ids = torch.randint(6, 300, (1, 10))
    deep = torch.randn(1, 9, 24)
    m = tiny()  # g_l = 0: tanh(0) = 0
    torch.testing.assert_close(m(ids, deep, torch.ones(1))[0], m(ids)[0])
    m = tiny(gate=1.0)
    assert not torch.allclose(m(ids, deep, torch.ones(1))[0], m(ids)[0])
    # a row without a photo (visual_mask 0) is the text-only model
    torch.testing.assert_close(m(ids, deep, torch.zeros(1))[0], m(ids)[0])


def test_budget_and_length_guards():
    m = tiny()
    assert m.generate([BOS, SEP], max_new_tokens=0) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate([BOS], max_new_tokens=-1)
    with pytest.raises(ValueError, match="exceeds max_len"):
        m(torch.zeros(1, 65, dtype=torch.long))
    assert len(m.generate([BOS] * 60, max_new_tokens=50)) <= 4  # capped by max_len 64


def test_tokenizer_specials_and_example_encoding(tok):
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    ids, start = encode_example(tok, TASKS["trace"], trace_target(RECORD), RECORD["title"])
    assert ids[0] == BOS and ids[start - 1] == SEP and ids[-1] == EOS
    assert ids[start] == THINK and END_THINK in ids[start:]
    text = decode(tok, ids[start:])
    assert text.startswith("<think> the article type is Tshirts") and "</think> Men Blue Solid Tshirts" in text
    prompt, n = encode_example(tok, TASKS["caption"], None, None)
    assert n == len(prompt) and prompt[-1] == SEP


def test_attributes_and_trace_targets():
    pairs = record_attributes(RECORD)
    assert pairs[:3] == [("article type", "Tshirts"), ("colour", "Blue"), ("gender", "Men")]
    assert ("fabric", "Polyester") in pairs and all(k != "wash care" for k, _ in pairs)
    assert parse_attributes(format_attributes(pairs)) == dict(pairs)
    assert parse_attributes("colour: Blue; junk; : x; fit:") == {"colour": "Blue"}
    t = trace_target(RECORD)
    assert t.startswith("<think> ") and " </think> " in t
    assert t.endswith("Men Blue Solid Tshirts by Quechua for sports use")


def test_every_task_has_an_example():
    got = examples(RECORD, random.Random(0))
    assert {e[0] for e in got} == set(TASKS)
    cap = next(e for e in got if e[0] == "caption")
    assert cap[2] == RECORD["title"] and cap[3] is False  # the title is never given for captioning
    assert examples({"id": 1, "title": "x"}, random.Random(0)) == [("caption", TASKS["caption"], "x", False)]


def test_a_few_sft_steps_learn_and_the_weights_round_trip(tok, tmp_path):
    from sdk.train.train_reasoner import batch_tensors

    torch.manual_seed(0)
    m = Reasoner(ReasonerConfig(**TINY))
    rng = random.Random(0)
    recs = [dict(RECORD, id=i, title=f"{c} shirt", base_colour=c) for i, c in enumerate(("Blue", "Red", "Black", "White"))]
    feats = np.random.default_rng(0).standard_normal((4, 9, 24)).astype(np.float16)
    rows = {r["id"]: i for i, r in enumerate(recs)}
    batch = [(r, t, p, a, u, True) for r in recs for t, p, a, u in examples(r, rng, ("caption", "category"))]
    ids, labels, deep, vmask = batch_tensors(tok, batch, rows, feats)
    assert ids.shape[0] == len(batch) and vmask.tolist() == [1.0] * len(batch)
    assert (labels != -100).sum() > 0 and deep.shape == (len(batch), 9, 24)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits, _ = m(ids, deep, vmask)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    save_reasoner(m, tok, tmp_path / "r", {"note": "test"})
    m2, tok2 = load_reasoner(tmp_path / "r")
    prompt, _ = encode_example(tok2, TASKS["caption"], None, None)
    assert m2.generate(prompt, deep[0]) == m.generate(prompt, deep[0])
    with pytest.raises(FileNotFoundError, match="reasoner file not found"):
        load_reasoner(tmp_path / "missing")
    # stored fp16 (half the bytes), loaded back into the fp32 model: same greedy tokens here
    copy_half(tmp_path / "r", tmp_path / "r16")
    sizes = [(tmp_path / d / "reasoner.safetensors").stat().st_size for d in ("r", "r16")]
    assert sizes[1] < 0.6 * sizes[0]
    m3, tok3 = load_reasoner(tmp_path / "r16")
    assert all(p.dtype == torch.float32 for p in m3.parameters()) and tok3.to_str() == tok.to_str()
    assert m3.generate(prompt, deep[0]) == m.generate(prompt, deep[0])
    with torch.no_grad():
        assert torch.allclose(m3(ids[:2], deep[:2], vmask[:2])[0], m(ids[:2], deep[:2], vmask[:2])[0], atol=2e-2)


def test_student_keeps_the_chosen_teacher_layers():
    from sdk.export.distill_reasoner import student_from_teacher

    teacher = tiny(seed=1, gate=0.5)
    ids = torch.tensor([[BOS, 20, 21, 22, SEP, 30]])
    deep = torch.randn(1, 9, 24)
    same = student_from_teacher(teacher, [0, 1]).eval()
    assert torch.equal(same(ids, deep)[0], teacher(ids, deep)[0])
    one = student_from_teacher(teacher, [1])
    assert one.cfg.n_layers == 1
    assert torch.equal(one.layers[0].gate, teacher.layers[1].gate)
    assert torch.equal(one.embed.weight, teacher.embed.weight)
    with pytest.raises(ValueError, match="layers must be indices"):
        student_from_teacher(teacher, [2])


def test_kd_loss_counts_answer_tokens_only():
    from sdk.train.train_reasoner import kd_loss

    torch.manual_seed(0)
    t = torch.randn(2, 5, 300)
    labels = torch.full((2, 5), -100)
    labels[:, 2:] = 7
    assert kd_loss(t, t, labels).abs() < 1e-6
    s = t.clone()
    s[:, :2] = torch.randn(2, 2, 300)  # prompt positions differ: not counted
    assert kd_loss(s, t, labels).abs() < 1e-6
    s[:, 3] += torch.randn(2, 300)
    assert kd_loss(s, t, labels) > 0.01
    assert kd_loss(s, t, torch.full((2, 5), -100)) == 0


def test_token_distillation_pulls_the_student_to_the_teacher(tok):
    from sdk.export.distill_reasoner import student_from_teacher
    from sdk.train.train_reasoner import batch_tensors, kd_loss

    teacher = tiny(seed=2, gate=0.5)
    student = student_from_teacher(teacher, [0]).train()
    rng = random.Random(0)
    recs = [dict(RECORD, id=i, title=f"{c} shirt", base_colour=c) for i, c in enumerate(("Blue", "Red", "Black"))]
    feats = np.random.default_rng(0).standard_normal((3, 9, 24)).astype(np.float16)
    batch = [(r, t, p, a, u, True) for r in recs for t, p, a, u in examples(r, rng, ("category", "attribute_qa"))]
    ids, labels, deep, vmask = batch_tensors(tok, batch, {r["id"]: i for i, r in enumerate(recs)}, feats)
    with torch.no_grad():
        t_logits, _ = teacher(ids, deep, vmask)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = kd_loss(student(ids, deep, vmask)[0], t_logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_sequence_distillation_trains_on_the_teachers_traces():
    from sdk.train.train_reasoner import TrainConfig, epoch_examples, trace_view

    assert [trace_view(True, True), trace_view(True, False), trace_view(False, True)] == ["photo+title", "title", "photo"]
    recs = [dict(RECORD, id=i) for i in range(40)]
    targets = {v: {i: f"<think> {v} {i} </think> teacher" for i in range(40)} for v in ("photo+title", "title", "photo")}
    cfg = TrainConfig(tasks_per_item=len(TASKS))
    data = epoch_examples(recs, random.Random(0), cfg, {i: i for i in range(40)}, targets)
    traces = [(r, a, u, ph) for r, task, _, a, u, ph in data if task == "trace"]
    assert len(traces) == 40 and {trace_view(u, ph) for _, _, u, ph in traces} == {"photo+title", "title", "photo"}
    for r, a, u, ph in traces:
        assert a == f"<think> {trace_view(u, ph)} {r['id']} </think> teacher"
    plain = epoch_examples(recs, random.Random(0), cfg, {i: i for i in range(40)})
    assert all(a == trace_target(r) for r, task, _, a, *_ in plain if task == "trace")


def test_teacher_traces_are_read_per_view_and_a_missing_view_is_named(tmp_path):
    import json

    from sdk.export.distill_reasoner import read_traces

    for view in ("photo+title", "title"):
        (tmp_path / f"{view}.jsonl").write_text(
            "\n".join(json.dumps({"id": i, "trace": f"{view} {i}"}) for i in (3, 7)) + "\n\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError,
                       match=r"photo\.jsonl: no traces for the photo view; run python -m sdk.train.traces"):
        read_traces(tmp_path)
    (tmp_path / "photo.jsonl").write_text(json.dumps({"id": "5", "trace": "p"}) + "\n", encoding="utf-8")
    got = read_traces(tmp_path)
    assert got == {"photo+title": {3: "photo+title 3", 7: "photo+title 7"}, "title": {3: "title 3", 7: "title 7"},
                   "photo": {5: "p"}}
