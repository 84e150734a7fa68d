"""``make bench`` / ``pagedserve bench suite``: throughput, scheduler overhead and prefix caching,
summarised in one table, every figure beside the baseline measured in the same run.

Writes the table (with the commands that reproduce it) to ``--out`` (default
``.bench_results.md``) for the README.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

import torch

from pagedserve.bench.workload import WorkloadSpec

QUICK = WorkloadSpec(num_requests=16, prompt_len=(32, 256), output_len=(16, 64), seed=0)
FULL = WorkloadSpec()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedserve bench suite", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="reduced throughput workload (16 requests, outputs 16-64 tokens)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=".bench_results.md")
    p.add_argument("--repeat", type=int, default=3,
                   help="throughput runs per system, keeping each one's fastest (default 3)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pagedserve.bench.prefix import format_result as format_prefix
    from pagedserve.bench.prefix import run_prefix
    from pagedserve.bench.scheduler_overhead import format_result as format_sched
    from pagedserve.bench.scheduler_overhead import run_scheduler_overhead
    from pagedserve.bench.throughput import format_report, run_throughput

    spec = QUICK if args.quick else FULL
    started = time.perf_counter()
    sched = run_scheduler_overhead()
    print(format_sched(sched), flush=True)
    prefix = run_prefix(args.model)
    print(format_prefix(prefix), flush=True)
    throughput = run_throughput(spec, args.model, repeat=args.repeat)
    print(format_report(throughput), flush=True)
    from pagedserve.bench.decode_step import format_weights, run_weights
    from pagedserve.bench.memory import memory_table
    from pagedserve.bench.preemption import run_preemption
    from pagedserve.bench.tensor_parallel import run_tensor_parallel

    memory = memory_table()
    preemption = run_preemption(args.model)
    tensor_parallel = run_tensor_parallel(args.model)
    weights = run_weights(args.model)
    print(format_weights(weights), flush=True)

    rows = (_rows(throughput, sched, prefix) + _memory_rows(memory)
            + _preemption_rows(preemption) + _tensor_parallel_rows(tensor_parallel)
            + _weights_rows(weights))
    table = _table(rows)
    print("\n" + table)
    with open(args.out, "w") as f:
        f.write(_markdown(table, spec, args.quick, time.perf_counter() - started, args.repeat))
    print(f"\nwritten to {args.out}")
    return 0


def _rows(throughput, sched, prefix) -> list[tuple[str, str, str, str, str]]:
    r = throughput.results
    offline, cluster, hf = r["offline"], r["cluster"], r["hf"]
    cpu_mean, cpu_p50, cpu_p99 = sched.summary(sched.cpu_us)
    return [
        ("offline engine throughput", (f"{offline.tokens_per_s:.1f} out tok/s "
         f"({offline.requests_per_s:.2f} req/s)"),
         f"HF static batching {hf.tokens_per_s:.1f} tok/s",
         f"{offline.tokens_per_s / hf.tokens_per_s:.2f}x", ">= 3.5x"),
        ("gRPC cluster throughput", (f"{cluster.tokens_per_s:.1f} out tok/s "
         f"({cluster.requests_per_s:.2f} req/s)"), f"offline {offline.tokens_per_s:.1f} tok/s",
         f"{cluster.tokens_per_s / offline.tokens_per_s:.2f}x", ">= 0.95x"),
        ("cluster vs HF", f"{cluster.tokens_per_s:.1f} out tok/s",
         f"HF {hf.tokens_per_s:.1f} tok/s", f"{cluster.tokens_per_s / hf.tokens_per_s:.2f}x", ""),
        (f"scheduler CPU/step, {sched.num_seqs} seqs", (f"mean {cpu_mean:.0f} us, p50 "
         f"{cpu_p50:.0f}, p99 {cpu_p99:.0f}"), "target 1000 us", f"{1000 / cpu_mean:.2f}x",
         ">= 1x"),
        (f"prefix caching, {prefix.num_requests} x {prefix.prefix_len}-token prefix",
         f"{prefix.seconds_on:.2f} s", f"caching off {prefix.seconds_off:.2f} s",
         f"{prefix.speedup:.2f}x", ">= 3.5x"),
    ]


def _memory_rows(memory) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, ours, base, note in memory:
        if name.startswith("KV waste"):
            rows.append((name, ours, f"static reservation {base}", "", "< 4% (paper)"))
        else:
            paper = "6-10%" if "parallel" in name else "37-55%"
            rows.append((name, ours, f"no sharing {base}", note.split(" ")[0] + " saved",
                         f"paper: {paper} saved"))
    return rows


def _preemption_rows(rows) -> list[tuple[str, str, str, str, str]]:
    ref = rows[0][1]
    return [(f"preemption by {mode} (tight pool, {n} preemptions)", f"{seconds:.2f} s",
             f"unconstrained {ref:.2f} s", f"{ref / seconds:.2f}x",
             "identical output" if same else "OUTPUT DIFFERS")
            for mode, seconds, n, same in rows[1:]]


def _tensor_parallel_rows(results) -> list[tuple[str, str, str, str, str]]:
    one, two = results
    mib = [[f"{b / 2**20:.0f}" for b in r.weight_bytes] for r in results]
    return [
        ("TP=2 prefill step (2 ranks, gloo)", f"{two.prefill_s * 1e3:.0f} ms",
         f"TP=1 {one.prefill_s * 1e3:.0f} ms", f"{two.prefill_s / one.prefill_s:.2f}x",
         "no speed-up on 2 cores"),
        ("TP=2 decode step (2 ranks, gloo)", f"{two.decode_s * 1e3:.1f} ms",
         f"TP=1 {one.decode_s * 1e3:.1f} ms", f"{two.decode_s / one.decode_s:.2f}x",
         "no speed-up on 2 cores"),
        ("TP=2 weight MiB per rank", " / ".join(mib[1]), f"TP=1 {mib[0][0]}",
         f"{max(two.weight_bytes) / one.weight_bytes[0]:.2f}x largest rank", "< 1x"),
    ]


def _weights_rows(results) -> list[tuple[str, str, str, str, str]]:
    first = results[0]
    rows = [(f"decode step, batch {r.batch}, weights as exact 8-bit codes", f"{r.codes_ms:.1f} ms",
             f"fp32 panels {r.fp32_ms:.1f} ms", f"{r.fp32_ms / r.codes_ms:.2f}x",
             "same output bits") for r in results]
    rows.append(("weight MiB, exact 8-bit codes", f"{first.codes_weight_bytes / 2**20:.0f}",
                 f"fp32 panels {first.fp32_weight_bytes / 2**20:.0f}",
                 f"{first.codes_weight_bytes / first.fp32_weight_bytes:.2f}x", "< 1x"))
    return rows


def _table(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["| benchmark | result | baseline (same run) | ratio | target |",
             "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def _markdown(table: str, spec: WorkloadSpec, quick: bool, seconds: float, repeat: int) -> str:
    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
               f"no GPU, torch {torch.__version__} with {torch.get_num_threads()} threads, "
               "float32, SmolLM2-135M-Instruct (packaged GGUF)")
    command = "make bench ARGS=--quick" if quick else "make bench"
    return "\n".join([
        "## Benchmarks", "",
        (f"Machine: {machine}. Shared with other jobs, so expect noise of ±20%: every ratio "
        "compares figures measured in the same invocation."), "",
        (f"Throughput workload: {spec.describe()}; all requests submitted at once; each system's "
         f"fastest of {repeat} runs."), "",
        table, "",
        "Reproduce:", "",
        "```bash",
        f"{command}                      # everything above (took {seconds / 60:.0f} min here)",
        (f"pagedserve bench throughput --repeat {repeat} --num-requests {spec.num_requests} "
        f"--input-len {spec.prompt_len[0]}:{spec.prompt_len[1]} "
        f"--output-len {spec.output_len[0]}:{spec.output_len[1]}"),
        "pagedserve bench scheduler --num-seqs 256",
        "pagedserve bench prefix --num-requests 32 --prefix-len 512",
        "pagedserve bench memory",
        "pagedserve bench preemption",
        "pagedserve bench tensor-parallel",
        "```", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
