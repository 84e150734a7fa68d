"""``pagedserve bench throughput | scheduler | prefix | memory | preemption | decode-step | peers
| tensor-parallel | suite``.

Each benchmark measures its baseline in the same invocation and prints ratios against it."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedserve.bench.workload import WorkloadSpec, parse_range


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf (default: packaged SmolLM2)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=parse_range, default=(32, 256), metavar="LOW:HIGH",
                   help="prompt lengths, uniform (default 32:256)")
    p.add_argument("--output-len", type=parse_range, default=(16, 128), metavar="LOW:HIGH",
                   help="output lengths, uniform (default 16:128)")
    p.add_argument("--seed", type=int, default=0)


def spec_from(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(args.num_requests, args.input_len, args.output_len, args.seed)


def _throughput(argv: list[str]) -> int:
    from pagedserve.bench.throughput import format_report, run_throughput

    p = argparse.ArgumentParser(prog="pagedserve bench throughput",
                                description="offline engine vs gRPC cluster vs HF static batching")
    add_workload_arguments(p)
    p.add_argument("--systems", default="offline,cluster,hf",
                   help="comma-separated subset of offline,cluster,cluster-inproc,hf (cluster: "
                        "`pagedserve up` processes; cluster-inproc: the same servers in this "
                        "process, sharing its GIL)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per system, keeping each one's fastest (noisy shared machines)")
    args = p.parse_args(argv)
    report = run_throughput(spec_from(args), args.model, systems=args.systems.split(","),
                            hf_batch_size=args.hf_batch_size, repeat=args.repeat)
    print(format_report(report))
    return 0


def _scheduler(argv: list[str]) -> int:
    from pagedserve.bench.scheduler_overhead import format_result, run_scheduler_overhead

    p = argparse.ArgumentParser(prog="pagedserve bench scheduler",
                                description="scheduler CPU per step against an instant worker")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=500, help="decode steps measured")
    p.add_argument("--no-prefix-caching", action="store_true")
    args = p.parse_args(argv)
    result = run_scheduler_overhead(args.num_seqs, args.prompt_len, args.steps,
                                    enable_prefix_caching=not args.no_prefix_caching)
    print(format_result(result))
    return 0


def _prefix(argv: list[str]) -> int:
    from pagedserve.bench.prefix import format_result, run_prefix

    p = argparse.ArgumentParser(prog="pagedserve bench prefix",
                                description="shared-prefix requests, prefix caching on vs off")
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(format_result(run_prefix(args.model, args.num_requests, args.prefix_len,
                                   args.suffix_len, args.output_len, args.seed)))
    return 0


def _memory(argv: list[str]) -> int:
    from pagedserve.bench.memory import main as memory_main

    return memory_main(argv)


def _preemption(argv: list[str]) -> int:
    from pagedserve.bench.preemption import main as preemption_main

    return preemption_main(argv)


def _peers(argv: list[str]) -> int:
    from pagedserve.bench.peers import main as peers_main

    return peers_main(argv)


def _tensor_parallel(argv: list[str]) -> int:
    from pagedserve.bench.tensor_parallel import main as tp_main

    return tp_main(argv)


def _decode_step(argv: list[str]) -> int:
    from pagedserve.bench.decode_step import main as decode_main

    return decode_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"throughput": _throughput, "scheduler": _scheduler, "prefix": _prefix,
                "memory": _memory, "preemption": _preemption, "decode-step": _decode_step,
                "peers": _peers, "tensor-parallel": _tensor_parallel}
    if argv and argv[0] == "suite":
        from pagedserve.bench.suite import main as suite_main

        return suite_main(argv[1:])
    if not argv or argv[0] not in commands:
        print("usage: pagedserve bench {throughput,scheduler,prefix,memory,preemption,"
              "decode-step,peers,tensor-parallel,suite} [--help]",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
