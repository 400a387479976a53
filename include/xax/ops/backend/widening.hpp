#pragma once
// The widening path for half-precision matmuls on CPUs (or backends) without native half dot products, where
// xax's own AVX2 GEMM (packing_gemm.hpp) does not run them (AVX-512 CPUs, whose fp32 kernel is twice as wide;
// an explicitly requested backend; a CPU without AVX2): the bf16/f16 operands are widened to float one
// bounded panel at a time, an fp32 GEMM multiplies the panels and accumulates in fp32 across them, and the
// result is rounded once into a half output.
//
// Why panels. Widening whole operands needs fp32 copies of them, which made the float16 policy use *more*
// memory than fp32 in an activation-heavy configuration (issue 12: fp32 / f16 peak RSS growth 0.69): the
// activations are the operands. Here the scratch is bounded by PanelLimits (10 MiB per thread by default)
// whatever the shape, and reused from call to call.
//
// Why that costs nothing measurable. The panels are large (up to 1024 deep and a few hundred wide), so each
// fp32 GEMM call still runs at full speed, its own cache blocking intact; a panel of A is widened once and
// reused across the column blocks when A fits one panel (the weights of a Linear layer nearly always do), and
// the widening itself is a memory-speed pass shared by xax's threads (ConversionBatch).
//
// The fp32 GEMM is a callback, so the same driver serves oneDNN's fp32 kernel (the automatic choice where
// oneDNN has no native half kernel) and Eigen's (the portable backend).

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax::detail::widening {

/// Upper bounds on the widened panels, in float elements: at most (1 Mi + 1 Mi + 512 Ki) floats = 10 MiB per
/// thread. Not smaller: on two threads oneDNN's fp32 kernel scales worse on thin panels (1024x1024x512 runs
/// at 1.67x its one-thread speed, 1024^3 at 2x), and a 1024^3 product in 4 panels took 13 ms against 10 ms
/// whole (Zen 4, AVX512_CORE cap, 2026-12-01). These limits keep the products of an MLP train step in one
/// panel.
struct PanelLimits {
  Eigen::Index depth = 1024;                        ///< k of one panel
  Eigen::Index a_elements = Eigen::Index{1} << 20;  ///< an op(A) panel, mc x kc
  Eigen::Index b_elements = Eigen::Index{1} << 20;  ///< an op(B) panel, kc x nc
  Eigen::Index c_elements = Eigen::Index{1} << 19;  ///< an fp32 block of a half output, mc x nc
};

/// The panel sizes for one problem.
struct Panels {
  Eigen::Index mc = 1, nc = 1, kc = 1;
};

/// `extent` split into the fewest pieces of at most `limit`, all of (nearly) the same size: a remainder panel
/// much thinner than the others would run the fp32 GEMM at a fraction of its speed.
inline Eigen::Index even_split(Eigen::Index extent, Eigen::Index limit) {
  extent = std::max<Eigen::Index>(extent, 1);
  limit = std::max<Eigen::Index>(limit, 1);
  const Eigen::Index pieces = (extent + limit - 1) / limit;
  return (extent + pieces - 1) / pieces;
}

inline Panels choose_panels(const MatmulProblem& p, const PanelLimits& limits) {
  Panels panels;
  panels.kc = even_split(p.k, limits.depth);
  panels.mc = even_split(p.m, limits.a_elements / panels.kc);
  panels.nc = even_split(p.n, limits.b_elements / panels.kc);
  if (p.output != DType::float32 && panels.mc * panels.nc > limits.c_elements) {
    panels.nc = even_split(p.n, limits.c_elements / panels.mc);
  }
  return panels;
}

/// One thread's panels, reused from call to call and bounded by the PanelLimits in use.
struct Workspace {
  ScratchBuffer<float> a;
  ScratchBuffer<float> b;
  ScratchBuffer<float> c;
  ScratchBuffer<float> bias;
  ConversionBatch batch;

  [[nodiscard]] std::size_t bytes() const {
    return (a.capacity() + b.capacity() + c.capacity() + bias.capacity()) * sizeof(float);
  }
  void release() {
    a.release();
    b.release();
    c.release();
    bias.release();
    batch.clear();
  }
};

inline Workspace& workspace() {
  thread_local Workspace instance;
  return instance;
}

/// Records the widening of rows [row, row + rows) x columns [col, col + cols) of a stored column-major matrix
/// into a dense column-major float block (ld = rows).
template <class In>
void add_block(const void* stored, Eigen::Index ld, Eigen::Index row, Eigen::Index col, Eigen::Index rows,
               Eigen::Index cols, float* out, ConversionBatch& batch) {
  // An empty block (an operand of an empty reduction) may be stored at nullptr, and offsetting nullptr is UB.
  if (rows == 0 || cols == 0) return;
  const auto* in = static_cast<const In*>(stored) + row + col * ld;
  if (ld == rows) {
    batch.add(in, out, static_cast<std::size_t>(rows * cols));
    return;
  }
  for (Eigen::Index j = 0; j < cols; ++j)
    batch.add(in + j * ld, out + j * rows, static_cast<std::size_t>(rows));
}

/// Widens a whole (short) vector: the bias.
template <class In>
const float* widen_vector(const void* data, Eigen::Index n, ScratchBuffer<float>& scratch) {
  float* out = scratch.get(static_cast<std::size_t>(n));
  convert_n(static_cast<const In*>(data), out, static_cast<std::size_t>(n));
  return out;
}

/// Runs the half-precision problem `p` (bfloat16 or float16 inputs; output float or the inputs' type; any
/// bias type) through `float_gemm`, a callable that runs a float32 MatmulProblem (with its bias, activation
/// and accumulation). Records "<fp32 kernel> (<type> widened to float32 in panels)" as the implementation.
template <class In, class Out, class FloatGemm>
void run_typed(const MatmulProblem& p, FloatGemm&& float_gemm, const PanelLimits& limits) {
  Workspace& ws = workspace();
  const Panels panels = choose_panels(p, limits);

  const float* bias = nullptr;
  if (p.bias != nullptr) {
    switch (p.bias_type) {
      case DType::float32:
        bias = static_cast<const float*>(p.bias);
        break;
      case DType::bfloat16:
        bias = widen_vector<bfloat16>(p.bias, p.m, ws.bias);
        break;
      case DType::float16:
        bias = widen_vector<float16>(p.bias, p.m, ws.bias);
        break;
      case DType::float64:
        throw Error("xax::matmul: a float64 bias is not supported; use float or the inputs' type");
    }
  }

  // Which panels the scratch holds, so that a panel used by several blocks is widened once.
  Eigen::Index a_row = -1, a_depth = -1, b_col = -1, b_depth = -1;
  std::string fp32_kernel;
  for (Eigen::Index j0 = 0; j0 < p.n; j0 += panels.nc) {
    const Eigen::Index nb = std::min(panels.nc, p.n - j0);
    for (Eigen::Index i0 = 0; i0 < p.m; i0 += panels.mc) {
      const Eigen::Index mb = std::min(panels.mc, p.m - i0);
      // The fp32 accumulator of this block: C itself when it is float, else a float block rounded at the end.
      float* c_block = nullptr;
      Eigen::Index c_ld = 0;
      ws.batch.clear();
      if constexpr (std::is_same_v<Out, float>) {
        c_block = static_cast<float*>(p.c) + i0 + j0 * p.ldc;
        c_ld = p.ldc;
      } else {
        c_block = ws.c.get(static_cast<std::size_t>(mb * nb));
        c_ld = mb;
        if (p.accumulate) add_block<Out>(p.c, p.ldc, i0, j0, mb, nb, c_block, ws.batch);
      }
      for (Eigen::Index l0 = 0;; l0 += panels.kc) {
        const Eigen::Index kb = std::min(panels.kc, p.k - l0);
        const bool last = l0 + kb >= p.k;
        const Eigen::Index a_rows = p.transpose_a ? kb : mb;
        const Eigen::Index a_cols = p.transpose_a ? mb : kb;
        const Eigen::Index b_rows = p.transpose_b ? nb : kb;
        const Eigen::Index b_cols = p.transpose_b ? kb : nb;
        float* a_panel = ws.a.get(static_cast<std::size_t>(std::max<Eigen::Index>(a_rows * a_cols, 1)));
        float* b_panel = ws.b.get(static_cast<std::size_t>(std::max<Eigen::Index>(b_rows * b_cols, 1)));
        if (a_row != i0 || a_depth != l0) {
          add_block<In>(p.a.data, p.a.ld, p.transpose_a ? l0 : i0, p.transpose_a ? i0 : l0, a_rows, a_cols,
                        a_panel, ws.batch);
          a_row = i0;
          a_depth = l0;
        }
        if (b_col != j0 || b_depth != l0) {
          add_block<In>(p.b.data, p.b.ld, p.transpose_b ? j0 : l0, p.transpose_b ? l0 : j0, b_rows, b_cols,
                        b_panel, ws.batch);
          b_col = j0;
          b_depth = l0;
        }
        ws.batch.run();  // one fork/join for everything this panel needs
        ws.batch.clear();

        MatmulProblem panel;
        panel.input = DType::float32;
        panel.output = DType::float32;
        panel.a = {a_panel, a_rows, a_cols, std::max<Eigen::Index>(a_rows, 1)};
        panel.b = {b_panel, b_rows, b_cols, std::max<Eigen::Index>(b_rows, 1)};
        panel.transpose_a = p.transpose_a;
        panel.transpose_b = p.transpose_b;
        panel.c = c_block;
        panel.ldc = c_ld;
        panel.m = mb;
        panel.n = nb;
        panel.k = kb;
        panel.accumulate = l0 > 0 || p.accumulate;
        if (last) {  // the epilogue applies once, to the complete fp32 sum
          panel.bias = bias != nullptr ? bias + i0 : nullptr;
          panel.bias_type = DType::float32;
          panel.activation = p.activation;
        }
        float_gemm(panel);
        if (last) break;
      }
      fp32_kernel = last_matmul_implementation_record();
      if constexpr (!std::is_same_v<Out, float>) {
        auto* out = static_cast<Out*>(p.c) + i0 + j0 * p.ldc;
        for (Eigen::Index j = 0; j < nb; ++j) {
          ws.batch.add(static_cast<const float*>(c_block + j * mb), out + j * p.ldc,
                       static_cast<std::size_t>(mb));
        }
        ws.batch.run();
        ws.batch.clear();
      }
    }
  }
  last_matmul_implementation_record() =
      fp32_kernel + " (" + std::string(dtype_name(p.input)) + " widened to float32 in panels)";
}

/// Dispatches `p` (half inputs) on its scalar types to run_typed.
template <class FloatGemm>
void run(const MatmulProblem& p, FloatGemm&& float_gemm, const PanelLimits& limits = {}) {
  const auto unsupported = [&p] {
    return Error("xax::matmul: inputs of type " + std::string(dtype_name(p.input)) +
                 " with an output of type " + std::string(dtype_name(p.output)) +
                 " are not supported; the output must be float32 or the inputs' type");
  };
  if (p.m == 0 || p.n == 0) {
    last_matmul_implementation_record() = "none (empty output)";
    return;
  }
  switch (p.input) {
    case DType::bfloat16:
      if (p.output == DType::float32) return run_typed<bfloat16, float>(p, float_gemm, limits);
      if (p.output == DType::bfloat16) return run_typed<bfloat16, bfloat16>(p, float_gemm, limits);
      throw unsupported();
    case DType::float16:
      if (p.output == DType::float32) return run_typed<float16, float>(p, float_gemm, limits);
      if (p.output == DType::float16) return run_typed<float16, float16>(p, float_gemm, limits);
      throw unsupported();
    case DType::float32:
    case DType::float64:
      break;
  }
  throw Error("xax::matmul: the widening path takes bfloat16 or float16 inputs, not " +
              std::string(dtype_name(p.input)));
}

}  // namespace xax::detail::widening
