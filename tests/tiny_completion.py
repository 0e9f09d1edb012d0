"""A tiny image completion module and an engine carrying it, built in code (random weights). Needs torch."""

import json


def tiny_completion(seed: int = 0, skip_dim: int = 0):
    """An `ImageCompletion` fitting the tiny fusion model of tiny_models.tiny_fusion (d 32, text 16);
    skip_dim: its out_dim when that model has a skip path."""
    import torch

    from sdk.train.completion import CompletionConfig, ImageCompletion

    torch.manual_seed(seed)
    return ImageCompletion(CompletionConfig(d_model=32, text_dim=16, n_tokens=49, n_queries=7, n_heads=4, n_layers=1,
                                            ffn_mult=2, dropout=0.0, skip_dim=skip_dim)).eval()


def engine_with_completion(split_engine_path, folder, model):
    """A copy of a split engine with `model` exported as its completion part -> (engine path, parity report)."""
    import torch

    from sdk.engine import EngineFile, write_engine
    from sdk.export.bundle import completion_parts
    from sdk.export.onnx_completion import CompletionExportConfig, export_completion_onnx

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = export_completion_onnx(model, CompletionExportConfig(folder, num_threads=1))
    finally:
        torch.set_num_threads(before)
    parity = json.loads((folder / "completion.parity.json").read_text())
    section, parts = completion_parts(path, embedder_sha256="0" * 64, parity=parity)
    src = EngineFile.read(split_engine_path)
    manifest = json.loads(json.dumps(src.manifest))
    manifest["completion"] = section
    out = folder / "completion.engine"
    write_engine(out, manifest, {n: src.part(n) for n in src.part_names} | parts)
    return out, parity
