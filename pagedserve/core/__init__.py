"""The shared core every service imports: domain errors, sampling parameters, the step codec,
token-id and deadline checks, gRPC and metrics-server helpers, model-path resolution.

It sits below the services (``router``, ``scheduler``, ``worker``, ``kvstore``), which sit below
the applications in ``pagedserve`` (cli, ``up``, the offline ``LLM``, bench, loadtest, client,
the in-process cluster). Nothing here imports a service or an application, and no service
imports an application or another service (the scheduler uses ``kvstore``); ``make lint`` checks
this with import-linter (the contract is in pyproject.toml).
"""
