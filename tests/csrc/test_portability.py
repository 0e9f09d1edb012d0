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


def test_x86_intrinsics_only_inside_the_guard():
    """Every line naming an x86 intrinsic, vector type or CPUID builtin is inside `#if MOON3_HAVE_AVX2_KERNEL`
    (or the block that defines it from `defined(__x86_64__)`), so other architectures never see one."""
    sources = sorted(CSRC.glob("**/*.cpp")) + sorted(CSRC.glob("**/*.h"))
    assert sources
    outside = []
    for src in sources:
        depth_guarded: list[bool] = []  # one entry per open #if: is it an x86 guard?
        for n, line in enumerate(src.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("#if"):
                depth_guarded.append("MOON3_HAVE_AVX2_KERNEL" in s or "__x86_64__" in s)
            elif s.startswith("#else") or s.startswith("#elif"):
                if depth_guarded:
                    depth_guarded[-1] = False  # the other branch is the non-x86 one
            elif s.startswith("#endif"):
                depth_guarded.pop()
            if X86_ONLY.search(line.split("//")[0]) and not any(depth_guarded):
                outside.append(f"{src.name}:{n}: {s}")
    assert not outside, "x86-only code outside the AVX2 guard:\n" + "\n".join(outside)


CROSS = shutil.which("aarch64-linux-gnu-g++")


@pytest.mark.slow  # ~4 s of CPU, but the pybind11 headers make it 10+ s on a busy machine
@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (Debian: apt-get install g++-aarch64-linux-gnu)")
def test_compiles_for_aarch64(tmp_path):
    """The kernels compile for aarch64 with warnings as errors (the scalar path, vectorised with NEON)."""
    pybind11 = pytest.importorskip("pybind11")
    import sysconfig

    obj = tmp_path / "l2norm.o"
    cmd = [CROSS, "-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-c",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(CSRC / "l2norm.cpp"), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    head = obj.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, "not an AArch64 object"  # EM_AARCH64
