"""``pagedserve loadtest``: arguments, one run or a rate sweep, and the outputs.

The top-level CLI adds these arguments to its ``loadtest`` sub-parser with
``add_loadtest_arguments`` and calls ``main(args)``; ``python -m pagedserve.loadtest`` does the
same on its own. ``run_loadtest(args)`` is the programmatic entry (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from pagedserve.cli import add_client_security_arguments
from pagedserve.core.grpc_util import tls_config_from_args
from pagedserve.loadtest import report
from pagedserve.loadtest.arrivals import validate_arrivals
from pagedserve.loadtest.backends import (
    BACKEND_NAMES,
    Credentials,
    SamplingConfig,
    make_backend,
)
from pagedserve.loadtest.datasets import (
    DATASET_NAMES,
    DatasetConfig,
    DatasetError,
    build_dataset,
)
from pagedserve.loadtest.metrics import parse_slos, summarize
from pagedserve.loadtest.runner import PhaseOutcome, RunConfig, run_phases

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"


def _length_range(text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"32:256"`` -> (32, 256)."""
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}") from None
    if not rates:
        raise argparse.ArgumentTypeError("--sweep needs at least one rate")
    return rates


def add_loadtest_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--backend", choices=BACKEND_NAMES, default="grpc")
    server.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="router address for --backend grpc (default %(default)s)",
    )
    server.add_argument(
        "--base-url",
        default="",
        help="server root for --backend openai, e.g. http://127.0.0.1:8000",
    )
    server.add_argument(
        "--model",
        default="",
        help="model name to send (openai: default is the first of /v1/models)",
    )
    add_client_security_arguments(server)

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="random")
    data.add_argument("--dataset-path", default=None, help="request file for --dataset json")
    data.add_argument(
        "--num-requests",
        type=int,
        default=100,
        help="measured requests per run (per rate with --sweep)",
    )
    data.add_argument(
        "--input-len",
        type=_length_range,
        default=(128, 128),
        metavar="N|MIN:MAX",
        help="random: prompt length range (default 128)",
    )
    data.add_argument(
        "--output-len",
        type=_length_range,
        default=(128, 128),
        metavar="N|MIN:MAX",
        help="random, shared-prefix: output length range (default 128)",
    )
    data.add_argument(
        "--vocab-range",
        type=_length_range,
        default=(1000, 30000),
        metavar="LO:HI",
        help="token ids drawn for synthetic prompts (default 1000:30000)",
    )
    data.add_argument("--num-prefixes", type=int, default=4)
    data.add_argument("--suffixes-per-prefix", type=int, default=8)
    data.add_argument("--prefix-len", type=int, default=256)
    data.add_argument("--suffix-len", type=int, default=32)
    data.add_argument(
        "--max-input-len",
        type=int,
        default=1024,
        help="sharegpt-synthetic: clip prompt lengths (default 1024)",
    )
    data.add_argument(
        "--max-output-len",
        type=int,
        default=1024,
        help="sharegpt-synthetic: clip output lengths (default 1024)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--rate",
        type=float,
        default=math.inf,
        help="requests per second; inf sends all at once (default)",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps; 1.0 = Poisson, <1 burstier",
    )
    load.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="cap on requests in flight (combines with --rate)",
    )
    load.add_argument(
        "--sweep",
        type=_rates,
        default=None,
        metavar="RATES",
        help="comma-separated rates: one run per rate, then a summary table",
    )
    load.add_argument("--warmup", type=int, default=0, help="requests sent first, not measured")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="deadline of each request in seconds (default 60)",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="overall limit of each run in seconds, warmup included (default 600)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2e:10000",
    )
    out.add_argument("--out", default=None, help="write config, per-request results, aggregates")
    out.add_argument("--plot", default=None, help="write a PNG (CDFs + timeline, or sweep curves)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _dataset_config(args: argparse.Namespace) -> DatasetConfig:
    return DatasetConfig(
        name=args.dataset,
        seed=args.seed,
        input_len=tuple(args.input_len),
        output_len=tuple(args.output_len),
        vocab_range=tuple(args.vocab_range),
        num_prefixes=args.num_prefixes,
        suffixes_per_prefix=args.suffixes_per_prefix,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        path=args.dataset_path,
    )


def _run_config(args: argparse.Namespace, rate: float) -> RunConfig:
    validate_arrivals(rate, args.burstiness)
    return RunConfig(
        rate=rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        show_progress=not args.no_progress,
    )


def _config_record(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that describe the run (callables the top-level CLI may add are dropped)."""
    simple = (str, int, float, bool, list, tuple, type(None))
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, simple)}


def _point(rate: float, warmup: PhaseOutcome, measured: PhaseOutcome, slos: dict[str, float]):
    summary = summarize(measured.results, measured.duration_s, slos)
    summary.update(
        num_not_sent=measured.num_not_sent,
        timed_out=measured.timed_out,
        num_warmup=len(warmup.results),
        num_warmup_failed=sum(1 for r in warmup.results if not r.is_ok),
    )
    return {"rate": rate, "summary": summary, "results": measured.results}


async def run_loadtest(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one load test (or one per ``--sweep`` rate); prints the table; writes ``--out`` and
    ``--plot``. Returns ``{"config", "summary", "results"}``, or ``{"config", "sweep": [...]}``
    with one ``{"rate", "summary", "results"}`` per rate. Raises ``ValueError`` on bad options."""
    rates = args.sweep or [args.rate]
    slos = parse_slos(args.goodput)
    run_cfgs = [_run_config(args, rate) for rate in rates]
    if args.num_requests < 1 or args.warmup < 0 or not args.timeout > 0:
        raise ValueError("need --num-requests >= 1, --warmup >= 0 and --timeout > 0")
    if args.plot:
        report._pyplot()  # fail before the run, not after it
    # One request list for all rates, so a sweep never re-sends a prompt it already cached.
    specs = build_dataset(_dataset_config(args), args.warmup + args.num_requests * len(rates))
    warmup_specs, specs = specs[: args.warmup], specs[args.warmup :]
    sampling = SamplingConfig(temperature=args.temperature, model=args.model)
    run_id = f"loadtest-{uuid.uuid4().hex[:8]}"
    credentials = Credentials(args.api_key, tls_config_from_args(args))
    backend = make_backend(args.backend, args.target, args.base_url, sampling, run_id,
                           credentials)
    points = []
    try:
        for i, cfg in enumerate(run_cfgs):
            chunk = specs[i * args.num_requests : (i + 1) * args.num_requests]
            label = f" @ {rates[i]:g}/s" if args.sweep else ""
            warmup, measured = await run_phases(
                backend, warmup_specs if i == 0 else [], chunk, cfg, args.timeout, label
            )
            points.append(_point(rates[i], warmup, measured, slos))
            print(report.format_table(points[-1]["summary"], "pagedserve loadtest" + label))
    finally:
        await backend.close()
    return _finish(args, points)


def _finish(args: argparse.Namespace, points: list[dict[str, Any]]) -> dict[str, Any]:
    config = _config_record(args)
    if args.sweep:
        print(report.format_sweep_table(points))
        payload: dict[str, Any] = {"config": config, "sweep": [_jsonable(p) for p in points]}
        if args.plot:
            report.plot_sweep(args.plot, points)
    else:
        payload = {"config": config, **_jsonable(points[0])}
        payload.pop("rate")
        if args.plot:
            report.plot_run(args.plot, points[0]["results"])
    if args.out:
        report.write_json(args.out, payload)
    return payload


def _jsonable(point: dict[str, Any]) -> dict[str, Any]:
    return {**point, "results": [r.to_dict() for r in point["results"]]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve loadtest",
        description="Drive a pagedserve router (gRPC) or an OpenAI-compatible server with load.",
    )
    add_loadtest_arguments(parser)
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """0 when at least one measured request completed in every run, 1 if none did, 2 on bad
    options. Failed requests are data (overload is expected), not an error of the tool."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(None if args is None else list(args))
    try:
        payload = asyncio.run(run_loadtest(args))
    except (ValueError, DatasetError, RuntimeError) as exc:
        print(f"pagedserve loadtest: error: {exc}", file=sys.stderr)
        return 2
    points = payload.get("sweep") or [payload]
    return 0 if all(p["summary"]["num_completed"] > 0 for p in points) else 1


__all__ = ["add_loadtest_arguments", "build_parser", "main", "run_loadtest"]
