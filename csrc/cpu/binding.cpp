// Fused CPU kernels of the "cpu" backend (docs/math.md sections 2 and 3): their registration as torch
// operators. The kernels are split by job: cube.cpp (the M = 3 cube), pair.cpp (the pair LSE),
// common.h (what both use: LSE accumulators, row passes, checks), ops.h (the operators' C++
// declarations), tile_mm.h (one tile product), vec_rows.h (vectorised float32 row passes).
//
// Operators (namespace symile_kernels, CPU dispatch key):
//   cpu_cube_lse_forward(x, y, z, tau) -> (La, Lb, Lc)
//   cpu_cube_lse_backward(x, y, z, tau, La, Lb, Lc, gLa, gLb, gLc, need_dx, need_dy, need_dz, need_dtau)
//     -> (dx, dy, dz, dtau)
//   cpu_pair_lse_forward(a, b, pos, tau) -> L
//   cpu_pair_lse_backward(a, b, pos, tau, L, gL, need_da, need_db, need_dpos, need_dtau)
//     -> (da, db, dpos, dtau)
// with the semantics of symile_kernels/backends.py. Their fake (meta) kernels are
// registered in Python (symile_kernels/cpu.py).
//
// Layout of the work (the chunked backend, symile_kernels/chunked.py, is the
// readable blueprint):
//  * The cube tau*T[i,j,k] is cut into tiles of BLOCK_I x BLOCK_J anchor/partner
//    row pairs (the rows of XY[(i,j)] = x[i] * y[j]) by BLOCK_K columns; one tile
//    S = XY @ (tau z[k-block])^T is one matrix product (tile_mm.h: oneDNN's
//    micro-kernels for float32, BLAS for float64) into a per-thread workspace,
//    followed by vectorised passes over it while it is hot in cache. The cube is
//    never held: extra memory is O(N*d + N) plus per-slice partials and the
//    per-thread tiles.
//  * Cube: the i range is split into a fixed number of slices (contiguous runs of
//    i-blocks, at most kMaxSlices, independent of the thread count) that the
//    at::parallel_for threads take one at a time from a shared counter. A slice
//    owns its rows of La and dx; reductions over i (Lb, Lc, dy, dz, dtau) go to
//    per-slice partial buffers that are combined in slice order at the end. The
//    reduction order is therefore fixed: the result does not depend on the number
//    of threads (up to 16 threads; beyond that the slice count follows the thread
//    count), only on the problem size. The extension must be compiled with
//    -fopenmp for at::parallel_for to use more than one thread (setup.py does).
//  * Pair: work items are i-blocks; the reduction over i (db) is folded into db
//    in i-block order as the blocks finish (see pair_backward_kernel), so the
//    result does not depend on the thread count at all.
//  * Elementwise passes over float32 tiles use vec_rows.h: AVX-512, AVX2 or plain
//    loops chosen at run time, with a vectorised exponential (<= 2 ulp).
//  * Log-sum-exps are kept as (m, s) pairs, value = m + log(s), in double, with
//    a running maximum m, so tau = 100 (logits in [-100, 100]) cannot overflow.
#include <torch/library.h>

#include "ops.h"

// FRAGMENT: the symile_kernels namespace is shared with the Python custom ops
// (symile_kernels/ops.py) and the CUDA backend.
TORCH_LIBRARY_FRAGMENT(symile_kernels, m) {
  m.def("cpu_cube_lse_forward(Tensor x, Tensor y, Tensor z, Tensor tau) -> (Tensor, Tensor, Tensor)");
  // The bool flags: which gradients to compute (an unneeded one comes back as an empty (0,) tensor).
  m.def("cpu_cube_lse_backward(Tensor x, Tensor y, Tensor z, Tensor tau, Tensor La, Tensor Lb, Tensor Lc, "
        "Tensor gLa, Tensor gLb, Tensor gLc, bool need_dx=True, bool need_dy=True, bool need_dz=True, "
        "bool need_dtau=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_pair_lse_forward(Tensor a, Tensor b, Tensor pos, Tensor tau) -> Tensor");
  m.def("cpu_pair_lse_backward(Tensor a, Tensor b, Tensor pos, Tensor tau, Tensor L, Tensor gL, "
        "bool need_da=True, bool need_db=True, bool need_dpos=True, bool need_dtau=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_pair_lse_forward_grads(Tensor a, Tensor b, Tensor pos, Tensor tau, bool need_U, bool need_V) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symile_kernels, CPU, m) {
  m.impl("cpu_cube_lse_forward", &symile_cpu::cube_lse_forward);
  m.impl("cpu_cube_lse_backward", &symile_cpu::cube_lse_backward);
  m.impl("cpu_pair_lse_forward", &symile_cpu::pair_lse_forward);
  m.impl("cpu_pair_lse_backward", &symile_cpu::pair_lse_backward);
  m.impl("cpu_pair_lse_forward_grads", &symile_cpu::pair_lse_forward_grads);
}
