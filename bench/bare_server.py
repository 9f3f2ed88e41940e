"""The reference point of the HTTP benchmarks: a bare aiohttp handler returning a constant JSON body.

Same stack as `klipstream serve` (aiohttp on uvloop, no access log) and nothing else, so the ratios
in bench_http.py show what the service's own work costs. `python bench/bare_server.py PORT`.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

BODY = '{"status":"ok","service":"bare","version":"0"}'


async def constant(request: web.Request) -> web.Response:
    return web.Response(text=BODY, content_type="application/json")


async def constant_after_body(request: web.Request) -> web.Response:
    await request.read()  # a POST handler must at least read what it was sent
    return web.Response(text=BODY, content_type="application/json")


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    app = web.Application()
    app.router.add_get("/bare", constant)
    app.router.add_post("/bare", constant_after_body)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
