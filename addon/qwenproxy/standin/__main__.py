"""`python -m qwenproxy.standin`: run the stand-in in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from ._server import StandIn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwenproxy.standin",
        description="A local stand-in of Qwen's OAuth and API servers (for tests and demos).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8443, help="port to listen on (0: any free)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throwaway CA")
    parser.add_argument("--cert-dir", type=Path, help="where to write ca.pem (default: temp dir)")
    parser.add_argument("--token-lifetime", type=float, default=6 * 3600, metavar="S")
    parser.add_argument("--device-code-lifetime", type=float, default=600, metavar="S")
    parser.add_argument("--interval", type=int, metavar="S", help="poll interval to announce")
    parser.add_argument(
        "--min-poll-interval",
        type=float,
        metavar="S",
        help="answer slow_down to faster polls (default: --interval, else 2; 0 disables)",
    )
    parser.add_argument("--resource-url", help="resource_url in token answers ({port} allowed)")
    parser.add_argument("--rotate-refresh", action="store_true", help="rotate refresh tokens")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    standin = StandIn(
        tls=args.tls,
        cert_dir=args.cert_dir,
        token_lifetime=args.token_lifetime,
        device_code_lifetime=args.device_code_lifetime,
        interval=args.interval,
        min_poll_interval=args.min_poll_interval,
        resource_url=args.resource_url,
        rotate_refresh=args.rotate_refresh,
    )
    standin.start(host=args.host, port=args.port)
    print(f"Qwen stand-in listening on {standin.base_url}", flush=True)
    if standin.ca_path:
        print(f"CA certificate: {standin.ca_path}", flush=True)
    print("Press Ctrl-C to stop.", flush=True)

    stopped = threading.Event()
    # SIGTERM (how a demo script ends us) is as clean as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(timeout=1):  # a timeout keeps Ctrl-C responsive everywhere
            pass
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    print("Qwen stand-in stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
