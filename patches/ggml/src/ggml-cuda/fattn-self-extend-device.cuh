#pragma once

// Self-Extend flash attention on CUDA (fattn-self-extend.cu): the device helpers of its kernels (tile loads, the table of
// steps, classification, mma operands and the rotation of K as it leaves shared memory).

#include "fattn-self-extend-common.cuh"

// ------------------------------------------------------------------------------------------------------------------
// device helpers

// Tiles of D halves per row without padding (SWZ) keep the 16-byte chunk c of row r at chunk c ^ (r % 8): the 8 rows that
// one ldmatrix reads are then in 8 different bank groups, as the padding of rows to D + 8 halves makes them, while a row's
// cp.async writes fill whole 128-byte lines (with the padding every row but one in 8 starts 16*(r % 8) bytes into one:
// 2.6x the shared-memory wavefronts and 1.5x the L2 sectors of those loads, ncu on the prefill kernel, H200).
// Offset in halves of chunk c (8 halves) of row r of a tile whose rows are S halves apart.
template <bool SWZ, int S>
static __device__ __forceinline__ int fattn_se_chunk(const int r, const int c) {
    return r*S + 8*(SWZ ? c ^ (r & 7) : c);
}

// One K/V tile, rows k0 .. k0 + T - 1 of D halves, into shared memory rows of S halves: the padding of S = D + 8, or
// S = D swizzled (SWZ, fattn_se_chunk); either makes ldmatrix conflict-free. Rows past the end of the cache repeat its
// last row: their keys are masked, but V must stay finite since P = 0 multiplies it. Thread tid always copies the same
// 16 byte column of every (128/(D/8))-th row. (Also the rows of a rotation table: D = 2*(floats per row).)
template <int D, int T, int S = D + 8, bool SWZ = false>
static __device__ __forceinline__ void fattn_se_load_kv(
        half * GGML_CUDA_RESTRICT tile, const char * GGML_CUDA_RESTRICT src, const int64_t nb1, const int k0, const int n_kv, const int tid) {
    constexpr int chunks_row = D/8;
    constexpr int rows_pass  = FATTN_SE_NTHREADS/chunks_row;
    static_assert(FATTN_SE_NTHREADS % chunks_row == 0 && T % rows_pass == 0, "bad K/V tile size");
    static_assert(!SWZ || S == D, "a swizzled tile has no padding");

    const int j0 = tid / chunks_row;
    const int jc = tid % chunks_row;
    const unsigned int dst = ggml_cuda_cvta_generic_to_shared(tile);
    const char * src_c = src + 16*jc;
    if (k0 + T <= n_kv) {
        src_c += int64_t(k0 + j0)*nb1;
#pragma unroll
        for (int i = 0; i < T/rows_pass; ++i) {
            cp_async_cg_16<64>(dst + fattn_se_chunk<SWZ, S>(j0 + i*rows_pass, jc)*sizeof(half), src_c + i*rows_pass*nb1);
        }
    } else {
#pragma unroll
        for (int i = 0; i < T/rows_pass; ++i) {
            const int64_t k = min(k0 + j0 + i*rows_pass, n_kv - 1);
            cp_async_cg_16<64>(dst + fattn_se_chunk<SWZ, S>(j0 + i*rows_pass, jc)*sizeof(half), src_c + k*nb1);
        }
    }
}

// Table of steps (ggml_flash_attn_ext_se_steps): G, n_rows of which lo (a power of two) are single positions.
static void fattn_se_set_steps(fattn_se_params & p, const int G, const int lo, const int n_rows) {
    p.k_steps_G       = G;
    p.k_steps_lo      = lo;
    p.k_steps_hi      = n_rows - lo;
    p.k_steps_G_div   = init_fastdiv_values(G);
    p.k_steps_lo_log2 = __builtin_ctz(lo);
    p.nb_kg3          = 0; // shared by the streams
}

// The two rows of a table of steps whose product rotates a key at position pos on to pos/G. It goes back m = pos - pos/G
// positions (0 for an empty cell, pos < 0): row m % lo and row lo + m/lo, clamped to the table, which the graph sizes
// to cover every cell. (The decode kernel makes them for every key of every tile: no hardware division.)
static __device__ __forceinline__ void fattn_se_steps_rows(const fattn_se_params & p, const int pos, int & r_lo, int & r_hi) {
    const int m = pos > 0 ? pos - int(fastdiv(uint32_t(pos), p.k_steps_G_div)) : 0;
    r_lo = m & (p.k_steps_lo - 1);
    r_hi = p.k_steps_lo + min(m >> p.k_steps_lo_log2, p.k_steps_hi - 1);
}

// The cos and sin (x, y) of a pair's angle through both steps of a key: the single step's a, then the larger one's b
// (c = c1 c2 - s1 s2, s = s1 c2 + c1 s2, in f32).
static __device__ __forceinline__ float2 fattn_se_steps_cs(const float2 a, const float2 b) {
    return make_float2(a.x*b.x - a.y*b.y, a.y*b.x + a.x*b.y);
}

// Table of steps: its single-position rows into rows 0 .. p.k_steps_lo - 1 of the table region (rows of S halves, as
// fattn_se_load_kv lays out a table's rows; D: halves per row, twice the floats). A loop, not fattn_se_load_kv's unrolled
// passes: those hold 128 rows' addresses at once, 16-19 registers more in the decode kernel for heads of 256.
template <int D, int S>
static __device__ __forceinline__ void fattn_se_load_steps_lo(half * GGML_CUDA_RESTRICT tab, const fattn_se_params & p, const int tid) {
    constexpr int chunks_row = D/8;
    for (int c = tid; c < p.k_steps_lo*chunks_row; c += FATTN_SE_NTHREADS) {
        const int r = c / chunks_row, jc = c % chunks_row;
        cp_async_cg_16<0>(ggml_cuda_cvta_generic_to_shared(tab + r*S + 8*jc), p.k_g + int64_t(r)*p.nb_kg1 + 16*jc);
    }
}

// Table of steps: the larger step of a tile's first key (at pos0) and the one after it into the two rows after the single
// steps: with the keys in position order and p.k_steps_lo >= T, every key of the tile takes one of those.
template <int D, int S>
static __device__ __forceinline__ void fattn_se_load_steps_hi(
        half * GGML_CUDA_RESTRICT tab, const fattn_se_params & p, const int pos0, const int tid) {
    constexpr int chunks_row = D/8;
    static_assert(2*chunks_row <= FATTN_SE_NTHREADS, "bad table row size");
    if (tid < 2*chunks_row) {
        int r_lo, r_hi;
        fattn_se_steps_rows(p, pos0, r_lo, r_hi);
        const int r = min(r_hi + tid/chunks_row, p.k_steps_lo + p.k_steps_hi - 1);
        cp_async_cg_16<0>(ggml_cuda_cvta_generic_to_shared(tab + (FATTN_SE_STEPS_LO_MAX + tid/chunks_row)*S + 8*(tid % chunks_row)),
                          p.k_g + int64_t(r)*p.nb_kg1 + 16*(tid % chunks_row));
    }
}

// pos_k of the keys k0 .. k0 + T - 1 (if pos_tile) and the mask of the block's rows for them (if mask_rows); keys past
// n_kv are left out.
template <int T>
static __device__ __forceinline__ void fattn_se_load_pos_mask(
        int * GGML_CUDA_RESTRICT pos_tile, const char * GGML_CUDA_RESTRICT pos_k, half * GGML_CUDA_RESTRICT mask_tile,
        const char * GGML_CUDA_RESTRICT mask_rows, const int64_t nb_m1, const int rows, const int k0, const int n_kv, const int tid) {
    if (pos_tile && tid < T && k0 + tid < n_kv) {
        // 4 byte cp.async: the positions have no alignment beyond their element size
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;"
            : : "r"(ggml_cuda_cvta_generic_to_shared(pos_tile + tid)), "l"(pos_k + int64_t(k0 + tid)*sizeof(int)));
    }
    if (mask_rows) {
        constexpr int chunks_row = T/8;
        const unsigned int tile_s = ggml_cuda_cvta_generic_to_shared(mask_tile);
        for (int c = tid; c < rows*chunks_row; c += FATTN_SE_NTHREADS) {
            const int r  = c / chunks_row;
            const int jc = c % chunks_row;
            const int k  = k0 + 8*jc;
            if (k < n_kv) {
                cp_async_cg_16<0>(tile_s + (r*(T + 8) + 8*jc)*sizeof(half), mask_rows + r*nb_m1 + int64_t(k)*sizeof(half));
            }
        }
    }
}

// Smallest and largest of the positions of the block's rows (queries), in every lane of the warp.
static __device__ __forceinline__ void fattn_se_pos_range(const int * GGML_CUDA_RESTRICT pos_q, const int rows, int & lo, int & hi) {
    lo = INT_MAX;
    hi = INT_MIN;
    for (int r = threadIdx.x; r < rows; r += WARP_SIZE) {
        lo = min(lo, pos_q[r]);
        hi = max(hi, pos_q[r]);
    }
    lo = __reduce_min_sync(0xFFFFFFFF, lo);
    hi = __reduce_max_sync(0xFFFFFFFF, hi);
}

// Decode: warp w's quarter of the class of a tile, keys w*T/4 .. (w + 1)*T/4 - 1, all rows of the block. Leaves
// {any visible pair, any non-zero mask value, min and max pos_k over the keys visible to at least one row}.
// A key is visible to a row if its mask value is not -inf, or (causal, no mask) if 0 <= pos_k <= the row's position:
// then it is visible to some row if pos_k <= pq_max, and masked for some row unless pos_k <= pq_min. nvalid: keys of
// the tile that exist (0: a tile past the range).
template <int T>
static __device__ __forceinline__ void fattn_se_class_part(
        int4 * GGML_CUDA_RESTRICT part, const int * GGML_CUDA_RESTRICT pos_tile, const half * GGML_CUDA_RESTRICT mask_tile,
        const bool causal, const int pq_min, const int pq_max, const int rows, const int nvalid) {
    constexpr int KPW = T/FATTN_SE_NWARPS; // keys per warp
    constexpr int CPW = KPW/8;             // 8-key mask chunks per row and warp
    constexpr int RPP = WARP_SIZE/CPW;     // rows per pass over the warp's chunks
    static_assert(KPW <= WARP_SIZE && KPW % 8 == 0, "bad tile size");

    const int lane = threadIdx.x;
    const int kw   = threadIdx.y*KPW;
    const int jc   = lane % CPW;
    const int k    = kw + 8*jc;                  // first key of the lane's chunk
    const int nk   = min(max(nvalid - k, 0), 8); // keys of the chunk that exist
    const uint32_t kmask = (1u << nk) - 1;

    uint32_t vis = 0; // bit i: key k + i is visible to some row
    uint32_t nz  = 0; // bit i: some row has a non-zero mask value for key k + i
    if (mask_tile) {
        if (nk > 0) {
            for (int r = lane/CPW; r < rows; r += RPP) {
                const uint4 m8 = *(const uint4 *) (mask_tile + r*(T + 8) + k);
                const uint32_t m2[4] = {m8.x, m8.y, m8.z, m8.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const uint32_t lo = m2[i] & 0xFFFF;
                    const uint32_t hi = m2[i] >> 16;
                    vis |= uint32_t(lo != 0xFC00) << (2*i) | uint32_t(hi != 0xFC00) << (2*i + 1); // 0xFC00: f16 -inf
                    nz  |= uint32_t((lo & 0x7FFF) != 0) << (2*i) | uint32_t((hi & 0x7FFF) != 0) << (2*i + 1);
                }
            }
        }
        vis &= kmask;
        nz  &= kmask;
        // OR over the lanes that looked at the same chunk in other rows:
#pragma unroll
        for (int offset = CPW; offset < WARP_SIZE; offset <<= 1) {
            vis |= __shfl_xor_sync(0xFFFFFFFF, vis, offset, WARP_SIZE);
            nz  |= __shfl_xor_sync(0xFFFFFFFF, nz,  offset, WARP_SIZE);
        }
    } else {
        vis = kmask;
    }

    // lane j < KPW looks at key kw + j, whose visibility is bit j%8 of chunk j/8, known to lane j/8 (among others)
    const uint32_t vis_chunk = __shfl_sync(0xFFFFFFFF, vis, (lane/8) % CPW, WARP_SIZE);
    int  pk_min = INT_MAX;
    int  pk_max = INT_MIN;
    bool vis_k  = false; // causal: the lane's key is visible to some row
    if (lane < KPW && (vis_chunk >> (lane % 8)) & 1) {
        const int pk = pos_tile[kw + lane];
        vis_k = !causal || (pk >= 0 && pk <= pq_max);
        nz   |= causal && !(pk >= 0 && pk <= pq_min);
        if (vis_k) {
            pk_min = pk;
            pk_max = pk;
        }
    }
    pk_min = __reduce_min_sync(0xFFFFFFFF, pk_min);
    pk_max = __reduce_max_sync(0xFFFFFFFF, pk_max);
    const int any_vis = __any_sync(0xFFFFFFFF, causal ? vis_k : vis != 0);
    const int any_nz  = __any_sync(0xFFFFFFFF, nz  != 0);
    if (lane == 0) {
        *part = make_int4(any_vis, any_nz, pk_min, pk_max);
    }
}

// ldmatrix.x4 of 16 x 16 halves from shared memory into the ggml_cuda_mma layout of tile<16, 8, half2> (x[0]: rows 0-7
// and x[1]: rows 8-15 of halves 0-7, x[2], x[3]: the same of halves 8-15). Each lane passes the 32-bit shared address of
// the row it serves (fattn_se_lane_row/col), so a tile at a constant offset from a per-thread base costs no arithmetic.
//   A: all four registers feed one mma as the A operand, in order.
//   B: the two mma of a tile<16, 16, float> take (x[0], x[2]) and (x[1], x[3]) as B: loaded so that each pair lands in
//      consecutive registers, as the instruction wants them (no moves). Lanes give rows 0-7, 0-7, 8-15, 8-15 at halves 0,
//      8, 0, 8 per group of 8 lanes.
//   BT: B from the transposed matrix (V^T from V rows), as ggml_cuda_mma::load_ldmatrix_trans.
enum fattn_se_ldsm_kind { FATTN_SE_LDSM_A, FATTN_SE_LDSM_B, FATTN_SE_LDSM_BT };

template <fattn_se_ldsm_kind kind>
static __device__ __forceinline__ int fattn_se_lane_row(const int lane) {
    return kind == FATTN_SE_LDSM_B ? lane % 8 + 8*(lane/16) : lane % 16;
}

template <fattn_se_ldsm_kind kind>
static __device__ __forceinline__ int fattn_se_lane_col(const int lane) {
    return kind == FATTN_SE_LDSM_B ? 8*((lane/8) % 2) : 8*(lane/16);
}

// Offset in halves of the lane's ldmatrix row and first column in a tile of rows S halves apart. In a swizzled tile
// (SWZ, fattn_se_chunk) the lane's row r has r % 8 == lane % 8 for every kind and its chunk is c = 0 or 1, so chunk
// 2*d16 + c of its row lies at 2*(d16 ^ swz) + (c ^ (lane % 2)) with swz = (lane/2) % 4 (fattn_se_lane_swz): this
// offset (the chunk for dimensions 0 .. 7) plus 32*(d16 ^ swz) bytes.
template <fattn_se_ldsm_kind kind, bool SWZ>
static __device__ __forceinline__ int fattn_se_lane_offset(const int lane, const int S) {
    const int c = fattn_se_lane_col<kind>(lane)/8;
    return fattn_se_lane_row<kind>(lane)*S + 8*(SWZ ? c ^ (lane % 2) : c);
}

static __device__ __forceinline__ int fattn_se_lane_swz(const int lane) {
    return (lane/2) % 4;
}

template <fattn_se_ldsm_kind kind>
static __device__ __forceinline__ void fattn_se_ldsm(tile<16, 8, half2> & t, const uint32_t addr) {
#if defined(AMPERE_MMA_AVAILABLE)
    int * x = (int *) t.x;
    if constexpr (kind == FATTN_SE_LDSM_A) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
            : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "r"(addr));
    } else if constexpr (kind == FATTN_SE_LDSM_B) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
            : "=r"(x[0]), "=r"(x[2]), "=r"(x[1]), "=r"(x[3]) : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
            : "=r"(x[0]), "=r"(x[2]), "=r"(x[1]), "=r"(x[3]) : "r"(addr));
    }
#else
    GGML_UNUSED_VARS(t, addr);
    NO_DEVICE_CODE;
#endif // defined(AMPERE_MMA_AVAILABLE)
}

// S[kk] = Q K^T for the 16 columns of a warp and the keys 16*kk .. 16*kk + 15, kk < NK. K: the lane's B address
// (fattn_se_lane_row/col) of the first key row, rows SKV halves apart; in a swizzled tile (fattn_se_chunk) the lane's
// chunk of dimensions 16*d16 .. lies 32*(d16 ^ swz) bytes after it (fattn_se_lane_swz), else swz is 0. Q comes from
// registers (Q_reg) or, if Q_reg is null, from shared memory at the lane's A address Q_sm.
template <int D, int NK, int SKV>
static __device__ __forceinline__ void fattn_se_kq(
        tile<16, 16, float> * S, const tile<16, 8, half2> * Q_reg, const uint32_t Q_sm, const uint32_t K, const int swz = 0) {
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        S[kk] = tile<16, 16, float>{};
    }
#pragma unroll
    for (int d16 = 0; d16 < D/16; ++d16) {
        tile<16, 8, half2> Q_A;
        if (Q_reg) {
            Q_A = Q_reg[d16];
        } else {
            fattn_se_ldsm<FATTN_SE_LDSM_A>(Q_A, Q_sm + 32*d16);
        }
#pragma unroll
        for (int kk = 0; kk < NK; ++kk) {
            tile<16, 8, half2> K_B;
            fattn_se_ldsm<FATTN_SE_LDSM_B>(K_B, K + 16*kk*SKV*sizeof(half) + 32*(d16 ^ swz));
            mma(S[kk], Q_A, K_B);
        }
    }
}

// Element r of a B operand loaded by fattn_se_ldsm<FATTN_SE_LDSM_B> is the half2 at row lane/4 + 8*(r % 2), halves
// 8*(r/2) + 2*(lane % 4) and the next: the offset of that pair from the lane's first one in a table tile laid out like
// the K tile (rows of SKV halves; fattn_se_kq_rot's tab).
template <int SKV>
static __device__ __forceinline__ int fattn_se_rot_offset(const int r) {
    return 8*(r % 2)*SKV + 8*(r/2);
}

// S[kk] = Q_g K_g^T as fattn_se_kq, K_g made from the K rows at K and the table rows at tab (f16, a tile laid out like
// K's): the lane's first table element, row lane/4 of the first key, column 2*(lane % 4). ROT_NORM: the half2 of a B
// element is one pair, its cos and sin one half2 of the table; ROT_NEOX: element r of dimension chunk d16 < D/32 and
// element r of chunk d16 + D/32 are the two halves of the same pairs, whose cos and sin are half2 D/2 apart.
// ROT_STEPS: instead of tab, lo[2*kk + j] and hi[2*kk + j] point at the lane's first element (column 2*(lane % 4)) of
// the single-position and the larger step (f32) of key 16*kk + lane/4 + 8*j (in shared memory, the larger one maybe in
// global); they compose in f32 (fattn_se_steps_cs). A table of f16 rows rotates in half2
// arithmetic: a product rounded to f16 before the fma that adds it, 4 instructions per two pairs where converting to
// f32 and back took about 20: the op's largest error in the self-test grows 1.1-2.0x, to 2.8e-4-5.2e-4 of the output
// scale, as large as the other forms' (RESULTS 4.5).
template <int D, int NK, int SKV, int ROT>
static __device__ __forceinline__ void fattn_se_kq_rot(
        tile<16, 16, float> * S, const tile<16, 8, half2> * Q_reg, const uint32_t K, const half * GGML_CUDA_RESTRICT tab,
        const float * const * lo, const float * const * hi) {
    constexpr int  PAIRS = ROT & FATTN_SE_ROT_PAIRS;
    constexpr bool STEPS = ROT & FATTN_SE_ROT_STEPS;
    static_assert(PAIRS == FATTN_SE_ROT_NORM || PAIRS == FATTN_SE_ROT_NEOX, "not a rotation");
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        S[kk] = tile<16, 16, float>{};
    }
    if constexpr (PAIRS == FATTN_SE_ROT_NORM) {
#pragma unroll
        for (int d16 = 0; d16 < D/16; ++d16) {
#pragma unroll
            for (int kk = 0; kk < NK; ++kk) {
                tile<16, 8, half2> K_B;
                fattn_se_ldsm<FATTN_SE_LDSM_B>(K_B, K + (16*kk*SKV + 16*d16)*sizeof(half));
#pragma unroll
                for (int r = 0; r < K_B.ne; ++r) {
                    if constexpr (STEPS) { // the pair's cos and sin: its single step's times its larger step's
                        const float2 l  = *(const float2 *) (lo[2*kk + r % 2] + 16*d16 + 8*(r/2));
                        const float2 h  = *(const float2 *) (hi[2*kk + r % 2] + 16*d16 + 8*(r/2));
                        const float2 cs = fattn_se_steps_cs(l, h);
                        const float2 k  = __half22float2(K_B.x[r]);
                        K_B.x[r] = __floats2half2_rn(k.x*cs.x - k.y*cs.y, k.x*cs.y + k.y*cs.x);
                    } else { // (x, y) -> (x c - y s, x s + y c) = (x, x)(c, s) + (-y, y)(s, c)
                        const half2 cs = *(const half2 *) (tab + 16*kk*SKV + 16*d16 + fattn_se_rot_offset<SKV>(r));
                        const half2 k  = K_B.x[r];
                        const half2 ny = __hmul2(__high2half2(k), __floats2half2_rn(-1.0f, 1.0f)); // (exact)
                        K_B.x[r] = __hfma2(__low2half2(k), cs, __hmul2(ny, __lowhigh2highlow(cs)));
                    }
                }
                mma(S[kk], Q_reg[d16], K_B);
            }
        }
    } else {
#pragma unroll
        for (int d16 = 0; d16 < D/32; ++d16) {
#pragma unroll
            for (int kk = 0; kk < NK; ++kk) {
                tile<16, 8, half2> K_a; // dimensions 16*d16 ..: the pairs' first halves
                tile<16, 8, half2> K_b; // dimensions D/2 + 16*d16 ..: their second halves
                fattn_se_ldsm<FATTN_SE_LDSM_B>(K_a, K + (16*kk*SKV + 16*d16)*sizeof(half));
                fattn_se_ldsm<FATTN_SE_LDSM_B>(K_b, K + (16*kk*SKV + 16*d16 + D/2)*sizeof(half));
#pragma unroll
                for (int r = 0; r < K_a.ne; ++r) {
                    if constexpr (!STEPS) { // two pairs at once: a' = a c - b s, b' = a s + b c
                        const half *  t  = tab + 16*kk*SKV + 16*d16 + fattn_se_rot_offset<SKV>(r);
                        const half2   c  = *(const half2 *) t;
                        const half2   sn = *(const half2 *) (t + D/2);
                        const half2   a  = K_a.x[r];
                        const half2   b  = K_b.x[r];
                        K_a.x[r] = __hfma2(a, c,  __hneg2(__hmul2(b, sn)));
                        K_b.x[r] = __hfma2(a, sn, __hmul2(b, c));
                    } else {
                        const float * t  = lo[2*kk + r % 2] + 16*d16 + 8*(r/2);
                        const float2  c1 = *(const float2 *) t;
                        const float2  s1 = *(const float2 *) (t + D/2);
                        // two pairs' cos and sin times those of their larger steps
                        const float * h  = hi[2*kk + r % 2] + 16*d16 + 8*(r/2);
                        const float2  c2 = *(const float2 *) h;
                        const float2  s2 = *(const float2 *) (h + D/2);
                        const float2  px = fattn_se_steps_cs(make_float2(c1.x, s1.x), make_float2(c2.x, s2.x));
                        const float2  py = fattn_se_steps_cs(make_float2(c1.y, s1.y), make_float2(c2.y, s2.y));
                        const float2  c  = make_float2(px.x, py.x);
                        const float2  sn = make_float2(px.y, py.y);
                        const float2  a  = __half22float2(K_a.x[r]);
                        const float2  b  = __half22float2(K_b.x[r]);
                        K_a.x[r] = __floats2half2_rn(a.x*c.x  - b.x*sn.x, a.y*c.y  - b.y*sn.y);
                        K_b.x[r] = __floats2half2_rn(a.x*sn.x + b.x*c.x,  a.y*sn.y + b.y*c.y);
                    }
                }
                mma(S[kk], Q_reg[d16],        K_a);
                mma(S[kk], Q_reg[d16 + D/32], K_b);
            }
        }
    }
}

// The rotated pair (a, b) of a rotation table (ggml-self-extend.h) that dimension d < n_rot belongs to: (2i, 2i + 1)
// (ROT_NORM) or (i, i + n_rot/2) (ROT_NEOX); the table holds the pair's cos at a and its sin at b.
static __device__ __forceinline__ void fattn_se_rot_pair(const int d, const int n_rot, const int rot, int & a, int & b) {
    const int half = n_rot/2;
    a = rot == FATTN_SE_ROT_NORM ? d & ~1 : (d < half ? d : d - half);
    b = rot == FATTN_SE_ROT_NORM ? a + 1  : a + half;
}

// Position of element l of C tile kk among the thread's values of its column (l/2 % 2) in the tile row of C tiles:
// 0 .. 4*NK - 1.
static __device__ __forceinline__ int fattn_se_col_index(const int kk, const int l) {
    return 4*kk + 2*(l/4) + l % 2;
}

// op(v[0], ..., v[N - 1]) as a tree of depth log2(N); v is overwritten. One level per instantiation, so that every loop
// has a constant trip count and v stays in registers. Neighbours pair first: the values of one C tile (fattn_se_col_index)
// combine before those of the next, so that a tile's maxima start while the products of the later tiles are in flight
// (pairing v[i] with v[i + N/2] waited for the last product: prefill 2-6 % slower for D = 64 and 128, H200 self-test).
template <int N, typename F>
static __device__ __forceinline__ float fattn_se_tree(float * v, const F op) {
    static_assert(N > 0 && (N & (N - 1)) == 0, "N must be a power of 2");
    if constexpr (N == 1) {
        return v[0];
    } else {
#pragma unroll
        for (int i = 0; i < N/2; ++i) {
            v[i] = op(v[2*i], v[2*i + 1]); // reads no v[k] with k < i, the only ones written so far
        }
        return fattn_se_tree<N/2>(v, op);
    }
}

// r[j] = op over the thread's values of its column j (0, 1) in the C tiles S[0 .. NK - 1], as trees (fattn_se_tree).
template <int NK, typename F>
static __device__ __forceinline__ void fattn_se_col_reduce(const tile<16, 16, float> * S, const F op, float * r) {
    static_assert(tile<16, 16, float>::ne == 8, "fattn_se_col_index assumes 4 values per column and C tile");
    float v[2][4*NK];
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
#pragma unroll
        for (int l = 0; l < tile<16, 16, float>::ne; ++l) {
            v[(l/2) % 2][fattn_se_col_index(kk, l)] = S[kk].x[l];
        }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        r[j] = fattn_se_tree<4*NK>(v[j], op);
    }
}
