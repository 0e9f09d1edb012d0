"""The wheel: what it holds, what it requires, portable machine code, and a torch-free install that embeds.

The wheel is built from the tracked files (as a fresh clone would build it) with
`pip wheel --no-deps --no-build-isolation`, offline. What ships, and why:
  * sdk/ with the compiled sdk/_C*.so: the runtime;
  * sdk/export, sdk/train (+ weights ~21 MB), sdk/calib: inert without the [export] extra, and with
    it `moon3 build` works from the installed wheel, no source checkout;
  * not tests/, benchmarks/, data/, csrc/ sources, engines or caches.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME_REQUIRES = {"numpy", "pillow", "tokenizers", "onnxruntime"}


def _tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    out = subprocess.run([git, "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("pybind11", reason="building the wheel offline needs pybind11 (the [test] extra)")
    src = tmp_path_factory.mktemp("src")
    for rel in _tracked_files():
        if (REPO / rel).is_file():  # a tracked file deleted in the work tree is not built
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (whl,) = dist.glob("moon3_sdk-*.whl")
    return whl


def test_wheel_holds_the_runtime_and_the_compiled_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    so = [n for n in names if re.fullmatch(r"sdk/_C\.[\w.-]+\.so", n)]
    assert len(so) == 1, f"expected one sdk/_C*.so, got {so}"
    for need in ("sdk/_C.pyi", "sdk/py.typed", "sdk/embedder.py", "sdk/batch.py", "sdk/ray.py", "sdk/cli.py",
                 "sdk/export/build.py", "sdk/train/weights/embedder.safetensors", "sdk/train/weights/embedder.json"):
        assert need in names, f"{need} missing from the wheel"
    unwanted = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "data", "csrc", "scripts", "calib",
                                                         "export", "train")
                or n.endswith((".cpp", ".h", ".pyc", ".engine", ".onnx")) or "__pycache__" in n]
    assert not unwanted, f"not for the wheel: {unwanted[:10]}"


def test_wheel_runtime_requirements_are_lean(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    reqs = meta.get_all("Requires-Dist") or []
    base = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
    assert base == RUNTIME_REQUIRES, f"runtime requirements changed: {sorted(base)}"
    torch_reqs = [r for r in reqs if re.match(r"torch\b", r)]
    assert torch_reqs and all('extra == "export"' in r for r in torch_reqs)
    assert {"export", "gpu", "trt", "ray", "test", "bench"} <= set(meta.get_all("Provides-Extra"))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checks x86-64 machine code")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_compiled_module_runs_on_any_x86_64(wheel, tmp_path):
    """No -march=native: AVX/VEX instructions appear only in the run-time dispatched AVX2 kernel."""
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if n.startswith("sdk/_C."))
        path = Path(z.extract(so, tmp_path))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         check=True).stdout
    by_function: dict[str, int] = {}
    fn = "?"
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
        elif re.search(r"\tv[a-z0-9]+\s", line):  # a VEX-encoded (AVX) instruction
            by_function[fn] = by_function.get(fn, 0) + 1
    # The functions csrc/ compiles for AVX2 (`__attribute__((target("avx2...")))`); in the mangled
    # symbols a name appears as <length><name>.
    targeted = set()
    for src in [*(REPO / "csrc").glob("**/*.cpp"), *(REPO / "csrc").glob("**/*.h")]:
        targeted |= set(re.findall(r'__attribute__\(\(target\("avx2[^"]*"\)\)\)\s+(?:inline\s+)?[\w:<>*&]+\s+(\w+)\s*\(',
                                   src.read_text()))
    assert targeted, "no AVX2 kernel found in csrc/"
    allowed = {f"{len(n)}{n}" for n in targeted}
    assert any(a in f for f in by_function for a in allowed), "no AVX2 kernel in the binary (was the dispatch removed?)"
    outside = {f: n for f, n in by_function.items() if not any(a in f for a in allowed)}
    assert not outside, f"AVX instructions outside the dispatched kernels {sorted(targeted)} (a -march flag?): {outside}"


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    return path / "bin" / "python"


@pytest.mark.slow
def test_wheel_installs_without_torch_and_embeds(wheel, tiny_engine, tmp_path):
    """pip install the wheel into a fresh venv (binary wheels only: no compiler needed), then embed the
    sample products there with no build tools on PATH: torch is neither installed nor imported, the
    compiled module loads, and the vectors equal this environment's."""
    engine = Path(os.environ.get("MOON3_ENGINE") or tiny_engine.path)
    py = _fresh_venv(tmp_path / "venv")
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:",
                           str(wheel)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "moon3-sdk" in installed and "onnxruntime" in installed
    assert not installed & {"torch", "transformers", "onnx", "ray", "pyarrow"}, sorted(installed)

    records = [json.loads(line) for line in (REPO / "data/samples/items.jsonl").read_text().splitlines()]
    script = tmp_path / "embed.py"
    script.write_text(
        "import json, sys, warnings\n"
        "import numpy as np, sdk, sdk.ops\n"
        "from sdk.errors import TruncationWarning\n"
        "warnings.simplefilter('ignore', TruncationWarning)\n"
        "engine, samples, out = sys.argv[1:]\n"
        "records = [json.loads(l) for l in open(f'{samples}/items.jsonl')]\n"
        "with sdk.Embedder(engine, threads=1) as emb:\n"
        "    v = emb.embed_products(records, root=samples)\n"
        "np.save(out, v)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'have_c': sdk.ops.HAVE_C, 'file': sdk.__file__,\n"
        "                  'kernel': sdk.ops._C.l2_normalize_kernel(), 'version': sdk.__version__}))\n"
    )
    bare = {"PATH": str(py.parent), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}  # no compiler, no repo
    out = tmp_path / "v.npy"
    run = subprocess.run([str(py), "-I", str(script), str(engine), str(REPO / "data/samples"), str(out)],
                         capture_output=True, text=True, env=bare, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["torch"] is False and info["have_c"] is True
    assert info["file"].startswith(str(tmp_path / "venv")), "imported the repo's sdk instead of the wheel's"
    assert info["kernel"] in ("avx2", "scalar")
    cli = subprocess.run([str(py.parent / "moon3"), "inspect", str(engine)], capture_output=True, text=True, env=bare,
                         cwd=tmp_path, timeout=300)
    assert cli.returncode == 0 and "embedder:" in cli.stdout, cli.stderr

    import warnings

    from sdk import Embedder
    from sdk.errors import TruncationWarning

    with Embedder(engine, threads=1) as emb, warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        here = emb.embed_products(records, root=REPO / "data/samples")
    np.testing.assert_allclose(np.load(out), here, rtol=0, atol=1e-6)
