// Elementwise passes over one float32 tile row, written once over a vector type
// `Vec` that the including file defines (see vec_rows.h, which includes this
// file once per instruction set inside its own namespace and target region).
// Every pass computes at most one exponential per element. Remainders shorter
// than Vec::W use std::exp.
//
// Vec provides: W (lanes), load, store, set1, add, sub, mul, fmadd(a, b, c) = a * b + c,
// max, exp, hsum, hmax, and a double accumulator Acc with acc_zero, acc_fma(acc, a, b)
// (acc += a * b, exact products) and acc_sum. No include guard: included once per instruction set.

inline float row_max(const float* s, int64_t n) {
  Vec m = Vec::set1(-std::numeric_limits<float>::infinity());
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) m = Vec::max(m, Vec::load(s + k));
  float r = Vec::hmax(m);
  for (; k < n; ++k) r = std::max(r, s[k]);
  return r;
}

// Returns sum_k e^(s[k] - ref).
inline double exp_row_sum(const float* s, int64_t n, float ref) {
  const Vec ref_v = Vec::set1(ref);
  Vec t = Vec::set1(0.0f);
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) t = Vec::add(t, Vec::exp(Vec::sub(Vec::load(s + k), ref_v)));
  double total = Vec::hsum(t);
  for (; k < n; ++k) total += std::exp(s[k] - ref);
  return total;
}

// Returns sum_k e^(s[k] - ref) and adds w * e^(s[k] - ref) to col_sum[k].
inline double exp_row_col_sum(const float* s, int64_t n, float ref, float w, float* col_sum) {
  const Vec neg_ref = Vec::set1(-ref), w_v = Vec::set1(w);
  Vec t = Vec::set1(0.0f);
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) {
    const Vec e = Vec::exp(Vec::add(Vec::load(s + k), neg_ref));
    t = Vec::add(t, e);
    Vec::store(col_sum + k, Vec::fmadd(w_v, e, Vec::load(col_sum + k)));
  }
  double total = Vec::hsum(t);
  for (; k < n; ++k) {
    const float e = std::exp(s[k] - ref);
    total += e;
    col_sum[k] += w * e;
  }
  return total;
}

// In place: s[k] <- scale * e^(s[k] - ref).
inline void exp_row_scale(float* s, int64_t n, float ref, float scale) {
  const Vec neg_ref = Vec::set1(-ref), scale_v = Vec::set1(scale);
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W)
    Vec::store(s + k, Vec::mul(scale_v, Vec::exp(Vec::add(Vec::load(s + k), neg_ref))));
  for (; k < n; ++k) s[k] = scale * std::exp(s[k] - ref);
}

// In place, the cube backward's shared form: s[k] <- e^(s[k] - ref) * (a + u * gv[k]).
// With kDot, also returns sum_k G[k] * S[k] (S the logits read, G the values written)
// accumulated in double from exact double products: the tau gradient's share of the
// row (docs/math.md section 2: dtau = sum G T), whose terms largely cancel against
// the positive part, so float32 sums of them would bias it (Vec::Acc, vec_rows.h).
template <bool kDot>
inline double g_row_shared(float* s, int64_t n, float ref, float a, float u, const float* gv) {
  const Vec neg_ref = Vec::set1(-ref), a_v = Vec::set1(a), u_v = Vec::set1(u);
  typename Vec::Acc acc = Vec::acc_zero();
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) {
    const Vec v = Vec::load(s + k);
    const Vec g = Vec::mul(Vec::exp(Vec::add(v, neg_ref)), Vec::fmadd(u_v, Vec::load(gv + k), a_v));
    if (kDot) Vec::acc_fma(acc, g, v);
    Vec::store(s + k, g);
  }
  double dot = kDot ? Vec::acc_sum(acc) : 0.0;
  for (; k < n; ++k) {
    const float g = std::exp(s[k] - ref) * (a + u * gv[k]);
    if (kDot) dot += static_cast<double>(g) * s[k];
    s[k] = g;
  }
  return dot;
}

// In place, the cube backward's two-exponential form: s[k] <- a e^(s[k] - ref) + gLc[k] e^(s[k] - Lc[k]);
// with kDot, returns sum_k G[k] * S[k] as g_row_shared does.
template <bool kDot>
inline double g_row_two(float* s, int64_t n, float ref, float a, const float* Lc, const float* gLc) {
  const Vec neg_ref = Vec::set1(-ref), a_v = Vec::set1(a);
  typename Vec::Acc acc = Vec::acc_zero();
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) {
    const Vec v = Vec::load(s + k);
    const Vec ea = Vec::exp(Vec::add(v, neg_ref));
    const Vec ec = Vec::exp(Vec::sub(v, Vec::load(Lc + k)));
    const Vec g = Vec::fmadd(a_v, ea, Vec::mul(Vec::load(gLc + k), ec));
    if (kDot) Vec::acc_fma(acc, g, v);
    Vec::store(s + k, g);
  }
  double dot = kDot ? Vec::acc_sum(acc) : 0.0;
  for (; k < n; ++k) {
    const float g = a * std::exp(s[k] - ref) + gLc[k] * std::exp(s[k] - Lc[k]);
    if (kDot) dot += static_cast<double>(g) * s[k];
    s[k] = g;
  }
  return dot;
}

// out[k] = e^(x[k]) (the accuracy test's entry point; remainders use Vec::exp too,
// through a padded copy, so that every element is the vector routine's).
inline void exp_array(const float* x, int64_t n, float* out) {
  int64_t k = 0;
  for (; k + Vec::W <= n; k += Vec::W) Vec::store(out + k, Vec::exp(Vec::load(x + k)));
  if (k < n) {
    float in[Vec::W], res[Vec::W];
    for (int64_t c = 0; c < Vec::W; ++c) in[c] = k + c < n ? x[k + c] : 0.0f;
    Vec::store(res, Vec::exp(Vec::load(in)));
    for (int64_t c = 0; k + c < n; ++c) out[k + c] = res[c];
  }
}
