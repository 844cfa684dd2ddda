"""A horde on loopback that follows the real server's contract, for local mode and tests."""

from horde_worker.localhorde.server import FaultPlan, LocalHorde, RateLimit, ServerOptions

__all__ = ["FaultPlan", "LocalHorde", "RateLimit", "ServerOptions"]
