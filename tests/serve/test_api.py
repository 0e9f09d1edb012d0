"""The HTTP API of `moon3 serve` against a real server: vectors equal `sdk.Embedder`'s, the OpenAI
shape (and the `openai` client), multipart photos, per-item errors, request-level errors and
limits, health / ready / metrics."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
from serve_helpers import TITLES, Server, b64, photo

ATOL = 1e-6  # the tiny engine is FP32: batch-independent


def post(server, path, **kw):
    return httpx.post(server.url + path, timeout=60, **kw)


def test_openai_embeddings_equal_the_embedder(server, reference):
    r = post(server, "/v1/embeddings", json={"model": "tiny", "input": TITLES[:5]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny_split"
    assert [d["index"] for d in body["data"]] == list(range(5))
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got, reference.embed(texts=TITLES[:5]), atol=ATOL)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 5


def test_openai_dimensions_and_base64(server, reference):
    r = post(server, "/v1/embeddings", json={"input": "red running shoes", "dimensions": 16,
                                             "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    (d,) = r.json()["data"]
    v = np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
    np.testing.assert_allclose(v, reference.embed(texts=["red running shoes"], dim=16)[0], atol=ATOL)
    assert np.linalg.norm(v) == pytest.approx(1, abs=1e-5)


def test_the_openai_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    res = client.embeddings.create(model="tiny_split", input=TITLES[:3])  # asks for base64 by default
    got = np.array([d.embedding for d in res.data], np.float32)
    np.testing.assert_allclose(got, reference.embed(texts=TITLES[:3]), atol=ATOL)
    res = client.embeddings.create(model="tiny_split", input="blue cotton shirt", dimensions=16,
                                   encoding_format="float")
    np.testing.assert_allclose(res.data[0].embedding, reference.embed(texts=["blue cotton shirt"], dim=16)[0],
                               atol=ATOL)
    with pytest.raises(openai.BadRequestError, match="dimensions must be in"):
        client.embeddings.create(model="tiny_split", input="x", dimensions=99)


def test_products_with_photos_equal_the_embedder(server, reference):
    photos = [photo(k) for k in range(3)] + [photo(9, 300, 200, "JPEG")]
    items = [{"id": "a", "title": TITLES[0], "image": b64(photos[0])},
             {"id": 2, "image": "data:image/png;base64," + b64(photos[1])},
             {"title": TITLES[1], "trace": "red shoe for running"},
             {"id": "d", "title": TITLES[2], "image": b64(photos[3])}]
    r = post(server, "/v1/embed", json={"items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["id"] for d in body["data"]] == ["a", 2, None, "d"] and body["dimensions"] == 32
    want = reference.embed(images=[photos[0], photos[1], None, photos[3]], texts=[TITLES[0], None, TITLES[1], TITLES[2]],
                           traces=[None, None, "red shoe for running", None])
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, atol=ATOL)


def test_multipart_photos(server, reference):
    p0, p1 = photo(20), photo(21, 64, 64, "JPEG")
    items = [{"id": "x", "title": TITLES[3], "image_file": "p0"}, {"id": "y", "image_file": "p1"}]
    r = post(server, "/v1/embed", data={"items": json.dumps(items), "dimensions": "16"},
             files={"p0": ("a.png", p0, "image/png"), "p1": ("b.jpg", p1, "image/jpeg")})
    assert r.status_code == 200, r.text
    want = reference.embed(images=[p0, p1], texts=[TITLES[3], None], dim=16)
    np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), want, atol=ATOL)
    # the one-product shorthand: fields title / id and a file part named image
    r = post(server, "/v1/embed", data={"title": TITLES[4], "id": "z"}, files={"image": ("c.png", p0, "image/png")})
    assert r.status_code == 200, r.text
    (d,) = r.json()["data"]
    assert d["id"] == "z"
    np.testing.assert_allclose(d["embedding"], reference.embed(images=[p0], texts=[TITLES[4]])[0], atol=ATOL)


def test_bad_items_are_reported_and_the_good_ones_come_back(server, reference):
    good = photo(30)
    items = [
        {"id": "ok1", "title": TITLES[0], "image": b64(good)},
        {"id": "corrupt", "image": b64(b"\xff\xd8\xff not a jpeg")},
        {"id": "url", "image": "https://example.com/shoe.jpg"},
        {"id": "path", "image": "file:///etc/passwd"},
        {"id": "b64", "image": "not base64!!"},
        {"id": "empty", "title": "   "},
        {"id": "type", "title": 42},
        {"id": "typo", "imgae": b64(good)},
        {"id": [1], "title": "x"},
        "just a string",
        {"id": "ok2", "title": TITLES[1]},
    ]
    r = post(server, "/v1/embed", json={"items": items})
    assert r.status_code == 207, r.text
    body = r.json()
    assert [d["id"] for d in body["data"]] == ["ok1", "ok2"] and [d["index"] for d in body["data"]] == [0, 10]
    want = reference.embed(images=[good, None], texts=[TITLES[0], TITLES[1]])
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, atol=ATOL)
    errors = {e["index"]: e["message"] for e in body["errors"]}
    assert sorted(errors) == list(range(1, 10))
    expect = {1: "item 1 image: ", 2: "item 2 image: looks like a URL", 3: "item 3 image: looks like a URL",
              4: "item 4 image: not valid base64", 5: "item 5: nothing to embed (no image, title is empty)",
              6: "item 6 title: must be a string or null, got a number", 7: "item 7: unknown field(s) ['imgae']",
              8: "item 8 id: must be a string or an integer, got an array", 9: "item 9: must be an object"}
    for i, start in expect.items():
        assert errors[i].startswith(start), (i, errors[i])
    assert "never fetches URLs" in errors[2]


def test_all_bad_items_is_422_and_the_next_request_is_fine(server):
    r = post(server, "/v1/embed", json={"items": [{"image": b64(b"garbage")}, {"title": ""}]})
    assert r.status_code == 422 and r.json()["data"] == [] and len(r.json()["errors"]) == 2
    r = post(server, "/v1/embeddings", json={"input": ["", " ", [1, 2]]})
    assert r.status_code == 422
    assert [e["message"] for e in r.json()["errors"]] == [
        "item 0: the text is empty", "item 1: the text is empty (whitespace only)",
        "item 2: token-id input is not supported by this server; send the text"]
    assert post(server, "/v1/embeddings", json={"input": "ok"}).status_code == 200


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "the body is not valid JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object, got an array"),
    (b'{"model": "m"}', 400, "missing field 'input'"),
    (b'{"input": 5}', 400, "input must be a string or an array of strings, got a number"),
    (b'{"input": [1, 2, 3]}', 400, "input is an array of token ids"),
    (b'{"input": []}', 400, "input is empty"),
    (b'{"input": "a", "dimensions": 0}', 400, "dimensions must be in [1, 32]"),
    (b'{"input": "a", "dimensions": "8"}', 400, "dimensions must be an int"),
    (b'{"input": "a", "encoding_format": "hex"}', 400, "encoding_format must be one of ['float', 'base64']"),
])
def test_request_errors_name_what_was_wrong(server, body, status, message):
    r = post(server, "/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status and err["type"] == "invalid_request_error"


def test_json_beyond_orjson_is_answered_as_by_the_standard_library(server):
    """orjson (when installed) parses and writes the bodies; what it refuses (NaN, an int over 64
    bits to write) or would read differently (an int over 64 bits, as a float) goes to the json
    module, so such requests get the same answers as without orjson."""
    from sdk.serve.parsing import dumps, loads

    big = 2**70
    r = post(server, "/v1/embed", json={"items": [{"id": big, "title": "rote Schuhe, Größe 42"}]})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == big
    value = {"a": [0.1, 1e-05, -2.5, 3.4028234663852886e38], "id": big, "t": "Größe", "n": None}
    assert json.loads(dumps(value)) == value
    assert loads(b'{"x": 1, "n": 123456789012345678901234567890}')["n"] == 123456789012345678901234567890
    assert np.isnan(loads(b'{"x": NaN}')["x"])
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        loads(b"{not json")


def test_embed_request_errors(server):
    r = post(server, "/v1/embed", json={"items": [{"title": "a"}], "dimension": 8})
    assert r.status_code == 400 and "unknown field(s) ['dimension']" in r.json()["error"]["message"]
    r = post(server, "/v1/embed", json={"items": []})
    assert r.status_code == 400 and "items is empty" in r.json()["error"]["message"]
    r = post(server, "/v1/embed", content=b"title=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json or multipart/form-data" in r.json()["error"]["message"]
    r = post(server, "/v1/embed", json={"items": [{"title": "a", "image_file": "p"}]})
    assert r.status_code == 422 and "only a multipart request has file parts" in r.json()["errors"][0]["message"]


def test_limits(server):
    r = post(server, "/v1/embeddings", json={"input": ["a"] * 65})  # --max-items 64
    assert r.status_code == 413 and "65 items; the limit is 64" in r.json()["error"]["message"]
    big = b64(b"\0" * (1 << 20))  # --max-body-mb 1
    r = post(server, "/v1/embed", json={"items": [{"image": big}]})
    assert r.status_code == 413 and "the limit is 1048576" in r.json()["error"]["message"]
    assert post(server, "/v1/embeddings", json={"input": ["a"] * 64}).status_code == 200


def test_reason_without_a_reasoner_is_404(server):
    r = post(server, "/v1/reason", json={"task": "caption", "title": "x"})
    assert r.status_code == 404 and "has no reasoner" in r.json()["error"]["message"]


def test_health_ready_models_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["precision"] == "fp32"
    assert ready.json()["batch_invariant"] is True
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny_split" and models[0]["matryoshka_dims"] == [16, 32]
    before = server.metrics()
    post(server, "/v1/embeddings", json={"input": ["a", ""]})
    post(server, "/v1/embeddings", content=b"{", headers={"content-type": "application/json"})
    m = server.metrics()

    def delta(key):
        return m.get(key, 0) - before.get(key, 0)

    assert delta('moon3_requests_total{code="207",endpoint="/v1/embeddings"}') == 1
    assert delta('moon3_requests_total{code="400",endpoint="/v1/embeddings"}') == 1
    assert delta('moon3_items_total{endpoint="/v1/embeddings",outcome="ok"}') == 1
    assert delta('moon3_errors_total{kind="bad_item"}') == 1
    assert delta('moon3_errors_total{kind="bad_request"}') == 1
    assert delta("moon3_batch_size_count") >= 1
    assert m["moon3_ready"] == 1 and m["moon3_queue_depth"] == 0
    assert 'moon3_request_latency_seconds_bucket{endpoint="/v1/embeddings",le="+Inf"}' in m


def test_concurrent_requests_are_batched_and_equal_the_embedder(server, reference):
    """48 one-item requests at once: merged into batches (mean size > 1 in /metrics), and each
    answer is its own item's vector."""
    photos = [photo(100 + k) for k in range(16)]
    items = [{"id": k, "title": TITLES[k % len(TITLES)] + f" {k}"} if k % 3 else
             {"id": k, "title": TITLES[k % len(TITLES)], "image": b64(photos[k % 16])} for k in range(48)]
    before = server.metrics()

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=48)) as c:
            return await asyncio.gather(*(c.post("/v1/embed", json={"items": [it]}) for it in items))

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], np.float32)
    assert [r.json()["data"][0]["id"] for r in responses] == list(range(48))
    want = reference.embed(images=[photos[k % 16] if k % 3 == 0 else None for k in range(48)],
                           texts=[it["title"] for it in items])
    np.testing.assert_allclose(got, want, atol=ATOL)
    m = server.metrics()
    batches = m["moon3_batch_size_count"] - before["moon3_batch_size_count"]
    assert m["moon3_batch_size_sum"] - before["moon3_batch_size_sum"] == 48
    assert batches < 48 / 2, f"{batches} batches for 48 concurrent requests: not merged"


def test_a_per_token_int8_server_gives_each_item_its_vector_alone(tiny_int8_engines):
    """INT8 with one activation scale per token (`--int8-activations per-token`): whatever batches
    the server merges concurrent requests into, each item gets the vector it gets alone."""
    from sdk.embedder import Embedder

    photos = [photo(300 + k) for k in range(8)]
    items = [{"id": k, "title": TITLES[k % len(TITLES)] + f" {k}", **({"image": b64(photos[k % 8])} if k % 2 else {})}
             for k in range(24)]
    emb = Embedder(tiny_int8_engines["per-token"], threads=1)
    alone = np.concatenate([emb.embed(images=[photos[k % 8] if k % 2 else None], texts=[it["title"]])
                            for k, it in enumerate(items)])
    s = Server(tiny_int8_engines["per-token"], "--max-batch", "8", "--max-wait-ms", "20")
    try:
        assert httpx.get(s.url + "/ready").json()["batch_invariant"] is True

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=24)) as c:
                return await asyncio.gather(*(c.post("/v1/embed", json={"items": [it]}) for it in items))

        responses = asyncio.run(go())
        merged = s.metrics()["moon3_batch_size_count"]
    finally:
        s.stop()
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], np.float32)
    np.testing.assert_allclose(got, alone, atol=2e-6)
    assert merged < 24, "the requests were not merged into batches: nothing was checked"
