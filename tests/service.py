"""Run `rulesvc serve` as a real process, as a user would, for process-level tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

from rulesvc.store.mongod import EmbeddedMongod, free_port


class ServiceProcess:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, workers: int = 1) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.env = {
            **os.environ,
            "RULESVC_DATA_DIR": str(workdir / ".rulesvc"),
            "RULESVC_LOG_FORMAT": "json",
            **(env or {}),
        }
        if "MONGODB_URI" not in (env or {}):
            self.env.pop("MONGODB_URI", None)  # the embedded mongod, as on a fresh machine
        self.proc: subprocess.Popen[bytes] | None = None
        self.key: str | None = None
        self.log_path = workdir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> float:
        """Returns the seconds until /readyz answered 200 (a loaded 2-core machine took over 60 once)."""
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rulesvc",
                    "serve",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    self.key = self.key or next(
                        (line for line in self.log().splitlines() if line.startswith("rsk_")), None
                    )
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"service not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `rulesvc ARGS` with this service's settings, as an operator would on its machine."""
        return subprocess.run(
            [sys.executable, "-m", "rulesvc", *args], cwd=self.workdir, env=self.env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def signal(self, sig: signal.Signals, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    @contextlib.contextmanager
    def db(self) -> Iterator[Database[dict[str, Any]]]:
        """The running service's database (its embedded mongod's, or MONGODB_URI's), to check what it
        stored; closed before the service stops."""
        uri = self.env.get("MONGODB_URI") or EmbeddedMongod(self.workdir / ".rulesvc").running_uri()
        assert uri is not None, f"no mongod serves {self.workdir / '.rulesvc'}"
        with MongoClient(uri) as client:
            yield client[self.env.get("RULESVC_DATABASE", "rulesvc")]

    def mongod_pid(self) -> int:
        return int((self.workdir / ".rulesvc" / "mongod.pid").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
