"""The baseline for the HTTP figures: the least an aiohttp service can do per request.

Reads the body and answers 202 with a small JSON document, in `--workers` processes sharing the port
(SO_REUSEPORT), as `rulesvc serve --workers` does. No parsing, no storage.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"accepted": 1, "duplicates": 0}, status=202)


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers > 1:
        command = [sys.executable, __file__, "--port", str(args.port), "--workers", "1"]
        procs = [subprocess.Popen(command) for _ in range(args.workers)]
        try:
            for proc in procs:
                proc.wait()
        finally:
            for proc in procs:
                proc.terminate()
        return
    app = web.Application()
    app.router.add_post("/v1/events", accept)
    app.router.add_get("/", ready)
    web.run_app(app, host="127.0.0.1", port=args.port, reuse_port=True, print=None, access_log=None)
    os._exit(0)


if __name__ == "__main__":
    main()
