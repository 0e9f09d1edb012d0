"""Weights stored in half precision (sdk.train.storage): written, checked, read back as float32."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from sdk.paths import file_sha256  # noqa: E402
from sdk.train.storage import load_fp32_state, merge_record, weights_sha256s, write_half  # noqa: E402


def test_half_copy_rounds_floats_keeps_other_tensors_and_reads_back_fp32(tmp_path):
    src = tmp_path / "w.safetensors"
    state = {"w": torch.randn(8, 4), "steps": torch.arange(3)}
    save_file(state, str(src))
    record = write_half(src, tmp_path / "h.safetensors")
    stored = load_file(str(tmp_path / "h.safetensors"))
    assert stored["w"].dtype == torch.float16 and stored["steps"].dtype == torch.int64
    back = load_fp32_state(tmp_path / "h.safetensors")
    assert back["w"].dtype == torch.float32 and torch.allclose(back["w"], state["w"], rtol=1e-3, atol=1e-4)
    assert torch.equal(back["steps"], state["steps"])
    assert record == {"stored_dtype": "float16", "source_sha256": file_sha256(src),
                      "sha256": file_sha256(tmp_path / "h.safetensors")}
    assert load_fp32_state(src)["w"].dtype == torch.float32  # FP32 files read unchanged
    assert weights_sha256s(tmp_path / "h.safetensors", record) == (record["sha256"], record["source_sha256"])
    assert weights_sha256s(src, {}) == (file_sha256(src),)
    # a copy of a copy keeps naming the first FP32 source
    again = merge_record({**record, "config": 1}, write_half(tmp_path / "h.safetensors", tmp_path / "h2.safetensors"))
    assert again["source_sha256"] == record["source_sha256"] and again["config"] == 1


def test_tensors_that_do_not_fit_float16_stay_float32_and_unknown_dtypes_are_refused(tmp_path):
    src = tmp_path / "w.safetensors"
    # the inverse std of a constant feature channel (1e6) does not fit FP16 (max 65504)
    save_file({"inv_std": torch.tensor([1.0, 1e6]), "w": torch.randn(4)}, str(src))
    record = write_half(src, tmp_path / "h.safetensors")
    stored = load_file(str(tmp_path / "h.safetensors"))
    assert stored["inv_std"].dtype == torch.float32 and stored["inv_std"][1] == 1e6
    assert stored["w"].dtype == torch.float16 and record["kept_float32"] == ["inv_std"]
    assert "kept_float32" not in write_half(tmp_path / "h.safetensors", tmp_path / "h2.safetensors", "bfloat16")
    write_half(src, tmp_path / "b.safetensors", "bfloat16")  # bfloat16 keeps fp32's range
    assert load_fp32_state(tmp_path / "b.safetensors")["inv_std"][1] == pytest.approx(1e6, rel=1e-2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_half(src, tmp_path / "x.safetensors", "int8")


def test_the_half_copy_command_line_passes_its_arguments(monkeypatch, capsys):
    from sdk.train.storage import copy_half_main

    seen = []
    monkeypatch.setattr("sys.argv", ["embedder", "a", "b", "--dtype", "bfloat16"])
    copy_half_main("embedder", "embedder", lambda *a: seen.append(a) or "b/embedder.safetensors")
    assert seen == [("a", "b", "bfloat16")] and "b/embedder.safetensors" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["reasoner", "a"])
    with pytest.raises(SystemExit):
        copy_half_main("reasoner", "reasoner", lambda *a: None)
