"""sdk.export.onnx_completion: the image completion part, ONNX vs PyTorch (tiny model, in code)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tiny_completion import tiny_completion  # noqa: E402

from sdk.export.onnx_completion import (  # noqa: E402
    CompletionExportConfig,
    export_completion_onnx,
    padded_states,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("completion")
    model = tiny_completion()
    path = export_completion_onnx(model, CompletionExportConfig(folder, num_threads=1))
    return model, path, json.loads((folder / "completion.parity.json").read_text())


def test_parity_report_passes_on_padded_batches(exported):
    _, path, report = exported
    assert path.is_file() and report["passed"] and report["model"] == "completion"
    assert report["min_cosine"] >= 0.9999 and report["max_abs_err"] < 1e-4
    assert [(b["batch"], b["text_len"]) for b in report["batches"]] == [(1, 4), (5, 11), (3, 32)]


def test_onnx_matches_torch_at_lengths_it_was_not_traced_on(exported):
    import onnxruntime as ort

    model, path, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = padded_states(9, 17, 16, seed=42)
    got = sess.run(["image_tokens"], feed)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(feed["token_states"]), torch.from_numpy(feed["attention_mask"]).float()).numpy()
    assert got.shape == (9, 49, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # one row alone, unpadded, gives what it gives inside the padded batch
    n = int(feed["attention_mask"][3].sum())
    alone = sess.run(["image_tokens"], {"token_states": feed["token_states"][3:4, :n],
                                        "attention_mask": feed["attention_mask"][3:4, :n]})[0]
    np.testing.assert_allclose(alone[0], got[3], atol=1e-5)


def test_failed_parity_raises_and_keeps_the_report(tmp_path, monkeypatch):
    from sdk.export import onnx_completion
    from sdk.export.onnx_tools import ExportError

    real = onnx_completion.verify_completion

    def broken(graph, cfg):
        with torch.no_grad():
            graph.completion.out[1].bias.add_(1.0)  # the torch side drifts from the exported graph
        return real(graph, cfg)

    monkeypatch.setattr(onnx_completion, "verify_completion", broken)
    with pytest.raises(ExportError, match="completion parity failed"):
        export_completion_onnx(tiny_completion(), CompletionExportConfig(tmp_path, num_threads=1))
    assert json.loads((tmp_path / "completion.parity.json").read_text())["passed"] is False


def test_bad_export_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="min_cosine"):
        CompletionExportConfig(tmp_path, min_cosine=0.0)
    with pytest.raises(ValueError, match="check_batches"):
        CompletionExportConfig(tmp_path, check_batches=((0, 3),))


def test_build_adds_completion_only_for_the_embedder_it_was_trained_against(tmp_path):
    from sdk.export.build import BuildConfig, _completion_section
    from sdk.export.onnx_tools import ExportError
    from sdk.paths import file_sha256
    from sdk.train.completion import save_completion

    weights = tmp_path / "embedder"
    weights.mkdir()
    (weights / "embedder.safetensors").write_bytes(b"the embedder these completion weights were trained on")
    sha = file_sha256(weights / "embedder.safetensors")
    good, stale = tmp_path / "good", tmp_path / "stale"
    save_completion(tiny_completion(), good, sha, metrics={"m": 1})
    save_completion(tiny_completion(), stale, "f" * 64)
    logged = []
    section, parts = _completion_section(good, weights, tmp_path / "w1", explicit=False, log=logged.append)
    assert section["completes"] == "image" and section["embedder_sha256"] == sha and section["metrics"] == {"m": 1}
    assert section["parity"]["min_cosine"] >= 0.9999 and list(parts) == ["completion.onnx"]
    # stale weights: left out with a warning by default, refused when asked for explicitly
    assert _completion_section(stale, weights, tmp_path / "w2", explicit=False, log=logged.append) == (None, {})
    assert "trained against other embedder weights" in logged[-1] and "built without image completion" in logged[-1]
    with pytest.raises(ExportError, match="re-train them"):
        _completion_section(stale, weights, tmp_path / "w3", explicit=True, log=logged.append)
    # an fp16 copy of that embedder (sdk.train.fusion_model.copy_half) still matches: its record names the
    # FP32 file it came from; the engine records the copy's own hash
    half = tmp_path / "half"
    half.mkdir()
    (half / "embedder.safetensors").write_bytes(b"the same weights, stored fp16")
    own = file_sha256(half / "embedder.safetensors")
    record = {"config": {}, "stored_dtype": "float16", "source_sha256": sha, "sha256": own}
    (half / "embedder.json").write_text(json.dumps(record))
    section, _ = _completion_section(good, half, tmp_path / "w4", explicit=True, log=logged.append)
    assert section["embedder_sha256"] == own
    # ... but only while the copy is the file its record describes
    (half / "embedder.safetensors").write_bytes(b"other weights, put in its place")
    with pytest.raises(ExportError, match="re-train them"):
        _completion_section(good, half, tmp_path / "w5", explicit=True, log=logged.append)
    # the single layout never carries it; None leaves it out
    assert BuildConfig(layout="single", completion=good).completion_dir() is None
    assert BuildConfig(completion=None).completion_dir() is None
    assert BuildConfig(completion=good).completion_dir() == good
