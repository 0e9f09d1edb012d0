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


def test_default_threads_leave_a_core_for_the_event_loop():
    import os

    from sdk.serve import default_threads

    n = default_threads()
    assert 1 <= n <= max(1, (os.cpu_count() or 1) - 1)
