#pragma once

// The CPU kernel of GGML_OP_FLASH_ATTN_EXT_SE (ops-self-extend.cpp): how the op is cut into work items, the
// scratch of a thread, and the row operations of a tile (masks and classes, K rows packed or rotated, the table of
// steps, dot products with a key's rotation applied on the way, V accumulation, prefetch). Private to that file.

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml-self-extend.h"
#include "simd-gemm.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t SE_TILE_ROWS = 128; // rows (query x head) per tile, at most: each K/V tile is converted once per
                                      // tile of rows (64 -> 128: prefill 8 % faster, SmolLM2 at 8K on 2 cores)
constexpr int64_t SE_TILE_KV   = 64; // keys per tile
constexpr int64_t SE_MIN_CHUNK = 256; // keys per chunk when the keys are split, at least
constexpr int64_t SE_ROWS_GEMM = 8;   // tiles of more rows multiply packed f32 tiles; fewer (decode) dot each key
constexpr size_t  SE_PREFETCH  = 8192; // few-row tiles: bytes of K and V rows requested ahead of the key in use

// the node's operands; the kernel folds 1/logit_softcap into scale
using se_args = ggml_flash_attn_ext_se_args;

// how the op is cut into work items; shared by the kernel and the work-size estimate
struct se_plan {
    int64_t DK, DV, n_q, n_kv, n_head, n_head_kv, ne3;
    int64_t gqa;      // query heads per KV head
    int64_t q_blk;    // queries per tile
    int64_t n_qblk;   // tiles of queries per (stream, KV head)
    int64_t n_chunk;  // key chunks (1: no split)
    int64_t chunk;    // keys per chunk
    double  inv_g;    // table of steps: 1/G, and log2 n_lo, for a key's steps without an integer division (se_k_steps)
    int     lo_shift;
    int64_t n_item() const { return ne3*n_head_kv*n_qblk*n_chunk; }
};

se_plan se_make_plan(const se_args & a, int nth) {
    const ggml_tensor * q = a.q;
    const ggml_tensor * k = a.k;
    const ggml_tensor * v = a.v;

    se_plan p;
    p.DK        = k->ne[0];
    p.DV        = v->ne[0];
    p.n_q       = q->ne[1];
    p.n_kv      = k->ne[1];
    p.n_head    = q->ne[2];
    p.n_head_kv = k->ne[2];
    p.ne3       = q->ne[3];
    p.gqa       = p.n_head/p.n_head_kv;
    p.q_blk     = std::max<int64_t>(1, SE_TILE_ROWS/p.gqa);
    p.n_qblk    = (p.n_q + p.q_blk - 1)/p.q_blk;

    // enough items for the threads to balance (8 per thread), but chunks of at least SE_MIN_CHUNK keys
    const int64_t n_base = p.ne3*p.n_head_kv*p.n_qblk;
    p.n_chunk = 1;
    if (nth > 1 && n_base < 8*nth) {
        p.n_chunk = std::min((8*nth + n_base - 1)/n_base, std::max<int64_t>(1, p.n_kv/SE_MIN_CHUNK));
    }
    p.chunk = (p.n_kv + p.n_chunk - 1)/p.n_chunk;
    p.inv_g    = a.n_group > 0 ? 1.0/a.n_group : 0.0;
    p.lo_shift = a.n_group > 0 ? __builtin_ctz(a.n_lo) : 0;
    return p;
}

// per-thread scratch: the tile buffers, then the accumulators of one work item
struct se_scratch {
    float * Q, * Qg;   // [R, DK]            rows of the tile (query t, head hh) at t*gqa + hh
    float * Qc, * Qgc; // [R, DK] (at most)  the same rows in the vec_dot type of K / K_g (few-row tiles only)
    float * Qh;        // [R, DK] (at most)  table of steps, few-row tiles: Qg rotated on by a key's larger step
    float * Kt;        // [DK, SE_TILE_KV]   K or K_g tile, transposed
    float * S, * Sg;   // [R, SE_TILE_KV]    q.k and q_g.k_g; S then holds the probabilities
    float * V;         // [SE_TILE_KV, DV]
    float * sel;       // [q_blk, SE_TILE_KV] mask value per (query, key), -inf: not visible
    float * row;       // [max(DK, DV)]      one converted row
    float * cs;        // [DK]               table forms: a key's row, converted (a row per key) or composed (steps)
    float * M, * L;    // [R]                running max and sum
    float * O;         // [R, DV]            unnormalized output
    size_t  n_floats;

    se_scratch(const se_plan & p, float * base) {
        const int64_t R = p.q_blk*p.gqa;
        int64_t off = 0; // 64-byte aligned pieces
        auto take = [&](int64_t n) { float * r = base ? base + off : nullptr; off += (n + 15) & ~int64_t(15); return r; };
        Q   = take(R*p.DK);
        Qg  = take(R*p.DK);
        Qc  = take(std::min(R, SE_ROWS_GEMM)*p.DK);
        Qgc = take(std::min(R, SE_ROWS_GEMM)*p.DK);
        Qh  = take(std::min(R, SE_ROWS_GEMM)*p.DK);
        Kt  = take(p.DK*SE_TILE_KV);
        S   = take(R*SE_TILE_KV);
        Sg  = take(R*SE_TILE_KV);
        V   = take(SE_TILE_KV*p.DV);
        sel = take(p.q_blk*SE_TILE_KV);
        row = take(std::max(p.DK, p.DV));
        cs  = take(p.DK);
        M   = take(R);
        L   = take(R);
        O   = take(R*p.DV);
        n_floats = off;
    }
};

size_t se_partial_floats(const se_plan & p) {
    return p.n_chunk > 1 ? (size_t) (p.ne3*p.n_q*p.n_head)*p.n_chunk*(2 + p.DV) : 0;
}

// row of a K/V-like tensor converted to f32
inline void se_row_to_f32(const ggml_tensor * t, const char * row, float * out, int64_t n) {
    switch (t->type) {
        case GGML_TYPE_F32: memcpy(out, row, n*sizeof(float)); break;
        case GGML_TYPE_F16: ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, out, n); break;
        default:            ggml_get_type_traits(t->type)->to_float(row, out, n); break;
    }
}

// The first step of a tile for one query at position pq: for its keys j < nk (positions pk[j], mask row mp or none),
// sl[j] = the mask value (-inf: not visible; -inf too for j >= nk up to SE_TILE_KV) and gr[j] = 1 where the pair takes
// the grouped operands (pq - pk[j] >= W); need_n / need_g are set when a visible pair takes the plain / grouped ones.
// causal (no mask): the mask value is 0 where 0 <= pk[j] <= pq, else -inf (ggml_flash_attn_ext_se_causal).
// Vectorized: as a scalar loop (a table lookup per mask value) it took about a tenth of a SmolLM2 prefill on 2 cores.
inline void se_classify_row(const ggml_fp16_t * mp, bool causal, const int32_t * pk, int32_t pq, int32_t W, int64_t nk,
                            float * sl, uint8_t * gr, bool & need_n, bool & need_g) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256i last = _mm256_set1_epi32(pq - W); // grouped: pk <= pq - W
    const __m256i qpos = _mm256_set1_epi32(pq);
    const __m256i zero = _mm256_setzero_si256();
    const __m256  ninf = _mm256_set1_ps(-INFINITY);
    unsigned any_n = 0, any_g = 0;
    for (; j + 8 <= nk; j += 8) {
        const __m256i   k   = _mm256_loadu_si256((const __m256i *) (pk + j));
        __m256 m = _mm256_setzero_ps();
        if (mp) {
            m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (mp + j)));
        } else if (causal) { // hidden: pk > pq or pk < 0
            const __m256i hidden = _mm256_or_si256(_mm256_cmpgt_epi32(k, qpos), _mm256_cmpgt_epi32(zero, k));
            m = _mm256_and_ps(_mm256_castsi256_ps(hidden), ninf);
        }
        _mm256_storeu_ps(sl + j, m);
        const unsigned  g   = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(k, last))) & 0xFFu;
        const unsigned  vis = _mm256_movemask_ps(_mm256_cmp_ps(m, ninf, _CMP_NEQ_OQ));
        // the 8 bits of g as 8 bytes of 0 or 1
        const uint64_t bytes = (((g*0x0101010101010101ull) & 0x8040201008040201ull) + 0x7F7F7F7F7F7F7F7Full) >> 7
                             & 0x0101010101010101ull;
        memcpy(gr + j, &bytes, sizeof(bytes));
        any_g |= g & vis;
        any_n |= ~g & vis;
    }
    need_g |= any_g != 0;
    need_n |= any_n != 0;
#endif
    for (; j < nk; ++j) {
        sl[j] = mp ? GGML_CPU_FP16_TO_FP32(mp[j]) : causal && (pk[j] < 0 || pk[j] > pq) ? -INFINITY : 0.0f;
        gr[j] = pq - pk[j] >= W;
        if (sl[j] != -INFINITY) {
            need_g |=  gr[j];
            need_n |= !gr[j];
        }
    }
    for (; j < SE_TILE_KV; ++j) {
        sl[j] = -INFINITY;
    }
}

// the largest of a tile's SE_TILE_KV logits (ggml_vec_max_f32 is a scalar loop)
inline float se_tile_max(const float * x) {
#if defined(__AVX2__)
    __m256 m = _mm256_loadu_ps(x);
    for (int64_t j = 8; j < SE_TILE_KV; j += 8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
#else
    float m = -INFINITY;
    ggml_vec_max_f32(SE_TILE_KV, &m, x);
    return m;
#endif
}

// keys [c0, c0 + nk) as Kt[d*SE_TILE_KV + key] (zero padded to SE_TILE_KV keys), each made as an f32 row of DK by
// make_row(j, row)
template <typename F>
void se_pack_rows(int64_t DK, int64_t c0, int64_t nk, float * Kt, float * row, F make_row) {
    for (int64_t t = 0; t < nk; ++t) {
        make_row(c0 + t, row);
        for (int64_t d = 0; d < DK; ++d) {
            Kt[d*SE_TILE_KV + t] = row[d];
        }
    }
    for (int64_t d = 0; d < DK; ++d) {
        for (int64_t t = nk; t < SE_TILE_KV; ++t) {
            Kt[d*SE_TILE_KV + t] = 0.0f;
        }
    }
}

// K rows [c0, c0 + nk) of KV head hk, stream s, packed by se_pack_rows
void se_pack_k(const ggml_tensor * k, int64_t c0, int64_t nk, int64_t hk, int64_t s, float * Kt, float * row) {
    se_pack_rows(k->ne[0], c0, nk, Kt, row, [&](int64_t j, float * out) {
        se_row_to_f32(k, (const char *) k->data + j*k->nb[1] + hk*k->nb[2] + s*k->nb[3], out, k->ne[0]);
    });
}

// The first n_rot dimensions of an f32 row rotated in place by a row cs of a rotation table, or (inverse) back
// (a prefill rotates each grouped key once per tile of queries; a decode step dots through se_dot_rows instead)
void se_rotate_row(float * row, const float * cs, int64_t n_rot, int32_t rope_mode, bool inverse = false) {
    const int64_t half = n_rot/2;
    const bool    neox = rope_mode == GGML_ROPE_TYPE_NEOX;
    const float   sgn  = inverse ? -1.0f : 1.0f;
    int64_t i = 0; // pairs done
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    const __m256 vsgn = _mm256_set1_ps(sgn);
    if (neox) { // x, y: 8 pairs' first and second dimensions; cos and sin likewise
        for (; i + 8 <= half; i += 8) {
            const __m256 x = _mm256_loadu_ps(row + i), y = _mm256_loadu_ps(row + half + i);
            const __m256 c = _mm256_loadu_ps(cs + i), sn = _mm256_mul_ps(vsgn, _mm256_loadu_ps(cs + half + i));
            _mm256_storeu_ps(row + i,        _mm256_fmsub_ps(x, c, _mm256_mul_ps(y, sn)));
            _mm256_storeu_ps(row + half + i, _mm256_fmadd_ps(x, sn, _mm256_mul_ps(y, c)));
        }
    } else { // 4 interleaved pairs (x, y): even lanes x c - y s, odd lanes y c + x s
        for (; i + 4 <= half; i += 4) {
            const __m256 v  = _mm256_loadu_ps(row + 2*i), t = _mm256_loadu_ps(cs + 2*i);
            const __m256 c  = _mm256_moveldup_ps(t), sn = _mm256_mul_ps(vsgn, _mm256_movehdup_ps(t));
            const __m256 sw = _mm256_permute_ps(v, 0xB1); // (y, x) per pair
            _mm256_storeu_ps(row + 2*i, _mm256_fmaddsub_ps(v, c, _mm256_mul_ps(sw, sn)));
        }
    }
#endif
    for (; i < half; ++i) {
        const int64_t ia = neox ? i : 2*i;        // the pair (ia, ib): cos at ia, sin at ib
        const int64_t ib = neox ? i + half : 2*i + 1;
        const float x = row[ia], y = row[ib], c = cs[ia], sn = sgn*cs[ib];
        row[ia] = x*c - y*sn;
        row[ib] = x*sn + y*c;
    }
}

// Table of steps: key j's two rows, the single-position step (lo) and the larger one (hi, row n_lo + h). Keys the
// table does not cover (the graph sizes it to cover every cell) take its last larger step rather than read past it.
struct se_steps {
    const float * lo;
    const float * hi;
    int64_t       h;
};

// A decode step finds the steps of every grouped key, so without an integer division: p/G from a double product,
// corrected where it rounds below a multiple of G; n_lo is a power of two.
inline se_steps se_k_steps(const se_args & a, const se_plan & pl, int64_t j, int64_t s) {
    const ggml_tensor * tab = a.k_g;
    const int64_t p = ((const int32_t *) ((const char *) a.pos_k->data + s*a.pos_k->nb[1]))[j];
    int64_t pg = (int64_t) (p*pl.inv_g);
    pg += (pg + 1)*a.n_group <= p;
    const int64_t m = p > 0 ? p - pg : 0; // p/G - p positions back
    const int64_t h = std::min<int64_t>(m >> pl.lo_shift, tab->ne[1] - a.n_lo - 1);
    return { (const float *) ((const char *) tab->data + (m & (a.n_lo - 1))*tab->nb[1]),
             (const float *) ((const char *) tab->data + (a.n_lo + h)*tab->nb[1]), h };
}

// Rotation-table form: the row of the table that rotates key j's K row on to its grouped position, in the table's
// type: row j (F16 or F32), or with a table of steps (F32) the single-position step only, with h = the larger step's
// index, which the caller applies to the queries instead (q . R_hi R_lo k = R_hi^-1 q . R_lo k); h = -1 without steps.
inline const void * se_k_rot_cs(const se_args & a, const se_plan & pl, int64_t j, int64_t s, int64_t & h) {
    if (a.n_group == 0) {
        h = -1;
        return (const char *) a.k_g->data + j*a.k_g->nb[1] + s*a.k_g->nb[3];
    }
    const se_steps st = se_k_steps(a, pl, j, s);
    h = st.h;
    return st.lo;
}

// a row of n values of a table of type t as f32: the row itself (F32), or converted into buf (F16)
inline const float * se_tab_f32(ggml_type t, const void * row, int64_t n, float * buf) {
    if (t == GGML_TYPE_F32) {
        return (const float *) row;
    }
    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, buf, n);
    return buf;
}

// Rotation-table form: key j's grouped operand made from its K row, as f32: the row rotated by row j of the table, or
// by the product of its two steps (cs: scratch for that row or product)
void se_k_rot_row(const se_args & a, const se_plan & pl, int64_t j, int64_t hk, int64_t s, float * row, float * cs) {
    const ggml_tensor * k = a.k;
    const int64_t n_rot = a.k_g->ne[0];
    se_row_to_f32(k, (const char *) k->data + j*k->nb[1] + hk*k->nb[2] + s*k->nb[3], row, k->ne[0]);
    if (a.n_group == 0) {
        int64_t h;
        se_rotate_row(row, se_tab_f32(a.k_g->type, se_k_rot_cs(a, pl, j, s, h), n_rot, cs), n_rot, a.rope_mode);
        return;
    }
    const se_steps st = se_k_steps(a, pl, j, s);
    memcpy(cs, st.lo, n_rot*sizeof(float)); // the product of the two rotations: one rotated by the other
    se_rotate_row(cs, st.hi, n_rot, a.rope_mode);
    se_rotate_row(row, cs, n_rot, a.rope_mode);
}

// the grouped keys [c0, c0 + nk) of KV head hk made from K and the table, packed by se_pack_rows
void se_pack_k_rot(const se_args & a, const se_plan & pl, int64_t c0, int64_t nk, int64_t hk, int64_t s, float * Kt,
                   float * row, float * cs) {
    se_pack_rows(a.k->ne[0], c0, nk, Kt, row, [&](int64_t j, float * out) { se_k_rot_row(a, pl, j, hk, s, out, cs); });
}

// The rotation a key row takes on its way into a dot product (se_dot_rows): none, or by a row cs of a rotation table
// (F32, or F16: cs_f16) over its first n_rot dimensions, in either pair layout (ggml-self-extend.h)
struct se_rot {
    const void * cs = nullptr; // null: none
    bool         cs_f16 = false;
    int64_t      n_rot = 0;
    bool         neox = false;
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <bool F16>
inline __m256 se_load8(const void * k, int64_t d) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) k + d)))
               : _mm256_loadu_ps((const float *) k + d);
}

// out[r*SE_TILE_KV] = (R k) . Q[r] for N query rows in f32: the key (f16 or f32) loaded once, rotated (ROT: 0 none,
// 1 NORM pairs, 2 NEOX pairs) by rot (a row of f16: T16) in registers. A decode step dots each grouped key of the
// table forms this way: made in a scratch row first, by calls that convert, rotate and dot one after the other, it
// cost them a fifth of SmolLM2's decode at 16K on two cores against the grouped-key cache (docs/RESULTS.md 4.2).
template <int N, bool F16, int ROT, bool T16>
void se_dot_rows_n(const void * k, int64_t DK, const float * Q, const se_rot & rot, float * out) {
    __m256 acc[N];
    for (int r = 0; r < N; ++r) {
        acc[r] = _mm256_setzero_ps();
    }
    auto add = [&](__m256 x, int64_t d) {
        for (int r = 0; r < N; ++r) {
            acc[r] = _mm256_fmadd_ps(x, _mm256_loadu_ps(Q + r*DK + d), acc[r]);
        }
    };
    int64_t d = 0;
    if (ROT == 1) { // 4 interleaved pairs (x, y) per 8 floats: even lanes x c - y s, odd lanes y c + x s
        for (; d < rot.n_rot; d += 8) {
            const __m256 v = se_load8<F16>(k, d), t = se_load8<T16>(rot.cs, d);
            const __m256 sw = _mm256_permute_ps(v, 0xB1);
            add(_mm256_fmaddsub_ps(v, _mm256_moveldup_ps(t), _mm256_mul_ps(sw, _mm256_movehdup_ps(t))), d);
        }
    } else if (ROT == 2) { // the pairs' first dimensions at d, their second at d + n_rot/2
        const int64_t half = rot.n_rot/2;
        for (; d < half; d += 8) {
            const __m256 x = se_load8<F16>(k, d), y = se_load8<F16>(k, half + d);
            const __m256 c = se_load8<T16>(rot.cs, d), sn = se_load8<T16>(rot.cs, half + d);
            add(_mm256_fmsub_ps(x, c, _mm256_mul_ps(y, sn)), d);
            add(_mm256_fmadd_ps(x, sn, _mm256_mul_ps(y, c)), half + d);
        }
        d = rot.n_rot;
    }
    for (; d < DK; d += 8) {
        add(se_load8<F16>(k, d), d);
    }
    for (int r = 0; r < N; ++r) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r*SE_TILE_KV] = _mm_cvtss_f32(h);
    }
}

template <bool F16, int ROT, bool T16>
bool se_dot_rows_t(const void * k, int64_t DK, const float * Q, int64_t n, const se_rot & rot, float * out) {
    switch (n) {
        case 1: se_dot_rows_n<1, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 2: se_dot_rows_n<2, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 3: se_dot_rows_n<3, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 4: se_dot_rows_n<4, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 5: se_dot_rows_n<5, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 6: se_dot_rows_n<6, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 7: se_dot_rows_n<7, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        case 8: se_dot_rows_n<8, F16, ROT, T16>(k, DK, Q, rot, out); return true;
        default: return false;
    }
}

template <bool F16, int ROT>
bool se_dot_rows_c(const void * k, int64_t DK, const float * Q, int64_t n, const se_rot & rot, float * out) {
    return rot.cs_f16 ? se_dot_rows_t<F16, ROT, true>(k, DK, Q, n, rot, out)
                      : se_dot_rows_t<F16, ROT, false>(k, DK, Q, n, rot, out);
}

template <bool F16>
bool se_dot_rows_r(const void * k, int64_t DK, const float * Q, int64_t n, const se_rot & rot, float * out) {
    if (!rot.cs) {
        return se_dot_rows_t<F16, 0, false>(k, DK, Q, n, rot, out);
    }
    return rot.neox ? se_dot_rows_c<F16, 2>(k, DK, Q, n, rot, out) : se_dot_rows_c<F16, 1>(k, DK, Q, n, rot, out);
}

// the same for any n <= 8 and an F16 or F32 key row, rotated by rot (if any); false when this build has no such kernel
// or the rotated dimensions do not fall on whole vectors (the caller rotates a converted row and uses ggml's vec_dot)
bool se_dot_rows(ggml_type type, const void * k, int64_t DK, const float * Q, int64_t n, float * out,
                 const se_rot & rot = {}) {
    if (DK % 8 != 0 || (rot.cs && rot.n_rot % (rot.neox ? 16 : 8) != 0)) {
        return false;
    }
    switch (type) {
        case GGML_TYPE_F16: return se_dot_rows_r<true>(k, DK, Q, n, rot, out);
        case GGML_TYPE_F32: return se_dot_rows_r<false>(k, DK, Q, n, rot, out);
        default:            return false;
    }
}

// O[r] += sum_i P[r*SE_TILE_KV + js[i]] v_i over the R rows of a tile and its keys js with a visible probability,
// for N = R <= 8 rows and f16 V rows vs: eight dimensions' accumulators stay in registers while the keys go by, where
// a row at a time loaded and stored every accumulator once per key
template <int N>
void se_mad_tile_n(const ggml_fp16_t * const * vs, const int * js, int n, int64_t DV, float * O, const float * P) {
    for (int64_t d = 0; d < DV; d += 8) {
        __m256 acc[N];
        for (int r = 0; r < N; ++r) {
            acc[r] = _mm256_loadu_ps(O + r*DV + d);
        }
        for (int i = 0; i < n; ++i) {
            const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (vs[i] + d)));
            for (int r = 0; r < N; ++r) {
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + r*SE_TILE_KV + js[i]), x, acc[r]);
            }
        }
        for (int r = 0; r < N; ++r) {
            _mm256_storeu_ps(O + r*DV + d, acc[r]);
        }
    }
}

// the same for any R <= 8 and f16 V whose rows fill whole vectors; false otherwise (the caller goes key by key)
bool se_mad_tile(ggml_type type, const void * const * vs, const int * js, int n, int64_t DV, float * O, const float * P,
                 int64_t R) {
    if (type != GGML_TYPE_F16 || DV % 8 != 0) {
        return false;
    }
    const auto * v = (const ggml_fp16_t * const *) vs;
    switch (R) {
        case 1: se_mad_tile_n<1>(v, js, n, DV, O, P); return true;
        case 2: se_mad_tile_n<2>(v, js, n, DV, O, P); return true;
        case 3: se_mad_tile_n<3>(v, js, n, DV, O, P); return true;
        case 4: se_mad_tile_n<4>(v, js, n, DV, O, P); return true;
        case 5: se_mad_tile_n<5>(v, js, n, DV, O, P); return true;
        case 6: se_mad_tile_n<6>(v, js, n, DV, O, P); return true;
        case 7: se_mad_tile_n<7>(v, js, n, DV, O, P); return true;
        case 8: se_mad_tile_n<8>(v, js, n, DV, O, P); return true;
        default: return false;
    }
}
#else
bool se_dot_rows(ggml_type, const void *, int64_t, const float *, int64_t, float *, const se_rot & = {}) {
    return false;
}

bool se_mad_tile(ggml_type, const void * const *, const int *, int, int64_t, float *, const float *, int64_t) {
    return false;
}
#endif

// Decode is bound by memory latency, so a few-row tile requests the rows of the keys ahead of the one in use: one
// key's K (or K_g, as the tile's first query will take it) and V rows per key dotted, about SE_PREFETCH bytes ahead.
// Spread so, the requests overlap the dot products; a whole tile's rows requested at once (256 lines for SmolLM2)
// fill the core's miss buffers and stall it, which cost the steps form a fifth of its decode speed at 16K on two
// cores (docs/RESULTS.md 4.2).
struct se_prefetcher {
    const se_args & a;
    int64_t hk, s;
    int32_t pos_q0;
    const int32_t * pk;
    size_t  k_bytes, kg_bytes, v_bytes; // row sizes once: ggml_row_size is a call into ggml-base
    int64_t dist;                       // keys ahead

    se_prefetcher(const se_args & a, int64_t hk, int64_t s, int32_t pos_q0) : a(a), hk(hk), s(s), pos_q0(pos_q0) {
        pk       = (const int32_t *) ((const char *) a.pos_k->data + s*a.pos_k->nb[1]);
        k_bytes  = ggml_row_size(a.k->type, a.k->ne[0]);
        kg_bytes = a.k_rot ? k_bytes : ggml_row_size(a.k_g->type, a.k_g->ne[0]);
        v_bytes  = ggml_row_size(a.v->type, a.v->ne[0]);
        dist     = std::max<int64_t>(4, SE_PREFETCH/(k_bytes + v_bytes));
    }

    // always inlined: GCC 12 takes a call to a function that does nothing but prefetch for one without effects
    // and drops it (no prefetch was left in the kernel)
#if defined(__GNUC__)
    __attribute__((always_inline))
#endif
    void key(int64_t j) const {
        const bool grouped = pos_q0 - pk[j] >= a.n_window;
        const bool use_kg  = grouped && !a.k_rot;
        const ggml_tensor * kt = use_kg ? a.k_g : a.k;
        const char * kr = (const char *) kt->data + j*kt->nb[1] + hk*kt->nb[2] + s*kt->nb[3];
        if (grouped && a.k_rot && a.n_group == 0) { // (a table of steps stays in the caches)
            __builtin_prefetch((const char *) a.k_g->data + j*a.k_g->nb[1] + s*a.k_g->nb[3]);
        }
        const char * vr = (const char *) a.v->data + j*a.v->nb[1] + hk*a.v->nb[2] + s*a.v->nb[3];
        for (size_t b = 0, n = use_kg ? kg_bytes : k_bytes; b < n; b += 64) {
            __builtin_prefetch(kr + b);
        }
        for (size_t b = 0; b < v_bytes; b += 64) {
            __builtin_prefetch(vr + b);
        }
    }
};

} // namespace
