"""``pagedserve``: up | router | scheduler | worker | generate | loadtest | bench."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (a user message unless --raw)")
    p.add_argument("--address", default="127.0.0.1:50051", help="router address")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token")
    p.add_argument("--n", type=int, default=None, help="parallel samples")
    p.add_argument("--best-of", type=int, default=None)
    p.add_argument("--beam-width", type=int, default=None)
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--cache-salt", default="",
                   help="share prefix-cache blocks only with requests sending the same salt")
    add_client_security_arguments(p)


def add_client_security_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--api-key`` and the TLS flags of a client of the router (generate, loadtest)."""
    from pagedserve.core.grpc_util import add_tls_arguments

    p.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY") or None,
                   help="sent as 'authorization: Bearer KEY' [env PAGEDSERVE_API_KEY]")
    add_tls_arguments(p, "PAGEDSERVE_CLIENT_", server=False)


_SAMPLING = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
             "logprobs", "n", "best_of", "beam_width", "length_penalty")


async def _generate(args: argparse.Namespace) -> int:
    import grpc

    from pagedserve.client import AsyncClient
    from pagedserve.core.grpc_util import tls_config_from_args

    sampling = {k: getattr(args, k) for k in _SAMPLING if getattr(args, k) is not None}
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    kwargs: dict = {"timeout": args.timeout, "cache_salt": args.cache_salt, **sampling}
    if args.raw:
        kwargs["prompt"] = args.prompt
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        kwargs["messages"] = [*messages, {"role": "user", "content": args.prompt}]
    many = (args.n or 1) > 1 or (args.beam_width or 1) > 1
    try:
        async with AsyncClient(args.address, tls=tls_config_from_args(args),
                               api_key=args.api_key) as client:
            async for response in client.generate(**kwargs):
                prefix = f"[{response.index}] " if many and response.text else ""
                sys.stdout.write(prefix + response.text)
                sys.stdout.flush()
                if response.finish_reason and many:
                    sys.stdout.write("\n")
    except grpc.aio.AioRpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from pagedserve.up import add_up_arguments

    add_up_arguments(sub.add_parser("up", help="run a local cluster (router+scheduler+workers)"))
    sub.add_parser("router", help="run a router", add_help=False)
    sub.add_parser("scheduler", help="run the scheduler", add_help=False)
    sub.add_parser("worker", help="run a worker", add_help=False)
    _generate_args(sub.add_parser("generate", help="stream a completion from a router"))
    sub.add_parser("loadtest", help="drive a router with a workload", add_help=False)
    sub.add_parser("bench", help="benchmarks (throughput)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("router", "scheduler", "worker", "loadtest", "bench"):
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "up":
        from pagedserve.up import run_up

        return run_up(args)
    if args.command == "generate":
        return asyncio.run(_generate(args))
    parser.error(f"unknown command {args.command}")
    return 2


def _delegate(command: str, rest: list[str]) -> int:
    if command == "router":
        from router.__main__ import main as run
    elif command == "scheduler":
        from scheduler.__main__ import main as run
    elif command == "worker":
        from worker.__main__ import main as run
    elif command == "loadtest":
        from pagedserve.loadtest.cli import main as loadtest_main

        return loadtest_main(rest)
    else:
        from pagedserve.bench.cli import main as bench_main

        return bench_main(rest)
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
