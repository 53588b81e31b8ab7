"""python -m gateway [flags]: serve the front door (OpenAI + KServe v2) in front of a running Triton.

Normally started by the launcher (`make serve`), which passes Triton's ports; every flag is also a
GATEWAY_* environment variable (gateway/settings.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import uvicorn

from gateway import settings as settings_mod
from gateway.app import create_app, setup_logging

GRACEFUL_SHUTDOWN_S = 10  # in-flight requests get this long after SIGTERM


def uvicorn_config(s: settings_mod.GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(s), host=s.host, port=s.port,
        # h11: its parser enforces the header-size limit (httptools has none that can be set).
        http="h11", h11_max_incomplete_event_size=s.max_header_bytes,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        limit_concurrency=s.max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=s.tls_certfile, ssl_keyfile=s.tls_keyfile,
        access_log=False, log_level="warning", server_header=False, date_header=False,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings_mod.add_arguments(p)
    try:
        s = settings_mod.from_args(p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    setup_logging()
    print(f"gateway: listening on {s.url} (Triton gRPC {s.triton_grpc_url}, HTTP {s.triton_http_url})", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(s)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
