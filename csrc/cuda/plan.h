// Host-side planning for the CUDA backend: tile configurations, shared-memory
// layouts, launch geometry and size checks.
//
// Plain C++17 with no CUDA or torch types, so the same arithmetic is used by the
// kernels (through SK_HD under nvcc) and unit-tested on a machine without a GPU
// (csrc/cuda/plan_test.cpp, compiled with g++ by tests/test_cuda_backend.py).
//
// Names follow docs/math.md: the cube T[i,j,k] = sum_d x[i,d] y[j,d] z[k,d] is tiled
// by BLOCK_I x BLOCK_J (i, j) pairs (the BP = BLOCK_I * BLOCK_J rows of a tile
// product) against BLOCK_K rows of z, reducing d in chunks of BLOCK_D; the
// backward's W contraction writes output columns in chunks of BLOCK_DW.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define SK_HD __host__ __device__
#else
#define SK_HD
#endif

namespace symile_cuda {

// How tile products are computed. Float64 tensors always use kIeee.
enum Mode : int {
  kIeee = 0,  // SIMT fused multiply-adds in the tensors' dtype (float32 or float64)
  kTf32 = 1,  // float32 tensors, products on tensor cores in TF32 (WMMA m16n16k8), float32 accumulation
  kBf16 = 2,  // float32 tensors rounded to bf16 tiles in shared memory (WMMA m16n16k16), float32 accumulation
};

constexpr int kThreads = 256;  // every kernel runs 256 threads (8 warps) per CTA
constexpr int kSmemAlign = 128;
// Dynamic shared memory every configuration must fit: the per-block opt-in limit of
// sm_86/sm_89 (99 KiB), the smallest among the GPUs with bf16/TF32 tensor cores.
constexpr std::size_t kSmemLimit = 101376;

struct TileConfig {
  int BLOCK_I;    // anchor rows i per tile
  int BLOCK_J;    // partner rows j per tile; BP = BLOCK_I * BLOCK_J (i, j) pairs
  int BLOCK_K;    // rows of z per tile (columns of the tile product)
  int BLOCK_D;    // reduction chunk over d
  int BLOCK_DW;   // output columns of the W contraction per CTA (backward)
  int pad_in;     // shared-memory row padding of operand tiles, in elements
  int pad_acc;    // shared-memory row padding of accumulator tiles, in elements
  int in_size;    // bytes of an operand element in shared memory
  int acc_size;   // bytes of an accumulator element
};

SK_HD constexpr int tile_pairs(const TileConfig& c) { return c.BLOCK_I * c.BLOCK_J; }

// Padding: SIMT tiles use one element (odd strides avoid bank conflicts); WMMA
// tiles use 16 bytes so every ldm is a multiple of 8 (16-bit) or 4 (32-bit)
// elements and every fragment pointer stays 32-byte aligned.
SK_HD constexpr TileConfig config_for(int mode, int elem_size) {
  return elem_size == 8 ? TileConfig{4, 16, 32, 16, 64, 1, 1, 8, 8}
       : mode == kTf32  ? TileConfig{4, 16, 64, 32, 128, 4, 4, 4, 4}
       : mode == kBf16  ? TileConfig{4, 16, 64, 32, 128, 8, 4, 2, 4}
                        : TileConfig{4, 16, 64, 32, 128, 1, 1, 4, 4};
}

SK_HD constexpr std::size_t align_up(std::size_t bytes) {
  return (bytes + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
}

SK_HD constexpr std::size_t tile_bytes(int rows, int cols, int pad, int elem) {
  return align_up(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols + pad) * static_cast<std::size_t>(elem));
}

// Byte offsets of the shared-memory regions of the forward kernels (cube and pair).
struct ForwardLayout {
  std::size_t S, P, Z, pair_m, pair_s, row_l, total;
};

SK_HD constexpr ForwardLayout forward_layout(const TileConfig& c) {
  const int BP = tile_pairs(c);
  const std::size_t S = 0;                                                  // BP x BLOCK_K accumulators (logits)
  const std::size_t P = S + tile_bytes(BP, c.BLOCK_K, c.pad_acc, c.acc_size);  // BP x BLOCK_D row products
  const std::size_t Z = P + tile_bytes(BP, c.BLOCK_D, c.pad_in, c.in_size);    // BLOCK_K x BLOCK_D rows of z
  const std::size_t pair_m = Z + tile_bytes(c.BLOCK_K, c.BLOCK_D, c.pad_in, c.in_size);
  const std::size_t pair_s = pair_m + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t row_l = pair_s + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t total = row_l + tile_bytes(1, BP, 0, c.acc_size);
  return ForwardLayout{S, P, Z, pair_m, pair_s, row_l, total};
}

// Byte offsets of the backward kernels' regions. W (the BP x BLOCK_DW result of
// the W contraction) reuses the bytes of S, G, P, Cd and Cw: it is stored only
// after the last tile that needed them.
struct BackwardLayout {
  std::size_t S, G, P, Cd, Cw, W, dA, LA, gA, LB, gB, LC, gC, red, total;
};

SK_HD constexpr std::size_t max_size(std::size_t a, std::size_t b) { return a > b ? a : b; }

SK_HD constexpr BackwardLayout backward_layout(const TileConfig& c) {
  const int BP = tile_pairs(c);
  const std::size_t S = 0;                                                     // BP x BLOCK_K logits
  const std::size_t G = S + tile_bytes(BP, c.BLOCK_K, c.pad_acc, c.acc_size);  // BP x BLOCK_K weights G (operand)
  const std::size_t P = G + tile_bytes(BP, c.BLOCK_K, c.pad_in, c.in_size);    // BP x BLOCK_D row products
  const std::size_t Cd = P + tile_bytes(BP, c.BLOCK_D, c.pad_in, c.in_size);   // BLOCK_K x BLOCK_D (logit operand)
  const std::size_t Cw = Cd + tile_bytes(c.BLOCK_K, c.BLOCK_D, c.pad_in, c.in_size);  // BLOCK_K x BLOCK_DW (W operand)
  const std::size_t union_end = max_size(Cw + tile_bytes(c.BLOCK_K, c.BLOCK_DW, c.pad_in, c.in_size),
                                         tile_bytes(BP, c.BLOCK_DW, c.pad_acc, c.acc_size));
  const std::size_t W = 0;
  const std::size_t dA = union_end;                                            // BLOCK_I x BLOCK_DW
  const std::size_t LA = dA + tile_bytes(c.BLOCK_I, c.BLOCK_DW, 0, c.acc_size);
  const std::size_t gA = LA + tile_bytes(1, BP, 0, c.acc_size);                // vectors sized BP >= any block
  const std::size_t LB = gA + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t gB = LB + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t LC = gB + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t gC = LC + tile_bytes(1, c.BLOCK_K > BP ? c.BLOCK_K : BP, 0, c.acc_size);
  const std::size_t red = gC + tile_bytes(1, c.BLOCK_K > BP ? c.BLOCK_K : BP, 0, c.acc_size);
  const std::size_t total = red + tile_bytes(1, kThreads, 0, c.acc_size);
  return BackwardLayout{S, G, P, Cd, Cw, W, dA, LA, gA, LB, gB, LC, gC, red, total};
}

SK_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Launch geometry.

// Cube forward. A unit is (i-block ib, j-split js): BLOCK_I rows of x against the
// j-blocks [js * num_jb / num_js, (js + 1) * num_jb / num_js) and every k. CTA c runs
// units c, c + ctas, ...; it owns row c of the Lb and Lc partial LSE buffers
// (ctas x J, ctas x K), and unit (ib, js) owns La_part[js, i-block] (num_js x I).
// The partials are combined by a log-sum-exp over their rows in a fixed order,
// so results are deterministic for a given GPU.
struct CubeForwardPlan {
  int64_t num_ib = 0, num_jb = 0, num_js = 0, units = 0, units_per_cta = 0, ctas = 0;
  std::size_t smem = 0;
};

inline CubeForwardPlan plan_cube_forward(int64_t I, int64_t J, int64_t K, const TileConfig& c, int num_sms) {
  (void)K;
  CubeForwardPlan p;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  p.num_ib = ceil_div(I, c.BLOCK_I);
  p.num_jb = ceil_div(J, c.BLOCK_J);
  // Split j only when the i-blocks alone cannot fill two CTAs per SM.
  int64_t js = ceil_div(2 * sms, p.num_ib);
  p.num_js = js < 1 ? 1 : (js > p.num_jb ? p.num_jb : js);
  p.units = p.num_ib * p.num_js;
  // At most 4 CTAs per SM, each running an equal count of units (the last CTAs one fewer at most).
  const int64_t cap = 4 * sms;
  p.units_per_cta = ceil_div(p.units, cap);
  p.ctas = ceil_div(p.units, p.units_per_cta);
  p.smem = forward_layout(c).total;
  return p;
}

// j-blocks [first, last) of split js (every split gets at least one when num_js <= num_jb).
SK_HD inline int64_t split_begin(int64_t js, int64_t num_jb, int64_t num_js) { return js * num_jb / num_js; }

// Cube backward (one launch per anchor: x, then y, then z) and pair backward:
// CTA u owns output rows [ab * rows, (ab + 1) * rows) x columns [dw * BLOCK_DW, ...)
// with ab = u / num_dw, dw = u % num_dw. No two CTAs write the same output.
struct BackwardPlan {
  int64_t num_ab = 0, num_dw = 0, units = 0;
  std::size_t smem = 0;
};

inline BackwardPlan plan_backward(int64_t rows, int64_t D, int64_t rows_per_cta, const TileConfig& c) {
  BackwardPlan p;
  p.num_ab = ceil_div(rows, rows_per_cta);
  p.num_dw = ceil_div(D, c.BLOCK_DW);
  p.units = p.num_ab * p.num_dw;
  p.smem = backward_layout(c).total;
  return p;
}

// Pair forward: CTA b owns rows [b * BP, (b + 1) * BP) of a.
struct PairForwardPlan {
  int64_t blocks = 0;
  std::size_t smem = 0;
};

inline PairForwardPlan plan_pair_forward(int64_t N, const TileConfig& c) {
  PairForwardPlan p;
  p.blocks = ceil_div(N, tile_pairs(c));
  p.smem = forward_layout(c).total;
  return p;
}

// ---------------------------------------------------------------------------
// Argument checks shared by the binding and the unit tests. Each returns an
// empty string when the arguments are fine, else a message naming the argument.

// The mode a tensor dtype runs: 16-bit rows (elem_size 2) run bf16 tiles when
// they are bf16 and TF32 tiles when fp16 (exact for fp16 values), whatever mode says.
SK_HD constexpr int effective_mode(int mode, int elem_size, bool is_bf16) {
  return elem_size != 2 ? mode : (is_bf16 ? kBf16 : kTf32);
}

inline std::string check_mode(int64_t mode, int elem_size) {
  if (mode != kIeee && mode != kTf32 && mode != kBf16) {
    return "mode must be 0 (IEEE), 1 (TF32) or 2 (bf16 tiles); got " + std::to_string(mode);
  }
  if (elem_size == 8 && mode != kIeee) {
    return "mode " + std::to_string(mode) + " (tensor-core tiles) needs float32 tensors; float64 runs only mode 0 (IEEE)";
  }
  if (elem_size != 2 && elem_size != 4 && elem_size != 8) {
    return "tensors must be float32, float64, bfloat16 or float16; got an element of " + std::to_string(elem_size) +
           " bytes";
  }
  return "";
}

inline std::string check_sizes(int64_t I, int64_t J, int64_t K, int64_t D) {
  const char* names[] = {"x.size(0) (I)", "y.size(0) (J)", "z.size(0) (K)", "the feature size d"};
  const int64_t sizes[] = {I, J, K, D};
  for (int q = 0; q < 4; ++q) {
    if (sizes[q] < 1) return std::string(names[q]) + " must be >= 1; got " + std::to_string(sizes[q]);
  }
  // Row indices are held in int64 everywhere, but launch grids are int32.
  const int64_t kMaxRows = int64_t(1) << 31;
  for (int q = 0; q < 3; ++q) {
    if (sizes[q] >= kMaxRows) return std::string(names[q]) + " must be < 2^31; got " + std::to_string(sizes[q]);
  }
  return "";
}

// Pair ops: a (I, d) against b (J, d), I <= J.
inline std::string check_pair_sizes(int64_t I, int64_t J, int64_t D) {
  const int64_t kMaxRows = int64_t(1) << 31;
  if (I < 1) return "a.size(0) (I) must be >= 1; got " + std::to_string(I);
  if (J < I) return "b.size(0) (J) must be >= a.size(0) (I) = " + std::to_string(I) + "; got " + std::to_string(J);
  if (D < 1) return "the feature size d must be >= 1; got " + std::to_string(D);
  if (J >= kMaxRows) return "b.size(0) (J) must be < 2^31; got " + std::to_string(J);
  return "";
}

inline std::string check_smem(std::size_t smem, int64_t device_limit) {
  if (static_cast<int64_t>(smem) > device_limit) {
    return "the kernel needs " + std::to_string(smem) + " bytes of shared memory per block but the device allows " +
           std::to_string(device_limit);
  }
  return "";
}

}  // namespace symile_cuda
