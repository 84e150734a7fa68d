"""Run the Triton kernels under the interpreter when there is no CUDA device.

``@triton.jit`` decides between compiling and interpreting when a kernel is *decorated*, i.e.
when ``worker.kernels.<kernel>`` is imported, by reading ``TRITON_INTERPRET`` then. Importing
``triton`` itself earlier is harmless. If another test module imported a kernel module before
this conftest ran (whole-suite runs), that module holds compiled-mode kernels, which cannot run
on CPU tensors, so it is reloaded here. ``importlib.reload`` re-executes it in the same module
namespace, so launchers already bound elsewhere (e.g. by ``TritonAttentionBackend``) see the
interpreted kernels too.

With CUDA available nothing changes: the same tests run compiled on the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # cpu_ops holds no Triton kernel (and its C++ library must not be loaded twice).
    for _name in [m for m in sys.modules
                  if m.startswith("worker.kernels.") and m != "worker.kernels.cpu_ops"]:
        importlib.reload(sys.modules[_name])
