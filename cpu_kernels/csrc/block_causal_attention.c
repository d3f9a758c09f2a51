/* Block-causal self-attention, forward and backward, float32, AVX-512 (cpu_kernels/c_attention.py calls it).
 *
 * For one (batch, head) slice: query row i reads keys [0, key_end[i]) (block-causal over scales: every token of a
 * scale sees the tokens of its own and the coarser scales), with the head dimension c = 64.
 *
 *   forward:  S = q kᵀ, P = softmax(scale · S) row by row over the keys it reads, o = P v, lse = log Σ exp(scale · S)
 *   backward: P again from lse, dv = Pᵀ do, dP = do vᵀ, dS = scale · P ∘ (dP − rowsum(do ∘ o)), dq = dS k, dk = dSᵀ q
 *
 * Queries go in blocks of BQ rows; a block's scores against the keys its last row reads (the most: key_end does not
 * decrease) fit in L2, so the softmax is exact per row (no running maximum) and nothing of size L × L is kept.
 * Every product is C (+)= A · B with B read in rows of 64 floats (k and v transposed once per slice), through one
 * register-blocked kernel: 6 rows × 64 columns of C in 24 registers, one broadcast of A per row and step.
 *
 * Tensors are (B, L, H, 64) views with any strides over b, t and h (c contiguous), so the kernel reads q, k, v from
 * the qkv projection's layout and writes the gradients into it. Slices [bh_begin, bh_end) of B·H let several
 * threads share a call (the caller splits; no state is shared). Returns 0, or 1 when memory ran out.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

#define C_HEAD 64   /* head dimension */
#define MR 6        /* rows of C per register block */
#define BQ 48       /* query rows per block */
#define KC 64       /* steps of a product summed apart before adding to its output */

static inline __mmask16 first_lanes(int n) { return (__mmask16)((1u << n) - 1u); }

/* C[mr × 64] (+)= Σ_k A[r·ars + k·aks] · B[k·ldb + 0..63], mr <= MR a constant after inlining. The sum goes in chunks
 * of KC steps, each formed in registers from zero and then added to C: the rounding grows with K / KC + KC, not K. */
static inline __attribute__((always_inline)) void block(const int mr, int K, const float *A, int64_t ars, int64_t aks,
                                                         const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate) {
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int k1 = K - k0 < KC ? K : k0 + KC;
        __m512 c[MR][4];
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++)
            if (r < mr)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) c[r][j] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const float *b = B + k * ldb, *a = A + k * aks;
            __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
#pragma GCC unroll 6
            for (int r = 0; r < MR; r++)
                if (r < mr) {
                    __m512 ar = _mm512_set1_ps(a[r * ars]);
                    c[r][0] = _mm512_fmadd_ps(ar, b0, c[r][0]);
                    c[r][1] = _mm512_fmadd_ps(ar, b1, c[r][1]);
                    c[r][2] = _mm512_fmadd_ps(ar, b2, c[r][2]);
                    c[r][3] = _mm512_fmadd_ps(ar, b3, c[r][3]);
                }
        }
        const int add = accumulate || k0 > 0;
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++)
            if (r < mr)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    float *cr = C + r * ldc + 16 * j;
                    _mm512_storeu_ps(cr, add ? _mm512_add_ps(_mm512_loadu_ps(cr), c[r][j]) : c[r][j]);
                }
    }
    if (K == 0 && !accumulate)
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(C + r * ldc + 16 * j, _mm512_setzero_ps());
}

/* C[M × N] (+)= A[M × K] · B[K × N], N a multiple of 64; A[m][k] at A[m·ars + k·aks] (a transposed A is a stride swap) */
static void gemm(int M, int N, int K, const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate) {
    for (int n0 = 0; n0 < N; n0 += 64) {
        int m0 = 0;
        for (; m0 + MR <= M; m0 += MR)
            block(MR, K, A + m0 * ars, ars, aks, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
        const float *a = A + m0 * ars;
        float *c = C + m0 * ldc + n0;
        switch (M - m0) {
            case 1: block(1, K, a, ars, aks, B + n0, ldb, c, ldc, accumulate); break;
            case 2: block(2, K, a, ars, aks, B + n0, ldb, c, ldc, accumulate); break;
            case 3: block(3, K, a, ars, aks, B + n0, ldb, c, ldc, accumulate); break;
            case 4: block(4, K, a, ars, aks, B + n0, ldb, c, ldc, accumulate); break;
            case 5: block(5, K, a, ars, aks, B + n0, ldb, c, ldc, accumulate); break;
            default: break;
        }
    }
}

static inline int round64(int n) { return (n + 63) & ~63; }

/* x's L rows (stride sx) transposed into xt[64][Lp], zero past L */
static void transpose_rows(const float *x, int64_t sx, int L, int Lp, float *xt) {
    for (int j = 0; j < C_HEAD; j++) {
        float *dst = xt + (int64_t)j * Lp;
        for (int t = 0; t < L; t++) dst[t] = x[t * sx + j];
        for (int t = L; t < Lp; t++) dst[t] = 0.f;
    }
}

/* One row of scores s[0..np) → probabilities over [0, n_keys), zeros after. With lse given: exp(scale·s − lse) (the
 * backward's recomputation); else the softmax of scale·s, returning its log-sum-exp. */
static float probabilities(float *s, int n_keys, int np, float scale, const float *lse) {
    const __m512 vscale = _mm512_set1_ps(scale);
    int j;
    if (lse) {
        const __m512 vlse = _mm512_set1_ps(*lse);
        for (j = 0; j + 16 <= n_keys; j += 16)
            _mm512_storeu_ps(s + j, exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, vlse)));
        if (j < n_keys) {
            _mm512_storeu_ps(s + j, _mm512_maskz_mov_ps(first_lanes(n_keys - j), exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, vlse))));
            j += 16;
        }
        for (; j < np; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
        return *lse;
    }
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (j = 0; j + 16 <= n_keys; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
    if (j < n_keys) vmax = _mm512_mask_max_ps(vmax, first_lanes(n_keys - j), vmax, _mm512_loadu_ps(s + j));
    const float max_scaled = _mm512_reduce_max_ps(vmax) * scale;
    const __m512 vmaxs = _mm512_set1_ps(max_scaled);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n_keys; j += 16) {
        __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, vmaxs));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_storeu_ps(s + j, e);
    }
    if (j < n_keys) {
        __m512 e = _mm512_maskz_mov_ps(first_lanes(n_keys - j), exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, vmaxs)));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_storeu_ps(s + j, e);
        j += 16;
    }
    for (; j < np; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
    const float sum = _mm512_reduce_add_ps(vsum);
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (j = 0; j < n_keys; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
    return max_scaled + logf(sum);
}

static float *alloc_floats(int64_t n) { return aligned_alloc(64, sizeof(float) * (size_t)round64((int)n)); }

/* Strides in floats, per (b, h, t) of a (B, L, H, 64) view. Forward: Lq query rows against Lk keys (the same L in
 * teacher forcing; a scale's queries against the KV cache in sampling), lse (B, H, Lq) contiguous, key_end[Lq] does
 * not decrease, 1 <= key_end[i] <= Lk. Backward: L rows and keys, lse and key_end as the forward's. */
int block_causal_attention_forward(int bh_begin, int bh_end, int H, int Lq, int Lk,
                                   const float *q, int64_t sqb, int64_t sqh, int64_t sqt, const float *k, int64_t skb, int64_t skh, int64_t skt,
                                   const float *v, int64_t svb, int64_t svh, int64_t svt, float *o, int64_t sob, int64_t soh, int64_t sot,
                                   float *lse, const int *key_end, float scale) {
    const int Lp = round64(Lk);
    float *kt = alloc_floats((int64_t)C_HEAD * Lp), *s = alloc_floats((int64_t)BQ * Lp);
    if (!kt || !s) { free(kt); free(s); return 1; }
    for (int bh = bh_begin; bh < bh_end; bh++) {
        const int b = bh / H, h = bh % H;
        const float *qs = q + b * sqb + h * sqh, *ks = k + b * skb + h * skh, *vs = v + b * svb + h * svh;
        float *os = o + b * sob + h * soh, *lses = lse + (int64_t)bh * Lq;
        transpose_rows(ks, skt, Lk, Lp, kt);
        for (int i0 = 0; i0 < Lq; i0 += BQ) {
            const int m = Lq - i0 < BQ ? Lq - i0 : BQ, n = key_end[i0 + m - 1], np = round64(n);
            gemm(m, np, C_HEAD, qs + i0 * sqt, sqt, 1, kt, Lp, s, np, 0);                  /* S = q kᵀ */
            for (int i = 0; i < m; i++) lses[i0 + i] = probabilities(s + i * np, key_end[i0 + i], np, scale, NULL);
            gemm(m, C_HEAD, n, s, np, 1, vs, svt, os + i0 * sot, sot, 0);                  /* o = P v */
        }
    }
    free(kt); free(s);
    return 0;
}

int block_causal_attention_backward(int bh_begin, int bh_end, int H, int L,
                                    const float *q, int64_t sqb, int64_t sqh, int64_t sqt, const float *k, int64_t skb, int64_t skh, int64_t skt,
                                    const float *v, int64_t svb, int64_t svh, int64_t svt, const float *o, int64_t sob, int64_t soh, int64_t sot,
                                    const float *go, int64_t sgb, int64_t sgh, int64_t sgt, const float *lse, const int *key_end, float scale,
                                    float *dq, int64_t sdqb, int64_t sdqh, int64_t sdqt, float *dk, int64_t sdkb, int64_t sdkh, int64_t sdkt,
                                    float *dv, int64_t sdvb, int64_t sdvh, int64_t sdvt) {
    const int Lp = round64(L);
    float *kt = alloc_floats((int64_t)C_HEAD * Lp), *vt = alloc_floats((int64_t)C_HEAD * Lp), *p = alloc_floats((int64_t)BQ * Lp),
          *ds = alloc_floats((int64_t)BQ * Lp), *dk_acc = alloc_floats((int64_t)Lp * C_HEAD), *dv_acc = alloc_floats((int64_t)Lp * C_HEAD),
          *delta = alloc_floats(Lp);
    int failed = !kt || !vt || !p || !ds || !dk_acc || !dv_acc || !delta;
    for (int bh = bh_begin; bh < bh_end && !failed; bh++) {
        const int b = bh / H, h = bh % H;
        const float *qs = q + b * sqb + h * sqh, *ks = k + b * skb + h * skh, *vs = v + b * svb + h * svh;
        const float *os = o + b * sob + h * soh, *gs = go + b * sgb + h * sgh, *lses = lse + (int64_t)bh * L;
        float *dqs = dq + b * sdqb + h * sdqh, *dks = dk + b * sdkb + h * sdkh, *dvs = dv + b * sdvb + h * sdvh;
        transpose_rows(ks, skt, L, Lp, kt);
        transpose_rows(vs, svt, L, Lp, vt);
        memset(dk_acc, 0, sizeof(float) * (size_t)L * C_HEAD);
        memset(dv_acc, 0, sizeof(float) * (size_t)L * C_HEAD);
        for (int i = 0; i < L; i++) {   /* rowsum(do ∘ o) */
            __m512 acc = _mm512_setzero_ps();
            for (int j = 0; j < C_HEAD; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(gs + i * sgt + j), _mm512_loadu_ps(os + i * sot + j), acc);
            delta[i] = _mm512_reduce_add_ps(acc);
        }
        for (int i0 = 0; i0 < L; i0 += BQ) {
            const int m = L - i0 < BQ ? L - i0 : BQ, n = key_end[i0 + m - 1], np = round64(n);
            gemm(m, np, C_HEAD, qs + i0 * sqt, sqt, 1, kt, Lp, p, np, 0);                  /* S = q kᵀ */
            for (int i = 0; i < m; i++) probabilities(p + i * np, key_end[i0 + i], np, scale, lses + i0 + i);
            gemm(m, np, C_HEAD, gs + i0 * sgt, sgt, 1, vt, Lp, ds, np, 0);                 /* dP = do vᵀ */
            const __m512 vscale = _mm512_set1_ps(scale);
            for (int i = 0; i < m; i++) {                                                   /* dS = scale · P ∘ (dP − δ) */
                const __m512 vdelta = _mm512_set1_ps(delta[i0 + i]);
                float *dsr = ds + i * np;
                const float *pr = p + i * np;
                for (int j = 0; j < np; j += 16)
                    _mm512_storeu_ps(dsr + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + j), _mm512_sub_ps(_mm512_loadu_ps(dsr + j), vdelta)), vscale));
            }
            gemm(m, C_HEAD, n, ds, np, 1, ks, skt, dqs + i0 * sdqt, sdqt, 0);              /* dq = dS k */
            gemm(n, C_HEAD, m, ds, 1, np, qs + i0 * sqt, sqt, dk_acc, C_HEAD, 1);          /* dk += dSᵀ q */
            gemm(n, C_HEAD, m, p, 1, np, gs + i0 * sgt, sgt, dv_acc, C_HEAD, 1);           /* dv += Pᵀ do */
        }
        for (int t = 0; t < L; t++) {
            memcpy(dks + t * sdkt, dk_acc + t * C_HEAD, sizeof(float) * C_HEAD);
            memcpy(dvs + t * sdvt, dv_acc + t * C_HEAD, sizeof(float) * C_HEAD);
        }
    }
    free(kt); free(vt); free(p); free(ds); free(dk_acc); free(dv_acc); free(delta);
    return failed;
}
