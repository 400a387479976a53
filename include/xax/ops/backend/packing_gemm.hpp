#pragma once
// xax's own GEMM for AVX2 CPUs without AVX-512: half-precision products there have no native dot product
// (issue 12), and fp32 products run on it too.
//
// Why it exists. There, a bf16 or f16 product used to be widened to fp32 panels (widening.hpp) and handed to
// oneDNN's fp32 GEMM, which then copies those panels once more into its own packed layout, and a half output
// took one more pass to round the fp32 result. A GEMM packs its operands anyway, so this one packs straight
// from the 16-bit storage (the widening is free inside the copy it makes regardless) and rounds each tile of
// the result as it leaves the registers: the product costs what an fp32 product costs, so 16-bit compute
// stops being slower than fp32 where it cannot be faster.
//
// fp32 products run on it as well (their packing is a plain copy), for two reasons. It is faster there than
// oneDNN 2.6's AVX2 gemm:jit on every shape measured (README, "xax's own AVX2 GEMM"), and fp32 is the
// baseline every mixed-precision figure is a ratio to: with both on one kernel, mixed vs fp32 compares
// precisions, not GEMM implementations.
//
// The algorithm is the classic one (Goto and van de Geijn, "Anatomy of High-Performance Matrix
// Multiplication", 2008; BLIS's loop order): C is cut into nc-wide column panels, the depth into kc slices;
// a kc x nc slice of op(B) is packed into nr-wide micro-panels (shared by the threads, kept in L3), an
// mc x kc block of op(A) into mr-high micro-panels (one per thread, kept in L2), and a 16 x 6 register tile
// of C accumulates one kc slice at a time with 12 FMA accumulators: 2 FMAs per cycle, 8 lanes each.
//
// Accumulation is fp32 throughout. With a half output and a depth beyond one slice, the partial sums of a
// column panel are kept in an fp32 buffer (never rounded in between), and C is rounded once, after the
// bias and activation. Scratch is bounded whatever the operands' size: the packed B slice (3 MiB), that
// buffer (4 MiB; 6 columns of C where m exceeds 174,762), an A block per thread (144 KiB) and the widened
// bias.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/detail/simd.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/backend/problem.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/threads.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax::detail::packing_gemm {

/// The register tile: 16 rows (two 8-lane vectors) by 6 columns, 12 accumulators of the 16 ymm registers.
inline constexpr Eigen::Index mr = 16;
inline constexpr Eigen::Index nr = 6;
/// Blocking for Zen 2/3 and Haswell-class caches: a 16 x 256 A micro-panel (16 KiB) and a 256 x 6 B
/// micro-panel (6 KiB) share L1, a 144 x 256 A block (144 KiB) stays in L2, a 256 x 3072 B slice (3 MiB)
/// in L3.
inline constexpr Eigen::Index kc_max = 256;
inline constexpr Eigen::Index mc_max = 144;
inline constexpr Eigen::Index nc_max = 3072;
/// The fp32 buffer of a half output's column panel, in floats (4 MiB); nc shrinks so that m x nc fits.
inline constexpr Eigen::Index fp32_panel_max = Eigen::Index{1} << 20;
/// Products below this many flops (2mnk) stay on one thread: waking the second costs more than it saves.
inline constexpr double parallel_min_flops = 4.0e6;

/// The CPU can run this GEMM: AVX2 with FMA and F16C.
inline bool supported(const CpuFeatures& cpu) {
  return XAX_X86_KERNELS && supports_avx2_kernels(cpu);
}

/// The name last_matmul_implementation() reports for a product of `input`.
inline std::string implementation_name(DType input) {
  if (input == DType::float32) return "xax:avx2_gemm (float32)";
  return "xax:avx2_gemm (" + std::string(dtype_name(input)) + " packed to float32)";
}

/// A product's scratch, all of it held by the thread that calls xax::matmul (its team only uses it, so no
/// allocation happens inside the parallel region): the packed B slice, every part's A block, the fp32 panel
/// buffer and the widened bias.
struct Workspace {
  ScratchBuffer<float> packed_b;
  ScratchBuffer<float> packed_a;
  ScratchBuffer<float> fp32_panel;
  ScratchBuffer<float> bias;

  [[nodiscard]] std::size_t bytes() const {
    return (packed_b.capacity() + packed_a.capacity() + fp32_panel.capacity() + bias.capacity()) *
           sizeof(float);
  }
  void release() {
    packed_b.release();
    packed_a.release();
    fp32_panel.release();
    bias.release();
  }
};

inline Workspace& workspace() {
  thread_local Workspace instance;
  return instance;
}

#if XAX_X86_KERNELS
XAX_SIMD_DIAGNOSTICS_BEGIN

// --- reading the operands' storage as float ---

// f16 is widened by F16C's vcvtph2ps alone, not by convert.hpp's conversions, which also keep a signalling
// NaN signalling: the product's FMAs quiet it regardless, and the packing copy saves their five extra
// instructions per eight values.

template <class In>
XAX_TARGET_AVX2 inline float widen_one(In value) {
  if constexpr (std::is_same_v<In, float16>) {
    return _cvtsh_ss(std::bit_cast<std::uint16_t>(value));
  } else {
    return convert_scalar<float>(value);
  }
}

template <class In>
XAX_TARGET_AVX2 inline __m256 widen_eight(const In* source) {
  if constexpr (std::is_same_v<In, float>) {
    return _mm256_loadu_ps(source);
  } else {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
    if constexpr (std::is_same_v<In, bfloat16>) {
      return bfloat16_to_float_avx2_lanes(halves);
    } else {
      return _mm256_cvtph_ps(halves);
    }
  }
}

template <class Out>
XAX_TARGET_AVX2 inline void round_eight(__m256 values, Out* target) {
  __m128i halves;
  if constexpr (std::is_same_v<Out, bfloat16>) {
    const __m256i rounded = bfloat16_round_avx2(_mm256_castps_si256(values));  // 8 x 16 bits in 32-bit lanes
    halves = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08));
  } else {
    halves = float_to_half_avx2_lanes(values);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(target), halves);
}

// --- packing ---

/// Transposes the 8 x 8 block whose row i is `block[i]`: afterwards `block[q]` holds its column q.
XAX_TARGET_AVX2 inline void transpose_eight(__m256 (&block)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(block[0], block[1]), t1 = _mm256_unpackhi_ps(block[0], block[1]);
  const __m256 t2 = _mm256_unpacklo_ps(block[2], block[3]), t3 = _mm256_unpackhi_ps(block[2], block[3]);
  const __m256 t4 = _mm256_unpacklo_ps(block[4], block[5]), t5 = _mm256_unpackhi_ps(block[4], block[5]);
  const __m256 t6 = _mm256_unpacklo_ps(block[6], block[7]), t7 = _mm256_unpackhi_ps(block[6], block[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  block[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  block[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  block[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  block[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  block[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  block[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  block[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  block[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/// Packs rows [0, rows) x depth [0, depth) of op(A) into mr-high micro-panels: panel r holds, for each depth
/// p, the mr floats op(A)(r * mr + i, p), rows past `rows` zero. op(A)(i, p) = a[i * row_step + p *
/// depth_step].
template <class In>
XAX_TARGET_AVX2 void pack_a(const In* a, Eigen::Index row_step, Eigen::Index depth_step, Eigen::Index rows,
                            Eigen::Index depth, float* packed) {
  for (Eigen::Index r0 = 0; r0 < rows; r0 += mr, packed += mr * depth) {
    const Eigen::Index height = std::min(mr, rows - r0);
    const In* origin = a + r0 * row_step;
    if (height == mr && row_step == 1) {  // op(A) = A: each depth is 16 adjacent elements
      for (Eigen::Index p = 0; p < depth; ++p) {
        const In* column = origin + p * depth_step;
        _mm256_storeu_ps(packed + p * mr, widen_eight(column));
        _mm256_storeu_ps(packed + p * mr + 8, widen_eight(column + 8));
      }
    } else if (height == mr && depth_step == 1) {  // op(A) = A^T: each row is adjacent along the depth
      Eigen::Index p = 0;
      for (; p + 8 <= depth; p += 8) {
        for (Eigen::Index half = 0; half < mr; half += 8) {
          __m256 rows8[8];
          for (int i = 0; i < 8; ++i) rows8[i] = widen_eight(origin + (half + i) * row_step + p);
          transpose_eight(rows8);
          for (int q = 0; q < 8; ++q) _mm256_storeu_ps(packed + (p + q) * mr + half, rows8[q]);
        }
      }
      for (; p < depth; ++p) {
        for (Eigen::Index i = 0; i < mr; ++i) packed[p * mr + i] = widen_one(origin[i * row_step + p]);
      }
    } else {
      for (Eigen::Index p = 0; p < depth; ++p) {
        for (Eigen::Index i = 0; i < mr; ++i) {
          packed[p * mr + i] = i < height ? widen_one(origin[i * row_step + p * depth_step]) : 0.0f;
        }
      }
    }
  }
}

/// Packs micro-panels [first, last) of op(B)'s depth [0, depth) x columns [0, cols): panel s holds, for each
/// depth p, the nr floats op(B)(p, s * nr + j), columns past `cols` zero. op(B)(p, j) = b[p * depth_step +
/// j * col_step].
template <class In>
XAX_TARGET_AVX2 void pack_b(const In* b, Eigen::Index depth_step, Eigen::Index col_step, Eigen::Index depth,
                            Eigen::Index cols, Eigen::Index first, Eigen::Index last, float* packed) {
  for (Eigen::Index s = first; s < last; ++s) {
    float* panel = packed + s * nr * depth;
    const Eigen::Index j0 = s * nr;
    const Eigen::Index width = std::min(nr, cols - j0);
    const In* origin = b + j0 * col_step;
    if (width == nr && depth_step == 1) {  // op(B) = B: each column is adjacent along the depth
      // `<`, not `<=`: the scalar loop takes at least the last depth, so that the overlapping stores below
      // stay inside this panel (the next one may be another thread's).
      Eigen::Index p = 0;
      for (; p + 8 < depth; p += 8) {
        __m256 columns[8];
        for (int j = 0; j < nr; ++j) columns[j] = widen_eight(origin + j * col_step + p);
        columns[6] = columns[7] = _mm256_setzero_ps();
        transpose_eight(columns);
        // Each depth's 6 floats are followed by 2 that the next store overwrites.
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(panel + (p + q) * nr, columns[q]);
      }
      for (; p < depth; ++p) {
        for (Eigen::Index j = 0; j < nr; ++j) panel[p * nr + j] = widen_one(origin[j * col_step + p]);
      }
    } else if (width == nr && col_step == 1 && j0 + 8 <= cols) {
      // op(B) = B^T: each depth's 6 columns are adjacent. Eight are read (the two past them exist, by the
      // condition) and stored; the next depth's store overwrites the two extra, and the last depth is
      // stored alone so that nothing lands in the next panel.
      for (Eigen::Index p = 0; p + 1 < depth; ++p) {
        _mm256_storeu_ps(panel + p * nr, widen_eight(origin + p * depth_step));
      }
      const In* row = origin + (depth - 1) * depth_step;
      for (Eigen::Index j = 0; j < nr; ++j) panel[(depth - 1) * nr + j] = widen_one(row[j]);
    } else {
      for (Eigen::Index p = 0; p < depth; ++p) {
        for (Eigen::Index j = 0; j < nr; ++j) {
          panel[p * nr + j] = j < width ? widen_one(origin[p * depth_step + j * col_step]) : 0.0f;
        }
      }
    }
  }
}

// --- the register tile ---

/// Column j of the tile: rows 0-7 in lanes[2j], rows 8-15 in lanes[2j + 1].
struct Tile {
  __m256 lanes[2 * nr];
};

/// The 16 x 6 product of one A micro-panel and one B micro-panel over `depth`.
///
/// The twelve accumulators are named variables and the six columns unrolled by hand: with an array and a
/// loop over the columns, GCC at -O2 kept the array on the stack (a load and a store around every FMA, 3.5x
/// slower), and accumulating into `c` directly did the same at -O3 (its address escapes to the store
/// functions). Not always_inline: inlined into an OpenMP region's outlined function, which does not inherit
/// the target attribute, clang 14 compiled the FMAs as calls to fmaf (50x slower).
XAX_TARGET_AVX2 inline void multiply_tile(Eigen::Index depth, const float* a, const float* b, Tile& c) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
  for (Eigen::Index p = 0; p < depth; ++p, a += mr, b += nr) {
    const __m256 upper = _mm256_loadu_ps(a);
    const __m256 lower = _mm256_loadu_ps(a + 8);
    __m256 bj = _mm256_broadcast_ss(b);
    c00 = _mm256_fmadd_ps(upper, bj, c00);
    c01 = _mm256_fmadd_ps(lower, bj, c01);
    bj = _mm256_broadcast_ss(b + 1);
    c10 = _mm256_fmadd_ps(upper, bj, c10);
    c11 = _mm256_fmadd_ps(lower, bj, c11);
    bj = _mm256_broadcast_ss(b + 2);
    c20 = _mm256_fmadd_ps(upper, bj, c20);
    c21 = _mm256_fmadd_ps(lower, bj, c21);
    bj = _mm256_broadcast_ss(b + 3);
    c30 = _mm256_fmadd_ps(upper, bj, c30);
    c31 = _mm256_fmadd_ps(lower, bj, c31);
    bj = _mm256_broadcast_ss(b + 4);
    c40 = _mm256_fmadd_ps(upper, bj, c40);
    c41 = _mm256_fmadd_ps(lower, bj, c41);
    bj = _mm256_broadcast_ss(b + 5);
    c50 = _mm256_fmadd_ps(upper, bj, c50);
    c51 = _mm256_fmadd_ps(lower, bj, c51);
  }
  c = Tile{{c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51}};
}

/// Where a tile's sums go, and what joins them: tile = sums [+ fp32 partial sums] [+ old half C] [+ bias,
/// then activation], stored as fp32 partial sums (or a float C) or rounded into the half C.
template <class Out>
struct TileTarget {
  float* fp32 = nullptr;  ///< the float C, or the fp32 panel buffer of a half C
  Eigen::Index fp32_ld = 0;
  Out* out = nullptr;  ///< the half C (unused for a float C)
  Eigen::Index out_ld = 0;
  bool add_fp32 = false;   ///< add what `fp32` holds
  bool add_out = false;    ///< add the half C's old values (accumulate, first slice)
  bool finish = false;     ///< last slice: add the bias and apply the activation
  bool store_out = false;  ///< round into the half C (else store into `fp32`)
  const float* bias = nullptr;
  Activation activation = Activation::none;
};

XAX_TARGET_AVX2 inline __m256 relu_lanes(__m256 v) {
  // `x < 0 ? 0 : x`, as activation_block: keeps -0 and NaN.
  return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v);
}

/// Stores a whole 16 x 6 tile from registers (no GELU: that goes through store_partial_tile).
template <class Out>
XAX_TARGET_AVX2 inline void store_tile(Tile& c, const TileTarget<Out>& target) {
  __m256 bias_upper = _mm256_setzero_ps(), bias_lower = _mm256_setzero_ps();
  if (target.finish && target.bias != nullptr) {
    bias_upper = _mm256_loadu_ps(target.bias);
    bias_lower = _mm256_loadu_ps(target.bias + 8);
  }
  for (int j = 0; j < nr; ++j) {
    __m256 upper = c.lanes[2 * j], lower = c.lanes[2 * j + 1];
    // Null for a half C without a buffer, and offsetting a null pointer is undefined.
    float* fp32 = target.fp32 != nullptr ? target.fp32 + j * target.fp32_ld : nullptr;
    if (target.add_fp32) {
      upper = _mm256_add_ps(upper, _mm256_loadu_ps(fp32));
      lower = _mm256_add_ps(lower, _mm256_loadu_ps(fp32 + 8));
    }
    if constexpr (!std::is_same_v<Out, float>) {
      if (target.add_out) {
        const Out* old = target.out + j * target.out_ld;
        upper = _mm256_add_ps(upper, widen_eight(old));
        lower = _mm256_add_ps(lower, widen_eight(old + 8));
      }
    }
    if (target.finish) {
      upper = _mm256_add_ps(upper, bias_upper);
      lower = _mm256_add_ps(lower, bias_lower);
      if (target.activation == Activation::relu) {
        upper = relu_lanes(upper);
        lower = relu_lanes(lower);
      }
    }
    if constexpr (!std::is_same_v<Out, float>) {
      if (target.store_out) {
        Out* out = target.out + j * target.out_ld;
        round_eight(upper, out);
        round_eight(lower, out + 8);
        continue;
      }
    }
    _mm256_storeu_ps(fp32, upper);
    _mm256_storeu_ps(fp32 + 8, lower);
  }
}

/// Stores the top-left rows x cols of a tile, element by element (edges, and the GELU epilogue).
template <class Out>
XAX_TARGET_AVX2 inline void store_partial_tile(Tile& c, Eigen::Index rows, Eigen::Index cols,
                                               const TileTarget<Out>& target) {
  alignas(32) std::array<float, mr * nr> sums;
  for (int j = 0; j < nr; ++j) {
    _mm256_store_ps(sums.data() + j * mr, c.lanes[2 * j]);
    _mm256_store_ps(sums.data() + j * mr + 8, c.lanes[2 * j + 1]);
  }
  for (Eigen::Index j = 0; j < cols; ++j) {
    float* column = sums.data() + j * mr;
    // Null for a half C without a buffer, and offsetting a null pointer is undefined.
    float* fp32 = target.fp32 != nullptr ? target.fp32 + j * target.fp32_ld : nullptr;
    for (Eigen::Index i = 0; i < rows; ++i) {
      if (target.add_fp32) column[i] += fp32[i];
      if constexpr (!std::is_same_v<Out, float>) {
        if (target.add_out) column[i] += widen_one(target.out[i + j * target.out_ld]);
      }
      if (target.finish && target.bias != nullptr) column[i] += target.bias[i];
    }
    if (target.finish) activation_block(target.activation, column, column, static_cast<std::size_t>(rows));
    if constexpr (!std::is_same_v<Out, float>) {
      if (target.store_out) {
        for (Eigen::Index i = 0; i < rows; ++i) {
          target.out[i + j * target.out_ld] = convert_scalar<Out>(column[i]);
        }
        continue;
      }
    }
    std::copy(column, column + rows, fp32);
  }
}

/// The start of part `index` when [0, extent) is cut into `parts` pieces, at multiples of `grain`.
inline Eigen::Index part_start(Eigen::Index extent, int index, int parts, Eigen::Index grain) {
  return static_cast<Eigen::Index>(
      block_start(static_cast<std::size_t>(extent), static_cast<std::size_t>(index),
                  static_cast<std::size_t>(parts), static_cast<std::size_t>(grain)));
}

/// One product, cut into blocks and parts; the buffers are allocated before the parallel region.
template <class In, class Out>
struct Plan {
  const In* a = nullptr;
  const In* b = nullptr;
  Out* c = nullptr;
  Eigen::Index m = 0, n = 0, k = 0, ldc = 0;
  Eigen::Index a_row_step = 0, a_depth_step = 0, b_depth_step = 0, b_col_step = 0;
  Eigen::Index kc = 0, nc = 0;
  bool buffered = false;  ///< a half C deeper than one slice: partial sums in fp32_panel (ld m)
  bool accumulate = false;
  Activation activation = Activation::none;
  const float* bias = nullptr;
  float* packed_b = nullptr;
  float* packed_a = nullptr;  ///< one A block of mc_max x kc per part
  float* fp32_panel = nullptr;
  int parts = 1;  ///< row_parts x column_parts: row parts pack their own A blocks, column parts share them
  int row_parts = 1;
  int column_parts = 1;
};

/// Part `part`'s tiles of the column panel [jc, jc + width) over the depth slice [pc, pc + depth), with
/// that slice of op(B) packed. Its own function, with the target attribute, so that the tile kernels inline
/// into AVX2 code: an OpenMP region's outlined body does not inherit the attribute.
template <class In, class Out>
XAX_TARGET_AVX2 void multiply_part(const Plan<In, Out>& plan, int part, Eigen::Index jc, Eigen::Index width,
                                   Eigen::Index pc, Eigen::Index depth) {
  constexpr bool half_output = !std::is_same_v<Out, float>;
  const bool first = pc == 0, last = pc + depth >= plan.k;
  const Eigen::Index panels = (width + nr - 1) / nr;
  const int row_part = part / plan.column_parts, column_part = part % plan.column_parts;
  const Eigen::Index row_end = part_start(plan.m, row_part + 1, plan.row_parts, mr);
  const Eigen::Index panel_begin = part_start(panels, column_part, plan.column_parts, 1);
  const Eigen::Index panel_end = part_start(panels, column_part + 1, plan.column_parts, 1);
  float* const packed_a = plan.packed_a + part * mc_max * plan.kc;
  for (Eigen::Index ic = part_start(plan.m, row_part, plan.row_parts, mr); ic < row_end; ic += mc_max) {
    const Eigen::Index height = std::min(mc_max, row_end - ic);
    pack_a(plan.a + ic * plan.a_row_step + pc * plan.a_depth_step, plan.a_row_step, plan.a_depth_step, height,
           depth, packed_a);
    for (Eigen::Index s = panel_begin; s < panel_end; ++s) {
      const Eigen::Index j = jc + s * nr;
      const Eigen::Index cols = std::min(nr, plan.n - j);
      for (Eigen::Index r0 = 0; r0 < height; r0 += mr) {
        const Eigen::Index i = ic + r0;
        const Eigen::Index rows = std::min(mr, height - r0);
        Tile tile;
        multiply_tile(depth, packed_a + r0 * depth, plan.packed_b + s * nr * depth, tile);
        TileTarget<Out> target;
        target.finish = last;
        target.bias = plan.bias != nullptr ? plan.bias + i : nullptr;
        target.activation = plan.activation;
        if constexpr (half_output) {
          target.out = plan.c + i + j * plan.ldc;
          target.out_ld = plan.ldc;
          target.add_out = first && plan.accumulate;
          target.store_out = last;
          if (plan.buffered) {
            target.fp32 = plan.fp32_panel + i + (j - jc) * plan.m;
            target.fp32_ld = plan.m;
            target.add_fp32 = !first;
          }
        } else {
          target.fp32 = plan.c + i + j * plan.ldc;
          target.fp32_ld = plan.ldc;
          target.add_fp32 = !first || plan.accumulate;
        }
        if (rows == mr && cols == nr && !(last && plan.activation == Activation::gelu)) {
          store_tile(tile, target);
        } else {
          store_partial_tile(tile, rows, cols, target);
        }
      }
    }
  }
}

/// Runs `p` (In inputs, Out output, k > 0) on this GEMM.
template <class In, class Out>
void run_typed(const MatmulProblem& p) {
  Plan<In, Out> plan;
  plan.m = p.m;
  plan.n = p.n;
  plan.k = p.k;
  plan.a = static_cast<const In*>(p.a.data);
  plan.b = static_cast<const In*>(p.b.data);
  plan.c = static_cast<Out*>(p.c);
  plan.ldc = p.ldc;
  plan.a_row_step = p.transpose_a ? p.a.ld : 1;
  plan.a_depth_step = p.transpose_a ? 1 : p.a.ld;
  plan.b_depth_step = p.transpose_b ? p.b.ld : 1;
  plan.b_col_step = p.transpose_b ? 1 : p.b.ld;
  plan.accumulate = p.accumulate;
  plan.activation = p.activation;

  // Depth slices of (nearly) equal size: a thin last slice would run the tile at a fraction of its speed.
  const Eigen::Index slices = (p.k + kc_max - 1) / kc_max;
  plan.kc = (p.k + slices - 1) / slices;
  plan.buffered = !std::is_same_v<Out, float> && slices > 1;
  plan.nc = std::min(p.n, nc_max);
  if (plan.buffered) plan.nc = std::min(plan.nc, std::max(nr, fp32_panel_max / p.m / nr * nr));

#if defined(_OPENMP)
  const double flops = 2.0 * static_cast<double>(p.m) * static_cast<double>(p.n) * static_cast<double>(p.k);
  if (!omp_in_parallel() && flops >= parallel_min_flops) plan.parts = num_threads();
#endif
  // Row parts pack their own A blocks (no work repeated); products too short to give every part 32 rows
  // split their columns too, and those parts pack the same A blocks.
  plan.row_parts = static_cast<int>(std::clamp<Eigen::Index>(p.m / (2 * mr), 1, plan.parts));
  while (plan.parts % plan.row_parts != 0) --plan.row_parts;
  plan.column_parts = plan.parts / plan.row_parts;

  Workspace& ws = workspace();
  const Eigen::Index panels_max = (plan.nc + nr - 1) / nr;
  plan.packed_b = ws.packed_b.get(static_cast<std::size_t>(panels_max * nr * plan.kc));
  plan.packed_a = ws.packed_a.get(static_cast<std::size_t>(plan.parts * mc_max * plan.kc));
  if (plan.buffered) plan.fp32_panel = ws.fp32_panel.get(static_cast<std::size_t>(p.m * plan.nc));
  if (p.bias != nullptr) {
    if (p.bias_type == DType::float32) {
      plan.bias = static_cast<const float*>(p.bias);
    } else {
      float* widened = ws.bias.get(static_cast<std::size_t>(p.m));
      if (p.bias_type == DType::bfloat16) {
        convert_n(static_cast<const bfloat16*>(p.bias), widened, static_cast<std::size_t>(p.m));
      } else {
        convert_n(static_cast<const float16*>(p.bias), widened, static_cast<std::size_t>(p.m));
      }
      plan.bias = widened;
    }
  }

  const Plan<In, Out>& shared = plan;
#if defined(_OPENMP)
#pragma omp parallel num_threads(shared.parts) if (shared.parts > 1)
#endif
  {
    // The runtime may grant fewer threads than parts (OMP_THREAD_LIMIT, nested regions): each thread takes
    // the parts its number, plus multiples of the team's size, names.
#if defined(_OPENMP)
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int thread = 0, team = 1;
#endif
    for (Eigen::Index jc = 0; jc < shared.n; jc += shared.nc) {
      const Eigen::Index width = std::min(shared.nc, shared.n - jc);
      const Eigen::Index panels = (width + nr - 1) / nr;
      for (Eigen::Index pc = 0; pc < shared.k; pc += shared.kc) {
        const Eigen::Index depth = std::min(shared.kc, shared.k - pc);
        for (int part = thread; part < shared.parts; part += team) {
          pack_b(shared.b + pc * shared.b_depth_step + jc * shared.b_col_step, shared.b_depth_step,
                 shared.b_col_step, depth, width, part_start(panels, part, shared.parts, 1),
                 part_start(panels, part + 1, shared.parts, 1), shared.packed_b);
        }
#if defined(_OPENMP)
#pragma omp barrier
#endif
        for (int part = thread; part < shared.parts; part += team) {
          multiply_part(shared, part, jc, width, pc, depth);
        }
#if defined(_OPENMP)
#pragma omp barrier  // the next slice overwrites packed_b
#endif
      }
    }
  }
  last_matmul_implementation_record() = implementation_name(p.input);
}

XAX_SIMD_DIAGNOSTICS_END
#endif  // XAX_X86_KERNELS

/// Whether xax::matmul's automatic backend runs products of `input` (float32, bfloat16, float16) here: on
/// AVX2 without AVX-512 (where oneDNN's fp32 kernel has twice the vector width, it stays faster, for half
/// products on widened panels), or on any AVX2 CPU in a build without oneDNN (Eigen's GEMM is compiled for
/// the build's baseline ISA).
inline bool runs_products_of(DType input, const CpuFeatures& cpu) {
  if (input != DType::float32 && input != DType::bfloat16 && input != DType::float16) return false;
  if (!supported(cpu)) return false;
#if defined(XAX_HAS_ONEDNN) && XAX_HAS_ONEDNN
  return !supports_avx512_kernels(cpu);
#else
  return true;
#endif
}

/// Whether it runs `p`: one of those products, not batched, with an output of float or the inputs' type and
/// a depth. (A batch of small slices, attention's, runs as one oneDNN primitive where oneDNN's kernel is
/// native: batched_matmul.hpp.)
inline bool applies(const MatmulProblem& p, const CpuFeatures& cpu) {
  return runs_products_of(p.input, cpu) && p.k > 0 && p.batch == 1 &&
         (p.output == DType::float32 || p.output == p.input) &&
         (p.bias == nullptr || p.bias_type != DType::float64);
}

/// Runs `p`, for which applies() holds.
inline void run(const MatmulProblem& p) {
#if XAX_X86_KERNELS
  if (p.input == DType::float32) {
    run_typed<float, float>(p);
  } else if (p.input == DType::bfloat16) {
    p.output == DType::float32 ? run_typed<bfloat16, float>(p) : run_typed<bfloat16, bfloat16>(p);
  } else {
    p.output == DType::float32 ? run_typed<float16, float>(p) : run_typed<float16, float16>(p);
  }
#else
  static_cast<void>(p);
#endif
}

}  // namespace xax::detail::packing_gemm
