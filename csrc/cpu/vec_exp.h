// Vec::exp of a SIMD Vec (vec_rows.h): e^x by Cody-Waite range reduction,
// x = n ln2 + r with |r| <= ln2 / 2, Cephes' degree-6 polynomial for e^r, and
// Vec::scale2n for the 2^n (the one step that differs between instruction sets).
// Arguments are clamped to [kExpLo, kExpHi] with the argument as the second
// operand of min and max, which x86 returns when either operand is NaN: a NaN
// passes through, -inf gives 0 and +inf gives inf.
// No include guard: included once per instruction set, inside its target region.

inline Vec Vec::exp(Vec a) {
  const Vec x = max(set1(kExpLo), min(set1(kExpHi), a));
  const Vec n = round_nearest(mul(x, set1(kLog2e)));
  Vec r = fnmadd(n, set1(kLn2Hi), x);  // exact: ln2_hi has 9 significant bits
  r = fnmadd(n, set1(kLn2Lo), r);
  Vec p = set1(kP0);
  p = fmadd(p, r, set1(kP1));
  p = fmadd(p, r, set1(kP2));
  p = fmadd(p, r, set1(kP3));
  p = fmadd(p, r, set1(kP4));
  p = fmadd(p, r, set1(kP5));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale2n(p, n);
}
