"""`python -m horde_worker`."""

from horde_worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
