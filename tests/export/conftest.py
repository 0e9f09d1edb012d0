"""Tiny embedder graphs built in code (random weights, nothing downloaded)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from tiny_models import PooledImageTower, efficientnet_tower, tiny_bert, tiny_fusion  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a busy 2-core machine, 2 intra-op threads make a contended conv stall for
    # seconds at each barrier, with 1 it does not. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def effnet_graph():
    from sdk.export.onnx_embedder import EmbedderGraph

    torch.manual_seed(0)
    return EmbedderGraph(efficientnet_tower(), tiny_bert(), tiny_fusion()).eval()


@pytest.fixture
def pooled_graph():
    from sdk.export.onnx_embedder import EmbedderGraph

    torch.manual_seed(1)
    return EmbedderGraph(PooledImageTower(), tiny_bert(), tiny_fusion()).eval()
