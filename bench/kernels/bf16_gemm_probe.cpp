// Probe for issue #8's prefill: is a packed, cache-blocked BF16 GEMM worth writing into the engine?
//
// C[N x M] = B[N x K] . A[M x K]^T in ggml's layout (A = weights, B = activations, C[n*M + m]),
// BF16 inputs, F32 accumulation, one thread, needs AVX512_BF16:
//   (1) "tiny": the loop of llamafile's tinyBLAS<32, __m512, __m512bh> (4x6 tiles of dot products
//       over all of K, rows read where they lie) - the kernel that is ~90 % of a prefill here;
//   (2) "packed": BLIS-style blocking - B packed per K block of 512, A packed in 48-row panels of
//       VNNI pairs, a 48x8 outer-product micro-kernel (3 A vectors, 8 broadcast pairs of B).
// Both run on the same data, alternating, 3 times; prints one JSON line per round (seconds,
// GFLOP/s, tiny/packed time ratio, max |difference|: summation order differs).
//
//   g++ -O3 -march=native -std=c++17 bench/kernels/bf16_gemm_probe.cpp -o /tmp/bf16_gemm_probe
//   /tmp/bf16_gemm_probe            # M = 4032, N = 1008, K = 4096 (a 9B-shaped prefill GEMM)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <vector>
#include <cmath>
#include <algorithm>
typedef uint16_t bf16;
static bf16 f2b(float f) { uint32_t u; memcpy(&u, &f, 4); return (bf16)(u >> 16); }

static void tiny(const bf16 *A, const bf16 *B, float *C, int M, int N, int K) {
    for (int ii = 0; ii < M; ii += 4)
        for (int jj = 0; jj + 6 <= N; jj += 6) {
            __m512 c[6][4];
            for (int j = 0; j < 6; j++) for (int i = 0; i < 4; i++) c[j][i] = _mm512_setzero_ps();
            for (int l = 0; l < K; l += 32) {
                __m512bh a[4];
                for (int i = 0; i < 4; i++) a[i] = (__m512bh)_mm512_loadu_si512(A + (size_t)(ii + i) * K + l);
                for (int j = 0; j < 6; j++) {
                    __m512bh b = (__m512bh)_mm512_loadu_si512(B + (size_t)(jj + j) * K + l);
                    for (int i = 0; i < 4; i++) c[j][i] = _mm512_dpbf16_ps(c[j][i], a[i], b);
                }
            }
            for (int j = 0; j < 6; j++) for (int i = 0; i < 4; i++) C[(size_t)(jj + j) * M + ii + i] = _mm512_reduce_add_ps(c[j][i]);
        }
}

enum { MR = 48, NR = 8, KC = 512, MC = 96, NC = 512 };
// Ap: [MR/16 vectors][KC/2 pairs][16 rows][2]  ; Bp: [NC][KC/2 pairs] as uint32 pairs
static void pack_A(const bf16 *A, int K, int i0, int p0, bf16 *Ap) {
    for (int kp = 0; kp < KC / 2; kp++)
        for (int r = 0; r < MR; r++) {
            const bf16 *src = A + (size_t)(i0 + r) * K + p0 + 2 * kp;
            bf16 *dst = Ap + ((size_t)kp * MR + r) * 2;
            dst[0] = src[0]; dst[1] = src[1];
        }
}
static void pack_B(const bf16 *B, int K, int j0, int nc, int p0, uint32_t *Bp) {
    for (int j = 0; j < nc; j++) memcpy(Bp + (size_t)j * (KC / 2), B + (size_t)(j0 + j) * K + p0, KC * 2);
}
static inline void ukernel(const bf16 *Ap, const uint32_t *Bp, float *C, int ldc, bool first) {
    __m512 c[NR][3];
    for (int j = 0; j < NR; j++) for (int v = 0; v < 3; v++) c[j][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + (size_t)j * ldc + 16 * v);
    for (int kp = 0; kp < KC / 2; kp++) {
        __m512bh a0 = (__m512bh)_mm512_loadu_si512(Ap + (size_t)kp * MR * 2);
        __m512bh a1 = (__m512bh)_mm512_loadu_si512(Ap + (size_t)kp * MR * 2 + 32);
        __m512bh a2 = (__m512bh)_mm512_loadu_si512(Ap + (size_t)kp * MR * 2 + 64);
        for (int j = 0; j < NR; j++) {
            __m512bh b = (__m512bh)_mm512_set1_epi32((int)Bp[(size_t)j * (KC / 2) + kp]);
            c[j][0] = _mm512_dpbf16_ps(c[j][0], a0, b);
            c[j][1] = _mm512_dpbf16_ps(c[j][1], a1, b);
            c[j][2] = _mm512_dpbf16_ps(c[j][2], a2, b);
        }
    }
    for (int j = 0; j < NR; j++) for (int v = 0; v < 3; v++) _mm512_storeu_ps(C + (size_t)j * ldc + 16 * v, c[j][v]);
}
static void packed(const bf16 *A, const bf16 *B, float *C, int M, int N, int K) {
    std::vector<bf16> Ap((size_t)MC * KC);
    std::vector<uint32_t> Bp((size_t)NC * KC / 2);
    for (int jc = 0; jc < N; jc += NC) {
        int nc = std::min((int)NC, N - jc);
        for (int pc = 0; pc < K; pc += KC) {
            pack_B(B, K, jc, nc, pc, Bp.data());
            for (int ic = 0; ic < M; ic += MC) {
                for (int ir = 0; ir < MC; ir += MR) pack_A(A, K, ic + ir, pc, Ap.data() + (size_t)ir * KC);
                for (int jr = 0; jr + NR <= nc; jr += NR)
                    for (int ir = 0; ir < MC; ir += MR)
                        ukernel(Ap.data() + (size_t)ir * KC, Bp.data() + (size_t)jr * (KC / 2), C + (size_t)(jc + jr) * M + ic + ir, M, pc == 0);
            }
        }
    }
}
int main() {
    int M = 4032, N = 1008, K = 4096;  // multiples of MC/NR/6 for the probe
    std::vector<bf16> A((size_t)M * K), B((size_t)N * K);
    srand(1);
    for (auto &x : A) x = f2b((rand() / (float)RAND_MAX - 0.5f));
    for (auto &x : B) x = f2b((rand() / (float)RAND_MAX - 0.5f));
    std::vector<float> C1((size_t)N * M), C2((size_t)N * M);
    double fl = 2.0 * M * N * K;
    for (int rep = 0; rep < 3; rep++) {
        auto t0 = std::chrono::steady_clock::now(); tiny(A.data(), B.data(), C1.data(), M, N, K);
        auto t1 = std::chrono::steady_clock::now(); packed(A.data(), B.data(), C2.data(), M, N, K);
        auto t2 = std::chrono::steady_clock::now();
        double a = std::chrono::duration<double>(t1 - t0).count(), b = std::chrono::duration<double>(t2 - t1).count();
        double md = 0; for (size_t i = 0; i < C1.size(); i++) md = std::max(md, (double)fabs(C1[i] - C2[i]));
        printf("{\"M\": %d, \"N\": %d, \"K\": %d, \"tiny_s\": %.4f, \"tiny_gflops\": %.1f, \"packed_s\": %.4f, "
               "\"packed_gflops\": %.1f, \"tiny_over_packed\": %.3f, \"max_abs_diff\": %.3g}\n",
               M, N, K, a, fl / a / 1e9, b, fl / b / 1e9, a / b, md);
    }
}
