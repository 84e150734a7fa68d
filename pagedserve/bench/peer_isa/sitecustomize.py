"""Put on vLLM's ``PYTHONPATH`` by ``pagedserve bench peers --isa avx2`` (never imported by
pagedserve): every process of the vLLM run, the engine processes it spawns included, sees a CPU
without AVX-512 or AMX, so vLLM loads its AVX2 kernel library (``vllm._C_AVX2``) and picks the
attention ISA it would pick on such a CPU. oneDNN, MKL and torch's own kernels are capped by the
environment the bench sets beside this (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY``; torch.compile's code generation follows the last one).
"""

import os

if os.environ.get("PAGEDSERVE_PEER_NO_AVX512") == "1":
    import torch.cpu

    def _absent() -> bool:
        return False

    for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported",
                  "_is_avx512_vnni_supported", "_is_amx_tile_supported",
                  "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, _name):
            setattr(torch.cpu, _name, _absent)
