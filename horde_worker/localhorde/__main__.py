"""Run the local horde on its own: `python -m horde_worker.localhorde --port 7001`."""

from __future__ import annotations

import argparse
import signal
import threading

from horde_worker.inference.tiny import DEMO_MODEL_NAME
from horde_worker.localhorde.server import LocalHorde


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl+C."""
    parser = argparse.ArgumentParser(prog="python -m horde_worker.localhorde", description=__doc__)
    parser.add_argument("--port", type=int, default=7001, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--model", action="append", dest="models",
                        help=f"a model name the horde knows (repeatable; default {DEMO_MODEL_NAME})")
    parser.add_argument("--api-key", help="the worker owner's API key (default: a new random one)")
    parser.add_argument("--min-ttl", type=int, default=150, help="shortest job TTL in seconds")
    args = parser.parse_args(argv)
    horde = LocalHorde(args.models or [DEMO_MODEL_NAME], port=args.port, owner_key=args.api_key,
                       min_ttl=args.min_ttl).start()
    print(f"local horde at {horde.url}", flush=True)
    print(f"api key: {horde.api_key}", flush=True)
    print(f"models: {', '.join(horde.state.models)}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    horde.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
