// Host-only unit test of plan.h (tile configurations, shared-memory layouts,
// launch geometry, argument checks). Built and run with g++ by
// tests/test_cuda_build.py; needs no GPU and no CUDA headers.
// Prints one line per failed check and exits non-zero when any failed.
#include <cstdio>
#include <string>
#include <vector>

#include "plan.h"

using namespace symile_cuda;

static int failures = 0;

#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
    }                                                        \
  } while (0)

static bool pow2_at_most_32(int v) { return v >= 1 && v <= 32 && (v & (v - 1)) == 0; }

static void check_config(int mode, int elem) {
  const TileConfig c = config_for(mode, elem);
  const int BP = tile_pairs(c);
  const char* name = elem == 8 ? "f64" : mode == kTf32 ? "tf32" : mode == kBf16 ? "bf16" : "f32";
  const bool wmma = elem == 4 && mode != kIeee;
  EXPECT(kThreads % BP == 0 && pow2_at_most_32(kThreads / BP), "%s: lanes per tile row", name);
  EXPECT(kThreads % c.BLOCK_K == 0 && pow2_at_most_32(kThreads / c.BLOCK_K), "%s: lanes per tile column", name);
  EXPECT(c.BLOCK_K <= BP, "%s: column statistics fit the BP-sized vectors", name);
  EXPECT(c.BLOCK_I <= 32 && c.BLOCK_J <= 32, "%s: per-row bookkeeping threads", name);
  // SIMT engine: a 16 x 16 thread grid.
  EXPECT(BP % 16 == 0 && c.BLOCK_K % 16 == 0 && c.BLOCK_DW % 16 == 0, "%s: tile sides split over 16 threads", name);
  if (wmma) {
    const int wk = mode == kTf32 ? 8 : 16;
    EXPECT(c.BLOCK_D % wk == 0 && c.BLOCK_K % wk == 0, "%s: reductions are whole WMMA k-steps", name);
    EXPECT(((BP / 16) * (c.BLOCK_K / 16)) % (kThreads / 32) == 0, "%s: logit tile pieces per warp", name);
    EXPECT(((BP / 16) * (c.BLOCK_DW / 16)) % (kThreads / 32) == 0, "%s: W tile pieces per warp", name);
    // ldm: a multiple of 16 bytes; 16 rows of any operand keep 32-byte alignment.
    const int lds_in[] = {c.BLOCK_D + c.pad_in, c.BLOCK_K + c.pad_in, c.BLOCK_DW + c.pad_in};
    for (int ld : lds_in) EXPECT(ld * c.in_size % 16 == 0, "%s: operand ldm %d", name, ld);
    const int lds_acc[] = {c.BLOCK_K + c.pad_acc, c.BLOCK_DW + c.pad_acc};
    for (int ld : lds_acc) EXPECT(ld * c.acc_size % 16 == 0, "%s: accumulator ldm %d", name, ld);
    EXPECT(16 * c.in_size % 32 == 0 || wk * c.in_size % 32 == 0, "%s: k offsets stay 32-byte aligned", name);
  }
  const ForwardLayout f = forward_layout(c);
  const BackwardLayout b = backward_layout(c);
  const std::size_t fo[] = {f.S, f.P, f.Z, f.pair_m, f.pair_s, f.row_l, f.row_ls, f.colm, f.colo, f.cols, f.roww,
                            f.total};
  for (std::size_t o : fo) EXPECT(o % kSmemAlign == 0, "%s: forward offset %zu aligned", name, o);
  const std::size_t bo[] = {b.S, b.G, b.P, b.Cd, b.Cw, b.W, b.dA, b.LA, b.gA, b.LB, b.gB, b.LC, b.gC, b.red, b.total};
  for (std::size_t o : bo) EXPECT(o % kSmemAlign == 0, "%s: backward offset %zu aligned", name, o);
  EXPECT(f.total <= kSmemLimit, "%s: forward needs %zu bytes", name, f.total);
  EXPECT(b.total <= kSmemLimit, "%s: backward needs %zu bytes", name, b.total);
  // Regions follow each other without overlap; W (stored after the k loop) may only reuse S..Cw.
  const std::size_t cw_end = b.Cw + tile_bytes(c.BLOCK_K, c.BLOCK_DW, c.pad_in, c.in_size);
  const std::size_t w_end = b.W + tile_bytes(BP, c.BLOCK_DW, c.pad_acc, c.acc_size);
  EXPECT(b.dA >= cw_end && b.dA >= w_end, "%s: dA after the S..Cw / W union", name);
  EXPECT(b.G >= b.S + tile_bytes(BP, c.BLOCK_K, c.pad_acc, c.acc_size), "%s: G after S", name);
  EXPECT(b.P >= b.G + tile_bytes(BP, c.BLOCK_K, c.pad_in, c.in_size), "%s: P after G", name);
  EXPECT(b.red + tile_bytes(1, kThreads, 0, c.acc_size) <= b.total, "%s: reduction buffer inside", name);
  EXPECT(f.Z >= f.P + tile_bytes(BP, c.BLOCK_D, c.pad_in, c.in_size), "%s: Z after P", name);
  EXPECT(f.row_l + tile_bytes(1, BP, 0, c.acc_size) <= f.total, "%s: forward vectors inside", name);
}

static void check_forward_plan(int64_t I, int64_t J, int64_t K, int64_t D, int sms, const TileConfig& c) {
  const CubeForwardPlan p = plan_cube_forward(I, J, K, D, c, sms);
  EXPECT(p.num_ib == ceil_div(I, c.BLOCK_I) && p.num_jb == ceil_div(J, c.BLOCK_J), "I=%lld J=%lld block counts",
         (long long)I, (long long)J);
  EXPECT(p.num_js >= 1 && p.num_js <= p.num_jb, "num_js=%lld within [1, %lld]", (long long)p.num_js,
         (long long)p.num_jb);
  EXPECT(p.units == p.num_ib * p.num_js, "units");
  EXPECT(p.ctas >= 1 && p.ctas <= 4 * (int64_t)sms, "ctas=%lld for %d SMs", (long long)p.ctas, sms);
  EXPECT(p.ctas * p.units_per_cta >= p.units && (p.ctas - 1) * p.units_per_cta < p.units,
         "every CTA gets work, every unit a CTA (units=%lld ctas=%lld per=%lld)", (long long)p.units,
         (long long)p.ctas, (long long)p.units_per_cta);
  // Walk the kernel's grid-stride loop: every (i-block, j-block) is visited exactly once.
  std::vector<int> seen(static_cast<std::size_t>(p.num_ib * p.num_jb), 0);
  for (int64_t cta = 0; cta < p.ctas; ++cta) {
    for (int64_t u = cta; u < p.units; u += p.ctas) {
      const int64_t ib = u / p.num_js, js = u % p.num_js;
      const int64_t first = split_begin(js, p.num_jb, p.num_js), last = split_begin(js + 1, p.num_jb, p.num_js);
      EXPECT(last > first, "split %lld of %lld is empty", (long long)js, (long long)p.num_js);
      for (int64_t jb = first; jb < last; ++jb) ++seen[static_cast<std::size_t>(ib * p.num_jb + jb)];
    }
  }
  int64_t wrong = 0;
  for (int s : seen) wrong += s != 1;
  EXPECT(wrong == 0, "I=%lld J=%lld sms=%d: %lld tiles not visited exactly once", (long long)I, (long long)J, sms,
         (long long)wrong);
  EXPECT(split_begin(p.num_js, p.num_jb, p.num_js) == p.num_jb, "splits end at the last j-block");
  EXPECT(p.smem == forward_layout(c, p.p_cols).total, "forward smem");
  // Full products cover every column of d in whole BLOCK_D chunks within the budget; else one chunk.
  if (p.full_products) {
    EXPECT(p.p_cols >= D && p.p_cols % c.BLOCK_D == 0 && p.p_cols < D + c.BLOCK_D && p.smem <= kForwardProductsSmem,
           "D=%lld: full products in %d columns, %zu bytes", (long long)D, p.p_cols, p.smem);
    EXPECT(c.pad_in == 1 || (p.p_cols + c.pad_in) * c.in_size % 16 == 0, "D=%lld: full-products ldm",
           (long long)D);  // tensor-core tiles (SIMT tiles keep odd strides)
  } else {
    EXPECT(p.p_cols == c.BLOCK_D && p.smem == forward_layout(c).total &&
               forward_layout(c, static_cast<int>(ceil_div(D, c.BLOCK_D) * c.BLOCK_D)).total > kForwardProductsSmem,
           "D=%lld: one chunk only when all of d does not fit", (long long)D);
  }
}

// Pair ops: every split holds column blocks, the units of each kernel own disjoint outputs,
// I = 4096 fills two CTAs per SM of a 132-SM GPU in every kernel.
static void check_pair_plan(int64_t I, int64_t J, int64_t D, int sms, const TileConfig& c) {
  const PairPlan p = plan_pair(I, J, D, c, sms);
  const char* fmt = "pair I=%lld J=%lld D=%lld sms=%d";
  const long long a[] = {(long long)I, (long long)J, (long long)D};
  EXPECT(p.f_splits >= 1 && p.f_splits <= p.f_col_blocks && p.a_splits <= p.a_col_blocks &&
             p.b_splits <= p.b_col_blocks,
         fmt, a[0], a[1], a[2], sms);
  EXPECT(p.f_col_blocks * c.BLOCK_K >= J && p.b_col_blocks * c.BLOCK_K >= I, fmt, a[0], a[1], a[2], sms);
  EXPECT(split_begin(p.f_splits, p.f_col_blocks, p.f_splits) == p.f_col_blocks, fmt, a[0], a[1], a[2], sms);
  EXPECT(p.f_units == p.f_row_blocks * p.f_splits && p.a_units == p.a_row_blocks * p.a_splits * p.num_dw &&
             p.b_units == p.b_row_blocks * p.b_splits * p.num_dw,
         fmt, a[0], a[1], a[2], sms);
  EXPECT(p.db_part == p.a_splits * I * D && p.dtau_part == p.db_part + p.b_splits * J * D &&
             p.backward_workspace == p.dtau_part + p.reduce_ctas && p.forward_workspace == 2 * p.f_splits * I,
         fmt, a[0], a[1], a[2], sms);
}

// Cube backward: slabs cover d and fit the limit; each pass's units own disjoint outputs
// (pairs: (i-split, j-split, slab); z: (k-block, i-split, slab)); the splits cover every block.
static void check_cube_backward_plan(int64_t I, int64_t J, int64_t K, int64_t D, int sms, int64_t limit,
                                     const TileConfig& c) {
  const CubeBackwardPlan p = plan_cube_backward(I, J, K, D, c, sms, limit);
  const char* fmt = "I=%lld J=%lld K=%lld D=%lld sms=%d limit=%lld";
  const long long a[] = {(long long)I, (long long)J, (long long)K, (long long)D};
  EXPECT(p.slab % kCubeChunk == 0 && p.slab >= kCubeChunk, fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  EXPECT(p.num_slabs * p.slab >= D && (p.num_slabs - 1) * p.slab < D, fmt, a[0], a[1], a[2], a[3], sms,
         (long long)limit);
  const bool one_chunk_fits = static_cast<int64_t>(cube_backward_layout(c, kCubeChunk, false).total) <= limit &&
                              static_cast<int64_t>(cube_backward_layout(c, kCubeChunk, true).total) <= limit;
  if (one_chunk_fits) {
    EXPECT(static_cast<int64_t>(p.pair_smem) <= limit && static_cast<int64_t>(p.z_smem) <= limit, fmt, a[0], a[1],
           a[2], a[3], sms, (long long)limit);
  }
  // A slab is as wide as d allows: one chunk more would exceed the limit.
  if (p.slab < ceil_div(D, kCubeChunk) * kCubeChunk) {
    EXPECT(static_cast<int64_t>(cube_backward_layout(c, p.slab + kCubeChunk, false).total) > limit ||
               static_cast<int64_t>(cube_backward_layout(c, p.slab + kCubeChunk, true).total) > limit,
           fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  }
  EXPECT(p.pair_is + p.pair_js + p.z_is <= kBackwardSplitBudget, fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  EXPECT(p.pair_units == p.pair_is * p.pair_js * p.num_slabs && p.z_units == p.num_kb * p.z_is * p.num_slabs, fmt,
         a[0], a[1], a[2], a[3], sms, (long long)limit);
  EXPECT(split_begin(p.pair_is, p.num_ib, p.pair_is) == p.num_ib && split_begin(p.pair_js, p.num_jb, p.pair_js) ==
             p.num_jb && split_begin(p.z_is, p.z_num_ib, p.z_is) == p.z_num_ib,
         fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  // Each pass counts blocks of its own tiles (cube_backward_config).
  const TileConfig cp = cube_backward_config(c, false), cz = cube_backward_config(c, true);
  EXPECT(p.num_ib == ceil_div(I, cp.BLOCK_I) && p.z_num_ib == ceil_div(I, cz.BLOCK_I) &&
             p.num_jb == ceil_div(J, cp.BLOCK_J) && p.num_kb == ceil_div(K, cz.BLOCK_K),
         fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  // Every split holds at least one block (splits never exceed the blocks).
  EXPECT(p.pair_is <= p.num_ib && p.pair_js <= p.num_jb && p.z_is <= p.z_num_ib, fmt, a[0], a[1], a[2], a[3], sms,
         (long long)limit);
  // Full products: all of d in whole kCubeChunk columns, taken where they fit two CTAs' share of the
  // SM, or the device's limit where the accumulators alone exceed that share.
  const int64_t d_cols = ceil_div(D, kCubeChunk) * kCubeChunk;
  auto need = [&](int pc) {
    return static_cast<int64_t>(max_size(cube_backward_layout(c, p.slab, false, pc).total,
                                         cube_backward_layout(c, p.slab, true, pc).total));
  };
  const int64_t two = two_cta_smem(limit);
  const bool fits = d_cols <= 4096 && (need(static_cast<int>(d_cols)) <= two ||
                                       (need(0) > two && need(static_cast<int>(d_cols)) <= limit));
  EXPECT(p.full_products == fits && p.p_cols == (fits ? d_cols : 0), fmt, a[0], a[1], a[2], a[3], sms,
         (long long)limit);
  EXPECT(p.pair_smem == cube_backward_layout(c, p.slab, false, p.p_cols).total &&
             p.z_smem == cube_backward_layout(c, p.slab, true, p.p_cols).total,
         fmt, a[0], a[1], a[2], a[3], sms, (long long)limit);
  for (bool z : {false, true}) {
    const TileConfig t = cube_backward_config(c, z);
    const int BP = tile_pairs(t);
    const CubeBackwardLayout l = cube_backward_layout(c, p.slab, z, p.p_cols);
    const bool full = p.p_cols > 0;
    // [begin, end) of each region; regions live at the same time must not overlap.
    struct R {
      std::size_t b, e;
    };
    const R S{l.S, l.S + tile_bytes(BP, t.BLOCK_K, t.pad_acc, t.acc_size)};
    const R P{l.P, l.P + (full ? 0 : tile_bytes(BP, t.BLOCK_D, t.pad_in, t.in_size))};
    const R Cd{l.Cd, l.Cd + kCubeBackwardStages * tile_bytes(t.BLOCK_K, t.BLOCK_D, t.pad_in, t.in_size)};
    const R Op{l.Op, l.Op + (z && full ? 0 : tile_bytes(z ? BP : t.BLOCK_K, kCubeChunk, t.pad_in, t.in_size))};
    const R G{l.G, l.G + tile_bytes(z ? t.BLOCK_K : BP, z ? BP : t.BLOCK_K, t.pad_in, t.in_size)};
    const R W{l.W, l.W + tile_bytes(z ? t.BLOCK_K : BP, static_cast<int>(p.slab), t.pad_acc, t.acc_size)};
    auto apart = [](R x, R y) { return x.e <= y.b || y.e <= x.b || x.b == x.e || y.b == y.e; };
    // tile_products: S, P and Cd together; tile_G: S and G; the contraction: G, Op and W.
    EXPECT(apart(S, P) && apart(S, Cd) && apart(P, Cd) && apart(S, G) && apart(G, Op) && apart(W, S) &&
               apart(W, P) && apart(W, Cd) && apart(W, G) && apart(W, Op),
           "cube backward regions (z=%d) overlap", int(z));
    const std::size_t tiles[] = {l.S, l.P, l.Cd, l.Op, l.G, l.W, l.Pf};
    for (std::size_t o : tiles) EXPECT(o % kSmemAlign == 0, "cube backward tile region at %zu aligned", o);
    // The packed vectors follow W, each on its element size, and Pf follows them.
    const std::size_t vec[] = {l.LA, l.gA, l.LB, l.gB, l.LC, l.gC, l.bcol, l.ref, l.arow, l.u};
    const int len[] = {t.BLOCK_I, t.BLOCK_I, t.BLOCK_J, t.BLOCK_J, t.BLOCK_K, t.BLOCK_K, t.BLOCK_K, BP, BP, BP};
    EXPECT(vec[0] == W.e, "cube backward vectors follow W");
    for (int q = 0; q < 10; ++q) {
      EXPECT(vec[q] % t.acc_size == 0 && (q == 9 || vec[q] + len[q] * t.acc_size == vec[q + 1]),
             "cube backward vector %d", q);
    }
    EXPECT(l.Pf == align_up(l.u + BP * t.acc_size) &&
               l.total == l.Pf + (full ? tile_bytes(BP, p.p_cols, t.pad_in, t.in_size) : 0),
           "cube backward Pf region");
    EXPECT(t.pad_in == 1 || (p.p_cols + t.pad_in) * t.in_size % 16 == 0, "cube backward Pf ldm");
  }
  EXPECT(p.dy_part == p.pair_js * I * D && p.dz_part == p.dy_part + p.pair_is * J * D &&
             p.dtau_part == p.dz_part + p.z_is * K * D && p.workspace == p.dtau_part + p.reduce_ctas,
         "cube backward workspace");
}

int main() {
  const int modes[][2] = {{kIeee, 4}, {kTf32, 4}, {kBf16, 4}, {kIeee, 8}};
  for (const auto& m : modes) check_config(m[0], m[1]);

  const int64_t sizes[] = {1, 2, 3, 7, 16, 17, 33, 64, 129, 1000, 4096};
  const int sms_list[] = {1, 3, 108, 132};
  for (const auto& m : modes) {
    const TileConfig c = config_for(m[0], m[1]);
    for (int64_t I : sizes)
      for (int64_t J : {int64_t(1), int64_t(5), int64_t(33), int64_t(4096)})
        for (int sms : sms_list)
          for (int64_t D : {int64_t(1), int64_t(48), int64_t(200), int64_t(256), int64_t(1000)})
            check_forward_plan(I, J, 7, D, sms, c);
    for (int64_t rows : sizes)
      for (int64_t D : {int64_t(1), int64_t(3), int64_t(48), int64_t(200), int64_t(256), int64_t(1000)})
        for (int sms : sms_list) check_pair_plan(rows, rows + 5, D, sms, c);
  }
  for (const auto& m : modes) {
    const TileConfig c = config_for(m[0], m[1]);
    for (int64_t N : {int64_t(1), int64_t(17), int64_t(130), int64_t(4096)})
      for (int64_t D : {int64_t(1), int64_t(64), int64_t(65), int64_t(256), int64_t(512), int64_t(1000)})
        for (int sms : {1, 2, 132})
          for (int64_t limit : {int64_t(101376), int64_t(232448), int64_t(40000)})
            check_cube_backward_plan(N, N + 3, N + 1, D, sms, limit, c);
  }
  // Where the forward keeps a pair block's products over all of d (kForwardProductsSmem).
  EXPECT(plan_cube_forward(64, 64, 64, 384, config_for(kBf16, 4), 132).full_products &&
             !plan_cube_forward(64, 64, 64, 385, config_for(kBf16, 4), 132).full_products,
         "bf16 full products up to d = 384");
  EXPECT(plan_cube_forward(64, 64, 64, 160, config_for(kTf32, 4), 132).full_products &&
             !plan_cube_forward(64, 64, 64, 161, config_for(kTf32, 4), 132).full_products,
         "TF32 full products up to d = 160");
  // Two CTAs per SM (issue 13): both backward passes fit two CTAs' share of an A100 SM (81 KiB) at
  // bf16 d <= 256 with full products (bf16 rows run the same tiles), up to d = 448 rebuilding them;
  // float32 (IEEE, TF32) up to d = 384 (full products to 128); float64 up to d = 192. Beyond, one
  // CTA per SM (the accumulators are d wide; narrower slabs would recompute the logits).
  const int64_t a100 = 166912;
  EXPECT(two_cta_smem(a100) == kTwoCtaSmemA100 && two_cta_smem(232448) == 115712, "two-CTA shares");
  for (const auto& m : modes) {
    const TileConfig c = config_for(m[0], m[1]);
    const int64_t top = m[1] == 8 ? 192 : m[0] == kBf16 ? 448 : 384;
    for (int64_t D = 1; D <= 512; D += (D < 64 ? 63 : 64)) {
      const CubeBackwardPlan p = plan_cube_backward(4096, 4096, 4096, D, c, 108, a100);
      const bool two = static_cast<int64_t>(max_size(p.pair_smem, p.z_smem)) <= kTwoCtaSmemA100;
      EXPECT(p.num_slabs == 1 && two == (D <= top), "mode %d/%d d=%lld on A100: %zu, %zu bytes", m[0], m[1],
             (long long)D, p.pair_smem, p.z_smem);
      if (m[0] == kBf16) {
        EXPECT(p.full_products == (D <= 256 || D > 448), "bf16 d=%lld full products", (long long)D);
      }
    }
  }
  // Per target: d = 512 in one slab where the device's shared memory allows (H100: 227 KiB).
  const CubeBackwardPlan h100 = plan_cube_backward(4096, 4096, 4096, 512, config_for(kBf16, 4), 132, 232448);
  EXPECT(h100.num_slabs == 1, "bf16 d=512 on H100: %lld slabs", (long long)h100.num_slabs);
  // Big sizes keep 64-bit arithmetic: N = 16384 at d = 256, and an N^2 * d past 2^31.
  const TileConfig f32 = config_for(kIeee, 4);
  const CubeForwardPlan big = plan_cube_forward(16384, 16384, 16384, 256, f32, 132);
  EXPECT(big.units == 4096 && big.ctas <= 528, "N=16384 plan: units=%lld ctas=%lld", (long long)big.units,
         (long long)big.ctas);
  EXPECT(big.ctas * 16384 * 4 < (int64_t(1) << 28), "N=16384 partial buffers stay small");
  const CubeBackwardPlan bigb = plan_cube_backward(16384, 16384, 16384, 256, f32, 132, 232448);
  EXPECT(bigb.pair_units >= 100 && bigb.z_units >= 264, "N=16384 backward units=%lld, %lld",
         (long long)bigb.pair_units, (long long)bigb.z_units);
  // The GPU suite's memory bound: N = 2048, d = 256 float32, backward workspace at most 48 MiB.
  const CubeBackwardPlan mid = plan_cube_backward(2048, 2048, 2048, 256, f32, 132, 232448);
  EXPECT(mid.workspace * 4 <= 48 * 1024 * 1024 + 4096, "N=2048 d=256 workspace %lld bytes",
         (long long)mid.workspace * 4);
  // Pair kernels at I = J = 4096 on 132 SMs: at least two CTAs per SM in every kernel.
  for (const auto& m : modes) {
    const PairPlan pp = plan_pair(4096, 4096, 256, config_for(m[0], m[1]), 132);
    EXPECT(pp.f_units >= 264 && pp.a_units >= 264 && pp.b_units >= 264, "pair I=4096 units %lld %lld %lld",
           (long long)pp.f_units, (long long)pp.a_units, (long long)pp.b_units);
  }

  // Argument checks.
  EXPECT(check_mode(0, 4).empty() && check_mode(1, 4).empty() && check_mode(2, 4).empty() && check_mode(0, 8).empty(),
         "valid modes accepted");
  EXPECT(check_mode(3, 4).find("mode must be 0") != std::string::npos, "bad mode named");
  EXPECT(check_mode(1, 8).find("float32") != std::string::npos, "TF32 on float64 refused");
  EXPECT(check_mode(0, 2).empty() && check_mode(1, 2).empty(), "16-bit tensors accepted");
  EXPECT(check_mode(0, 3).find("bfloat16 or float16") != std::string::npos, "odd element sizes refused");
  EXPECT(effective_mode(kIeee, 2, true) == kBf16 && effective_mode(kIeee, 2, false) == kTf32 &&
             effective_mode(kTf32, 4, false) == kTf32 && effective_mode(kIeee, 8, false) == kIeee,
         "16-bit rows choose their tensor-core tiles");
  EXPECT(check_sizes(3, 4, 5, 6).empty(), "valid sizes accepted");
  EXPECT(check_sizes(0, 4, 5, 6).find("x.size(0)") != std::string::npos, "empty x named");
  EXPECT(check_sizes(3, 4, 0, 6).find("z.size(0)") != std::string::npos, "empty z named");
  EXPECT(check_sizes(3, 4, 5, 0).find("feature size d") != std::string::npos, "d = 0 named");
  EXPECT(check_sizes(int64_t(1) << 31, 4, 5, 6).find("2^31") != std::string::npos, "huge I refused");
  EXPECT(check_pair_sizes(3, 3, 2).empty() && check_pair_sizes(3, 8, 2).empty(), "valid pair sizes accepted");
  EXPECT(check_pair_sizes(4, 3, 2).find("b.size(0) (J) must be >= a.size(0)") != std::string::npos, "J < I refused");
  EXPECT(check_pair_sizes(0, 3, 2).find("a.size(0)") != std::string::npos, "empty a named");
  EXPECT(check_pair_sizes(3, 3, 0).find("feature size d") != std::string::npos, "pair d = 0 named");
  EXPECT(check_smem(1000, 999).find("1000 bytes") != std::string::npos && check_smem(999, 999).empty(), "smem check");

  if (failures == 0) std::printf("plan_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
