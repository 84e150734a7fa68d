"""``pagedserve bench peers`` without vLLM: the real ``peers_vllm.py`` script, run as a subprocess
against a stand-in ``vllm`` package, speaks the JSON-lines protocol ``VllmPeer`` expects (ready
line, one answer per job, errors answered, stdout noise kept off the answer stream); and the
report's ratio and output comparison."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from pagedserve.bench.peers import (
    Comparison,
    Run,
    VllmPeer,
    Workload,
    format_comparison,
    prefix_workload,
)

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

FAKE_VLLM = '''
import os
from types import SimpleNamespace as NS

__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, model, **kw):
        if model == "missing":
            raise FileNotFoundError(model)
        print("python noise on stdout")
        os.write(1, b"native noise on fd 1\\n")
        self.resets = 0
        self.llm_engine = NS(vllm_config=NS(
            scheduler_config=NS(max_num_seqs=kw["max_num_seqs"],
                                max_num_batched_tokens=kw["max_num_batched_tokens"],
                                enable_chunked_prefill=True),
            cache_config=NS(block_size=16, enable_prefix_caching=kw["enable_prefix_caching"]),
            model_config=NS(dtype="torch.float32", max_model_len=512,
                            enforce_eager=kw.get("enforce_eager", False))))

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            if not ids:
                raise ValueError("empty prompt")
            assert p.temperature == 0.0 and use_tqdm is False
            if len(prompts) > 1:  # the timed run: exact lengths asked
                assert p.min_tokens == p.max_tokens and p.ignore_eos
            tokens = [(sum(ids) + i) % 97 for i in range(p.max_tokens)]
            outs.append(NS(outputs=[NS(token_ids=tokens)], num_cached_tokens=self.resets))
        return outs
'''


@pytest.fixture()
def fake_python(tmp_path: Path) -> Path:
    """An interpreter wrapper whose ``vllm`` is the stand-in above."""
    package = tmp_path / "site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    (package / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                       "    return {'prompt_token_ids': prompt_token_ids}\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"
        """))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


ENGINE_ARGS = {"model": "m", "dtype": "float32", "seed": 0, "enforce_eager": True,
               "enable_prefix_caching": True, "max_num_seqs": 256,
               "max_num_batched_tokens": 2048}


def test_protocol_round_trip(fake_python: Path, tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    peer = VllmPeer(fake_python, ENGINE_ARGS, log, kv_cache_gib=2.0)
    try:
        s = peer.settings
        assert s["ready"] and s["vllm_version"] == "0.0-fake" and s["dtype"] == "float32"
        assert (s["block_size"], s["max_num_seqs"], s["max_num_batched_tokens"]) == (16, 256, 2048)
        assert s["enforce_eager"] is True and s["enable_prefix_caching"] is True
        assert s["kv_cache_space_gib"] == os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")
        assert s["omp_threads_bind"].startswith("0-") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ
        workload = Workload("w", "test", [[5, 6, 7], [100, 200]], [3, 5])
        for resets in (1, 2):  # each job resets the prefix cache before its timed run
            run = peer.run(workload)
            assert run.outputs == [[18, 19, 20], [9, 10, 11, 12, 13]]
            assert run.cached_tokens == 2 * resets and run.seconds >= 0
        with pytest.raises(RuntimeError, match="ValueError: empty prompt"):
            peer.run(Workload("bad", "test", [[]], [1]))
        assert peer.run(workload).outputs[0] == [18, 19, 20]  # still serving after an error
        if sys.platform.startswith("linux"):
            cpu = peer.cpu_seconds()
            assert cpu is not None and cpu > 0
    finally:
        peer.close()
    text = log.read_text()
    assert "python noise on stdout" in text and "native noise on fd 1" in text


def test_load_failure_is_reported(fake_python: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="failed to load: FileNotFoundError"):
        VllmPeer(fake_python, {**ENGINE_ARGS, "model": "missing"}, tmp_path / "log", 2.0)


def test_comparison_ratio_and_output_equality() -> None:
    workload = Workload("w", "test", [[1], [2], [3]], [4, 4, 4])
    same, other = [[1, 2, 3, 4]] * 3, [[1, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 4]]
    c = Comparison(workload)
    c.runs["pagedserve"] = [Run(3.0, same, 0), Run(2.0, same, 0)]
    c.runs["vllm"] = [Run(4.0, other, 0), Run(5.0, other, 0)]
    assert c.ratio == pytest.approx(2.0)  # fastest runs: 4.0 s / 2.0 s
    assert c.tokens_per_s("pagedserve") == pytest.approx(6.0)
    assert c.equal_outputs() == (2, 3, [(1, 2)])
    text = format_comparison(c)
    assert "pagedserve / vLLM speed: 2.00x" in text
    assert "2/3 requests; the others differ: request 1 from output token 2" in text


def test_prefix_workload_shares_its_prefix() -> None:
    w = prefix_workload(num_requests=4, prefix_len=32, suffix_len=8, output_len=3, seed=1)
    assert len(w.prompts) == 4 and all(len(p) == 40 for p in w.prompts)
    assert all(p[:32] == w.prompts[0][:32] for p in w.prompts)
    assert len({tuple(p[32:]) for p in w.prompts}) == 4
    assert w.max_tokens == [3] * 4



def test_isa_emulation_hides_avx512_from_vllms_processes(tmp_path: Path) -> None:
    """``--isa avx2``: the sitecustomize put on vLLM's PYTHONPATH makes torch's CPU checks (the
    ones vLLM picks its kernel library and attention ISA by) say no AVX-512 and no AMX, in every
    process started with that environment, and only when asked."""
    import subprocess

    from pagedserve.bench.peers import PEER_ISA_SITE

    probe = ("import torch.cpu; print(torch.cpu._is_avx512_supported(), "
             "torch.cpu._is_amx_tile_supported())")
    env = {**os.environ, "PYTHONPATH": str(PEER_ISA_SITE), "PAGEDSERVE_PEER_NO_AVX512": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
    env.pop("PAGEDSERVE_PEER_NO_AVX512")
    import torch.cpu

    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == [str(torch.cpu._is_avx512_supported()),
                           str(torch.cpu._is_amx_tile_supported())]


def test_tree_libraries_names_what_the_process_tree_mapped() -> None:
    from pagedserve.bench.peers import _tree_libraries

    libs = _tree_libraries(os.getpid(), "lib")  # this process has torch/lib/*.so mapped
    assert "libtorch_cpu.so" in libs
    assert all(name.endswith(".so") for name in libs)
    assert _tree_libraries(os.getpid(), "no-such-folder") == []
