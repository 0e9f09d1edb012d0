"""Helpers of the `moon3 serve` tests: a real server subprocess, photos, titles."""

from __future__ import annotations

import base64
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90


class Server:
    """A `moon3 serve` subprocess: .url, .proc; rss() reads its resident memory."""

    def __init__(self, engine, *args: str, env: dict | None = None):
        self.log = io.StringIO()
        cmd = [sys.executable, "-m", "sdk", "serve", str(engine), "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        lines: queue.Queue = queue.Queue()

        def pump():  # keep reading so the pipe never fills, and remember the output
            for line in self.proc.stdout:
                self.log.write(line)
                lines.put(line)
            lines.put(None)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"moon3 serve did not start: {self.output()}")
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
        while time.monotonic() < deadline:  # warm-up done
            if httpx.get(self.url + "/ready").status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"moon3 serve never became ready: {self.output()}")

    def output(self) -> str:
        return self.log.getvalue()

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (the *_created series left out)."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#") and "_created" not in line:
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._pump.join(10)
        self.proc.stdout.close()
        return rc


def photo(seed: int, h: int = 40, w: int = 30, fmt: str = "PNG") -> bytes:
    """An encoded photo (random pixels) of h x w."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


TITLES = ["red running shoes", "blue cotton shirt", "black leather bag", "women white dress", "men sport watch",
          "casual blue shoes for men", "red and black shirt", "white leather watch"]
