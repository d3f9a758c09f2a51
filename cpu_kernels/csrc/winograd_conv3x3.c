/* 3×3 convolution, stride 1, zero padding 1, float32, by Winograd's F(4×4, 3×3), AVX-512 (cpu_kernels/c_winograd.py).
 *
 * A 4×4 tile of output comes from a 6×6 tile of input with 36 products per (input, output) channel pair instead of
 * 144 (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
 *
 *   y_tile = Aᵀ [ U ∘ (Bᵀ d B) ] A,   U = G g Gᵀ (the 3×3 weights, transformed once by the caller)
 *
 * summed over input channels, which makes the middle step 36 matrix products, one per position p of the 6×6 tile:
 * M[p] (tiles × O) = V[p] (tiles × C) · U[p] (C × O). Tiles go in blocks of TB; a block's V and M (36·TB·C and
 * 36·TB·O floats) stay in L2 while U streams through, and the block's input and output transforms run before and
 * after its products. Every vector is 16 channels: x and y are channels-last (B, H, W, C) / (B, H, W, O), C and O
 * multiples of 16. The products use one register block, 6 tiles × 64 output channels in 24 registers.
 *
 * Tiles [tile_begin, tile_end) of B · ceil(H/4) · ceil(W/4) (in image, tile row, tile column order) let several threads
 * share a call (the caller splits; no state is shared). Returns 0, or 1 when memory ran out.
 * `winograd_weights` makes U from the weights, input channels [c_begin, c_end) a call.
 *
 * Two layers before a conv can be folded into its input transform, which reads each input pixel anyway: a nearest
 * ×2 upsampling (`up`: x is H/2 × W/2 and never upsampled in memory) and a group norm followed by SiLU (`scale_BC`,
 * `shift_BC`: the norm as a per-image, per-channel affine map from the statistics `channel_sums` gathers). The zero
 * padding stays zero: it pads the conv's input, after both.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

#define MR 6      /* tiles per register block */
#define NP 36     /* positions of a 6×6 tile */

/* Bᵀ applied to six vectors d[0..5] (one column or row of a tile), written to t[0..5 · ts] */
static inline void input_1d(const __m512 d0, const __m512 d1, const __m512 d2, const __m512 d3, const __m512 d4,
                            const __m512 d5, __m512 *t, int ts) {
    const __m512 four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f), two = _mm512_set1_ps(2.f);
    t[0 * ts] = _mm512_fmadd_ps(four, d0, _mm512_fnmadd_ps(five, d2, d4));
    t[1 * ts] = _mm512_fnmadd_ps(four, _mm512_add_ps(d1, d2), _mm512_add_ps(d3, d4));
    t[2 * ts] = _mm512_fmadd_ps(four, _mm512_sub_ps(d1, d2), _mm512_sub_ps(d4, d3));
    t[3 * ts] = _mm512_fmadd_ps(two, _mm512_sub_ps(d3, d1), _mm512_sub_ps(d4, d2));
    t[4 * ts] = _mm512_fmadd_ps(two, _mm512_sub_ps(d1, d3), _mm512_sub_ps(d4, d2));
    t[5 * ts] = _mm512_fmadd_ps(four, d1, _mm512_fnmadd_ps(five, d3, d5));
}

/* Aᵀ applied to six vectors m[0..5], written to s[0..3 · ss] */
static inline void output_1d(const __m512 m0, const __m512 m1, const __m512 m2, const __m512 m3, const __m512 m4,
                             const __m512 m5, __m512 *s, int ss) {
    const __m512 a = _mm512_add_ps(m1, m2), b = _mm512_sub_ps(m1, m2), c = _mm512_add_ps(m3, m4), d = _mm512_sub_ps(m3, m4);
    s[0 * ss] = _mm512_add_ps(_mm512_add_ps(m0, a), c);
    s[1 * ss] = _mm512_fmadd_ps(_mm512_set1_ps(2.f), d, b);
    s[2 * ss] = _mm512_fmadd_ps(_mm512_set1_ps(4.f), c, a);
    s[3 * ss] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.f), d, b), m5);
}

/* The conv's input at (yy, xx) inside its H × W, channels c0 .. c0+15: x itself, or x nearest-upsampled ×2 (x is then
 * H/2 × W/2), then, where `scale` is given, silu(scale · x + shift) per channel (a group norm and SiLU before the conv) */
static inline __m512 conv_input(const float *x_hwC, int W, int C, int up, const float *scale, const float *shift,
                                int yy, int xx, int c0) {
    const int w = up ? W / 2 : W;
    __m512 v = _mm512_loadu_ps(x_hwC + ((int64_t)(yy >> up) * w + (xx >> up)) * C + c0);
    if (scale) v = silu512(_mm512_fmadd_ps(v, _mm512_loadu_ps(scale + c0), _mm512_loadu_ps(shift + c0)));
    return v;
}

/* V[p][r][c0 .. c0+15] = (Bᵀ d B)[p] for the tile whose input starts at (y0, x0) of the conv's input (zero outside) */
static void transform_input(const float *x_hwC, int H, int W, int C, int up, const float *scale, const float *shift,
                            int y0, int x0, int c0, float *V, int64_t vps) {
    __m512 d[6][6], t[6][6];
    const int inside = y0 >= 0 && x0 >= 0 && y0 + 6 <= H && x0 + 6 <= W;
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++) {
            const int yy = y0 + i, xx = x0 + j;
            d[i][j] = inside || (yy >= 0 && yy < H && xx >= 0 && xx < W)
                ? conv_input(x_hwC, W, C, up, scale, shift, yy, xx, c0) : _mm512_setzero_ps();
        }
    for (int j = 0; j < 6; j++) input_1d(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], &t[0][j], 6);
    for (int a = 0; a < 6; a++) {
        __m512 v[6];
        input_1d(t[a][0], t[a][1], t[a][2], t[a][3], t[a][4], t[a][5], v, 1);
        for (int b = 0; b < 6; b++) _mm512_store_ps(V + (a * 6 + b) * vps + c0, v[b]);
    }
}

/* y[(y0 + i, x0 + j)][o0 .. o0+15] = (Aᵀ M A)[i][j] + bias for the rows and columns inside the image */
static void transform_output(const float *M, int64_t mps, int o0, const float *bias, float *y_HWO, int H, int W, int O,
                             int y0, int x0) {
    __m512 t[4][6], s[4][4];
    for (int b = 0; b < 6; b++) {
        const float *m = M + b * mps + o0;
        output_1d(_mm512_load_ps(m), _mm512_load_ps(m + 6 * mps), _mm512_load_ps(m + 12 * mps), _mm512_load_ps(m + 18 * mps),
                  _mm512_load_ps(m + 24 * mps), _mm512_load_ps(m + 30 * mps), &t[0][b], 6);
    }
    for (int i = 0; i < 4; i++) output_1d(t[i][0], t[i][1], t[i][2], t[i][3], t[i][4], t[i][5], &s[i][0], 1);
    const __m512 bias16 = bias ? _mm512_loadu_ps(bias + o0) : _mm512_setzero_ps();
    for (int i = 0; i < 4 && y0 + i < H; i++)
        for (int j = 0; j < 4 && x0 + j < W; j++)
            _mm512_storeu_ps(y_HWO + ((int64_t)(y0 + i) * W + x0 + j) * O + o0, _mm512_add_ps(s[i][j], bias16));
}

/* Mp[r][o0 + 16·nv] = Σ_c Vp[r][c] · Up[c][o0 + 16·nv] for r < MR, nv <= 4 a constant after inlining */
static inline __attribute__((always_inline)) void product_block(const int nv, int C, const float *Vp, const float *Up,
                                                                int O, float *Mp) {
    __m512 acc[MR][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            if (j < nv) acc[r][j] = _mm512_setzero_ps();
    for (int c = 0; c < C; c++) {
        __m512 u[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            if (j < nv) u[j] = _mm512_loadu_ps(Up + (int64_t)c * O + 16 * j);
#pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            const __m512 v = _mm512_set1_ps(Vp[r * C + c]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
                if (j < nv) acc[r][j] = _mm512_fmadd_ps(v, u[j], acc[r][j]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            if (j < nv) _mm512_store_ps(Mp + r * O + 16 * j, acc[r][j]);
}

static void products(int rows, int C, int O, const float *V, const float *U, float *M, int64_t vps, int64_t ups, int64_t mps) {
    for (int p = 0; p < NP; p++)
        for (int o0 = 0; o0 < O; o0 += 64) {
            const float *Up = U + p * ups + o0;
            for (int r0 = 0; r0 < rows; r0 += MR) {
                const float *Vp = V + p * vps + (int64_t)r0 * C;
                float *Mp = M + p * mps + (int64_t)r0 * O + o0;
                switch (O - o0 >= 64 ? 4 : (O - o0) / 16) {
                    case 4: product_block(4, C, Vp, Up, O, Mp); break;
                    case 3: product_block(3, C, Vp, Up, O, Mp); break;
                    case 2: product_block(2, C, Vp, Up, O, Mp); break;
                    default: product_block(1, C, Vp, Up, O, Mp); break;
                }
            }
        }
}

/* Tiles per block: V and M of a block about 384 KiB each, a multiple of MR, at least MR */
static int tiles_per_block(int C, int O) {
    const int widest = C > O ? C : O;
    int tb = (384 * 1024 / (NP * 4 * widest)) / MR * MR;
    return tb < MR ? MR : tb;
}

/* G applied to three vectors g[0..2] (a row or column of 3×3 weights), written to r[0..5 · rs] */
static inline void weight_1d(const __m512 g0, const __m512 g1, const __m512 g2, __m512 *r, int rs) {
    const __m512 sixth = _mm512_set1_ps(1.f / 6.f), g02 = _mm512_add_ps(g0, g2);
    const __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 24.f), g0, _mm512_mul_ps(sixth, g2)), q = _mm512_mul_ps(_mm512_set1_ps(1.f / 12.f), g1);
    r[0 * rs] = _mm512_mul_ps(_mm512_set1_ps(0.25f), g0);
    r[1 * rs] = _mm512_mul_ps(_mm512_set1_ps(-1.f / 6.f), _mm512_add_ps(g02, g1));
    r[2 * rs] = _mm512_mul_ps(_mm512_set1_ps(-1.f / 6.f), _mm512_sub_ps(g02, g1));
    r[3 * rs] = _mm512_add_ps(p, q);
    r[4 * rs] = _mm512_sub_ps(p, q);
    r[5 * rs] = g2;
}

/* U[a·6 + b][c][o] = (G g[o][c] Gᵀ)[a][b] for input channels [c_begin, c_end); g_C9O holds g[o][c][i][j] at (c·9 + i·3 + j)·O + o */
int winograd_weights(int c_begin, int c_end, int C, int O, const float *g_C9O, float *U_PCO) {
    for (int c = c_begin; c < c_end; c++)
        for (int o0 = 0; o0 < O; o0 += 16) {
            __m512 g[3][3], t[6][3], u[6][6];
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 3; j++) g[i][j] = _mm512_loadu_ps(g_C9O + ((int64_t)c * 9 + i * 3 + j) * O + o0);
            for (int j = 0; j < 3; j++) weight_1d(g[0][j], g[1][j], g[2][j], &t[0][j], 3);
            for (int a = 0; a < 6; a++) weight_1d(t[a][0], t[a][1], t[a][2], &u[a][0], 1);
            for (int a = 0; a < 6; a++)
                for (int b = 0; b < 6; b++) _mm512_storeu_ps(U_PCO + ((int64_t)(a * 6 + b) * C + c) * O + o0, u[a][b]);
        }
    return 0;
}

/* sums_R2C[r][0][c], [r][1][c] = Σ x, Σ x² over the W pixels of row r of x (rows [row_begin, row_end) of B · H), in double:
 * a group norm's statistics before the conv (the caller adds rows and channels of a group) */
int channel_sums(int row_begin, int row_end, int W, int C, const float *x_RWC, double *sums_R2C) {
    for (int r = row_begin; r < row_end; r++)
        for (int c0 = 0; c0 < C; c0 += 16) {
            const float *x = x_RWC + (int64_t)r * W * C + c0;
            __m512d s[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, q[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
            for (int j0 = 0; j0 < W; j0 += 64) {   /* 64 pixels in float, then into double */
                __m512 sf = _mm512_setzero_ps(), qf = _mm512_setzero_ps();
                for (int j = j0; j < W && j < j0 + 64; j++) {
                    const __m512 v = _mm512_loadu_ps(x + (int64_t)j * C);
                    sf = _mm512_add_ps(sf, v);
                    qf = _mm512_fmadd_ps(v, v, qf);
                }
                s[0] = _mm512_add_pd(s[0], _mm512_cvtps_pd(_mm512_castps512_ps256(sf)));
                s[1] = _mm512_add_pd(s[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sf), 1))));
                q[0] = _mm512_add_pd(q[0], _mm512_cvtps_pd(_mm512_castps512_ps256(qf)));
                q[1] = _mm512_add_pd(q[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(qf), 1))));
            }
            double *out = sums_R2C + (int64_t)r * 2 * C + c0;
            _mm512_storeu_pd(out, s[0]);
            _mm512_storeu_pd(out + 8, s[1]);
            _mm512_storeu_pd(out + C, q[0]);
            _mm512_storeu_pd(out + C + 8, q[1]);
        }
    return 0;
}

int winograd_conv3x3(int tile_begin, int tile_end, int H, int W, int C, int O, const float *x_BhwC, int up,
                     const float *scale_BC, const float *shift_BC, const float *U_PCO, const float *bias_O, float *y_BHWO) {
    const int th = (H + 3) / 4, tw = (W + 3) / 4, TB = tiles_per_block(C, O);
    const int64_t vps = (int64_t)TB * C, mps = (int64_t)TB * O, ups = (int64_t)C * O;
    float *V = aligned_alloc(64, sizeof(float) * NP * vps), *M = aligned_alloc(64, sizeof(float) * NP * mps);
    if (!V || !M) { free(V); free(M); return 1; }
    memset(V, 0, sizeof(float) * NP * vps);   /* rows past a short last block stay zero */
    for (int t0 = tile_begin; t0 < tile_end; t0 += TB) {
        const int rows = tile_end - t0 < TB ? tile_end - t0 : TB;
        for (int r = 0; r < rows; r++) {
            const int t = t0 + r, b = t / (th * tw), ty = t / tw % th, tx = t % tw;
            const float *x = x_BhwC + (int64_t)b * (H >> up) * (W >> up) * C;
            const float *scale = scale_BC ? scale_BC + (int64_t)b * C : NULL, *shift = shift_BC ? shift_BC + (int64_t)b * C : NULL;
            for (int c0 = 0; c0 < C; c0 += 16)
                transform_input(x, H, W, C, up, scale, shift, 4 * ty - 1, 4 * tx - 1, c0, V + (int64_t)r * C, vps);
        }
        products((rows + MR - 1) / MR * MR, C, O, V, U_PCO, M, vps, ups, mps);
        for (int r = 0; r < rows; r++) {
            const int t = t0 + r, b = t / (th * tw), ty = t / tw % th, tx = t % tw;
            float *y = y_BHWO + (int64_t)b * H * W * O;
            for (int o0 = 0; o0 < O; o0 += 16) transform_output(M + (int64_t)r * O, mps, o0, bias_O, y, H, W, O, 4 * ty, 4 * tx);
        }
    }
    free(V);
    free(M);
    return 0;
}
