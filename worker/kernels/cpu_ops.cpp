// Fused fp32 CPU kernels for the torch backend (built by cpu_ops.py), once per instruction set.
//
// cpu_kernels.h holds the kernels, written over the vector operations of cpu_simd.h. This file
// compiles them three times into one library: AVX-512 and AVX2+FMA inside `#pragma GCC target`
// regions (x86-64 with GCC), and a portable build with the base flags (any CPU: SSE2 on x86-64,
// NEON on aarch64). Each lands in its own namespace and its own Python submodule; cpu_ops.py
// asks `cpu_supports` which ones this CPU can run and picks one per process. Compiling a set's
// code does not run it: only the chosen submodule's functions are ever called.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PS_HAVE_X86_VARIANTS 1
#endif

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": want fp32 CPU");
}

}  // namespace

#define PS_SIMD_PORTABLE
namespace ps_portable {
#include "cpu_simd.h"
#include "cpu_kernels.h"
}  // namespace ps_portable
#undef PS_SIMD_PORTABLE

#if defined(PS_HAVE_X86_VARIANTS)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PS_SIMD_AVX2
namespace ps_avx2 {
#include "cpu_simd.h"
#include "cpu_kernels.h"
}  // namespace ps_avx2
#undef PS_SIMD_AVX2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define PS_SIMD_AVX512
namespace ps_avx512 {
#include "cpu_simd.h"
#include "cpu_kernels.h"
}  // namespace ps_avx512
#undef PS_SIMD_AVX512
#pragma GCC pop_options
#endif

// Whether this CPU (and OS: the vector registers' state must be saved) can run a variant.
bool cpu_supports(const std::string& isa) {
  if (isa == "portable") return true;
#if defined(PS_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

// Every kernel runs without the GIL: the router's and scheduler's event loops (same process in a
// local cluster, or the worker's own gRPC threads) keep running while a step computes.
#define PS_BIND(NS, NAME)                                                                     \
  {                                                                                           \
    using release = pybind11::call_guard<pybind11::gil_scoped_release>;                      \
    auto sub = m.def_submodule(NAME);                                                         \
    sub.attr("isa") = NAME;                                                                   \
    sub.def("paged_decode", &NS::paged_decode, release());                                    \
    sub.def("rms_norm", &NS::rms_norm, release());                                            \
    sub.def("rope_", &NS::rope_, release());                                                  \
    sub.def("packed_linear", &NS::packed_linear, release());                                  \
    sub.def("codes_linear", &NS::codes_linear, release());                                    \
    sub.def("linear", &NS::linear, release());                                                \
    sub.def("silu_mul", &NS::silu_mul, release());                                            \
    sub.def("greedy_sample", &NS::greedy_sample, release());                                  \
    sub.def("prefill_attention", &NS::prefill_attention, release());                          \
    sub.def("prefill_attention_supported", &NS::prefill_attention_supported);                 \
    pybind11::class_<NS::LayerStack>(sub, "LayerStack")                                       \
        .def(pybind11::init<double, int64_t, int64_t, int64_t>())                            \
        .def("add", &NS::LayerStack::add)                                                     \
        .def("__len__", [](const NS::LayerStack& s) { return s.weights.size(); })           \
        .def("forward", &NS::LayerStack::forward, release());                                 \
  }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_supports", &cpu_supports);
  PS_BIND(ps_portable, "portable")
#if defined(PS_HAVE_X86_VARIANTS)
  PS_BIND(ps_avx2, "avx2")
  PS_BIND(ps_avx512, "avx512")
#endif
}
