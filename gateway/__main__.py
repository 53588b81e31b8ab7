"""python -m gateway [flags]: serve the front door (OpenAI + KServe v2) in front of a running Triton.

Normally started by the launcher (`make serve`), which passes Triton's ports; every flag is also a
GATEWAY_* environment variable (gateway/settings.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import uvicorn

from gateway import settings as settings_mod
from gateway.app import Drain, create_app, setup_logging

# After the drain (gateway/app.py Drain): what uvicorn's own shutdown still waits for requests that are
# not ours to end (KServe pass-through) before cancelling them.
UVICORN_GRACE_S = 1.0


class Server(uvicorn.Server):
    """uvicorn with a drain phase: the first SIGTERM/SIGINT starts the drain (new requests get 503, the
    listener stays open, requests in flight go on) instead of closing the listener at once. Once
    Drain.done() says so (at most shutdown_timeout_s + END_FLUSH_S after the signal), uvicorn's own
    shutdown closes the listener, gives what is left UVICORN_GRACE_S and exits. A second signal starts
    uvicorn's shutdown at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        if self.drain.since is None:
            self.drain.since = time.monotonic()  # plain stores only: this runs in a signal handler
            super().handle_exit(sig, frame)  # records the signal (uvicorn re-raises it at exit) ...
            self.should_exit = False  # ... but the listener stays open until the drain is over
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self.drain.ended_at is None and counter % 10 == 0:
                print(f"gateway: draining ({time.monotonic() - self.drain.since:.0f} s): new requests get 503, "
                      f"{self.drain.active} in flight", file=sys.stderr, flush=True)
            self.should_exit = self.drain.done(time.monotonic())
        return await super().on_tick(counter)


def uvicorn_config(s: settings_mod.GatewaySettings, app) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=s.host, port=s.port,
        # h11: its parser enforces the header-size limit (httptools has none that can be set).
        http="h11", h11_max_incomplete_event_size=s.max_header_bytes,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        limit_concurrency=s.max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=UVICORN_GRACE_S,
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
    app = create_app(s)
    Server(uvicorn_config(s, app), app.drain).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
