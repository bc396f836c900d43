// CPU kernel of GGML_OP_FLASH_ATTN_EXT_SE (see ggml-self-extend.h for what it computes).
//
// Work is cut into tiles of rows x keys. A row is one (query, head) pair; the rows of a tile are consecutive
// queries times all the query heads that share one KV head (GQA), so each K/V row is converted once and used
// by every head of its group. Per key tile:
//
//   1. the mask and the positions of the tile decide, per (query, key), masked / neighbour / grouped;
//      a tile with nothing visible is skipped,
//   2. only the operand pairs the tile needs are multiplied (q.k, q_g.k_g, or both near i - j = W); k_g is
//      given, or (rotation-table form) made from each K row as it is converted; with a table of steps, a few-row
//      tile rotates each K row by its key's single-position step only and the queries by the larger one, which
//      keys in position order share for n_lo positions at a time,
//   3. the chosen logit of each pair goes through one online softmax (running max M, sum L per row),
//   4. the probabilities multiply the V tile into the row's accumulator.
//
// When there are too few tiles of rows to keep every thread busy (decode), the keys are also split into
// chunks; each chunk leaves (M, L, O) per row and a reduction merges them exactly.

#include "ops-self-extend.h"

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
    float * cs;        // [DK]               table of steps: a key's row, composed
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
// Vectorized: as a scalar loop (a table lookup per mask value) it took about a tenth of a SmolLM2 prefill on 2 cores.
inline void se_classify_row(const ggml_fp16_t * mp, const int32_t * pk, int32_t pq, int32_t W, int64_t nk, float * sl,
                            uint8_t * gr, bool & need_n, bool & need_g) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256i last = _mm256_set1_epi32(pq - W); // grouped: pk <= pq - W
    const __m256  ninf = _mm256_set1_ps(-INFINITY);
    unsigned any_n = 0, any_g = 0;
    for (; j + 8 <= nk; j += 8) {
        const __m256 m = mp ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (mp + j))) : _mm256_setzero_ps();
        _mm256_storeu_ps(sl + j, m);
        const __m256i   k   = _mm256_loadu_si256((const __m256i *) (pk + j));
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
        sl[j] = mp ? GGML_CPU_FP16_TO_FP32(mp[j]) : 0.0f;
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

// Rotation-table form: the row of the table that rotates key j's K row on to its grouped position: row j, or with a
// table of steps the single-position step only, with h = the larger step's index, which the caller applies to the
// queries instead (q . R_hi R_lo k = R_hi^-1 q . R_lo k); h = -1 without steps.
inline const float * se_k_rot_cs(const se_args & a, const se_plan & pl, int64_t j, int64_t s, int64_t & h) {
    if (a.n_group == 0) {
        h = -1;
        return (const float *) ((const char *) a.k_g->data + j*a.k_g->nb[1] + s*a.k_g->nb[3]);
    }
    const se_steps st = se_k_steps(a, pl, j, s);
    h = st.h;
    return st.lo;
}

// Rotation-table form: key j's grouped operand made from its K row, as f32: the row rotated by row j of the table, or
// by the product of its two steps (cs: scratch for that product)
void se_k_rot_row(const se_args & a, const se_plan & pl, int64_t j, int64_t hk, int64_t s, float * row, float * cs) {
    const ggml_tensor * k = a.k;
    const int64_t n_rot = a.k_g->ne[0];
    se_row_to_f32(k, (const char *) k->data + j*k->nb[1] + hk*k->nb[2] + s*k->nb[3], row, k->ne[0]);
    if (a.n_group == 0) {
        int64_t h;
        se_rotate_row(row, se_k_rot_cs(a, pl, j, s, h), n_rot, a.rope_mode);
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
// over its first n_rot dimensions, in either pair layout (ggml-self-extend.h)
struct se_rot {
    const float * cs = nullptr; // null: none
    int64_t       n_rot = 0;
    bool          neox = false;
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <bool F16>
inline __m256 se_load8(const void * k, int64_t d) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) k + d)))
               : _mm256_loadu_ps((const float *) k + d);
}

// out[r*SE_TILE_KV] = (R k) . Q[r] for N query rows in f32: the key (f16 or f32) loaded once, rotated (ROT: 0 none,
// 1 NORM pairs, 2 NEOX pairs) by rot in registers. A decode step dots each grouped key of the table forms this way:
// made in a scratch row first, by calls that convert, rotate and dot one after the other, it cost them a fifth of
// SmolLM2's decode at 16K on two cores against the grouped-key cache (docs/RESULTS.md 4.2).
template <int N, bool F16, int ROT>
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
            const __m256 v = se_load8<F16>(k, d), t = _mm256_loadu_ps(rot.cs + d);
            const __m256 sw = _mm256_permute_ps(v, 0xB1);
            add(_mm256_fmaddsub_ps(v, _mm256_moveldup_ps(t), _mm256_mul_ps(sw, _mm256_movehdup_ps(t))), d);
        }
    } else if (ROT == 2) { // the pairs' first dimensions at d, their second at d + n_rot/2
        const int64_t half = rot.n_rot/2;
        for (; d < half; d += 8) {
            const __m256 x = se_load8<F16>(k, d), y = se_load8<F16>(k, half + d);
            const __m256 c = _mm256_loadu_ps(rot.cs + d), sn = _mm256_loadu_ps(rot.cs + half + d);
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

template <bool F16, int ROT>
bool se_dot_rows_t(const void * k, int64_t DK, const float * Q, int64_t n, const se_rot & rot, float * out) {
    switch (n) {
        case 1: se_dot_rows_n<1, F16, ROT>(k, DK, Q, rot, out); return true;
        case 2: se_dot_rows_n<2, F16, ROT>(k, DK, Q, rot, out); return true;
        case 3: se_dot_rows_n<3, F16, ROT>(k, DK, Q, rot, out); return true;
        case 4: se_dot_rows_n<4, F16, ROT>(k, DK, Q, rot, out); return true;
        case 5: se_dot_rows_n<5, F16, ROT>(k, DK, Q, rot, out); return true;
        case 6: se_dot_rows_n<6, F16, ROT>(k, DK, Q, rot, out); return true;
        case 7: se_dot_rows_n<7, F16, ROT>(k, DK, Q, rot, out); return true;
        case 8: se_dot_rows_n<8, F16, ROT>(k, DK, Q, rot, out); return true;
        default: return false;
    }
}

template <bool F16>
bool se_dot_rows_r(const void * k, int64_t DK, const float * Q, int64_t n, const se_rot & rot, float * out) {
    if (!rot.cs) {
        return se_dot_rows_t<F16, 0>(k, DK, Q, n, rot, out);
    }
    return rot.neox ? se_dot_rows_t<F16, 2>(k, DK, Q, n, rot, out) : se_dot_rows_t<F16, 1>(k, DK, Q, n, rot, out);
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

// One work item: queries [i0, i0 + nq) of stream s, the query heads of KV head hk, keys [c0, c1).
// Leaves M, L and the unnormalized O of each row in M_out/L_out/O_out (row r = query t*gqa + head hh).
void se_tile(const se_args & a, const se_plan & p, int64_t s, int64_t hk, int64_t i0, int64_t nq,
             int64_t c0, int64_t c1, const se_scratch & w) {
    const int64_t DK = p.DK, DV = p.DV, gqa = p.gqa, R = nq*gqa;

    float * Q   = w.Q,  * Qg = w.Qg, * Kt = w.Kt, * S = w.S, * Sg = w.Sg, * V = w.V;
    float * sel = w.sel, * row = w.row, * M = w.M, * L = w.L, * O = w.O;
    uint8_t grouped[SE_TILE_ROWS*SE_TILE_KV]; // per (query, key): 1 when the pair uses the grouped operands

    // few rows (decode): dot products on the cached rows as they are, no f32 tile packing
    const bool by_key = R <= SE_ROWS_GEMM;
    const auto * tk  = ggml_get_type_traits_cpu(a.k->type);
    const auto * tkg = ggml_get_type_traits_cpu(a.k_rot ? GGML_TYPE_F32 : a.k_g->type); // table form: f32 rows
    const size_t qc_row  = ggml_row_size(tk->vec_dot_type,  DK);
    const size_t qgc_row = ggml_row_size(tkg->vec_dot_type, DK);

    for (int64_t t = 0; t < nq; ++t) {
        for (int64_t hh = 0; hh < gqa; ++hh) {
            const int64_t h = hk*gqa + hh;
            const int64_t r = t*gqa + hh;
            memcpy(Q  + r*DK, (const char *) a.q->data   + (i0 + t)*a.q->nb[1]   + h*a.q->nb[2]   + s*a.q->nb[3],   DK*sizeof(float));
            if (a.q_rot) { // q_g: q rotated by the query's row of the table
                memcpy(Qg + r*DK, Q + r*DK, DK*sizeof(float));
                se_rotate_row(Qg + r*DK, (const float *) ((const char *) a.q_g->data + (i0 + t)*a.q_g->nb[1] + s*a.q_g->nb[3]),
                              a.q_g->ne[0], a.rope_mode);
            } else {
                memcpy(Qg + r*DK, (const char *) a.q_g->data + (i0 + t)*a.q_g->nb[1] + h*a.q_g->nb[2] + s*a.q_g->nb[3], DK*sizeof(float));
            }
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        M[r] = -INFINITY;
        L[r] = 0.0f;
    }
    memset(O, 0, R*DV*sizeof(float));
    // products the tiles skip keep finite values, so the selection below can run without branches
    memset(S,  0, R*SE_TILE_KV*sizeof(float));
    memset(Sg, 0, R*SE_TILE_KV*sizeof(float));
    if (by_key) {
        for (int64_t r = 0; r < R; ++r) {
            ggml_get_type_traits_cpu(tk->vec_dot_type)->from_float(Q + r*DK, (char *) w.Qc + r*qc_row, DK);
            if (!a.k_rot) { // the table form dots f32 rows with Qg itself
                ggml_get_type_traits_cpu(tkg->vec_dot_type)->from_float(Qg + r*DK, (char *) w.Qgc + r*qgc_row, DK);
            }
        }
    }

    const int32_t * pq = (const int32_t *) ((const char *) a.pos_q->data + s*a.pos_q->nb[1]) + i0;
    const int32_t * pk = (const int32_t *) ((const char *) a.pos_k->data + s*a.pos_k->nb[1]);

    const se_prefetcher pf(a, hk, s, pq[0]); // few rows: the keys' rows ahead, the first ones' at once
    for (int64_t j = c0; by_key && j < std::min(c1, c0 + pf.dist); ++j) {
        pf.key(j);
    }
    int64_t       rot_h = -1; // table of steps, few rows: the larger step whose inverse rotates Qg into Qh
    const float * Qk    = Qg; // table form, few rows: the queries that a grouped key's row is dotted with

    for (int64_t ic = c0; ic < c1; ic += SE_TILE_KV) {
        const int64_t nk = std::min(SE_TILE_KV, c1 - ic);

        // 1. classify every (query, key) of the tile
        bool need_n = false, need_g = false;
        for (int64_t t = 0; t < nq; ++t) {
            const ggml_fp16_t * mp = a.mask ? (const ggml_fp16_t *) ((const char *) a.mask->data
                    + (i0 + t)*a.mask->nb[1] + (s % a.mask->ne[3])*a.mask->nb[3]) + ic : nullptr;
            se_classify_row(mp, pk + ic, pq[t], a.n_window, nk, sel + t*SE_TILE_KV, grouped + t*SE_TILE_KV, need_n, need_g);
        }
        if (!need_n && !need_g) {
            continue;
        }

        // 2. the products the tile needs
        if (by_key) {
            int64_t rot_key = -1;    // table form: the key whose rotation rot holds
            bool    row_ready = false; //             whether `row` holds that key rotated (no fused dot for it)
            se_rot  rot;
            rot.n_rot = a.k_rot ? a.k_g->ne[0] : 0;
            rot.neox  = a.rope_mode == GGML_ROPE_TYPE_NEOX;
            for (int64_t j = 0; j < nk; ++j) {
                if (ic + j + pf.dist < c1) {
                    pf.key(ic + j + pf.dist);
                }
                for (int64_t t = 0; t < nq; ++t) {
                    if (sel[t*SE_TILE_KV + j] == -INFINITY) {
                        continue;
                    }
                    const bool g = grouped[t*SE_TILE_KV + j];
                    const ggml_tensor * kt = g && !a.k_rot ? a.k_g : a.k; // the table form rotates K
                    const char * kr = (const char *) kt->data + (ic + j)*kt->nb[1] + hk*kt->nb[2] + s*kt->nb[3];
                    if (g && a.k_rot) {
                        // table form: the key rotated as it is dotted, by its row of the table (or its single-position
                        // step, and the queries by the larger one)
                        if (rot_key != ic + j) {
                            int64_t h;
                            rot.cs    = se_k_rot_cs(a, p, ic + j, s, h);
                            rot_key   = ic + j;
                            row_ready = false;
                            if (h >= 0 && h != rot_h) { // keys in position order change h once per n_lo positions
                                memcpy(w.Qh, Qg, R*DK*sizeof(float));
                                const float * hi = (const float *) ((const char *) a.k_g->data + (a.n_lo + h)*a.k_g->nb[1]);
                                for (int64_t r = 0; r < R; ++r) {
                                    se_rotate_row(w.Qh + r*DK, hi, rot.n_rot, a.rope_mode, true);
                                }
                                rot_h = h;
                            }
                            Qk = h >= 0 ? w.Qh : Qg;
                        }
                        if (se_dot_rows(a.k->type, kr, DK, Qk + t*gqa*DK, gqa, Sg + t*gqa*SE_TILE_KV + j, rot)) {
                            continue;
                        }
                        if (!row_ready) { // made once per key of the tile (every query shares it)
                            se_row_to_f32(a.k, kr, row, DK);
                            se_rotate_row(row, rot.cs, rot.n_rot, a.rope_mode);
                            row_ready = true;
                        }
                        for (int64_t hh = 0; hh < gqa; ++hh) {
                            const int64_t r = t*gqa + hh;
                            ggml_vec_dot_f32(DK, Sg + r*SE_TILE_KV + j, 0, row, 0, Qk + r*DK, 0, 1);
                        }
                        continue;
                    }
                    if (se_dot_rows(kt->type, kr, DK, (g ? Qg : Q) + t*gqa*DK, gqa, (g ? Sg : S) + t*gqa*SE_TILE_KV + j)) {
                        continue;
                    }
                    for (int64_t hh = 0; hh < gqa; ++hh) {
                        const int64_t r = t*gqa + hh;
                        if (g) {
                            tkg->vec_dot(DK, Sg + r*SE_TILE_KV + j, 0, kr, 0, (const char *) w.Qgc + r*qgc_row, 0, 1);
                        } else {
                            tk->vec_dot(DK, S + r*SE_TILE_KV + j, 0, kr, 0, (const char *) w.Qc + r*qc_row, 0, 1);
                        }
                    }
                }
            }
        } else if (need_n) {
            se_pack_k(a.k, ic, nk, hk, s, Kt, row);
            memset(S, 0, R*SE_TILE_KV*sizeof(float));
            simd_gemm(S, Q, Kt, R, DK, SE_TILE_KV);
        }
        if (need_g && !by_key) {
            if (a.k_rot) {
                se_pack_k_rot(a, p, ic, nk, hk, s, Kt, row, w.cs);
            } else {
                se_pack_k(a.k_g, ic, nk, hk, s, Kt, row);
            }
            memset(Sg, 0, R*SE_TILE_KV*sizeof(float));
            simd_gemm(Sg, Qg, Kt, R, DK, SE_TILE_KV);
        }

        // 3. select, scale, mask; online softmax
        for (int64_t r = 0; r < R; ++r) {
            const int64_t t = r/gqa;
            const float   * sl = sel     + t*SE_TILE_KV;
            const uint8_t * gr = grouped + t*SE_TILE_KV;
            float * sr  = S  + r*SE_TILE_KV;
            float * sgr = Sg + r*SE_TILE_KV;
            if (a.logit_softcap == 0.0f) {
                for (int64_t j = 0; j < SE_TILE_KV; ++j) { // sl = -inf hides the pair
                    sr[j] = (gr[j] ? sgr[j] : sr[j])*a.scale + sl[j];
                }
            } else {
                for (int64_t j = 0; j < SE_TILE_KV; ++j) {
                    sr[j] = a.logit_softcap*tanhf((gr[j] ? sgr[j] : sr[j])*a.scale) + sl[j];
                }
            }
            const float tile_max = se_tile_max(sr);
            if (tile_max == -INFINITY) {
                memset(sr, 0, SE_TILE_KV*sizeof(float));
                continue;
            }
            const float m_new = std::max(M[r], tile_max);
            if (m_new > M[r]) {
                const float ms = expf(M[r] - m_new); // 0 on the first visible tile
                ggml_vec_scale_f32(DV, O + r*DV, ms);
                L[r] *= ms;
                M[r]  = m_new;
            }
            L[r] += (float) ggml_vec_soft_max_f32(SE_TILE_KV, sr, sr, m_new);
        }

        // 4. O += P V
        if (by_key) { // the keys some row sees, then their V rows
            const void * vs[SE_TILE_KV];
            int          js[SE_TILE_KV];
            int          n = 0;
            for (int64_t j = 0; j < nk; ++j) {
                bool any = false;
                for (int64_t r = 0; r < R; ++r) {
                    any |= S[r*SE_TILE_KV + j] != 0.0f;
                }
                if (any) {
                    vs[n] = (const char *) a.v->data + (ic + j)*a.v->nb[1] + hk*a.v->nb[2] + s*a.v->nb[3];
                    js[n++] = (int) j;
                }
            }
            if (se_mad_tile(a.v->type, vs, js, n, DV, O, S, R)) {
                continue;
            }
            for (int i = 0; i < n; ++i) {
                se_row_to_f32(a.v, (const char *) vs[i], row, DV);
                for (int64_t r = 0; r < R; ++r) {
                    ggml_vec_mad_f32(DV, O + r*DV, row, S[r*SE_TILE_KV + js[i]]);
                }
            }
            continue;
        }
        for (int64_t j = 0; j < nk; ++j) {
            se_row_to_f32(a.v, (const char *) a.v->data + (ic + j)*a.v->nb[1] + hk*a.v->nb[2] + s*a.v->nb[3], V + j*DV, DV);
        }
        if (nk < SE_TILE_KV) {
            memset(V + nk*DV, 0, (SE_TILE_KV - nk)*DV*sizeof(float));
        }
        simd_gemm(O, S, V, R, SE_TILE_KV, DV);
    }
}

// row (query i, head h) of stream s in dst
inline float * se_dst_row(ggml_tensor * dst, const se_plan & p, int64_t s, int64_t i, int64_t h) {
    return (float *) ((char *) dst->data + ((s*p.n_q + i)*p.n_head + h)*dst->nb[1]);
}

} // namespace

size_t ggml_cpu_flash_attn_ext_se_work_size(const ggml_tensor * dst, int n_tasks) {
    const se_plan p = se_make_plan(ggml_flash_attn_ext_se_get_args(dst), n_tasks);
    return sizeof(float)*(se_scratch(p, nullptr).n_floats*n_tasks + se_partial_floats(p));
}

void ggml_compute_forward_flash_attn_ext_se(const ggml_compute_params * params, ggml_tensor * dst) {
    se_args a = ggml_flash_attn_ext_se_get_args(dst);
    if (a.logit_softcap != 0.0f) {
        a.scale /= a.logit_softcap;
    }

    GGML_ASSERT(a.q->type == GGML_TYPE_F32 && a.q_g->type == GGML_TYPE_F32);
    GGML_ASSERT(a.q->nb[0] == sizeof(float) && a.q_g->nb[0] == sizeof(float));
    GGML_ASSERT(a.k->nb[0] == ggml_type_size(a.k->type) && a.k_g->nb[0] == ggml_type_size(a.k_g->type));
    GGML_ASSERT(!a.k_rot || (a.k_g->type == GGML_TYPE_F32 && a.k_g->ne[0] <= a.k->ne[0]));
    GGML_ASSERT(a.n_group == 0 || (a.n_lo >= 1 && (a.n_lo & (a.n_lo - 1)) == 0 && a.k_g->ne[1] > a.n_lo));
    GGML_ASSERT(a.q_rot ? a.k_rot && a.q_g->ne[0] == a.k_g->ne[0] && a.q_g->ne[2] == 1 : ggml_are_same_shape(a.q, a.q_g));
    GGML_ASSERT(a.v->nb[0] == ggml_type_size(a.v->type));

    const int ith = params->ith;
    const int nth = params->nth;
    const se_plan p = se_make_plan(a, nth);

    const size_t per_thread = se_scratch(p, nullptr).n_floats;
    const se_scratch w(p, (float *) params->wdata + ith*per_thread);
    float * partials = (float *) params->wdata + nth*per_thread;
    float * M = w.M, * L = w.L, * O = w.O;

    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    const int64_t n_item = p.n_item();
    for (int64_t item = ith; item < n_item; item = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        // item = ((s*n_head_kv + hk)*n_qblk + qb)*n_chunk + ch
        const int64_t ch = item % p.n_chunk;
        const int64_t qb = (item/p.n_chunk) % p.n_qblk;
        const int64_t hk = (item/(p.n_chunk*p.n_qblk)) % p.n_head_kv;
        const int64_t s  =  item/(p.n_chunk*p.n_qblk*p.n_head_kv);

        const int64_t i0 = qb*p.q_blk;
        const int64_t nq = std::min(p.q_blk, p.n_q - i0);
        const int64_t c0 = ch*p.chunk;
        const int64_t c1 = std::min(c0 + p.chunk, p.n_kv);

        se_tile(a, p, s, hk, i0, nq, c0, c1, w);

        for (int64_t t = 0; t < nq; ++t) {
            for (int64_t hh = 0; hh < p.gqa; ++hh) {
                const int64_t r = t*p.gqa + hh;
                const int64_t h = hk*p.gqa + hh;
                if (p.n_chunk == 1) {
                    const float inv = L[r] == 0.0f ? 0.0f : 1.0f/L[r];
                    float * out = se_dst_row(dst, p, s, i0 + t, h);
                    for (int64_t d = 0; d < p.DV; ++d) {
                        out[d] = O[r*p.DV + d]*inv;
                    }
                } else {
                    float * part = partials + (((s*p.n_q + i0 + t)*p.n_head + h)*p.n_chunk + ch)*(2 + p.DV);
                    part[0] = M[r];
                    part[1] = L[r];
                    memcpy(part + 2, O + r*p.DV, p.DV*sizeof(float));
                }
            }
        }
    }

    if (p.n_chunk == 1) {
        return;
    }

    // merge the chunks of each row: O = sum_c exp(M_c - M) O_c / sum_c exp(M_c - M) L_c
    ggml_barrier(params->threadpool);
    const int64_t n_rows = p.ne3*p.n_q*p.n_head;
    for (int64_t rr = ith; rr < n_rows; rr += nth) {
        const float * part = partials + rr*p.n_chunk*(2 + p.DV);
        float m = -INFINITY;
        for (int64_t c = 0; c < p.n_chunk; ++c) {
            m = std::max(m, part[c*(2 + p.DV)]);
        }
        float * out = (float *) ((char *) dst->data + rr*dst->nb[1]);
        memset(out, 0, p.DV*sizeof(float));
        float l = 0.0f;
        if (m != -INFINITY) {
            for (int64_t c = 0; c < p.n_chunk; ++c) {
                const float * pc = part + c*(2 + p.DV);
                if (pc[1] == 0.0f) {
                    continue;
                }
                const float w = expf(pc[0] - m);
                l += w*pc[1];
                for (int64_t d = 0; d < p.DV; ++d) {
                    out[d] += w*pc[2 + d];
                }
            }
        }
        const float inv = l == 0.0f ? 0.0f : 1.0f/l;
        ggml_vec_scale_f32(p.DV, out, inv);
    }
}
