"""Load-test harness: drives a pagedserve router (gRPC) or an OpenAI-compatible server.

Modules, dependencies flowing one way: ``datasets`` and ``arrivals`` (what and when),
``metrics`` (pure aggregation), ``backends`` (one request over the wire), ``runner`` (async
orchestration), ``report`` (table, JSON, plots), ``cli`` (arguments and entry points).
"""

from pagedserve.loadtest.cli import add_loadtest_arguments, main, run_loadtest

__all__ = ["add_loadtest_arguments", "main", "run_loadtest"]
