"""research.skip_scale: the title's skip term scaled, everything else unchanged."""

import pytest

torch = pytest.importorskip("torch")

from tiny_models import tiny_fusion  # noqa: E402

from research.skip_scale import main, scale_skip  # noqa: E402
from sdk.train.fusion_model import load_embedder, save_embedder  # noqa: E402


def test_scaling_multiplies_the_title_skip_term_only(tmp_path):
    save_embedder(tiny_fusion(skip_path=True), tmp_path / "src")
    scale_skip(tmp_path / "src", tmp_path / "x2", text=2.0)
    a, b = load_embedder(tmp_path / "src"), load_embedder(tmp_path / "x2")
    g = torch.Generator().manual_seed(0)
    pooled_text, pooled_img = torch.randn(3, a.cfg.text_dim, generator=g), torch.randn(3, a.cfg.image_dim, generator=g)
    assert torch.allclose(b.skip_text(pooled_text), 2 * a.skip_text(pooled_text), atol=1e-6)
    assert torch.equal(b.skip_image(pooled_img), a.skip_image(pooled_img))
    rest = {k: v for k, v in a.state_dict().items() if not k.startswith("skip_text.proj")}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in rest.items())
    main([str(tmp_path / "src"), str(tmp_path / "i0"), "--image", "0"])
    assert not load_embedder(tmp_path / "i0").skip_image.proj.weight.any()


def test_an_embedder_without_a_skip_path_is_refused(tmp_path):
    save_embedder(tiny_fusion(), tmp_path / "plain")
    with pytest.raises(ValueError, match="no skip path"):
        scale_skip(tmp_path / "plain", tmp_path / "out", text=2.0)
