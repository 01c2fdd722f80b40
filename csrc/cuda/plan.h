// Host-side planning for the CUDA backend: tile configurations, shared-memory
// layouts, launch geometry and size checks.
//
// Plain C++17 with no CUDA or torch types, so the same arithmetic is used by the
// kernels (through SK_HD under nvcc) and unit-tested on a machine without a GPU
// (csrc/cuda/plan_test.cpp, compiled with g++ by tests/test_cuda_build.py).
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
  kTf32 = 1,  // float32 tensors, products on tensor cores in TF32 (mma.sync m16n8k8), float32 accumulation
  kBf16 = 2,  // float32 tensors rounded to bf16 tiles in shared memory (ldmatrix + mma.sync), float32 accumulation
};

constexpr int kThreads = 256;  // every kernel runs 256 threads (8 warps) per CTA
constexpr int kSmemAlign = 128;
// Register plan: the minimum CTAs per SM each kernel's __launch_bounds__ asks for, so
// ptxas budgets 65536 / (kThreads * n) registers per thread (128 at n = 2, 255 at n = 1)
// rather than a cap of its own choosing (left free, it capped several kernels at 128 and
// spilled). Every kernel compiles without spills (tests/test_cuda_sass.py). The pair
// kernels fit 128 registers: two CTAs per SM. So does the cube forward (ldmatrix fragments; with
// float32 rows in TF32 tiles it spilled 32 bytes at 128 on sm_80 until opaque_tid() (tile_engines.cuh)
// stopped ptxas holding hoisted thread-index addresses: 94 registers since). The backward
// passes fit 128 with their own, smaller tiles
// (cube_backward_config: 32 pair rows in pass "pairs", 32 rows of z in pass "z"; with the
// forward's 64 they used 159-210 registers at one CTA per SM and spilled 4-100 bytes at 128),
// and their shared memory fits two CTAs per A100 SM at bf16 d <= 256 (plan_cube_backward).
constexpr int kMinCtasPairForward = 2;
constexpr int kMinCtasPairBackward = 2;  // da, db
constexpr int kMinCtasCubeForward = 2;
constexpr int kMinCtasCubePairs = 2;     // backward pass "pairs"
constexpr int kMinCtasCubeZ = 2;         // backward pass "z"
SK_HD constexpr int register_budget(int min_ctas) {
  return (65536 / (kThreads * min_ctas)) > 255 ? 255 : 65536 / (kThreads * min_ctas);
}
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

// Buffers of the logit tile product's second operand (rows of z, or of the pair kernels'
// columns): one is filled by cp.async while the other feeds the tile product.
constexpr int kOperandStages = 2;

// Padding: SIMT tiles use one element (odd strides avoid bank conflicts); tensor-core
// tiles use 16 bytes so every ldm is a multiple of 8 (16-bit) or 4 (32-bit) elements, every
// WMMA fragment pointer stays 32-byte aligned and every ldmatrix row 16-byte aligned.
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
  std::size_t S, P, Z, pair_m, pair_s, row_l, row_ls, colm, colo, cols, roww, total;
};

// p_cols: the columns of row products P holds, BLOCK_D (one chunk, the default) or every
// column of d (the cube forward's products built once per pair block, CubeForwardPlan).
SK_HD constexpr ForwardLayout forward_layout(const TileConfig& c, int p_cols = 0) {
  const int BP = tile_pairs(c);
  const int pc = p_cols > 0 ? p_cols : c.BLOCK_D;
  const std::size_t S = 0;                                                  // BP x BLOCK_K accumulators (logits)
  const std::size_t P = S + tile_bytes(BP, c.BLOCK_K, c.pad_acc, c.acc_size);  // BP x pc row products
  const std::size_t Z = P + tile_bytes(BP, pc, c.pad_in, c.in_size);           // 2 x BLOCK_K x BLOCK_D rows of z
  const std::size_t pair_m = Z + kOperandStages * tile_bytes(c.BLOCK_K, c.BLOCK_D, c.pad_in, c.in_size);
  const std::size_t pair_s = pair_m + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t row_l = pair_s + tile_bytes(1, BP, 0, c.acc_size);
  const std::size_t row_ls = row_l + tile_bytes(1, BP, 0, c.acc_size);     // running sums beside row_l's maxima
  const std::size_t colm = row_ls + tile_bytes(1, BP, 0, c.acc_size);      // BLOCK_K column maxima of a tile
  const std::size_t colo = colm + tile_bytes(1, c.BLOCK_K, 0, c.acc_size);  // BLOCK_K column LSEs of a tile as
  const std::size_t cols = colo + tile_bytes(1, c.BLOCK_K, 0, c.acc_size);  // (reference, sum) pairs
  const std::size_t roww = cols + tile_bytes(1, c.BLOCK_K, 0, c.acc_size);  // BP row weights exp(rowmax - max)
  const std::size_t total = roww + tile_bytes(1, BP, 0, c.acc_size);
  return ForwardLayout{S, P, Z, pair_m, pair_s, row_l, row_ls, colm, colo, cols, roww, total};
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
// Each partial is a (max, sum) pair (buffers of twice those sizes: maxima, then sums),
// merged by rescaled sums; they are combined by one max pass and one sum pass over
// their rows in a fixed order, so results are deterministic for a given GPU.
// Row products x[i] * y[j]: with full_products, a pair block's products over all of d
// (p_cols = d rounded up to BLOCK_D columns) are built once and reused by every tile of
// z rows; else (d too wide for kForwardProductsSmem) P holds one BLOCK_D chunk
// (p_cols = BLOCK_D), rebuilt per chunk and per tile of z rows.
struct CubeForwardPlan {
  int64_t num_ib = 0, num_jb = 0, num_js = 0, units = 0, units_per_cta = 0, ctas = 0;
  int p_cols = 0;
  bool full_products = false;
  std::size_t smem = 0;
};

// The most shared memory the forward takes to keep a pair block's products over all of d:
// 81 KiB, so two CTAs fit an A100's SM (164 KiB, 1 KiB reserved per CTA). bf16 tiles keep
// them up to d = 384, TF32 and IEEE float32 up to d = 160, float64 up to d = 96.
constexpr std::size_t kForwardProductsSmem = 82944;

inline CubeForwardPlan plan_cube_forward(int64_t I, int64_t J, int64_t K, int64_t D, const TileConfig& c,
                                         int num_sms) {
  (void)K;
  CubeForwardPlan p;
  const int64_t d_cols = ceil_div(D > 0 ? D : 1, c.BLOCK_D) * c.BLOCK_D;
  p.full_products = d_cols <= 4096 && forward_layout(c, static_cast<int>(d_cols)).total <= kForwardProductsSmem;
  p.p_cols = p.full_products ? static_cast<int>(d_cols) : c.BLOCK_D;
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
  p.smem = forward_layout(c, p.p_cols).total;
  return p;
}

// j-blocks [first, last) of split js (every split gets at least one when num_js <= num_jb).
SK_HD inline int64_t split_begin(int64_t js, int64_t num_jb, int64_t num_js) { return js * num_jb / num_js; }

// Cube backward (docs/math.md section 2): two passes, each recomputing the logits
// once over the full d (in BLOCK_D chunks) and contracting G with full-d accumulators
// kept in shared memory (rows x slab floats, kCubeChunk columns per tile product):
// * pass "pairs": unit (is, js, sl) walks the i-blocks of i-split is and the j-blocks
//   of j-split js; per (i-block, j-block) it accumulates W[(i, j), :] = sum_k G z[k]
//   over every k, then adds sum_j y[j] * W to its own rows dx_part[js, i, slab] and
//   sum_i x[i] * W to dy_part[is, j, slab];
// * pass "z": unit (kb, is, sl) owns BLOCK_K rows of z and accumulates
//   V[k, :] = sum_{i in split is, j} G (x[i] * y[j]) into dz_part[is, k, slab].
// Units never share an output row: no atomics; the partials are summed over their
// first axis in a fixed order (reduce_parts_kernel), so results are deterministic.
// A slab is the column range one unit accumulates: all of d when the accumulators fit
// the device's shared memory, else the largest multiple of kCubeChunk that fits (d
// beyond one slab recomputes the logits once per slab).
constexpr int kCubeChunk = 64;
// Widest spreads (natural-log units) at which one exponential is shared between the
// row and column reductions (forward) or the three G terms (backward); beyond them a
// tile takes an exact path with its own exponential. Bounds as the Triton and CPU
// kernels: a flushed term is below e^(spread - 87.3) of its column's largest (float32).
constexpr double kForwardShareSpread = 60.0;
constexpr double kBackwardShareSpread = 40.0;

// The backward passes' tiles: the mode's TileConfig with BLOCK_I halved in pass "pairs"
// (BP = 2 x 16 = 32 pair rows: its BP x d accumulators) and BLOCK_K halved in pass "z" (32
// rows of z, 16 in float64: its BLOCK_K x d accumulators). Same FLOPs and exponentials as the
// forward's tiles (each pass still recomputes the logits once); the halved accumulators bring
// both passes to two CTAs per SM: 128 registers (kMinCtasCube*) and, at bf16 d <= 256, at most
// 81 KiB of shared memory (kTwoCtaSmemA100). Every tile product keeps whole 16 x 16
// tensor-core tiles per warp (32 x 64 and 64 x 32: one per warp). One configuration for every
// target: sm_90's 2-CTA share (113 KiB) does not hold the forward's tiles at d = 256 either.
SK_HD constexpr TileConfig cube_backward_config(const TileConfig& c, bool z_pass) {
  return z_pass ? TileConfig{c.BLOCK_I, c.BLOCK_J, c.BLOCK_K / 2, c.BLOCK_D, c.BLOCK_DW, c.pad_in, c.pad_acc,
                             c.in_size, c.acc_size}
                : TileConfig{c.BLOCK_I / 2, c.BLOCK_J, c.BLOCK_K, c.BLOCK_D, c.BLOCK_DW, c.pad_in, c.pad_acc,
                             c.in_size, c.acc_size};
}

// Shared memory per CTA that lets two CTAs share an SM whose per-block opt-in limit is
// smem_limit: the SM holds smem_limit + 1 KiB (the per-CTA reserve), and each CTA takes its
// own 1 KiB reserve (A100: 82944 = 81 KiB; H100: 115712; sm_86/sm_89: 50176).
SK_HD constexpr int64_t two_cta_smem(int64_t smem_limit) { return (smem_limit + 1024) / 2 - 1024; }
constexpr int64_t kTwoCtaSmemA100 = 82944;  // two_cta_smem(166912)

// Buffers of z rows in the backward passes' logit products (tile_products' STAGES): two, the
// next chunk's cp.async copies in flight during this chunk's products, as in the forward.
constexpr int kCubeBackwardStages = kOperandStages;

struct CubeBackwardLayout {
  std::size_t S, G, P, Cd, Op, W, LA, gA, LB, gB, ref, arow, u, LC, gC, bcol, Pf, total;
};

// base: the mode's config (cube_backward_config picks the pass's tiles).
// z_pass: accumulators BLOCK_K x slab, operand chunk BP x kCubeChunk (pair products),
// G stored transposed (BLOCK_K x BP); else BP x slab, BLOCK_K x kCubeChunk (rows of z), G BP x BLOCK_K.
// Regions used at different times share bytes: the contraction's operand chunk Op aliases S,
// P and Cd (loaded after tile_G, which ends with a barrier; P and Cd are next written after the
// contraction's last barrier); G aliases P and Cd (written by tile_G after tile_products' last
// barrier, with no copy in flight) but neither S (which tile_G reads) nor Op.
// p_cols > 0 adds Pf, a pair block's row products over p_cols columns (all of d, a multiple of
// kCubeChunk; CubeBackwardPlan::full_products), kept apart from every other region; it replaces
// P (and, in pass "z", Op). The per-row vectors are packed (each on its element size).
SK_HD constexpr CubeBackwardLayout cube_backward_layout(const TileConfig& base, int64_t slab, bool z_pass,
                                                        int p_cols = 0) {
  const TileConfig c = cube_backward_config(base, z_pass);
  const int BP = tile_pairs(c);
  const int acc_rows = z_pass ? c.BLOCK_K : BP;
  const int op_rows = z_pass ? BP : c.BLOCK_K;
  const bool full = p_cols > 0;
  const std::size_t S = 0;
  const std::size_t P = S + tile_bytes(BP, c.BLOCK_K, c.pad_acc, c.acc_size);
  const std::size_t Cd = P + (full ? 0 : tile_bytes(BP, c.BLOCK_D, c.pad_in, c.in_size));
  const std::size_t cd_end = Cd + kCubeBackwardStages * tile_bytes(c.BLOCK_K, c.BLOCK_D, c.pad_in, c.in_size);
  const std::size_t Op = 0;
  const std::size_t op_end = z_pass && full ? 0 : Op + tile_bytes(op_rows, kCubeChunk, c.pad_in, c.in_size);
  const std::size_t G = max_size(P, op_end);
  const std::size_t g_end = G + (z_pass ? tile_bytes(c.BLOCK_K, BP, c.pad_in, c.in_size)
                                        : tile_bytes(BP, c.BLOCK_K, c.pad_in, c.in_size));
  const std::size_t W = max_size(g_end, cd_end);
  const std::size_t e = static_cast<std::size_t>(c.acc_size);
  const std::size_t LA = W + tile_bytes(acc_rows, static_cast<int>(slab), c.pad_acc, c.acc_size);
  const std::size_t gA = LA + c.BLOCK_I * e;
  const std::size_t LB = gA + c.BLOCK_I * e;
  const std::size_t gB = LB + c.BLOCK_J * e;
  const std::size_t LC = gB + c.BLOCK_J * e;
  const std::size_t gC = LC + c.BLOCK_K * e;
  const std::size_t bcol = gC + c.BLOCK_K * e;
  const std::size_t ref = bcol + c.BLOCK_K * e;
  const std::size_t arow = ref + BP * e;
  const std::size_t u = arow + BP * e;
  const std::size_t Pf = align_up(u + BP * e);
  const std::size_t total = Pf + (full ? tile_bytes(BP, p_cols, c.pad_in, c.in_size) : 0);
  return CubeBackwardLayout{S, G, P, Cd, Op, W, LA, gA, LB, gB, ref, arow, u, LC, gC, bcol, Pf, total};
}

// full_products: both passes build a pair block's row products x[i] * y[j] once over all of d
// (p_cols = d rounded up to kCubeChunk) and reuse them: pass "pairs" for every tile of z rows,
// pass "z" for its logits and its contraction. Taken when they fit beside the slab's
// accumulators within two CTAs' share of the SM (two_cta_smem), or, where the accumulators
// alone already exceed that share, within the device's limit; else rebuilt per tile and chunk.
// num_ib counts pass "pairs"' i-blocks, z_num_ib pass "z"'s (their BLOCK_I differ).
struct CubeBackwardPlan {
  int64_t slab = 0, num_slabs = 0, num_ib = 0, z_num_ib = 0, num_jb = 0, num_kb = 0;
  int p_cols = 0;
  bool full_products = false;
  int64_t pair_is = 0, pair_js = 0, pair_units = 0;  // pass "pairs": i-splits x j-splits x slabs
  int64_t z_is = 0, z_units = 0;                     // pass "z": k-blocks x i-splits x slabs
  int64_t reduce_ctas = 0;                           // dx reduction CTAs = dtau partials
  std::size_t pair_smem = 0, z_smem = 0;
  // Workspace of the compute dtype, in elements: dx_part, dy_part, dz_part, dtau_part.
  int64_t dx_part = 0, dy_part = 0, dz_part = 0, dtau_part = 0, workspace = 0;
};

SK_HD constexpr int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The backward's partial gradients hold pair_js + pair_is + z_is row sets (I, J or K rows of d):
// at most this many, so its workspace stays O(N d) (24 N d elements: 48 MiB of float32 at
// N = 2048, d = 256), at the price of fewer pass-"pairs" CTAs than two per SM on large GPUs.
constexpr int64_t kBackwardSplitBudget = 24;

// smem_limit: the device's per-block opt-in shared memory (bytes). Splits aim at about
// two CTAs per SM for each pass.
inline CubeBackwardPlan plan_cube_backward(int64_t I, int64_t J, int64_t K, int64_t D, const TileConfig& c,
                                           int num_sms, int64_t smem_limit) {
  CubeBackwardPlan p;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  int64_t slab = ceil_div(D, kCubeChunk) * kCubeChunk;
  while (slab > kCubeChunk && (static_cast<int64_t>(cube_backward_layout(c, slab, false).total) > smem_limit ||
                               static_cast<int64_t>(cube_backward_layout(c, slab, true).total) > smem_limit)) {
    slab -= kCubeChunk;
  }
  p.slab = slab;
  p.num_slabs = ceil_div(D, slab);
  const int64_t d_cols = ceil_div(D > 0 ? D : 1, kCubeChunk) * kCubeChunk;
  if (d_cols <= 4096) {
    const int pc = static_cast<int>(d_cols);
    const int64_t two = two_cta_smem(smem_limit);
    const int64_t with = static_cast<int64_t>(max_size(cube_backward_layout(c, slab, false, pc).total,
                                                       cube_backward_layout(c, slab, true, pc).total));
    const int64_t without = static_cast<int64_t>(max_size(cube_backward_layout(c, slab, false).total,
                                                          cube_backward_layout(c, slab, true).total));
    // Never trade two CTAs per SM for the products: they save loads, not FLOPs.
    p.full_products = with <= two || (without > two && with <= smem_limit);
  }
  p.p_cols = p.full_products ? static_cast<int>(d_cols) : 0;
  const TileConfig cp = cube_backward_config(c, false), cz = cube_backward_config(c, true);
  p.num_ib = ceil_div(I, cp.BLOCK_I);
  p.z_num_ib = ceil_div(I, cz.BLOCK_I);
  p.num_jb = ceil_div(J, cp.BLOCK_J);
  p.num_kb = ceil_div(K, cz.BLOCK_K);
  // Pass "z" splits i until its units reach two CTAs per SM; pass "pairs" takes a square of
  // splits towards the same; both within the workspace budget (kBackwardSplitBudget row sets).
  p.z_is = clamp64(ceil_div(2 * sms, p.num_kb * p.num_slabs), 1, p.z_num_ib < kBackwardSplitBudget / 3
                                                                    ? p.z_num_ib : kBackwardSplitBudget / 3);
  int64_t side = 1;
  while (side * side * p.num_slabs < 2 * sms && 2 * (side + 1) + p.z_is <= kBackwardSplitBudget) ++side;
  p.pair_is = clamp64(side, 1, p.num_ib);
  const int64_t js_cap = kBackwardSplitBudget - p.z_is - p.pair_is;
  p.pair_js = clamp64(ceil_div(2 * sms, p.pair_is * p.num_slabs), 1, p.num_jb < js_cap ? p.num_jb : js_cap);
  p.pair_units = p.pair_is * p.pair_js * p.num_slabs;
  p.z_units = p.num_kb * p.z_is * p.num_slabs;
  p.reduce_ctas = clamp64(ceil_div(I * D, kThreads), 1, 4 * sms);
  p.pair_smem = cube_backward_layout(c, slab, false, p.p_cols).total;
  p.z_smem = cube_backward_layout(c, slab, true, p.p_cols).total;
  p.dx_part = 0;
  p.dy_part = p.dx_part + p.pair_js * I * D;
  p.dz_part = p.dy_part + p.pair_is * J * D;
  p.dtau_part = p.dz_part + p.z_is * K * D;
  p.workspace = p.dtau_part + p.reduce_ctas;
  return p;
}

// Pair ops (a: I rows, b: J rows). Every kernel splits its column loop as well as its rows,
// so that small I still fills the GPU (I = 4096 is 64 row blocks of 64 rows):
// * forward: unit (rb, sp) = rows [rb * BP, ...) of a against the column blocks of split sp
//   (of b's J rows, BLOCK_K per block); it writes its rows' partial LSE as (max, sum) pairs
//   to L_part (2 x f_splits x I), combined in a fixed order;
// * backward "rows" (da, dpos, dtau): unit (rb, sp, dw) = rows of a x output columns
//   [dw * BLOCK_DW, ...) against the column blocks of split sp, writing da_part[sp];
// * backward "cols" (db): the same with a and b swapped (rows of b against blocks of a's I
//   columns), writing db_part[sp].
// The partial gradients are summed over their splits in a fixed order (reduce_parts_kernel).
struct PairPlan {
  int64_t f_row_blocks = 0, f_col_blocks = 0, f_splits = 0, f_units = 0;
  int64_t num_dw = 0;
  int64_t a_row_blocks = 0, a_col_blocks = 0, a_splits = 0, a_units = 0;
  int64_t b_row_blocks = 0, b_col_blocks = 0, b_splits = 0, b_units = 0;
  int64_t reduce_ctas = 0;
  std::size_t forward_smem = 0, backward_smem = 0;
  // Workspaces of the compute dtype, in elements.
  int64_t forward_workspace = 0;                                      // L_part
  int64_t da_part = 0, db_part = 0, dtau_part = 0, backward_workspace = 0;
};

// Splits of a loop over col_blocks so that rows x splits x extra reaches two CTAs per SM.
SK_HD constexpr int64_t column_splits(int64_t rows, int64_t extra, int64_t col_blocks, int64_t sms) {
  return clamp64(ceil_div(2 * sms, rows * extra), 1, col_blocks);
}

inline PairPlan plan_pair(int64_t I, int64_t J, int64_t D, const TileConfig& c, int num_sms) {
  PairPlan p;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const int64_t BP = tile_pairs(c);
  p.num_dw = ceil_div(D, c.BLOCK_DW);
  p.f_row_blocks = p.a_row_blocks = ceil_div(I, BP);
  p.f_col_blocks = p.a_col_blocks = ceil_div(J, c.BLOCK_K);
  p.b_row_blocks = ceil_div(J, BP);
  p.b_col_blocks = ceil_div(I, c.BLOCK_K);
  p.f_splits = column_splits(p.f_row_blocks, 1, p.f_col_blocks, sms);
  p.a_splits = column_splits(p.a_row_blocks, p.num_dw, p.a_col_blocks, sms);
  p.b_splits = column_splits(p.b_row_blocks, p.num_dw, p.b_col_blocks, sms);
  p.f_units = p.f_row_blocks * p.f_splits;
  p.a_units = p.a_row_blocks * p.a_splits * p.num_dw;
  p.b_units = p.b_row_blocks * p.b_splits * p.num_dw;
  p.reduce_ctas = clamp64(ceil_div(I * D, kThreads), 1, 4 * sms);
  p.forward_smem = forward_layout(c).total;
  p.backward_smem = backward_layout(c).total;
  p.forward_workspace = 2 * p.f_splits * I;
  p.da_part = 0;
  p.db_part = p.a_splits * I * D;
  p.dtau_part = p.db_part + p.b_splits * J * D;
  p.backward_workspace = p.dtau_part + p.reduce_ctas;
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
