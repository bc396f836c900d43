// Self-test of the Self-Extend flash attention kernels (fattn-self-extend.cu) without the ggml runtime: random inputs for
// a set of shapes are checked against a double precision CPU reference of the op (ggml-self-extend.h), then the prefill
// and decode shapes of the speed benchmarks are timed.
//
// From ggml/src/ggml-cuda of the patched llama.cpp, with this file next to fattn-self-extend.cu:
//   nvcc -std=c++17 -O3 -arch=sm_90 -I../../include -I.. -I. fattn-self-extend-selftest.cu -o selftest && ./selftest
// Exit status 0: every case within 1e-2 of its output scale (the largest |reference| of the case).
// Options: --check runs the cases only (e.g. under compute-sanitizer), --perf the timings only (e.g. under ncu),
// --splits times decode shapes with several numbers of KV splits (grouped keys given, and a rotation table). Decodes
// are timed with the grouped keys given, with a rotation table, with a table of steps, and, for a ratio in the same
// run, through llama.cpp's own vector kernel (fattn-vec.cuh) and its merge.

#define GGML_CUDA_FATTN_SE_SELFTEST
#include "fattn-self-extend.cu"
#include "fattn-vec.cuh"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// the ggml functions that the host code of the kernels can reach
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "%s:%d: ", file, line);
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    abort();
}

int ggml_cuda_get_device() {
    int id;
    CUDA_CHECK(cudaGetDevice(&id));
    return id;
}

void ggml_cuda_error(const char * stmt, const char * func, const char * file, int line, const char * msg) {
    fprintf(stderr, "CUDA error: %s\n  in %s at %s:%d\n  %s\n", msg, func, file, line, stmt);
    abort();
}

enum mask_kind {
    MASK_NONE,   // no mask tensor
    MASK_CAUSAL, // key visible iff pos_k <= pos_q
    MASK_HOLES,  // causal by position, ~10% of the cells masked for every query, query 3 sees nothing
    MASK_SEQS,   // causal by position, the first 64 cells and the second quarter belong to another sequence
};

struct se_case {
    const char * name;
    int   D, n_head, n_head_kv, n_q, n_kv, W, ne3;
    mask_kind mask;
    int   mask_ne3;  // 1: broadcast over the streams
    bool  shuffled;  // positions of the cells in random order, some duplicated; else cell j has position j
    float softcap;
    int   rot;       // fattn_se_rot: K_g as K and a rotation table of random angles (a prefill rotates K into a scratch)
    bool  q_rot;     // Q_g as Q and a table row per query, in rot's layout (NEOX without rot: K_g given, any n_q)
    int   steps;     // with rot, > 0: a table of steps instead of a row per key (group size SE_STEPS_G, this many rows
                     // of single positions: 128 as libllama makes it, or 8, so that a tile's keys span several larger steps
                     // and the kernel reads those of its keys from global memory)
};

#define SE_STEPS_G  3

// the pair layout of a case's tables: rot's, or NEOX where only the queries have one (K_g given)
static int se_table_mode(const int rot) {
    return rot != FATTN_SE_ROT_NONE ? rot : FATTN_SE_ROT_NEOX;
}

// Host copies of the inputs, in the layouts (views) that the kernels get.
struct se_host {
    int D, n_q, n_kv, n_head, n_head_kv, ne3, mask_ne3, n_cells, n_kv_pad, n_q_pad;
    std::vector<float>   q, q_g;       // q: [ne3][n_q][n_head][D] (permuted view), q_g: [ne3][n_head][n_q][D]
    std::vector<half>    k, k_g, v;    // k, v: cache [ne3][n_cells][n_head_kv][D], k_g: [ne3][n_head_kv][n_kv][D]
    std::vector<half>    mask;         // [mask_ne3][n_q_pad][n_kv_pad]
    std::vector<float>   tab;          // rotation table (rot): [ne3][n_kv][D] (values that f16 holds exactly: the device
                                       // gets it in f16), or (steps) [n_steps][D]; k_g then holds the rotated keys
    int                  n_steps = 0;  // rows of the table of steps
    std::vector<float>   qtab;         // the queries' table (q_rot): [ne3][n_q][D]; q_g then holds the rotated queries
    std::vector<int32_t> pos_q, pos_k; // [ne3][n_q], [ne3][n_kv]

    float qv (int s, int i, int h, int d) const { return q  [((size_t(s)*n_q + i)*n_head + h)*D + d]; }
    float qgv(int s, int i, int h, int d) const { return q_g[((size_t(s)*n_head + h)*n_q + i)*D + d]; }
    float kv (int s, int j, int h, int d) const { return __half2float(k  [((size_t(s)*n_cells + j)*n_head_kv + h)*D + d]); }
    float kgv(int s, int j, int h, int d) const { return __half2float(k_g[((size_t(s)*n_head_kv + h)*n_kv + j)*D + d]); }
    float vv (int s, int j, int h, int d) const { return __half2float(v  [((size_t(s)*n_cells + j)*n_head_kv + h)*D + d]); }
    float mv (int s, int i, int j)        const { return __half2float(mask[(size_t(s % mask_ne3)*n_q_pad + i)*n_kv_pad + j]); }
};

struct se_device {
    float * q = nullptr, * q_g = nullptr, * dst = nullptr;
    half  * k = nullptr, * k_g = nullptr, * v = nullptr, * mask = nullptr;
    half  * tab_rows = nullptr;           // rotation table of rows (F16)
    float * tab = nullptr, * qtab = nullptr; // table of steps (F32), the queries' table
    int32_t * pos_q = nullptr, * pos_k = nullptr;
    char  * ws = nullptr;
    half  * k_g_scratch = nullptr; // a table form's grouped keys where the kernel does not rotate K itself

    ~se_device() {
        for (void * ptr : {(void *) q, (void *) q_g, (void *) dst, (void *) k, (void *) k_g, (void *) v, (void *) mask,
                           (void *) tab_rows, (void *) tab, (void *) qtab, (void *) pos_q, (void *) pos_k, (void *) ws, (void *) k_g_scratch}) {
            cudaFree(ptr);
        }
    }
};

// one op as the backend runs the first Self-Extend op of a graph: the tile classes (prefill), then (a table form whose
// kernel does not rotate K itself) the grouped keys into k_g, then the attention; ws holds the classes, then the workspace
static void se_run(const fattn_se_params & p, const fattn_se_plan & P, char * ws, half * k_g = nullptr,
                   const bool neox = false) {
    if (P.classify) {
        fattn_se_classify(p, P, ws, 0);
    }
    fattn_se_params pr = p;
    if (k_g) {
        fattn_se_rotate_into(pr, p.D, neox, k_g, 0);
    }
    fattn_se_run(pr, P, ws, ws + P.nbytes_cls, 0);
}

static size_t se_smpbo = 0; // the device's shared memory per block, opted in

// A table form (rot: its pair layout; p.k_steps_G > 0: a table of steps) as the backend sets it up: the kernel rotates K
// where it can (fattn_se_rot_in_kernel), else returns a scratch for the grouped keys, which se_run fills first.
static half * se_table_setup(fattn_se_params & p, const int rot) {
    p.k_rot = fattn_se_rot_in_kernel(p, p.D, rot == FATTN_SE_ROT_NEOX, se_smpbo);
    half * k_g = nullptr;
    if (p.k_rot == FATTN_SE_ROT_NONE) {
        CUDA_CHECK(cudaMalloc(&k_g, size_t(p.D)*p.n_kv*p.n_head_kv*p.ne3*sizeof(half)));
    }
    return k_g;
}

template <typename T>
static T * to_device(const std::vector<T> & x) {
    T * ptr;
    CUDA_CHECK(cudaMalloc(&ptr, x.size()*sizeof(T)));
    CUDA_CHECK(cudaMemcpy(ptr, x.data(), x.size()*sizeof(T), cudaMemcpyHostToDevice));
    return ptr;
}

static fattn_se_params se_params_of(const se_host & h, const se_device & d, const float scale, const float softcap, const int W) {
    fattn_se_params p = {};
    const int64_t D = h.D;
    p.q   = (const char *) d.q;   p.nb_q1  = h.n_head*D*4;    p.nb_q2  = D*4; p.nb_q3  = int64_t(h.n_q)*h.n_head*D*4;
    p.q_g = (const char *) d.q_g; p.nb_qg1 = D*4;             p.nb_qg2 = h.n_q*D*4; p.nb_qg3 = int64_t(h.n_head)*h.n_q*D*4;
    p.k   = (const char *) d.k;   p.nb_k1  = h.n_head_kv*D*2; p.nb_k2  = D*2; p.nb_k3  = int64_t(h.n_cells)*h.n_head_kv*D*2;
    p.v   = (const char *) d.v;   p.nb_v1  = h.n_head_kv*D*2; p.nb_v2  = D*2; p.nb_v3  = int64_t(h.n_cells)*h.n_head_kv*D*2;
    p.k_g = (const char *) d.k_g; p.nb_kg1 = D*2;             p.nb_kg2 = h.n_kv*D*2; p.nb_kg3 = int64_t(h.n_head_kv)*h.n_kv*D*2;
    p.mask  = (const char *) d.mask;
    p.nb_m1 = int64_t(h.n_kv_pad)*2;
    p.nb_m3 = int64_t(h.n_q_pad)*h.n_kv_pad*2;
    p.ne_m3 = h.mask_ne3;
    p.pos_q = (const char *) d.pos_q; p.nb_pq1 = int64_t(h.n_q)*4;
    p.pos_k = (const char *) d.pos_k; p.nb_pk1 = int64_t(h.n_kv)*4;
    p.dst   = d.dst;
    p.D = h.D; p.n_q = h.n_q; p.n_kv = h.n_kv; p.n_head = h.n_head; p.n_head_kv = h.n_head_kv; p.ne3 = h.ne3;
    p.W = W; p.scale = scale; p.softcap = softcap;
    if (d.tab_rows) {
        p.k_g = (const char *) d.tab_rows; p.nb_kg1 = D*2; p.nb_kg2 = 0; p.nb_kg3 = int64_t(h.n_kv)*D*2;
    }
    if (d.tab) {
        p.k_g = (const char *) d.tab; p.nb_kg1 = D*4; p.nb_kg2 = 0; p.nb_kg3 = int64_t(h.n_kv)*D*4;
    }
    if (d.qtab) {
        p.q_g = (const char *) d.qtab; p.nb_qg1 = D*4; p.nb_qg2 = 0; p.nb_qg3 = int64_t(h.n_q)*D*4;
        p.n_rot_q = h.D;
    }
    return p;
}

static se_host se_make_inputs(const se_case & c, std::mt19937 & rng) {
    se_host h;
    h.D = c.D; h.n_q = c.n_q; h.n_kv = c.n_kv; h.n_head = c.n_head; h.n_head_kv = c.n_head_kv; h.ne3 = c.ne3;
    h.mask_ne3 = c.mask == MASK_NONE ? 1 : c.mask_ne3;
    h.n_cells  = c.n_kv + 5;             // the K/V views do not span their whole cache
    h.n_kv_pad = GGML_PAD(c.n_kv, 64);   // the mask is wider than the cache, the extra keys must stay unused
    h.n_q_pad  = GGML_PAD(c.n_q, 16);

    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const float q_amp = 3.0f; // logits with a standard deviation of about 1
    h.q.resize(size_t(h.ne3)*h.n_q*h.n_head*h.D);
    h.q_g.resize(h.q.size());
    for (float & x : h.q)   { x = q_amp*u(rng); }
    for (float & x : h.q_g) { x = q_amp*u(rng); }
    h.k.resize(size_t(h.ne3)*h.n_cells*h.n_head_kv*h.D);
    h.v.resize(h.k.size());
    h.k_g.resize(size_t(h.ne3)*h.n_head_kv*h.n_kv*h.D);
    for (half & x : h.k)   { x = __float2half(u(rng)); }
    for (half & x : h.v)   { x = __float2half(u(rng)); }
    for (half & x : h.k_g) { x = __float2half(u(rng)); }
    if (c.rot != FATTN_SE_ROT_NONE || c.q_rot) {
        const int mode = se_table_mode(c.rot);
        // a random angle per row and pair: cos at the pair's first dimension, sin at its second; K_g = K rotated, and
        // (q_rot) Q_g = Q rotated
        const int D = h.D;
        std::uniform_real_distribution<float> angle(-3.2f, 3.2f);
        // (round: the table's values as the F16 table of rows holds them)
        auto rotate = [&](std::vector<float> & tab, const int n_rows, const bool round, auto && put) {
            tab.resize(size_t(h.ne3)*n_rows*D);
            for (int s = 0; s < h.ne3; ++s) {
                for (int j = 0; j < n_rows; ++j) {
                    float * t = tab.data() + (size_t(s)*n_rows + j)*D;
                    for (int i = 0; i < D/2; ++i) {
                        const int a = mode == FATTN_SE_ROT_NORM ? 2*i : i;
                        const int b = mode == FATTN_SE_ROT_NORM ? 2*i + 1 : i + D/2;
                        const float phi = angle(rng);
                        t[a] = round ? __half2float(__float2half(cosf(phi))) : cosf(phi);
                        t[b] = round ? __half2float(__float2half(sinf(phi))) : sinf(phi);
                        put(s, j, a, b, t[a], t[b]);
                    }
                }
            }
        };
        if (c.rot != FATTN_SE_ROT_NONE && !c.steps) {
            rotate(h.tab, h.n_kv, true, [&](int s, int j, int a, int b, double co, double si) {
                for (int hk = 0; hk < h.n_head_kv; ++hk) {
                    const double ka = h.kv(s, j, hk, a), kb = h.kv(s, j, hk, b);
                    half * kg = h.k_g.data() + ((size_t(s)*h.n_head_kv + hk)*h.n_kv + j)*D;
                    kg[a] = __float2half(float(ka*co - kb*si));
                    kg[b] = __float2half(float(ka*si + kb*co));
                }
            });
        }
        if (c.q_rot) {
            rotate(h.qtab, h.n_q, false, [&](int s, int i, int a, int b, double co, double si) {
                for (int hq = 0; hq < h.n_head; ++hq) {
                    const double qa = h.qv(s, i, hq, a), qb = h.qv(s, i, hq, b);
                    float * qg = h.q_g.data() + ((size_t(s)*h.n_head + hq)*h.n_q + i)*D;
                    qg[a] = float(qa*co - qb*si);
                    qg[b] = float(qa*si + qb*co);
                }
            });
        }
    }

    h.pos_q.resize(size_t(h.ne3)*h.n_q);
    h.pos_k.resize(size_t(h.ne3)*h.n_kv);
    for (int s = 0; s < h.ne3; ++s) {
        int32_t * pk = h.pos_k.data() + size_t(s)*h.n_kv;
        for (int j = 0; j < h.n_kv; ++j) {
            pk[j] = j;
        }
        if (c.shuffled) {
            std::shuffle(pk, pk + h.n_kv, rng);
            std::uniform_int_distribution<int> cell(0, h.n_kv - 1);
            for (int n = 0; n < h.n_kv/20; ++n) {
                pk[cell(rng)] = pk[cell(rng)];
            }
        }
        for (int i = 0; i < h.n_q; ++i) {
            h.pos_q[size_t(s)*h.n_q + i] = h.n_kv - h.n_q + i + s; // the streams are at different positions
        }
    }

    if (c.steps) {
        // a random angle per row and pair; key j takes the sum of its two rows' angles (ggml_flash_attn_ext_se_steps)
        const int D = h.D, mode = c.rot;
        int m_max = 0;
        for (const int32_t pk : h.pos_k) {
            m_max = std::max(m_max, pk > 0 ? pk - pk/SE_STEPS_G : 0);
        }
        h.n_steps = c.steps + m_max/c.steps + 1;
        std::uniform_real_distribution<double> angle(-3.2, 3.2);
        std::vector<double> phi(size_t(h.n_steps)*D/2);
        for (double & x : phi) {
            x = angle(rng);
        }
        h.tab.resize(size_t(h.n_steps)*D);
        for (int r = 0; r < h.n_steps; ++r) {
            for (int i = 0; i < D/2; ++i) {
                const int a = mode == FATTN_SE_ROT_NORM ? 2*i : i;
                const int b = mode == FATTN_SE_ROT_NORM ? 2*i + 1 : i + D/2;
                h.tab[size_t(r)*D + a] = float(std::cos(phi[size_t(r)*D/2 + i]));
                h.tab[size_t(r)*D + b] = float(std::sin(phi[size_t(r)*D/2 + i]));
            }
        }
        for (int s = 0; s < h.ne3; ++s) {
            for (int j = 0; j < h.n_kv; ++j) {
                const int32_t pk = h.pos_k[size_t(s)*h.n_kv + j];
                const int m = pk > 0 ? pk - pk/SE_STEPS_G : 0;
                const int r_lo = m % c.steps, r_hi = c.steps + m/c.steps;
                for (int i = 0; i < D/2; ++i) {
                    const int a = mode == FATTN_SE_ROT_NORM ? 2*i : i;
                    const int b = mode == FATTN_SE_ROT_NORM ? 2*i + 1 : i + D/2;
                    const double ph = phi[size_t(r_lo)*D/2 + i] + phi[size_t(r_hi)*D/2 + i];
                    const double co = std::cos(ph), si = std::sin(ph);
                    for (int hk = 0; hk < h.n_head_kv; ++hk) {
                        const double ka = h.kv(s, j, hk, a), kb = h.kv(s, j, hk, b);
                        half * kg = h.k_g.data() + ((size_t(s)*h.n_head_kv + hk)*h.n_kv + j)*D;
                        kg[a] = __float2half(float(ka*co - kb*si));
                        kg[b] = __float2half(float(ka*si + kb*co));
                    }
                }
            }
        }
    }

    const half zero = __float2half(0.0f);
    const half ninf = __float2half(-INFINITY);
    h.mask.assign(size_t(h.mask_ne3)*h.n_q_pad*h.n_kv_pad, zero); // padding rows/keys are 0: visible if they were read
    if (c.mask != MASK_NONE) {
        std::uniform_real_distribution<float> u01(0.0f, 1.0f);
        for (int s = 0; s < h.mask_ne3; ++s) {
            std::vector<bool> hole(h.n_kv);
            for (int j = 0; j < h.n_kv; ++j) {
                hole[j] = c.mask == MASK_HOLES && u01(rng) < 0.1f;
            }
            for (int i = 0; i < h.n_q; ++i) {
                half * row = h.mask.data() + (size_t(s)*h.n_q_pad + i)*h.n_kv_pad;
                for (int j = 0; j < h.n_kv; ++j) {
                    const bool other = c.mask == MASK_SEQS && (j < 64 || (j >= h.n_kv/4 && j < h.n_kv/2));
                    const bool vis = h.pos_k[size_t(s)*h.n_kv + j] <= h.pos_q[size_t(s)*h.n_q + i] && !hole[j] && !other &&
                                     !(c.mask == MASK_HOLES && i == 3);
                    row[j] = vis ? zero : ninf;
                }
            }
        }
    }
    return h;
}

// out[(s, i, h)][d] in double precision, straight from the definition of the op, for the queries rows_i
static std::vector<double> se_reference(const se_host & h, const bool has_mask, const float scale, const float softcap,
                                        const int W, const std::vector<int> & rows_i) {
    const int D = h.D, gqa = h.n_head/h.n_head_kv;
    std::vector<double> out(size_t(h.ne3)*rows_i.size()*h.n_head*D, 0.0);
    std::vector<double> logit(h.n_kv);
    std::vector<double> acc(D);
    for (int s = 0; s < h.ne3; ++s) {
        for (size_t ri = 0; ri < rows_i.size(); ++ri) {
            const int i = rows_i[ri];
            const int32_t pq = h.pos_q[size_t(s)*h.n_q + i];
            for (int hq = 0; hq < h.n_head; ++hq) {
                const int hk = hq/gqa;
                double mx = -INFINITY;
                for (int j = 0; j < h.n_kv; ++j) {
                    const double m = has_mask ? double(h.mv(s, i, j)) : 0.0;
                    if (m == -INFINITY) {
                        logit[j] = -INFINITY;
                        continue;
                    }
                    const bool grouped = pq - h.pos_k[size_t(s)*h.n_kv + j] >= W;
                    double x = 0.0;
                    for (int d = 0; d < D; ++d) {
                        x += grouped ? double(h.qgv(s, i, hq, d))*h.kgv(s, j, hk, d)
                                     : double(h.qv (s, i, hq, d))*h.kv (s, j, hk, d);
                    }
                    x *= scale;
                    if (softcap != 0.0f) {
                        x = softcap*std::tanh(x/softcap);
                    }
                    logit[j] = x + m;
                    mx = std::max(mx, logit[j]);
                }
                double * o = out.data() + ((size_t(s)*rows_i.size() + ri)*h.n_head + hq)*D;
                if (mx == -INFINITY) {
                    continue; // nothing visible: 0
                }
                std::fill(acc.begin(), acc.end(), 0.0);
                double sum = 0.0;
                for (int j = 0; j < h.n_kv; ++j) {
                    if (logit[j] == -INFINITY) {
                        continue;
                    }
                    const double e = std::exp(logit[j] - mx);
                    sum += e;
                    for (int d = 0; d < D; ++d) {
                        acc[d] += e*h.vv(s, j, hk, d);
                    }
                }
                for (int d = 0; d < D; ++d) {
                    o[d] = acc[d]/sum;
                }
            }
        }
    }
    return out;
}

static bool se_run_case(const se_case & c, const int nsm, std::mt19937 & rng) {
    const se_host h = se_make_inputs(c, rng);
    se_device d;
    d.q   = to_device(h.q);   d.q_g = to_device(h.q_g);
    d.k   = to_device(h.k);   d.k_g = to_device(h.k_g); d.v = to_device(h.v);
    d.mask  = c.mask != MASK_NONE ? to_device(h.mask) : nullptr;
    if (c.rot != FATTN_SE_ROT_NONE) {
        if (c.steps) {
            d.tab = to_device(h.tab);
        } else {
            std::vector<half> rows(h.tab.size());
            for (size_t i = 0; i < rows.size(); ++i) {
                rows[i] = __float2half(h.tab[i]);
            }
            d.tab_rows = to_device(rows);
        }
    }
    d.qtab  = c.q_rot ? to_device(h.qtab) : nullptr;
    d.pos_q = to_device(h.pos_q); d.pos_k = to_device(h.pos_k);
    const size_t n_out = size_t(h.ne3)*h.n_q*h.n_head*h.D;
    CUDA_CHECK(cudaMalloc(&d.dst, n_out*sizeof(float)));
    CUDA_CHECK(cudaMemset(d.dst, 0xFF, n_out*sizeof(float))); // NaN: every output must be written

    const float scale = 1.0f/sqrtf(float(c.D));
    fattn_se_params p = se_params_of(h, d, scale, c.softcap, c.W);
    p.q_rot = c.q_rot ? se_table_mode(c.rot) : FATTN_SE_ROT_NONE;
    if (c.steps) {
        fattn_se_set_steps(p, SE_STEPS_G, c.steps, h.n_steps);
    }
    d.k_g_scratch = c.rot != FATTN_SE_ROT_NONE ? se_table_setup(p, c.rot) : nullptr;
    const fattn_se_plan P = fattn_se_make_plan(p, nsm);
    if (P.nbytes_cls + P.nbytes_ws > 0) {
        CUDA_CHECK(cudaMalloc(&d.ws, P.nbytes_cls + P.nbytes_ws));
    }
    se_run(p, P, d.ws, d.k_g_scratch, c.rot == FATTN_SE_ROT_NEOX);
    CUDA_CHECK(cudaDeviceSynchronize());

    std::vector<float> out(n_out);
    CUDA_CHECK(cudaMemcpy(out.data(), d.dst, n_out*sizeof(float), cudaMemcpyDeviceToHost));

    // large cases: a subset of the queries, always including the last ones
    std::vector<int> rows_i;
    const int stride = h.n_q > 64 ? 8 : 1;
    for (int i = 0; i < h.n_q; ++i) {
        if (i % stride == 0 || i >= h.n_q - 4) {
            rows_i.push_back(i);
        }
    }
    const std::vector<double> ref = se_reference(h, c.mask != MASK_NONE, scale, c.softcap, c.W, rows_i);

    double err_max = 0.0, ref_max = 0.0;
    for (int s = 0; s < h.ne3; ++s) {
        for (size_t ri = 0; ri < rows_i.size(); ++ri) {
            for (int hq = 0; hq < h.n_head; ++hq) {
                for (int dd = 0; dd < h.D; ++dd) {
                    const double r = ref[((size_t(s)*rows_i.size() + ri)*h.n_head + hq)*h.D + dd];
                    const double o = out[((size_t(s)*h.n_q + rows_i[ri])*h.n_head + hq)*h.D + dd];
                    const double e = std::isfinite(o) ? std::fabs(o - r) : INFINITY;
                    err_max = std::max(err_max, e);
                    ref_max = std::max(ref_max, std::fabs(r));
                }
            }
        }
    }
    const double rel = err_max/std::max(ref_max, 1e-6);
    const bool ok = rel <= 1e-2;
    printf("%-44s %-7s NHB=%d RPB=%2d nsplit=%3d  max|ref| %.3e  max err %.3e  rel %.2e  %s\n",
           c.name, P.decode ? "decode" : "prefill", P.NHB, P.RPB, P.nsplit, ref_max, err_max, rel, ok ? "OK" : "FAIL");
    return ok;
}

// ------------------------------------------------------------------------------------------------------------------
// timings

static __global__ void se_fill_half(half * x, const size_t n, const uint32_t seed) {
    for (size_t i = blockIdx.x*size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x)*blockDim.x) {
        uint32_t r = uint32_t(i)*2654435761u ^ seed;
        r ^= r >> 15; r *= 2246822519u; r ^= r >> 13;
        x[i] = __float2half(float(r & 0xFFFF)/32768.0f - 1.0f);
    }
}

static __global__ void se_fill_float(float * x, const size_t n, const uint32_t seed) {
    for (size_t i = blockIdx.x*size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x)*blockDim.x) {
        uint32_t r = uint32_t(i)*2654435761u ^ seed;
        r ^= r >> 15; r *= 2246822519u; r ^= r >> 13;
        x[i] = 3.0f*(float(r & 0xFFFF)/32768.0f - 1.0f);
    }
}

// causal mask of n_q queries at positions n_kv - n_q .. n_kv - 1 over cells at positions 0 .. n_kv - 1
static __global__ void se_fill_causal(half * mask, const int n_q, const int n_kv) {
    const int i = blockIdx.y;
    for (int j = blockIdx.x*blockDim.x + threadIdx.x; j < n_kv; j += gridDim.x*blockDim.x) {
        mask[size_t(i)*n_kv + j] = __float2half(j <= n_kv - n_q + i ? 0.0f : -INFINITY);
    }
}

static __global__ void se_fill_iota(int32_t * x, const int n, const int offset) {
    for (int i = blockIdx.x*blockDim.x + threadIdx.x; i < n; i += gridDim.x*blockDim.x) {
        x[i] = offset + i;
    }
}

// Reads n int4, which fills L2 with clean lines. The store is never taken (se_time_us's buffer is zeros), but the compiler
// cannot know that, so the loads stay.
static __global__ void se_read(const int4 * x, const size_t n, int * out) {
    int s = 0;
    for (size_t i = blockIdx.x*size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x)*blockDim.x) {
        const int4 v = x[i];
        s += v.x ^ v.y ^ v.z ^ v.w;
    }
    if (s == 0x7fffffff) {
        *out = s;
    }
}

// The median time of run in microseconds, each run timed alone after a read of more memory than the L2 cache holds: in
// a model, the layers' weights pass through L2 between two attention ops, so a decode reads its keys from DRAM (timed
// back to back instead, the 16 MiB of K and V of an 8K decode of the 1.1B shape stay in L2).
template <typename F>
static double se_time_us(const F & run) {
    static char * flush = nullptr;
    const size_t nflush = size_t(256) << 20;
    if (!flush) {
        CUDA_CHECK(cudaMalloc(&flush, nflush + sizeof(int)));
        CUDA_CHECK(cudaMemset(flush, 0, nflush + sizeof(int)));
    }
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    for (int it = 0; it < 3; ++it) {
        run();
    }
    std::vector<float> ms(20);
    for (float & t : ms) {
        se_read<<<1024, 256>>>((const int4 *) flush, nflush/sizeof(int4), (int *) (flush + nflush));
        CUDA_CHECK(cudaEventRecord(start));
        run();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return 1e3*ms[ms.size()/2];
}

// nsplit: KV splits per block of columns, or 0 for the plan's own; rot: K_g as K and a rotation table (decode), q_rot:
// with Q_g as Q and a table row per query too, steps: a table of steps (libllama's 128 rows of single positions, G = 8)
// instead of the table
static void se_time(const char * name, const int D, const int n_head, const int n_head_kv, const int n_q, const int n_kv,
                    const int W, const int nsm, const int nsplit = 0, const int rot = FATTN_SE_ROT_NONE,
                    const bool q_rot = false, const bool steps = false) {
    se_host h; // shapes only: the data is generated on the device
    h.D = D; h.n_q = n_q; h.n_kv = n_kv; h.n_head = n_head; h.n_head_kv = n_head_kv; h.ne3 = 1; h.mask_ne3 = 1;
    h.n_cells = n_kv; h.n_kv_pad = n_kv; h.n_q_pad = n_q;

    se_device d;
    const size_t nq = size_t(n_q)*n_head*D, nk = size_t(n_kv)*n_head_kv*D;
    CUDA_CHECK(cudaMalloc(&d.q, nq*sizeof(float)));   CUDA_CHECK(cudaMalloc(&d.q_g, nq*sizeof(float)));
    CUDA_CHECK(cudaMalloc(&d.dst, nq*sizeof(float)));
    CUDA_CHECK(cudaMalloc(&d.k, nk*sizeof(half)));    CUDA_CHECK(cudaMalloc(&d.k_g, nk*sizeof(half)));
    CUDA_CHECK(cudaMalloc(&d.v, nk*sizeof(half)));
    CUDA_CHECK(cudaMalloc(&d.mask, size_t(n_q)*n_kv*sizeof(half)));
    CUDA_CHECK(cudaMalloc(&d.pos_q, n_q*sizeof(int32_t))); CUDA_CHECK(cudaMalloc(&d.pos_k, n_kv*sizeof(int32_t)));
    se_fill_float<<<1024, 256>>>(d.q,   nq, 1);
    se_fill_float<<<1024, 256>>>(d.q_g, nq, 2);
    se_fill_half <<<1024, 256>>>(d.k,   nk, 3);
    se_fill_half <<<1024, 256>>>(d.k_g, nk, 4);
    se_fill_half <<<1024, 256>>>(d.v,   nk, 5);
    se_fill_causal<<<dim3(64, n_q), 256>>>(d.mask, n_q, n_kv);
    se_fill_iota<<<64, 256>>>(d.pos_q, n_q, n_kv - n_q);
    se_fill_iota<<<64, 256>>>(d.pos_k, n_kv, 0);
    constexpr int steps_lo = 128, steps_G = 8;
    const int n_tab = steps ? steps_lo + n_kv/steps_lo + 1 : n_kv;
    if (rot != FATTN_SE_ROT_NONE && steps) {
        CUDA_CHECK(cudaMalloc(&d.tab, size_t(n_tab)*D*sizeof(float)));
        se_fill_float<<<1024, 256>>>(d.tab, size_t(n_tab)*D, 6);
    } else if (rot != FATTN_SE_ROT_NONE) {
        CUDA_CHECK(cudaMalloc(&d.tab_rows, size_t(n_tab)*D*sizeof(half)));
        se_fill_half<<<1024, 256>>>(d.tab_rows, size_t(n_tab)*D, 6);
    }
    if (q_rot) {
        CUDA_CHECK(cudaMalloc(&d.qtab, size_t(n_q)*D*sizeof(float)));
        se_fill_float<<<1024, 256>>>(d.qtab, size_t(n_q)*D, 7);
    }
    CUDA_CHECK(cudaGetLastError());

    fattn_se_params p = se_params_of(h, d, 1.0f/sqrtf(float(D)), 0.0f, W);
    p.q_rot = q_rot ? se_table_mode(rot) : FATTN_SE_ROT_NONE;
    if (steps) {
        fattn_se_set_steps(p, steps_G, steps_lo, n_tab);
    }
    d.k_g_scratch = rot != FATTN_SE_ROT_NONE ? se_table_setup(p, rot) : nullptr;
    fattn_se_plan P = fattn_se_make_plan(p, nsm);
    if (nsplit > 0) {
        P.nsplit = nsplit;
        fattn_se_plan_memory(p, P);
    }
    if (P.nbytes_cls + P.nbytes_ws > 0) {
        CUDA_CHECK(cudaMalloc(&d.ws, P.nbytes_cls + P.nbytes_ws));
    }

    const double us = se_time_us([&]() { se_run(p, P, d.ws, d.k_g_scratch, rot == FATTN_SE_ROT_NEOX); });

    // work: the visible (query, key) pairs, 2 products of 2*D flops each; traffic: K or K_g and V once per KV head
    const double pairs = double(n_q)*(n_kv - n_q) + 0.5*double(n_q)*(n_q + 1);
    const double tflops = 4.0*D*pairs*n_head/(us*1e-6)/1e12;
    const double gbs    = 2.0*double(n_kv)*n_head_kv*D*sizeof(half)/(us*1e-6)/1e9;
    printf("%-34s %-7s NHB=%d RPB=%2d nsplit=%3d  %10.1f us/call  %6.1f TFLOP/s  %7.1f GB/s (K+V)\n",
           name, steps ? "steps" : q_rot ? "tables" : rot ? "table" : P.decode ? "decode" : "prefill", P.NHB, P.RPB, P.nsplit,
           us, tflops, gbs);
}

// llama.cpp's own flash attention for one query (fattn-vec.cuh with its merge, as its launch_fattn sets them up) on the
// shape of se_time, for a ratio measured in the same run.
template <int D>
static void se_time_vanilla(const char * name, const int n_head, const int n_head_kv, const int n_kv, const int nsm) {
    const size_t nq = size_t(n_head)*D, nk = size_t(n_kv)*n_head_kv*D;
    float * q, * dst, * parts;
    half  * k, * v, * mask;
    float2 * meta;
    CUDA_CHECK(cudaMalloc(&q, nq*sizeof(float)));
    CUDA_CHECK(cudaMalloc(&dst, nq*sizeof(float)));
    CUDA_CHECK(cudaMalloc(&k, nk*sizeof(half)));
    CUDA_CHECK(cudaMalloc(&v, nk*sizeof(half)));
    CUDA_CHECK(cudaMalloc(&mask, size_t(n_kv)*sizeof(half)));
    se_fill_float<<<1024, 256>>>(q, nq, 1);
    se_fill_half <<<1024, 256>>>(k, nk, 3);
    se_fill_half <<<1024, 256>>>(v, nk, 5);
    se_fill_causal<<<dim3(64, 1), 256>>>(mask, 1, n_kv);
    CUDA_CHECK(cudaGetLastError());

    const auto kernel = flash_attn_ext_vec<D, 1, GGML_TYPE_F16, GGML_TYPE_F16, false>;
    const int nthreads = ggml_cuda_fattn_vec_get_nthreads_host(0);
    int blocks_per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, nthreads, 0));
    // launch_fattn's choice of parallel blocks (no stream-k): the fullest waves, from one block per slot of an SM up
    const int ntiles_KV = (n_kv + D - 1)/D;
    const int per_wave  = nsm*blocks_per_sm;
    int pb = std::min(blocks_per_sm, ntiles_KV), nwaves_best = 0, eff_best = 0;
    for (int t = pb; t <= ntiles_KV; ++t) {
        const int nb = n_head*t, nwaves = (nb + per_wave - 1)/per_wave, eff = 100*nb/(nwaves*per_wave);
        if (eff_best >= 95 && nwaves > nwaves_best) {
            break;
        }
        if (eff > eff_best) {
            nwaves_best = nwaves; eff_best = eff; pb = t;
        }
    }
    CUDA_CHECK(cudaMalloc(&parts, size_t(pb)*nq*sizeof(float)));
    CUDA_CHECK(cudaMalloc(&meta, size_t(pb)*n_head*sizeof(float2)));

    const float scale = 1.0f/sqrtf(float(D));
    const int32_t nb11 = n_head_kv*D*2, nb12 = D*2;
    const int64_t nb13 = int64_t(n_kv)*nb11;
    // launched as llama.cpp launches them: in its launch chains where the GPU has them (ours are too)
    auto run = [&]() {
        ggml_cuda_kernel_launch(kernel, ggml_cuda_kernel_launch_params(dim3(1, pb, n_head), dim3(WARP_SIZE, nthreads/WARP_SIZE), 0, 0),
            (const char *) q, (const char *) k, (const char *) v, (const char *) mask, (const char *) nullptr, (const int *) nullptr,
            pb > 1 ? parts : dst, meta, scale, 0.0f, 1.0f, 1.0f, 1u, 0.0f,
            D, init_fastdiv_values(1), n_head, 1, n_head*D*4, D*4, n_head*D*4,
            D, n_kv, n_head_kv, 1, nb11, nb12, nb13,
            nb11, nb12, nb13,
            1, 1, 1, n_kv*2, n_kv*2, int64_t(n_kv)*2);
        if (pb > 1) {
            ggml_cuda_kernel_launch(flash_attn_combine_results<D>,
                ggml_cuda_kernel_launch_params(dim3(1, n_head, 1), dim3(D), pb*sizeof(float2), 0), parts, meta, dst, pb);
        }
    };
    const double us = se_time_us(run);
    printf("%-34s %-7s NHB=1 RPB= 1 nsplit=%3d  %10.1f us/call  %6.1f TFLOP/s  %7.1f GB/s (K+V)\n", name, "llama",
           pb, us, 4.0*D*n_kv*n_head/(us*1e-6)/1e12, 2.0*double(n_kv)*n_head_kv*D*sizeof(half)/(us*1e-6)/1e9);
    for (void * ptr : {(void *) q, (void *) dst, (void *) parts, (void *) k, (void *) v, (void *) mask, (void *) meta}) {
        cudaFree(ptr);
    }
}

static void se_time_vanilla(const char * name, const int D, const int n_head, const int n_head_kv, const int n_kv,
                            const int nsm) {
    switch (D) {
        case  64: se_time_vanilla< 64>(name, n_head, n_head_kv, n_kv, nsm); break;
        case 128: se_time_vanilla<128>(name, n_head, n_head_kv, n_kv, nsm); break;
        case 256: se_time_vanilla<256>(name, n_head, n_head_kv, n_kv, nsm); break;
        default:  GGML_ABORT("head size %d", D);
    }
}

// A decode of one query with the grouped keys given, with a rotation table for the keys, with tables for the keys and the
// query, with a table of steps for the keys and a table row for the query, and through llama.cpp's own kernel on the
// same shape.
static void se_time_decode(const char * name, const int D, const int n_head, const int n_head_kv, const int n_kv, const int W,
                           const int nsm) {
    se_time(name, D, n_head, n_head_kv, 1, n_kv, W, nsm);
    se_time(name, D, n_head, n_head_kv, 1, n_kv, W, nsm, 0, FATTN_SE_ROT_NEOX);
    se_time(name, D, n_head, n_head_kv, 1, n_kv, W, nsm, 0, FATTN_SE_ROT_NEOX, true);
    se_time(name, D, n_head, n_head_kv, 1, n_kv, W, nsm, 0, FATTN_SE_ROT_NEOX, true, true);
    se_time_vanilla(name, D, n_head, n_head_kv, n_kv, nsm);
}

int main(int argc, char ** argv) {
    int device;
    CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    printf("device: %s, cc %d.%d, %d SMs\n\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    se_smpbo = prop.sharedMemPerBlockOptin;
    if (prop.major < 8) {
        fprintf(stderr, "the kernels need an Ampere or newer GPU\n");
        return 1;
    }

    const se_case cases[] = {
        // name                                      D  Hq Hkv n_q   n_kv    W ne3 mask        mne3 shuffled softcap
        {"decode D=64 gqa=4",                        64, 16, 4,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"decode D=128 gqa=4",                      128, 32, 8,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"decode D=64 gqa=8 no mask W=1",            64,  8, 1,   1, 1000,   1, 1, MASK_NONE,   1, false,  0.0f},
        {"decode D=128 gqa=1 n_q=7",                128,  8, 8,   7, 1000,   7, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=64 gqa=4 n_q=7",                 64, 16, 4,   7, 1000,   7, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=128 gqa=8 n_q=7",               128, 16, 2,   7, 1000, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=64 gqa=4 n_q=512",               64, 16, 4, 512, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=128 gqa=4 n_q=512 W=1",         128, 32, 8, 512, 4096,   1, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=128 gqa=1 softcap",             128,  4, 4, 512, 1000, 512, 1, MASK_CAUSAL, 1, false, 30.0f},
        {"prefill D=64 gqa=8 no mask W=7",           64,  8, 1, 512, 1000,   7, 1, MASK_NONE,   1, false,  0.0f},
        {"shuffled D=64 gqa=4 n_q=7, 2 streams",     64,  8, 2,   7, 1000,   7, 2, MASK_HOLES,  2, true,   0.0f},
        {"shuffled D=128 gqa=4 n_q=512, mask bcast", 128, 8, 2, 512, 1000, 512, 2, MASK_HOLES,  1, true,   0.0f},
        {"shuffled decode D=64 gqa=4 softcap",       64, 16, 4,   1, 1000,   7, 2, MASK_HOLES,  2, true,  50.0f},
        {"shuffled decode D=128 gqa=4 n_q=2",       128, 16, 4,   2, 4096, 512, 1, MASK_HOLES,  1, true,   0.0f},
        {"2 sequences prefill D=64 gqa=4 n_q=100",   64,  8, 2, 100, 4096, 512, 1, MASK_SEQS,   1, false,  0.0f},
        {"2 sequences decode D=128 gqa=4",          128,  8, 2,   1, 4096, 512, 1, MASK_SEQS,   1, false,  0.0f},
        // head size 256 (Gemma 2/3: prefill tiles of 32 keys under classified tiles of 64, decode tiles of 64)
        {"decode D=256 gqa=4",                      256,  4, 1,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"decode D=256 gqa=2 n_q=7",                256,  8, 4,   7, 1000,   7, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=256 gqa=4 n_q=512",             256,  8, 2, 512, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=256 gqa=1 n_q=100 W=33",        256,  2, 2, 100, 1000,  33, 1, MASK_CAUSAL, 1, false,  0.0f},
        {"prefill D=256 gqa=2 softcap",             256,  4, 2, 512, 1000, 512, 1, MASK_CAUSAL, 1, false, 50.0f},
        {"prefill D=256 gqa=4 no mask W=7",         256,  4, 1, 200, 1000,   7, 1, MASK_NONE,   1, false,  0.0f},
        {"shuffled D=256 gqa=4 n_q=512, 2 streams", 256,  4, 1, 512, 1000, 100, 2, MASK_HOLES,  2, true,   0.0f},
        {"shuffled decode D=256 gqa=4 n_q=2",       256,  4, 1,   2, 4096, 512, 1, MASK_HOLES,  1, true,   0.0f},
        {"2 sequences prefill D=256 gqa=4 n_q=100", 256,  4, 1, 100, 4096, 512, 1, MASK_SEQS,   1, false,  0.0f},
        // K_g as K and a rotation table: decodes of one query and of a few, both pair layouts
        {"table NORM D=64 gqa=4",                    64, 16, 4,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NORM},
        {"table NEOX D=128 softcap, 2 streams",     128,  8, 2,   1, 1000, 100, 2, MASK_HOLES,  2, true,  30.0f, FATTN_SE_ROT_NEOX},
        {"table NEOX D=256 gqa=4",                  256,  4, 1,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX},
        {"table NORM D=256 2 sequences",            256,  4, 2,   1, 1000,  33, 1, MASK_SEQS,   1, false,  0.0f, FATTN_SE_ROT_NORM},
        {"table NORM decode D=128 n_q=2",           128, 16, 4,   2, 4096, 512, 1, MASK_HOLES,  1, true,   0.0f, FATTN_SE_ROT_NORM},
        {"table NEOX decode D=256 n_q=3",           256,  4, 1,   3, 1000, 100, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX},
        // and Q_g as Q and a table row per query
        {"tables NORM D=64 gqa=4",                   64, 16, 4,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NORM, true},
        {"tables NEOX D=128 softcap, 2 streams",    128,  8, 2,   1, 1000, 100, 2, MASK_HOLES,  2, true,  30.0f, FATTN_SE_ROT_NEOX, true},
        {"tables NEOX decode D=256 n_q=3",          256,  4, 1,   3, 1000, 100, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX, true},
        {"tables NORM decode D=128 n_q=2",          128, 16, 4,   2, 4096, 512, 1, MASK_HOLES,  1, true,   0.0f, FATTN_SE_ROT_NORM, true},
        // K_g as K and a table of steps
        {"steps NORM D=64 gqa=4",                    64, 16, 4,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NORM, false, 128},
        {"steps NEOX D=128 gqa=4",                  128, 16, 4,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX, false, 128},
        {"steps NEOX D=128 softcap, 2 streams",     128,  8, 2,   1, 1000, 100, 2, MASK_HOLES,  2, true,  30.0f, FATTN_SE_ROT_NEOX, false,   8},
        {"steps NEOX D=256 gqa=4",                  256,  4, 1,   1, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX, false, 128},
        {"steps NORM decode D=128 n_q=2, q rows",   128, 16, 4,   2, 4096, 512, 1, MASK_HOLES,  1, true,   0.0f, FATTN_SE_ROT_NORM, true,  128},
        {"steps NEOX D=256 2 sequences, q rows",    256,  4, 2,   1, 1000,  33, 1, MASK_SEQS,   1, false,  0.0f, FATTN_SE_ROT_NEOX, true,    8},
        // a prefill of a table form: K rotated into a scratch first (flash_attn_ext_se_rotate_k)
        {"table NEOX prefill D=128 n_q=512, q rows", 128, 32, 8, 512, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NEOX, true},
        {"steps NORM prefill D=64 n_q=100 2 streams", 64, 8, 2, 100, 1000, 100, 2, MASK_HOLES,  2, true,   0.0f, FATTN_SE_ROT_NORM, false,   8},
        {"steps NEOX prefill D=256 n_q=512 softcap", 256,  4, 1, 512, 4096, 512, 1, MASK_CAUSAL, 1, false, 50.0f, FATTN_SE_ROT_NEOX, true,  128},
        {"qrows prefill D=128 n_q=512",             128, 32, 8, 512, 4096, 512, 1, MASK_CAUSAL, 1, false,  0.0f, FATTN_SE_ROT_NONE, true},
        {"qrows prefill D=64 n_q=100 2 streams",     64,  8, 2, 100, 1000, 100, 2, MASK_HOLES,  2, true,   0.0f, FATTN_SE_ROT_NONE, true},
        {"qrows prefill D=256 n_q=512 softcap",     256,  4, 1, 512, 4096, 512, 1, MASK_CAUSAL, 1, false, 50.0f, FATTN_SE_ROT_NONE, true},
    };

    if (argc > 1 && strcmp(argv[1], "--splits") == 0) {
        // decode of the benchmarks' shapes with the plan's splits (first line) and with others
        const int sweep[] = {0, 8, 16, 32, 48, 64, 96, 128, 192, 264};
        struct { const char * name; int D, n_head, n_head_kv, n_kv, W; } shapes[] = {
            {"decode D=128 16/4 heads 8K",  128, 16, 4,  8192, 1024},
            {"decode D=128 32/8 heads 32K", 128, 32, 8, 32768, 1024},
            {"decode D=256 4/1 heads 64K",  256,  4, 1, 65536, 8192},
        };
        for (const auto & sh : shapes) {
            for (const int rot : {int(FATTN_SE_ROT_NONE), int(FATTN_SE_ROT_NEOX)}) { // grouped keys, rotation table
                for (const int ns : sweep) {
                    se_time(sh.name, sh.D, sh.n_head, sh.n_head_kv, 1, sh.n_kv, sh.W, prop.multiProcessorCount, ns, rot);
                }
            }
            se_time_decode(sh.name, sh.D, sh.n_head, sh.n_head_kv, sh.n_kv, sh.W, prop.multiProcessorCount);
        }
        return 0;
    }

    std::mt19937 rng(1234);
    int n_fail = 0;
    const bool perf_only = argc > 1 && strcmp(argv[1], "--perf") == 0;
    for (const se_case & c : cases) {
        if (!perf_only) {
            n_fail += !se_run_case(c, prop.multiProcessorCount, rng);
        }
    }
    printf("\n%d passed, %d failed\n\n", int(sizeof(cases)/sizeof(cases[0])) - n_fail, n_fail);
    if (argc > 1 && strcmp(argv[1], "--check") == 0) {
        return n_fail == 0 ? 0 : 1;
    }

    se_time("prefill D=64 16/4 heads",   64, 16, 4, 2048, 32768, 1024, prop.multiProcessorCount);
    se_time("prefill D=128 16/4 heads", 128, 16, 4, 2048, 32768, 1024, prop.multiProcessorCount);
    se_time("prefill D=128 32/8 heads", 128, 32, 8, 2048, 32768, 1024, prop.multiProcessorCount);
    // a 512-token ubatch (llama.cpp's default) at the end of an 8K and a 32K document: 1.1B and 8B shapes
    se_time("ubatch 512 D=128 16/4 heads 8K",  128, 16, 4, 512,  8192, 1024, prop.multiProcessorCount);
    se_time("ubatch 512 D=128 16/4 heads 32K", 128, 16, 4, 512, 32768, 1024, prop.multiProcessorCount);
    se_time("ubatch 512 D=128 32/8 heads 8K",  128, 32, 8, 512,  8192, 1024, prop.multiProcessorCount);
    // the same 32K ubatch with a table of rows and a table of steps: K rotated into a scratch first, as the backend does
    se_time("ubatch 512 D=128 16/4 heads 32K", 128, 16, 4, 512, 32768, 1024, prop.multiProcessorCount, 0, FATTN_SE_ROT_NORM, true);
    se_time("ubatch 512 D=128 16/4 heads 32K", 128, 16, 4, 512, 32768, 1024, prop.multiProcessorCount, 0, FATTN_SE_ROT_NORM, true,
            true);
    se_time_decode("decode D=64 16/4 heads",      64, 16, 4, 32768, 1024, prop.multiProcessorCount);
    se_time_decode("decode D=128 16/4 heads 8K", 128, 16, 4,  8192, 1024, prop.multiProcessorCount);
    se_time_decode("decode D=128 32/8 heads",    128, 32, 8, 32768, 1024, prop.multiProcessorCount);
    // Gemma 3 270M's global layers: 4 query heads, 1 KV head of 256
    se_time("prefill D=256 4/1 heads 64K",  256, 4, 1, 2048,  65536, 1024, prop.multiProcessorCount);
    se_time("prefill D=256 4/1 heads 128K", 256, 4, 1, 2048, 131072, 1024, prop.multiProcessorCount);
    se_time("ubatch 512 D=256 4/1 heads 128K",  256, 4, 1,  512, 131072, 1024, prop.multiProcessorCount);
    se_time_decode("decode D=256 4/1 heads 64K",  256, 4, 1,  65536, 1024, prop.multiProcessorCount);
    se_time_decode("decode D=256 4/1 heads 128K", 256, 4, 1, 131072, 1024, prop.multiProcessorCount);

    return n_fail == 0 ? 0 : 1;
}
