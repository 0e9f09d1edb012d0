"""csrc/ stays portable: x86 intrinsics only behind the AVX2 guard, and it compiles for aarch64 (Jetson).

The wheel-level check (no AVX instruction outside the dispatched kernel) is in tests/sdk/test_wheel.py.
"""

import re
import shutil
import subprocess
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
    outside = []
    for src in sources:
        text = src.read_text()
        guards = _x86_guard_macros(text)
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


CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.slow  # ~4 s of CPU, but the pybind11 headers make it 10+ s on a busy machine
@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (Debian: apt-get install g++-aarch64-linux-gnu)")
def test_compiles_for_aarch64(tmp_path):
    """Every csrc/ file compiles for aarch64 with warnings as errors (the scalar paths; NEON by the compiler)."""
    pybind11 = pytest.importorskip("pybind11")
    import sysconfig

    sources = sorted(CSRC.glob("**/*.cpp"))
    assert sources
    for src in sources:
        obj = tmp_path / f"{src.stem}.o"
        cmd = [CROSS, "-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-c", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{src.name}:\n{done.stderr[-4000:]}"
        head = obj.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, f"{obj.name} is not AArch64"
