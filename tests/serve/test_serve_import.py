"""`import sdk` and `import sdk.serve` stay light: no web stack, no torch, until a server is made."""

import subprocess
import sys


def test_serve_module_imports_no_web_stack_and_no_torch():
    code = ("import sys, sdk, sdk.serve, sdk.serve.batch, sdk.serve.client; "
            "heavy = [m for m in ('torch', 'starlette', 'uvicorn', 'prometheus_client', 'httpx') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_help_lists_the_flags(capsys):
    from sdk.cli import main

    try:
        main(["serve", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for flag in ("--max-batch", "--max-wait-ms", "--queue", "--max-items", "--max-body-mb", "--drain-s"):
        assert flag in out


def test_bad_settings_are_refused_with_the_value(capsys, tmp_path):
    from sdk.cli import main

    assert main(["serve", str(tmp_path / "x.engine"), "--max-batch", "64", "--queue", "32"]) == 2
    assert "queue (32) must be >= max_batch (64)" in capsys.readouterr().err


def test_default_threads_are_the_physical_cores_this_process_may_use():
    """As many engine threads as physical cores (hyper-threads of one core count once), checked
    against /proc/cpuinfo's (physical id, core id) pairs where it has them."""
    import os
    import re
    from pathlib import Path

    from sdk.serve import default_threads

    n = default_threads()
    allowed = os.sched_getaffinity(0)
    assert 1 <= n <= len(allowed)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    blocks = [dict(re.findall(r"^(processor|physical id|core id)\s*:\s*(\S+)", b, re.M)) for b in info.split("\n\n")]
    blocks = [b for b in blocks if "core id" in b and int(b["processor"]) in allowed]
    if blocks:
        assert n == len({(b.get("physical id"), b["core id"]) for b in blocks})
