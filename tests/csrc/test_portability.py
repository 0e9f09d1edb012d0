"""csrc/ stays portable: x86 intrinsics only behind the AVX2 guard, and it compiles for aarch64 (Jetson).

The wheel-level check (no AVX instruction outside the dispatched kernel) is in tests/packaging/test_wheels.py.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
X86_ONLY = re.compile(r"\b(_mm\w*|__m(128|256|512)\w*|immintrin\.h|__builtin_cpu_(supports|init))\b")


def _x86_guard_macros(text: str) -> set[str]:
    """Macros `#define`d (to non-zero) only inside an `#if ... __x86_64__ ...` branch, e.g.
    MOON3_HAVE_AVX2_KERNEL: an `#if` on one of them is an x86 guard too."""
    names, stack = set(), []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            stack.append("__x86_64__" in s)
        elif s.startswith(("#else", "#elif")) and stack:
            stack[-1] = False
        elif s.startswith("#endif") and stack:
            stack.pop()
        elif s.startswith("#define") and any(stack):
            parts = s.split()
            if len(parts) >= 3 and parts[2] != "0":
                names.add(parts[1])
    return names


def test_x86_intrinsics_only_inside_the_guard():
    """Every line naming an x86 intrinsic, vector type or CPUID builtin is inside an x86-only `#if`
    (on `__x86_64__`, or on a macro defined only there), so other architectures never see one."""
    sources = sorted(CSRC.glob("**/*.cpp")) + sorted(CSRC.glob("**/*.h"))
    assert sources
    # a guard macro may come from an included header (kernels.h's MOON3_FUSED_AVX2 in l2norm.cpp)
    guards = set().union(*(_x86_guard_macros(src.read_text()) for src in sources))
    outside = []
    for src in sources:
        text = src.read_text()
        stack: list[bool] = []  # one entry per open #if: does this branch exist only on x86?
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s.startswith("#if"):
                stack.append("__x86_64__" in s or any(re.search(rf"\b{g}\b", s) for g in guards))
            elif s.startswith(("#else", "#elif")):
                if stack:
                    stack[-1] = False  # the other branch is the non-x86 one
            elif s.startswith("#endif"):
                stack.pop()
            if X86_ONLY.search(line.split("//")[0]) and not any(stack):
                outside.append(f"{src.name}:{n}: {s}")
    assert not outside, "x86-only code outside the AVX2 guard:\n" + "\n".join(outside)


def _aarch64_compiler() -> list[str] | None:
    """A C++ compiler targeting aarch64 Linux: the GNU cross compiler if installed, else Zig's clang from
    the `ziglang` wheel (a test dependency, so CI always has one)."""
    gnu = shutil.which("aarch64-linux-gnu-g++")
    if gnu:
        return [gnu]
    try:
        import ziglang  # noqa: F401 - only its presence matters
    except ImportError:
        return None
    return [sys.executable, "-m", "ziglang", "c++", "-target", "aarch64-linux-gnu"]


CROSS = _aarch64_compiler()


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler: pip install ziglang (in the test extra), or "
                    "Debian: apt-get install g++-aarch64-linux-gnu")
def test_compiles_for_aarch64(tmp_path):
    """Every csrc/ file compiles for aarch64 with warnings as errors (the scalar paths; NEON by the compiler)."""
    pybind11 = pytest.importorskip("pybind11")
    import sysconfig

    sources = sorted(CSRC.glob("**/*.cpp"))
    assert sources
    objs = [tmp_path / f"{src.stem}.o" for src in sources]
    # one compiler per file, two at a time: each spends most of its time parsing the pybind11 headers
    running: list[tuple[Path, Path, subprocess.Popen]] = []

    def finish(src: Path, obj: Path, proc: subprocess.Popen) -> None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{src.name}:\n{err[-4000:]}"

    for src, obj in zip(sources, objs):
        cmd = [*CROSS, "-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-c", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(obj)]
        running.append((src, obj, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        if len(running) == 2:
            finish(*running.pop(0))
    for job in running:
        finish(*job)
    for obj in objs:
        head = obj.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, f"{obj.name} is not AArch64"
