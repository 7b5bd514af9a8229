/* The elementwise arithmetic, written once for the plain loops and the scalar tails of
 * the intrinsics loops.  Included by bnfast_kernels_impl.h with T, BNF_TO_D and
 * BNF_FROM_D (an element to double, a double rounded to an element), BNF_ELEM(name)
 * and BNF_ELEM_FN (the functions' attributes) defined; for float16 once more per
 * intrinsics level, with F16C's scalar conversions (bnfast_kernels_simd.h).
 *
 * y = (x - mean) * scale + shift, dx = a * ((dy - k1) - (x - mean) * k2), and dx = a * dy
 * with the statistics held fixed; in double, rounded once.  Each product is added by
 * C's fma(), rounded once, as the intrinsics loops' fused multiply-adds: the x86-64-v3
 * and -v4 clones and arm64 builds compile it to an instruction; the baseline x86-64
 * clone (a CPU without FMA) calls libm's, exact but a call per element.  The same bits
 * either way.  (Fused, (64, 256, 28, 28) float32 training took 0.89x the time.) */
BNF_ELEM_FN T BNF_ELEM(norm_elem)(T x, double mean, double scale, double shift)
{
    return BNF_FROM_D(fma(BNF_TO_D(x) - mean, scale, shift));
}

BNF_ELEM_FN T BNF_ELEM(dx_elem)(T g, T x, double mean, double a, double k1, double k2)
{
    return BNF_FROM_D(a * fma(-(BNF_TO_D(x) - mean), k2, BNF_TO_D(g) - k1));
}

BNF_ELEM_FN T BNF_ELEM(dx_fixed_elem)(T g, double a)
{
    return BNF_FROM_D(BNF_TO_D(g) * a);
}

/* The reductions' arithmetic, likewise: one element into the shifted sums (d = x - shift:
 * s1 += d, s2 += d^2), four rows of a column paired as (0 + 1) + (2 + 3), and the same for
 * the backward sums (sum dy, sum dy (x - mean), sum (x - mean)).  BNF_COMPENSATED
 * (float64): s2 + *s2lo compensated (bnf_two_sum), the square rounded first, and s1 +
 * *s1lo too where s1lo is given (the rows form: a column's sum is one chain of up to
 * 4K adds); else s2lo and s1lo are not touched (NULL, BNF_LO). */
BNF_ELEM_FN void BNF_ELEM(sums_elem)(T x, double shift, double *s1, double *s2,
                                     double *s2lo, double *s1lo)
{
    double d = BNF_TO_D(x) - shift;
#if BNF_COMPENSATED
    if (s1lo)
        bnf_two_sum(s1, s1lo, d);
    else
        *s1 += d;
    bnf_two_sum(s2, s2lo, d * d);
#else
    (void)s2lo;
    (void)s1lo;
    *s1 += d;
    *s2 = fma(d, d, *s2);
#endif
}

BNF_ELEM_FN void BNF_ELEM(sums_elem4)(T x0, T x1, T x2, T x3, double shift, double *s1,
                                      double *s2, double *s2lo, double *s1lo)
{
    double d0 = BNF_TO_D(x0) - shift, d1 = BNF_TO_D(x1) - shift;
    double d2 = BNF_TO_D(x2) - shift, d3 = BNF_TO_D(x3) - shift;
#if BNF_COMPENSATED
    if (s1lo)
        bnf_two_sum(s1, s1lo, (d0 + d1) + (d2 + d3));
    else
        *s1 += (d0 + d1) + (d2 + d3);
#else
    (void)s1lo;
    *s1 += (d0 + d1) + (d2 + d3);
#endif
#if BNF_COMPENSATED
    bnf_two_sum(s2, s2lo, fma(d0, d0, d1 * d1) + fma(d2, d2, d3 * d3));
#else
    (void)s2lo;
    *s2 += fma(d0, d0, d1 * d1) + fma(d2, d2, d3 * d3);
#endif
}

/* The backward sums: BNF_COMPENSATED (float64), sum dy and sum dy (x - mean) compensated
 * into s1 + *s1lo and s2 + *s2lo (the product rounded first); sum (x - mean), which only
 * recovers the mean's last bits, plain. */
BNF_ELEM_FN void BNF_ELEM(bwd_elem)(T g, T x, double mean, double *s1, double *s2,
                                    double *s3, double *s1lo, double *s2lo)
{
    double gi = BNF_TO_D(g), d = BNF_TO_D(x) - mean;
#if BNF_COMPENSATED
    bnf_two_sum(s1, s1lo, gi);
    bnf_two_sum(s2, s2lo, gi * d);
#else
    (void)s1lo;
    (void)s2lo;
    *s1 += gi;
    *s2 = fma(gi, d, *s2);
#endif
    *s3 += d;
}

BNF_ELEM_FN void BNF_ELEM(bwd_elem4)(T g0, T g1, T g2, T g3, T x0, T x1, T x2, T x3,
                                     double mean, double *s1, double *s2, double *s3,
                                     double *s1lo, double *s2lo)
{
    double a0 = BNF_TO_D(g0), a1 = BNF_TO_D(g1), a2 = BNF_TO_D(g2), a3 = BNF_TO_D(g3);
    double d0 = BNF_TO_D(x0) - mean, d1 = BNF_TO_D(x1) - mean;
    double d2 = BNF_TO_D(x2) - mean, d3 = BNF_TO_D(x3) - mean;
#if BNF_COMPENSATED
    bnf_two_sum(s1, s1lo, (a0 + a1) + (a2 + a3));
    bnf_two_sum(s2, s2lo, fma(a0, d0, a1 * d1) + fma(a2, d2, a3 * d3));
#else
    (void)s1lo;
    (void)s2lo;
    *s1 += (a0 + a1) + (a2 + a3);
    *s2 += fma(a0, d0, a1 * d1) + fma(a2, d2, a3 * d3);
#endif
    *s3 += (d0 + d1) + (d2 + d3);
}
