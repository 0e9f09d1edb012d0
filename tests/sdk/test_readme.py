"""The README's "Using an engine" section, kept honest: its Python example runs as written against a
tiny engine built in code (random weights, the README's widths: 256-d, Matryoshka 64/128/256, with
a reasoner), and its `moon3 ...` command lines parse with the real CLI.

The example runs in a fresh working directory holding what it names: the tiny engine under each
`*.engine` name, and a copy of each input file it names (a photo, a JSONL) from the repository,
which must exist. Anything else it names (e.g. a cache file) is created there by the example.
"""

import ast
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "Using an engine"
INPUTS = {".jpg", ".jpeg", ".png", ".webp", ".jsonl", ".json", ".parquet"}  # suffixes of files the example reads
DIM, MATRYOSHKA = 256, (64, 128, 256)


def section_blocks(text: str, heading: str, lang: str) -> list[tuple[int, str]]:
    """(line number of the code's first line, code) of each ```lang block in the section whose
    heading starts with `heading` (the extractor the installed-wheel check uses too)."""
    if not re.search(rf"^#+\s+{re.escape(heading)}", text, re.M):
        raise AssertionError(f"README.md has no section headed {heading!r}")
    return _by_path("moon3_installed_check", "packaging/installed_check.py").readme_blocks(text, heading, lang)


def _by_path(name: str, path: str):
    """A file under tests/ as a module, loaded by its path (`tests/packaging` is no package, and
    its name would be the PyPI `packaging`'s)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _root_conftest():
    """tests/conftest.py as a module (by path: `from conftest import` picks whichever conftest
    another test directory registered under that name first)."""
    return _by_path("moon3_tests_conftest", "conftest.py")


@pytest.fixture(scope="module")
def readme_engine(tmp_path_factory):
    """A tiny single-graph engine with the README's widths and a tiny reasoner with attribute heads."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    tiny_tokenizer_json = _root_conftest().tiny_tokenizer_json
    from tiny_models import TEXT_DIM, PooledImageTower, tiny_bert, tiny_heads, tiny_reasoner_export, tiny_reasoner_tokenizer

    from sdk.export.bundle import package_embedder, reasoner_parts
    from sdk.export.onnx_embedder import EmbedderGraph, OnnxExportConfig, export_embedder_onnx
    from sdk.preprocess import ImagePreprocess
    from sdk.train.fusion_model import EmbedderConfig, FusionEmbedder
    from sdk.train.reasoner_model import TASKS

    folder = tmp_path_factory.mktemp("readme")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(3)
        fusion = FusionEmbedder(EmbedderConfig(d_model=32, n_heads=4, text_dim=TEXT_DIM, fire_hidden=16,
                                               out_dim=DIM, matryoshka_dims=MATRYOSHKA, dropout=0.0))
        with torch.no_grad():  # parameters that start at zero moved off it, as in tiny_models.tiny_fusion
            for p in fusion.parameters():
                if not p.abs().sum():
                    p.normal_(0, 0.5)
        graph = EmbedderGraph(PooledImageTower(), tiny_bert(), fusion.eval()).eval()
        onnx_path = export_embedder_onnx(graph, OnnxExportConfig(folder / "embedder.onnx", exporter="torchscript",
                                                                 num_threads=1, check_batches=((2, 5, 3),)))
        heads, record = tiny_heads(folder / "heads")
        _, _, _, parity = tiny_reasoner_export(folder / "r", heads=heads)
    finally:
        torch.set_num_threads(before)
    section, parts = reasoner_parts(folder / "r", tiny_reasoner_tokenizer().to_str().encode(), tasks=TASKS,
                                    max_len=64, parity=parity, heads=record)
    # a budget that fits the example's titles: the tiny tokenizer spells unknown words letter by letter
    return package_embedder(folder / "readme.engine", onnx_path.read_bytes(), tiny_tokenizer_json().encode(),
                            dim=DIM, matryoshka_dims=MATRYOSHKA, image=ImagePreprocess(size=224),
                            text_max_length=64, trace_max_length=64, extra={"reasoner": section}, extra_parts=parts)


def stage(tree: ast.AST, cwd: Path, engine: Path) -> None:
    """Put in `cwd` what the example names: the engine under each *.engine name, the repo's input files."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        name = Path(node.value)
        if name.is_absolute() or (cwd / name).exists():
            continue
        if name.suffix == ".engine":
            src = engine
        elif name.suffix.lower() in INPUTS:
            src = REPO / name
            assert src.is_file(), f"README.md's example reads {node.value}, which is not in the repository"
        else:
            continue
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, cwd / name)


def test_using_an_engine_example_runs(readme_engine, tmp_path, monkeypatch, capsys):
    blocks = section_blocks(README.read_text(encoding="utf-8"), SECTION, "python")
    assert blocks, f"README.md has no ```python block under {SECTION!r}"
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_example"}
    try:
        for line, code in blocks:
            tree = ast.parse(code, filename="README.md")
            ast.increment_lineno(tree, line - 1)  # tracebacks point at README.md's lines
            stage(tree, tmp_path, readme_engine)
            exec(compile(tree, str(README), "exec"), ns)
    finally:
        for obj in ns.values():
            if type(obj).__module__.startswith("sdk.") and callable(getattr(obj, "close", None)):
                obj.close()
    out = capsys.readouterr().out.splitlines()

    emb = ns["emb"]
    assert emb.backend == "cpu" and emb.dim == DIM
    assert f"cpu {emb.precision}" in out  # print(emb.backend, emb.precision)
    for name, width in (("v", DIM), ("v64", 64)):
        v = ns[name]
        assert v.dtype == np.float32 and v.shape[1] == width, (name, v.shape)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_backend_comment_shows_a_real_backend_name():
    """The comment on `print(emb.backend, ...)` gives an example value; it must be a name `emb.backend`
    can return (a key of `sdk.embedder.BACKENDS`), not an ONNX Runtime provider name."""
    from sdk.sessions import BACKENDS

    lines = [ln for _, code in section_blocks(README.read_text(encoding="utf-8"), SECTION, "python")
             for ln in code.splitlines() if "print(emb.backend" in ln and "e.g." in ln]
    assert lines, "README.md's example no longer prints emb.backend with an example value"
    for ln in lines:
        example = ln.split("e.g.", 1)[1].split()[0].strip(",;")
        assert example in BACKENDS, (f"README.md: {ln.strip()!r} shows backend {example!r}; "
                                     f"emb.backend is one of {list(BACKENDS)}")


def test_command_lines_parse(capsys):
    from sdk.cli import build_parser

    blocks = section_blocks(README.read_text(encoding="utf-8"), SECTION, "bash")
    commands = [shlex.split(ln, comments=True) for _, code in blocks for ln in code.splitlines()
                if ln.strip().startswith("moon3 ")]
    assert {c[1] for c in commands} >= {"embed", "search", "index"}, commands
    for argv in commands:
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            why = capsys.readouterr().err.strip().splitlines()[-1:]
            pytest.fail(f"README.md: `{shlex.join(argv)}` does not parse: {' '.join(why)}", pytrace=False)


# --- The README fits on a page, and its map of docs/ points at real pages -------------------------

MAX_README_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links inside code are not links)."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to '-',
    '-1', '-2' ... for repeated headings)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def _broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file (or heading anchor, in a Markdown file) is missing."""
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-zA-Z][\w+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_readme_fits_on_a_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines (at most {MAX_README_LINES}): move the long "
                                   "sections to a page under docs/ and link it from the README's map")


def test_readme_links_resolve():
    assert not _broken_links(README), f"README.md: broken links {_broken_links(README)}"


def test_readme_maps_every_docs_page():
    """Every docs/*.md the README links exists (test above), and every docs page is in its map."""
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(_prose(README.read_text(encoding="utf-8")))}
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md's map of docs/ does not link {missing}"


@pytest.mark.parametrize("page", sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "sdk").rglob("MODEL_CARD.md")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_docs_links_resolve(page):
    """A docs page or a model card links repository files by relative paths; moved text (or a moved
    folder) must keep its links working."""
    assert not _broken_links(page), f"{page.relative_to(REPO)}: broken links {_broken_links(page)}"


def test_ci_runs_the_readme_test_command():
    """The "Two commands" section is the CI contract: .ci/run runs exactly its test command."""
    blocks = section_blocks(README.read_text(encoding="utf-8"), "Two commands", "bash")
    commands = [ln.strip() for _, code in blocks for ln in code.splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"], commands
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == commands[-1], f".ci/run runs {ci[-1]!r}, the README says {commands[-1]!r}"
