/* Per-sample l1 / squared-l2 norms of Conv2d weight gradients, formed and reduced in registers.

   uvood.scores.conv_kernel compiles and calls this file; its docstring gives the formulas. Per sample:
   the unfolded input patches are packed, 16 patch columns (one panel) at a time, as T x 16 rows; a
   6 x 16 tile of the weight gradient W = G A (6 output channels of one cotangent, 16 patch columns)
   is accumulated in 12 AVX registers over the T output positions; each requested reduction takes
   |W + O| or (W + O)^2 of the tile (O: an optional offset, zero-padded to whole tiles) and adds it
   to a float32 vector, which goes into float64 accumulators per (reduction, cotangent). Output
   channels past Cout read a row of zeros, patch columns past d are packed as zeros: both add 0. */
#include <immintrin.h>
#include <stddef.h>
#include <string.h>

#define MR 6
#define NR 16

/* Panel p of sample's unfolded patches: out[t*NR + jj] = patch element j = p*NR + jj at output position t
   (0 where j >= d or where the patch reaches into the zero padding). */
static void pack_panel(const float *a, int cin, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw,
                       int dh, int dw, int ho, int wo, int p, float *out)
{
    int d = cin * kh * kw;
    int ci[NR], ki[NR], kj[NR];
    for (int jj = 0; jj < NR; jj++) {
        int j = p * NR + jj, r = j % (kh * kw);
        ci[jj] = j < d ? j / (kh * kw) : -1;
        ki[jj] = r / kw;
        kj[jj] = r % kw;
    }
    for (int oh = 0; oh < ho; oh++) {
        float *dst0 = out + (size_t)oh * wo * NR;
        for (int jj = 0; jj < NR; jj++) {
            float *dst = dst0 + jj;
            int ih = oh * sh - ph + ki[jj] * dh;
            if (ci[jj] < 0 || ih < 0 || ih >= h) {
                for (int ow = 0; ow < wo; ow++) dst[(size_t)ow * NR] = 0.f;
                continue;
            }
            const float *row = a + ((size_t)ci[jj] * h + ih) * w;
            int iw = -pw + kj[jj] * dw;
            if (sw == 1 && iw >= 0 && iw + wo <= w) {
                for (int ow = 0; ow < wo; ow++) dst[(size_t)ow * NR] = row[iw + ow];
            } else {
                for (int ow = 0; ow < wo; ow++, iw += sw) dst[(size_t)ow * NR] = (iw >= 0 && iw < w) ? row[iw] : 0.f;
            }
        }
    }
}

/* One 6 x 16 tile of a sample's weight gradient: output channels c0..c0+5 of cotangent k (rows of gi, T
   positions each; rows past cout read zeros) times the packed panel b (T x NR patch columns of panel p),
   then every reduction of the tile added to scratch[r][k] (4 doubles each). */
static inline void tile(const float *gi, int T, int cout, int k, int c0, const float *b, int p, const float *zeros,
                        int nred, const int *kinds, const float *const *offs, int dpad, int K, double *scratch)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const float *r0 = gi + ((size_t)k * cout + c0) * T;
    const float *r1 = c0 + 1 < cout ? r0 + T : zeros;
    const float *r2 = c0 + 2 < cout ? r0 + 2 * (size_t)T : zeros;
    const float *r3 = c0 + 3 < cout ? r0 + 3 * (size_t)T : zeros;
    const float *r4 = c0 + 4 < cout ? r0 + 4 * (size_t)T : zeros;
    const float *r5 = c0 + 5 < cout ? r0 + 5 * (size_t)T : zeros;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int t = 0; t < T; t++, b += NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), x;
        x = _mm256_broadcast_ss(r0 + t); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(r1 + t); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(r2 + t); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(r3 + t); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(r4 + t); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(r5 + t); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    __m256 acc[12] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int r = 0; r < nred; r++) {
        __m256 s = _mm256_setzero_ps();
        for (int q = 0; q < 12; q++) {
            __m256 v = acc[q];
            if (offs[r]) v = _mm256_add_ps(v, _mm256_loadu_ps(offs[r] + (size_t)(c0 + q / 2) * dpad + p * NR + (q % 2) * 8));
            s = kinds[r] == 0 ? _mm256_add_ps(s, _mm256_and_ps(v, absmask)) : _mm256_fmadd_ps(v, v, s);
        }
        double *dq = scratch + 4 * ((size_t)r * K + k);
        __m256d v = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(s)),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
        _mm256_storeu_pd(dq, _mm256_add_pd(_mm256_loadu_pd(dq), v));
    }
}

/* Bytes of output gradients a pass over one panel may read and still find in the (per-core) L2 cache. */
#define G_BYTES (256 * 1024)

/* Samples n0 .. n1-1. a: n x cin x h x w; g: n x (K*cout) x T (T = ho*wo), both contiguous float32.
   kinds[r]: 0 = l1, 1 = squared l2; offs[r]: NULL or a (K-independent) cout_pad x d_pad offset, zero-padded.
   out: nred x K x n doubles (added to). work: npan*T*NR floats (npan = d_pad / NR); zeros: T floats of 0;
   scratch: 4*nred*K doubles. A sample's output gradients of at most G_BYTES are read once per panel, each
   panel packed just before (it is in cache); larger ones (many cotangents) are cut into chunks of tiles of
   at most G_BYTES, every panel packed first and each chunk run over all panels (each chunk read from L2). */
void conv_weight_norms(const float *a, const float *g, int n0, int n1, int n, int cin, int h, int w, int K, int cout,
                       int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, int ho, int wo,
                       int nred, const int *kinds, const float *const *offs, int dpad,
                       float *work, const float *zeros, double *scratch, double *out)
{
    const int T = ho * wo, npan = dpad / NR, bpl = (cout + MR - 1) / MR, nblk = K * bpl;
    const int chunked = (size_t)K * cout * T * sizeof(float) > G_BYTES;
    int bpc = (int)(G_BYTES / ((size_t)MR * T * sizeof(float)));
    if (bpc < 1) bpc = 1;
    for (int i = n0; i < n1; i++) {
        const float *ai = a + (size_t)i * cin * h * w;
        const float *gi = g + (size_t)i * K * cout * T;
        for (int q = 0; q < nred * K; q++) _mm256_storeu_pd(scratch + 4 * q, _mm256_setzero_pd());
        if (!chunked) {
            for (int p = 0; p < npan; p++) {
                pack_panel(ai, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, p, work);
                for (int blk = 0; blk < nblk; blk++)
                    tile(gi, T, cout, blk / bpl, (blk % bpl) * MR, work, p, zeros, nred, kinds, offs, dpad, K, scratch);
            }
        } else {
            for (int p = 0; p < npan; p++)
                pack_panel(ai, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, p, work + (size_t)p * T * NR);
            for (int b0 = 0; b0 < nblk; b0 += bpc) {
                int b1 = b0 + bpc < nblk ? b0 + bpc : nblk;
                for (int p = 0; p < npan; p++)
                    for (int blk = b0; blk < b1; blk++)
                        tile(gi, T, cout, blk / bpl, (blk % bpl) * MR, work + (size_t)p * T * NR, p, zeros, nred,
                             kinds, offs, dpad, K, scratch);
            }
        }
        for (int r = 0; r < nred; r++)
            for (int k = 0; k < K; k++) {
                const double *tmp = scratch + 4 * ((size_t)r * K + k);
                out[((size_t)r * K + k) * n + i] += (tmp[0] + tmp[1]) + (tmp[2] + tmp[3]);
            }
    }
}
