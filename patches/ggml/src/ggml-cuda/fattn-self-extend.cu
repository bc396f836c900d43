// Self-Extend flash attention, GGML_OP_FLASH_ATTN_EXT_SE (see ggml-self-extend.h), for NVIDIA GPUs with Ampere or newer
// tensor cores (mma.sync and cp.async through mma.cuh / cp-async.cuh).
//
// Work decomposition
//   A CUDA block owns NC "columns", a column being one (query, head) pair: RPB consecutive queries times NHB query heads
//   of a single KV head (GQA), column c = (query c/NHB, head c%NHB), so every K/V row the block loads serves NHB heads.
//   It walks a range of KV tiles of T keys. Per tile:
//     1. the tile is classified from the actual positions and the mask, never from indices (KV cells may hold several
//        sequences, holes, positions in any order):
//          skip       no (query, key) pair of the tile is visible: nothing is loaded,
//          neighbour  every visible key has pos_q - pos_k <  W for every query: S = Q   K^T, only K is loaded,
//          grouped    every visible key has pos_q - pos_k >= W for every query: S = Q_g K_g^T, only K_g is loaded,
//          mixed      the tile straddles pos_q - pos_k = W: both products, the positions select one per element;
//        and it is flagged masked when its mask has non-zero values (a mask of zeros is not loaded nor added);
//     2. S (f16 x f16 -> f32 mma) gets the softcap and the mask, then one online softmax per column;
//     3. O += P V with P rounded to f16 and O accumulated in f32.
//   Everything runs in base 2: log2(e) is folded into the Q scale (or the softcap factor) and into the mask.
//   Q_g stays in registers (at long context most tiles are grouped), Q is read from shared memory when needed.
//
//   Two configurations of one kernel:
//     prefill (NWC = 4): 64 columns, each warp owns 16 of them and all keys of a tile (T = 64; 32 for D = 256);
//     decode  (NWC = 1): 16 columns (few queries), the 4 warps split the keys of a tile and are merged at the end.
//   When the blocks alone cannot fill the GPU the KV range of each block is also split (nsplit): every split leaves an
//   unnormalized partial (max, sum, O) and flash_attn_ext_se_combine merges them exactly.
//   The rotation-table form of the op (K_g given as cos/sin per key): decode loads the table rows of a grouped tile with
//   its K rows and rotates the B operands of Q_g K_g^T as they come out of shared memory (fattn_se_kq_rot), so that a
//   step reads no second K; prefill first rotates the K view into a pool scratch (flash_attn_ext_se_rotate_k), then runs
//   the same kernel. With a table of steps instead (nothing per cell, ggml_flash_attn_ext_se_steps) a decode block keeps
//   the table's single-position steps whole in shared memory in place of the table tile (loaded once, with Q), and per
//   tile the two larger steps (one row for n_lo consecutive positions) that keys in position order can take; each key's
//   cos/sin are the product of its two as the operands are rotated. The scratch of a prefill composes both the same way.
//
// Classification
//   prefill: flash_attn_ext_se_classify runs first and classifies every (block of queries, tile of 64 keys) once for all
//            the heads, reading the whole mask once; it also gives each block of queries the range of tiles to walk (the
//            end of a causal mask and other sequences at the ends of the cache are never visited). In the attention kernel
//            a tile then costs one byte: a run of grouped tiles loads neither positions nor mask. A kernel with T = 32
//            (D = 256) gives both halves of a classified tile its class, which holds for any subset of its keys.
//   decode:  few queries, so the kernel classifies each tile itself (a quarter per warp) one tile ahead of its use;
//            that hides under the memory-bound loads and saves a launch.
//
// Pipeline (cp.async, two __syncthreads per tile, a load in flight behind each phase)
//   The loads of a tile depend on its class, so positions and mask run one tile ahead of K/V:
//     A: wait for [K part(t), pos/mask(t+1)], sync; issue V(t);
//        (decode) each warp classifies a quarter of tile t+1; S-phase of tile t, its maxima (D = 256: and P)
//     B: wait for V(t), sync; class(t+1) (decode: merge the quarters);
//        issue K part(t+1), pos/mask(t+2) as its class needs them (slot of tile t); PV-phase of tile t (D <= 128: P of
//        each 16 keys right before their products, pv_fused in the kernel).
//
// Launches
//   Every kernel goes through ggml_cuda_kernel_launch, so that on Hopper it takes part in programmatic dependent launch
//   like llama.cpp's own kernels: it lets the next kernel launch at once and waits for the previous grid's end before its
//   first memory access (ggml_cuda_pdl_lc, ggml_cuda_pdl_sync). A kernel launched plainly breaks that chain twice: it
//   cannot start early itself, and the kernel after it cannot either. (Hence no __restrict__ on Hopper, GGML_CUDA_RESTRICT:
//   no load may be hoisted above the wait.)
//
// mma tiles (ggml_cuda_mma::tile on Ampere):
//   tile<16, 8, half2>  A/B operand, 16 rows x 16 halves, loaded with ldmatrix from row-major shared memory.
//   tile<16, 16, float> mma(C, A, B): C[i][j] += sum_k A[i][k] B[j][k]; element l of a thread is at
//                       row get_i(l) = 8*((l/2)%2) + lane/4, column get_j(l) = 8*(l/4) + 2*(lane%4) + l%2.
//   S = Q K^T:  A = Q (columns x dims), B = K rows (keys x dims)      -> C = columns x keys
//   O += P V:   A = P (columns x keys), B = V^T via ldmatrix.trans   -> C = columns x dims
//   So a thread holds the columns 16*wc + lane/4 + 8*j, j = 0, 1, of every C tile of its warp.

#include "fattn-self-extend.cuh"
#include "cp-async.cuh"
#include "mma.cuh"

#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>

using namespace ggml_cuda_mma;

#define FATTN_SE_NWARPS   4
#define FATTN_SE_NTHREADS (FATTN_SE_NWARPS*WARP_SIZE)
#define FATTN_SE_LOG2E    1.4426950408889634f
// running maximum of a column before its first visible key: finite, so 2^(max_old - max_new) is never NaN
#define FATTN_SE_MAX_INIT (-FLT_MAX/2.0f)

enum fattn_se_class {
    FATTN_SE_SKIP      = 0,
    FATTN_SE_NEIGHBOUR = 1,
    FATTN_SE_GROUPED   = 2,
    FATTN_SE_MIXED     = FATTN_SE_NEIGHBOUR | FATTN_SE_GROUPED,
    FATTN_SE_CLASS     = 3, // the bits of the class above
    FATTN_SE_MASKED    = 4, // flag: the tile's mask has non-zero values, so it is added (else it is 0 and left out)
};

// The op as raw device pointers and byte strides, so that the kernels can also be driven without ggml tensors
// (fattn-self-extend-selftest.cu).
struct fattn_se_params {
    const char * q;     int64_t nb_q1,  nb_q2,  nb_q3;  // F32 [D, n_q,  n_head,    ne3]
    const char * q_g;   int64_t nb_qg1, nb_qg2, nb_qg3; // F32 [D, n_q,  n_head,    ne3], or (q_rot) [n_rot_q, n_q, 1, ne3]
    const char * k;     int64_t nb_k1,  nb_k2,  nb_k3;  // F16 [D, n_kv, n_head_kv, ne3], rows contiguous
    const char * k_g;   int64_t nb_kg1, nb_kg2, nb_kg3; // F16 [D, n_kv, n_head_kv, ne3]
    const char * v;     int64_t nb_v1,  nb_v2,  nb_v3;  // F16 [D, n_kv, n_head_kv, ne3]
    const char * mask;  int64_t nb_m1,  nb_m3;          // F16 [>= n_kv padded to 8, >= n_q, 1, ne_m3] or nullptr
    int          ne_m3;                                 // 1 (broadcast over the streams) or ne3
    const char * pos_q; int64_t nb_pq1;                 // I32 [n_q,  ne3]
    const char * pos_k; int64_t nb_pk1;                 // I32 [n_kv, ne3]
    float      * dst;                                   // F32 [D, n_head, n_q, ne3], contiguous

    int   D, n_q, n_kv, n_head, n_head_kv, ne3;
    int   W;
    float scale, softcap;
    int   k_rot;                                        // fattn_se_rot: NONE, or k_g is a rotation table of D floats
                                                        // per key (decode only), F32 [D, n_kv, 1, ne3], nb_kg2 unused
    int   k_steps_G;                                    // > 0: k_g is a table of steps for this group size instead,
    int   k_steps_lo, k_steps_hi;                       // F32 [n_rot, lo + hi] shared by the streams (nb_kg3 0);
    uint3 k_steps_G_div;                                // set by fattn_se_set_steps: division by G,
    int   k_steps_lo_log2;                              // and by lo (a power of two)
    int   q_rot;                                        // fattn_se_rot: NONE, or q_g is a rotation table of n_rot_q
    int   n_rot_q;                                      // floats per query (nb_qg2 0): Q_g is Q rotated as it is staged
};

// How the op is cut into blocks, made on the host by fattn_se_make_plan.
struct fattn_se_plan {
    bool   decode;        // NWC = 1 configuration
    int    NHB;           // query heads per block, all of one KV head
    int    RPB;           // queries per block
    int    n_rg;          // blocks along the queries
    int    ntiles;        // KV tiles of the cache, T keys each
    int    ntiles_c;      // prefill: classified tiles of the cache, FATTN_SE_TC keys each
    int    tpw_c;         // prefill: consecutive tiles a warp of flash_attn_ext_se_classify classifies
    int    nsplit;        // KV ranges per block of columns, merged by flash_attn_ext_se_combine if > 1
    bool   classify;      // prefill: tile classes made beforehand by flash_attn_ext_se_classify
    float  q_scale;       // Q, Q_g are multiplied by this: scale*log2(e), or scale/softcap with a softcap
    float  logit_mul;     // softcap*log2(e)
    size_t nbytes_shared;
    size_t off_tiles, nbytes_cls;   // layout of the tile classes (prefill): range at 0, tiles at off_tiles
    size_t off_O, nbytes_ws;        // layout of the workspace (split KV ranges): part_ML at 0, part_O at off_O

    // pointers, set by fattn_se_classify and fattn_se_run
    int2    * range;      // [ne3][n_rg]: ntiles_c - first and last + 1 classified tile with a visible key (atomicMax from 0)
    uint8_t * tiles;      // [ne3][n_rg][ntiles_c]: class | FATTN_SE_MASKED of every classified tile
    float2  * part_ML;    // [rows][nsplit]: max (base 2) and sum of each partial
    float   * part_O;     // [rows][nsplit][D]: unnormalized O of each partial
};

static constexpr __host__ __device__ int fattn_se_ncols(const bool decode) {
    return decode ? 16 : 64;
}

// Keys per tile. Decode is memory bound: 128 keys keep 32 KiB of K/V in flight per block for D = 64; larger heads use 64
// so that a block fits the 99 KiB of shared memory of consumer GPUs (D = 128; D = 256 decode needs 112 KiB). Prefill with
// D = 256 uses 32 keys, as llama.cpp's own kernel does: 16 columns x 256 dims of f32 O and of Q_g in registers leave no
// room for more logits, and 32-key K/K_g/V tiles keep two blocks per SM.
static constexpr __host__ __device__ int fattn_se_T(const int D, const bool decode) {
    return decode ? (D <= 64 ? 128 : 64) : (D >= 256 ? 32 : 64);
}

// Keys per tile of the prefill classification (flash_attn_ext_se_classify): a multiple of every prefill T.
#define FATTN_SE_TC 64

// Blocks per SM to fit, i.e. the register cap: prefill with D = 64 fits 3 blocks (168 registers per thread); the other
// configurations need more than 200 registers for Q_g and the f32 O accumulators, and their shared memory allows 2 anyway.
static constexpr __host__ __device__ int fattn_se_min_blocks(const int D, const int NWC) {
    return NWC == 4 && D <= 64 ? 3 : 2;
}

static int fattn_se_largest_divisor(const int n, const int max) {
    for (int d = std::min(n, max); d > 1; --d) {
        if (n % d == 0) {
            return d;
        }
    }
    return 1;
}

// Configuration and block shape: decode when all queries fit one block of 16 columns together with all the heads of a
// KV head (up to 16), otherwise 64 columns of up to 8 heads.
static void fattn_se_block_shape(const int n_q, const int gqa, bool & decode, int & NHB, int & RPB) {
    const int NHB_decode = fattn_se_largest_divisor(gqa, fattn_se_ncols(true));
    decode = n_q <= fattn_se_ncols(true)/NHB_decode;
    NHB    = decode ? NHB_decode : fattn_se_largest_divisor(gqa, 8);
    RPB    = fattn_se_ncols(decode)/NHB;
}

// The forms of K_g a kernel reads (template parameter ROT): the grouped keys themselves, or K and a rotation table tile of D
// floats per key (ggml-self-extend.h), the pairs (2i, 2i + 1) or (i, i + D/2) rotated as the B operands are loaded. With
// FATTN_SE_ROT_STEPS the kernel keeps the single-position steps of a table of steps in place of the table tile, and
// applies each key's larger step as the B operands are rotated.
enum fattn_se_rot { FATTN_SE_ROT_NONE = 0, FATTN_SE_ROT_NORM = 1, FATTN_SE_ROT_NEOX = 2, FATTN_SE_ROT_PAIRS = 3,
                    FATTN_SE_ROT_STEPS = 4 };

// Single-position steps that a decode kernel keeps whole in shared memory (libllama makes 128).
#define FATTN_SE_STEPS_LO_MAX 128

// Row stride of a rotation table tile in floats: rows 32 bytes apart modulo 128, so that the float2 reads of a half warp
// (4 rows x 4 lanes) hit distinct banks.
static constexpr __host__ __device__ int fattn_se_rot_stride(const int D) {
    return D + 8;
}

// Rows of the table region of a kernel's shared memory (fattn_se_rot): a table tile, or (FATTN_SE_ROT_STEPS) the single
// steps and two larger ones.
static constexpr __host__ __device__ int fattn_se_tab_rows(const int T, const int rot) {
    return rot & FATTN_SE_ROT_STEPS ? FATTN_SE_STEPS_LO_MAX + 2 : T;
}

// Must match the carving of shared memory in flash_attn_ext_se_f16. rot (fattn_se_rot): K_g is a rotation table tile, in
// place of a K_g tile of D + 8 halves per key, or a table of steps' single steps and two larger steps.
static size_t fattn_se_nbytes_shared(const int D, const bool decode, const int RPB, const int rot) {
    const int T = fattn_se_T(D, decode);
    return 2*T*(D + 8)*sizeof(half)                     // K, V tiles, rows padded by 16 bytes
         + (rot ? fattn_se_tab_rows(T, rot)*fattn_se_rot_stride(D)*sizeof(float) : T*(D + 8)*sizeof(half)) // K_g, table
         + 2*RPB*(T + 8)*sizeof(half)                   // mask, 2 slots
         + 2*T*sizeof(int)                              // pos_k, 2 slots
         + FATTN_SE_NWARPS*sizeof(int4)                 // per warp parts of the class of the next tile
         + fattn_se_ncols(decode)*(D + 8)*sizeof(half); // Q
}

// ------------------------------------------------------------------------------------------------------------------
// device helpers

// One K/V tile, rows k0 .. k0 + T - 1 of D halves, into shared memory rows of S halves (the padding of D + 8 makes ldmatrix
// conflict-free). Rows past the end of the cache repeat its last row: their keys are masked, but V must stay finite since
// P = 0 multiplies it. Thread tid always copies the same 16 byte column of every (128/(D/8))-th row. (Also the rows of a
// rotation table: D = 2*(floats per row).)
template <int D, int T, int S = D + 8>
static __device__ __forceinline__ void fattn_se_load_kv(
        half * GGML_CUDA_RESTRICT tile, const char * GGML_CUDA_RESTRICT src, const int64_t nb1, const int k0, const int n_kv, const int tid) {
    constexpr int chunks_row = D/8;
    constexpr int rows_pass  = FATTN_SE_NTHREADS/chunks_row;
    static_assert(FATTN_SE_NTHREADS % chunks_row == 0 && T % rows_pass == 0, "bad K/V tile size");

    const int j0 = tid / chunks_row;
    const int jc = tid % chunks_row;
    const unsigned int dst = ggml_cuda_cvta_generic_to_shared(tile + j0*S + 8*jc);
    const char * src_c = src + 16*jc;
    if (k0 + T <= n_kv) {
        src_c += int64_t(k0 + j0)*nb1;
#pragma unroll
        for (int i = 0; i < T/rows_pass; ++i) {
            cp_async_cg_16<64>(dst + i*rows_pass*S*sizeof(half), src_c + i*rows_pass*nb1);
        }
    } else {
#pragma unroll
        for (int i = 0; i < T/rows_pass; ++i) {
            const int64_t k = min(k0 + j0 + i*rows_pass, n_kv - 1);
            cp_async_cg_16<64>(dst + i*rows_pass*S*sizeof(half), src_c + k*nb1);
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
// A key is visible to a row if its mask value is not -inf; nvalid: keys of the tile that exist (0: a tile past the range).
template <int T>
static __device__ __forceinline__ void fattn_se_class_part(
        int4 * GGML_CUDA_RESTRICT part, const int * GGML_CUDA_RESTRICT pos_tile, const half * GGML_CUDA_RESTRICT mask_tile,
        const int rows, const int nvalid) {
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
    int pk_min = INT_MAX;
    int pk_max = INT_MIN;
    if (lane < KPW && (vis_chunk >> (lane % 8)) & 1) {
        pk_min = pos_tile[kw + lane];
        pk_max = pk_min;
    }
    pk_min = __reduce_min_sync(0xFFFFFFFF, pk_min);
    pk_max = __reduce_max_sync(0xFFFFFFFF, pk_max);
    const int any_vis = __any_sync(0xFFFFFFFF, vis != 0);
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
// (fattn_se_lane_row/col) of the first key row, rows SKV halves apart. Q comes from registers (Q_reg) or, if Q_reg is
// null, from shared memory at the lane's A address Q_sm.
template <int D, int NK, int SKV>
static __device__ __forceinline__ void fattn_se_kq(
        tile<16, 16, float> * S, const tile<16, 8, half2> * Q_reg, const uint32_t Q_sm, const uint32_t K) {
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
            fattn_se_ldsm<FATTN_SE_LDSM_B>(K_B, K + (16*kk*SKV + 16*d16)*sizeof(half));
            mma(S[kk], Q_A, K_B);
        }
    }
}

// Element r of a B operand loaded by fattn_se_ldsm<FATTN_SE_LDSM_B> is the half2 at row lane/4 + 8*(r % 2), halves
// 8*(r/2) + 2*(lane % 4) and the next: the table offset of that pair from the lane's first one (fattn_se_kq_rot's tab).
template <int D>
static __device__ __forceinline__ int fattn_se_rot_offset(const int r) {
    return 8*(r % 2)*fattn_se_rot_stride(D) + 8*(r/2);
}

// S[kk] = Q_g K_g^T as fattn_se_kq, K_g made from the K rows at K and the table rows at tab: the lane's first table
// element, row lane/4 of the first key, column 2*(lane % 4). ROT_NORM: the half2 of a B element is one pair, its cos and
// sin one float2 of the table; ROT_NEOX: element r of dimension chunk d16 < D/32 and element r of chunk d16 + D/32 are
// the two halves of the same pairs, whose cos and sin are float2 D/2 apart. ROT_STEPS: instead of tab, lo[2*kk + j] and
// hi[2*kk + j] point at the lane's first element (column 2*(lane % 4)) of the single-position and the larger step of key
// 16*kk + lane/4 + 8*j (in shared memory, the larger one maybe in global); they compose as c = c1 c2 - s1 s2,
// s = s1 c2 + c1 s2.
template <int D, int NK, int SKV, int ROT>
static __device__ __forceinline__ void fattn_se_kq_rot(
        tile<16, 16, float> * S, const tile<16, 8, half2> * Q_reg, const uint32_t K, const float * GGML_CUDA_RESTRICT tab,
        const float * const * lo, const float * const * hi) {
    constexpr int  PAIRS = ROT & FATTN_SE_ROT_PAIRS;
    constexpr bool STEPS = ROT & FATTN_SE_ROT_STEPS;
    static_assert(PAIRS == FATTN_SE_ROT_NORM || PAIRS == FATTN_SE_ROT_NEOX, "not a rotation");
    constexpr int ST = fattn_se_rot_stride(D);
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
                    float2 cs;
                    if constexpr (STEPS) { // the pair's cos and sin: its single step's times its larger step's
                        const float2 l = *(const float2 *) (lo[2*kk + r % 2] + 16*d16 + 8*(r/2));
                        const float2 h = *(const float2 *) (hi[2*kk + r % 2] + 16*d16 + 8*(r/2));
                        cs = make_float2(l.x*h.x - l.y*h.y, l.y*h.x + l.x*h.y);
                    } else {
                        cs = *(const float2 *) (tab + 16*kk*ST + 16*d16 + fattn_se_rot_offset<D>(r));
                    }
                    const float2 k  = __half22float2(K_B.x[r]);
                    K_B.x[r] = __floats2half2_rn(k.x*cs.x - k.y*cs.y, k.x*cs.y + k.y*cs.x);
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
                    const float * t  = STEPS ? lo[2*kk + r % 2] + 16*d16 + 8*(r/2)
                                             : tab + 16*kk*ST + 16*d16 + fattn_se_rot_offset<D>(r);
                    float2        c  = *(const float2 *) t;
                    float2        sn = *(const float2 *) (t + D/2);
                    if constexpr (STEPS) { // two pairs' cos and sin times those of their larger steps
                        const float * h  = hi[2*kk + r % 2] + 16*d16 + 8*(r/2);
                        const float2  c2 = *(const float2 *) h;
                        const float2  s2 = *(const float2 *) (h + D/2);
                        const float2  c1 = c, s1 = sn;
                        c  = make_float2(c1.x*c2.x - s1.x*s2.x, c1.y*c2.y - s1.y*s2.y);
                        sn = make_float2(s1.x*c2.x + c1.x*s2.x, s1.y*c2.y + c1.y*s2.y);
                    }
                    const float2  a  = __half22float2(K_a.x[r]);
                    const float2  b  = __half22float2(K_b.x[r]);
                    K_a.x[r] = __floats2half2_rn(a.x*c.x  - b.x*sn.x, a.y*c.y  - b.y*sn.y);
                    K_b.x[r] = __floats2half2_rn(a.x*sn.x + b.x*c.x,  a.y*sn.y + b.y*c.y);
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

// ------------------------------------------------------------------------------------------------------------------
// kernels

// The start of every kernel here ("Launches" above): let the next kernel launch, then wait for the previous grid.
static __device__ __forceinline__ void fattn_se_chain() {
    ggml_cuda_pdl_lc();
    ggml_cuda_pdl_sync();
}

// NWC: warps along the columns (4: prefill, 1: decode), T: keys per tile, ROT: the form of K_g (fattn_se_rot).
template <int D, int NWC, int T, bool use_softcap, int ROT>
__launch_bounds__(FATTN_SE_NTHREADS, fattn_se_min_blocks(D, NWC))
static __global__ void flash_attn_ext_se_f16(const fattn_se_params p, const fattn_se_plan P) {
#if defined(AMPERE_MMA_AVAILABLE)
    fattn_se_chain();
    constexpr int  NWK    = FATTN_SE_NWARPS/NWC; // warps along the keys of a tile
    constexpr int  NC     = 16*NWC;              // columns per block
    constexpr int  KW     = T/NWK;               // keys per warp and tile
    constexpr int  SKV    = D + 8;               // row stride of the K/V/Q tiles in halves
    constexpr int  SM     = T + 8;               // row stride of the mask tiles in halves
    constexpr int  SO     = D + 4;               // row stride of the f32 O staging of the epilogue
    constexpr bool decode = NWC == 1;
    constexpr int  TPC    = decode ? 1 : FATTN_SE_TC/T; // prefill: tiles per classified tile
    // Softmax and P V (D <= 128): the exponentials of a tile wait until V(t) is here, then the P of each 16 keys goes
    // straight into its products with V, so that MUFU and tensor-core instructions interleave: prefill 3-5 % faster
    // (H200, fattn-self-extend-selftest, D = 64 and 128; RESULTS 4.5). With D = 256 (prefill tiles of 32 keys, two
    // products of 16 keys per warp) it was 12 % slower, so there all of P is made before the barrier.
    constexpr bool pv_fused = D <= 128;
    static_assert(D % 16 == 0 && KW % 16 == 0 && (NC <= T || (!decode && NC <= 2*T)), "bad tile sizes");
    static_assert(NC == fattn_se_ncols(decode) && T == fattn_se_T(D, decode), "kernel and host configuration differ");
    static_assert(decode || FATTN_SE_TC % T == 0, "a tile must lie in one classified tile");
    static_assert(ROT == FATTN_SE_ROT_NONE || decode, "a prefill reads K_g from a scratch (flash_attn_ext_se_rotate_k)");
    // the epilogue reuses the K/K_g/V tiles and what follows them, up to the end of Q
    static_assert(NWK*NC*(SO*sizeof(float) + sizeof(float2)) <= (3*T + NC)*SKV*sizeof(half), "epilogue does not fit");

    // 2^x as one MUFU.EX2 with or without -use_fast_math: the softmax needs neither IEEE rounding nor subnormal results
    auto exp2_approx = [](const float x) {
        float y;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
        return y;
    };

    const int lane = threadIdx.x;
    const int w    = threadIdx.y;
    const int tid  = w*WARP_SIZE + lane;
    const int wc   = w / NWK; // the warp's 16 columns: 16*wc ...
    const int wk   = w % NWK; // the warp's keys of each tile: KW*wk ...

    const int rg    = P.n_rg - 1 - blockIdx.x; // causal masks give the last queries the most keys: start them first
    const int h0    = blockIdx.y*P.NHB;
    const int s     = blockIdx.z / P.nsplit;
    const int split = blockIdx.z % P.nsplit;
    const int hk    = h0 / (p.n_head/p.n_head_kv);
    const int i0    = rg*P.RPB;
    const int rows  = min(P.RPB, p.n_q - i0);

    const char * K         = p.k   + s*p.nb_k3  + hk*p.nb_k2;
    const char * Kg        = p.k_g + s*p.nb_kg3 + (ROT ? 0 : hk*p.nb_kg2); // a table serves every head
    const char * V         = p.v   + s*p.nb_v3  + hk*p.nb_v2;
    const char * mask_rows = p.mask ? p.mask + (s % p.ne_m3)*p.nb_m3 + i0*p.nb_m1 : nullptr;
    const int  * pos_q     = (const int *) (p.pos_q + s*p.nb_pq1) + i0;
    const char * pos_k     = p.pos_k + s*p.nb_pk1;

    // the block walks the tiles kt0 .. kt0 + ntb - 1 of the cache
    int kt_lo = 0;
    int kt_hi = P.ntiles;
    if constexpr (!decode) {
        const int2 r = P.range[int64_t(s)*P.n_rg + rg];
        kt_lo = (P.ntiles_c - r.x)*TPC;
        kt_hi = max(min(r.y*TPC, P.ntiles), kt_lo);
    }
    const int kt0 = kt_lo + int(int64_t(kt_hi - kt_lo)* split     /P.nsplit);
    const int ntb = kt_lo + int(int64_t(kt_hi - kt_lo)*(split + 1)/P.nsplit) - kt0;

    // prefill: the classes of the block's tiles, made by flash_attn_ext_se_classify
    const uint8_t * tiles = decode ? nullptr : P.tiles + (int64_t(s)*P.n_rg + rg)*P.ntiles_c;
    auto class_of = [&](const int t) {
        return t < ntb ? int(tiles[(kt0 + t)/TPC]) : int(FATTN_SE_SKIP);
    };

    extern __shared__ half2 fattn_se_smem[];
    half * sK  = (half *) fattn_se_smem;
    half * sKg = sK  + T*SKV;                 // or the table tile (or single and larger steps), rows of D + 8 floats
    half * sV  = sKg + fattn_se_tab_rows(T, ROT)*(ROT ? 2*fattn_se_rot_stride(D) : SKV);
    half * sM  = sV  + T*SKV;               // mask of tile t at sM + (t % 2)*P.RPB*SM
    int  * sP  = (int *) (sM + 2*P.RPB*SM); // pos_k of tile t at sP + (t % 2)*T
    int4 * sC  = (int4 *) (sP + 2*T);       // quarters of the class of the next tile
    half * sQ  = (half *) (sC + FATTN_SE_NWARPS);
    // Q_g is staged where no load is in flight yet: V, or (prefill with T < NC) K and K_g, which follow each other
    half * sQg = NC <= T ? sV : sK;

    auto nvalid_of = [&](const int t) {
        return t < ntb ? min(T, p.n_kv - (kt0 + t)*T) : 0;
    };
    // what tile t needs of its keys' positions and mask (decode: everything, its class is yet to be made); a grouped,
    // unmasked tile needs nothing, and then no address is computed
    auto load_pos_mask = [&](const int t, const int slot, const int cls) {
        const bool pos  = decode || (cls & FATTN_SE_CLASS) == FATTN_SE_MIXED;
        const bool mask = decode || (cls & FATTN_SE_MASKED);
        if (!pos && !mask) {
            return;
        }
        fattn_se_load_pos_mask<T>(pos ? sP + slot*T : nullptr, pos_k, sM + slot*P.RPB*SM, mask ? mask_rows : nullptr,
                                  p.nb_m1, rows, (kt0 + t)*T, p.n_kv, tid);
    };
    auto load_k = [&](const int t, const int cls) { // the key operands the class of tile t needs
        const int k0 = (kt0 + t)*T;
        if (cls & (ROT ? FATTN_SE_CLASS : FATTN_SE_NEIGHBOUR)) {
            fattn_se_load_kv<D, T>(sK, K, p.nb_k1, k0, p.n_kv, tid);
        }
        if (cls & FATTN_SE_GROUPED) {
            if constexpr (ROT & FATTN_SE_ROT_STEPS) { // positions of tile t: in its slot since (A) of the step before
                fattn_se_load_steps_hi<2*D, 2*fattn_se_rot_stride(D)>(sKg, p, nvalid_of(t) > 0 ? sP[(t % 2)*T] : 0, tid);
            } else if constexpr (ROT) {
                fattn_se_load_kv<2*D, T, 2*fattn_se_rot_stride(D)>(sKg, Kg, p.nb_kg1, k0, p.n_kv, tid);
            } else {
                fattn_se_load_kv<D, T>(sKg, Kg, p.nb_kg1, k0, p.n_kv, tid);
            }
        }
    };

    // prefill: the classes of tiles t + 1 and t + 2; each is read from global memory a step before the step that
    // issues its loads, so that the read has a whole step to land. (ncu still shows a stall right after (B): the K
    // tile's cp.async instructions still reading registers that the next instructions overwrite; RESULTS 4.5.)
    int cls_next  = decode ? 0 : class_of(1);
    int cls_next2 = decode ? 0 : class_of(2);
    if (ntb > 0) {
        load_pos_mask(0, 0, decode ? 0 : class_of(0));
        if (ntb > 1) {
            load_pos_mask(1, 1, cls_next);
        }
        if constexpr (decode) {
            // Short blocks: rather than wait for the class, load both K operands of the first tile along with Q (a table
            // of steps: its single steps; the tile's larger ones need its positions first: after Q).
            load_k(0, ROT & FATTN_SE_ROT_STEPS ? int(FATTN_SE_NEIGHBOUR) : int(FATTN_SE_MIXED));
            if constexpr (ROT & FATTN_SE_ROT_STEPS) {
                fattn_se_load_steps_lo<2*D, 2*fattn_se_rot_stride(D)>(sKg, p, tid);
            }
        }
    }

    // Q and Q_g, scaled, as f16 rows of the columns; columns past the queries are 0. Nothing hides these loads (every
    // block stages its NC x D values before its first tile, and with one wave of blocks all of them at once), so each
    // thread issues QK of them before it uses any: as a loop of one load after the other, with one select more in it,
    // the staging made the kernel 14 % slower in a prefill of 512-query ubatches on the 8B shape (H200; RESULTS 4.5).
    constexpr int QK = 8;
    static_assert((NC*D) % (QK*FATTN_SE_NTHREADS) == 0, "bad Q staging");
    for (int e0 = 0; e0 < NC*D; e0 += QK*FATTN_SE_NTHREADS) {
        float x[QK];
        float y[QK];
        // (q_rot) the element's pair partner and the pair's cos and sin: loaded with the rest, combined after
        float xp[QK];
        float co[QK];
        float sn[QK];
        bool  first[QK];
#pragma unroll
        for (int k = 0; k < QK; ++k) {
            const int e = e0 + k*FATTN_SE_NTHREADS + tid;
            const int c = e / D;
            const int r = c / P.NHB;
            const int h = h0 + c % P.NHB;
            const int d = e % D;
            x[k] = y[k] = xp[k] = sn[k] = 0.0f;
            co[k] = 1.0f;
            first[k] = true;
            if (r < rows) {
                const float * qr = (const float *) (p.q + s*p.nb_q3 + h*p.nb_q2 + (i0 + r)*p.nb_q1);
                x[k] = qr[d];
                if (p.q_rot == FATTN_SE_ROT_NONE) {
                    y[k] = ((const float *) (p.q_g + s*p.nb_qg3 + h*p.nb_qg2 + (i0 + r)*p.nb_qg1))[d];
                } else if (d < p.n_rot_q) {
                    const float * cs = (const float *) (p.q_g + s*p.nb_qg3 + (i0 + r)*p.nb_qg1);
                    int a, b;
                    fattn_se_rot_pair(d, p.n_rot_q, p.q_rot, a, b);
                    first[k] = d == a;
                    xp[k]    = qr[first[k] ? b : a];
                    co[k]    = cs[a];
                    sn[k]    = cs[b];
                }
            }
        }
        if (p.q_rot != FATTN_SE_ROT_NONE) {
#pragma unroll
            for (int k = 0; k < QK; ++k) { // dimensions past n_rot: cos 1, sin 0
                y[k] = first[k] ? x[k]*co[k] - xp[k]*sn[k] : xp[k]*sn[k] + x[k]*co[k];
            }
        }
#pragma unroll
        for (int k = 0; k < QK; ++k) {
            const int e = e0 + k*FATTN_SE_NTHREADS + tid;
            sQ [(e / D)*SKV + e % D] = __float2half(P.q_scale*x[k]);
            sQg[(e / D)*SKV + e % D] = __float2half(P.q_scale*y[k]);
        }
    }

    // The thread's columns j = 0, 1 are 16*wc + lane/4 + 8*j: their query (row of the mask tiles) and position.
    // Columns past the queries borrow the last query's, their results are not written.
    int mrow[2];
    int pq[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        mrow[j] = min((16*wc + lane/4 + 8*j)/P.NHB, rows - 1);
        pq[j]   = pos_q[mrow[j]];
    }
    int pq_min, pq_max;
    fattn_se_pos_range(pos_q, rows, pq_min, pq_max);

    // decode: the class of a tile from the 4 quarters of fattn_se_class_part
    auto class_merge = [&]() {
        int vis = 0, nzi = 0, pk_min = INT_MAX, pk_max = INT_MIN;
#pragma unroll
        for (int ww = 0; ww < FATTN_SE_NWARPS; ++ww) {
            const int4 part = sC[ww];
            vis   |= part.x;
            nzi   |= part.y;
            pk_min = min(pk_min, part.z);
            pk_max = max(pk_max, part.w);
        }
        const int masked = nzi ? int(FATTN_SE_MASKED) : 0;
        if (!vis) {
            return int(FATTN_SE_SKIP);
        }
        if (pq_max - pk_min < p.W) {
            return FATTN_SE_NEIGHBOUR | masked;
        }
        if (pq_min - pk_max >= p.W) {
            return FATTN_SE_GROUPED | masked;
        }
        return FATTN_SE_MIXED | masked;
    };

    cp_async_wait_all();
    __syncthreads();
    if constexpr (ROT & FATTN_SE_ROT_STEPS) {
        if (ntb > 0) { // the first tile's steps, now that its positions are here
            fattn_se_load_steps_hi<2*D, 2*fattn_se_rot_stride(D)>(sKg, p, sP[0], tid);
        }
    }

    tile<16, 8, half2> Qg_A[D/16];
#pragma unroll
    for (int d16 = 0; d16 < D/16; ++d16) {
        load_ldmatrix(Qg_A[d16], (const half2 *) (sQg + 16*wc*SKV) + 8*d16, SKV/2);
    }
    // the lane's ldmatrix addresses of its warp's Q rows, first K/K_g row and first V row
    const uint32_t Q_sm = ggml_cuda_cvta_generic_to_shared(sQ + (16*wc + fattn_se_lane_row<FATTN_SE_LDSM_A>(lane))*SKV
                                                                + fattn_se_lane_col<FATTN_SE_LDSM_A>(lane));
    const uint32_t K_sm = ggml_cuda_cvta_generic_to_shared(sK + (KW*wk + fattn_se_lane_row<FATTN_SE_LDSM_B>(lane))*SKV
                                                                + fattn_se_lane_col<FATTN_SE_LDSM_B>(lane));
    const uint32_t Kg_sm = K_sm + T*SKV*sizeof(half); // sKg follows sK
    // (ROT) the lane's first table element: row lane/4 of the warp's first key, column 2*(lane % 4)
    const float * tab = (const float *) sKg + (KW*wk + lane/4)*fattn_se_rot_stride(D) + 2*(lane % 4);
    const uint32_t V_sm = ggml_cuda_cvta_generic_to_shared(sV + (KW*wk + fattn_se_lane_row<FATTN_SE_LDSM_BT>(lane))*SKV
                                                                + fattn_se_lane_col<FATTN_SE_LDSM_BT>(lane));

    if constexpr (decode) {
        fattn_se_class_part<T>(sC + w, sP, mask_rows ? sM : nullptr, rows, nvalid_of(0));
    }
    __syncthreads(); // Q_g staging consumed, (decode) class parts of tile 0 visible

    int cls = decode ? class_merge() : class_of(0); // class | FATTN_SE_MASKED of tile t
    if constexpr (!decode) {
        if (cls != FATTN_SE_SKIP) {
            load_k(0, cls);
        }
    }

    tile<16, 16, float> O[D/16];
    float KQ_max[2] = {FATTN_SE_MAX_INIT, FATTN_SE_MAX_INIT};
    float KQ_sum[2] = {0.0f, 0.0f}; // sums of the thread's keys, reduced over the 4 lanes of a column at the end

    // Tile t. pure: it is grouped, unmasked and full, as nearly every tile at long context: that path is compiled
    // separately, without the branches of the other classes.
    auto step = [&](const int t, auto pure_c) {
        constexpr bool pure = decltype(pure_c)::value;
        const int  slot   = t % 2;
        const int  nvalid = pure ? T : nvalid_of(t);
        const bool work   = pure || cls != FATTN_SE_SKIP;

        cp_async_wait_all();
        __syncthreads(); // (A): K part(t) and pos/mask(t + 1) are here, every warp is done with V(t - 1)

        if (work) {
            fattn_se_load_kv<D, T>(sV, V, p.nb_v1, (kt0 + t)*T, p.n_kv, tid);
        }
        int cls_next3 = 0; // prefill: class of tile t + 3, for the next step
        if constexpr (decode) {
            fattn_se_class_part<T>(sC + w, sP + (1 - slot)*T, mask_rows ? sM + (1 - slot)*P.RPB*SM : nullptr, rows,
                                   nvalid_of(t + 1));
        } else {
            cls_next3 = class_of(t + 3);
        }

        tile<16, 16, float> S[KW/16];
        tile<16, 8, half2>  P_A[pv_fused ? 1 : KW/16];
        if (work) {
            // (table of steps) the steps of the thread's keys 16*kk + lane/4 + 8*j of the warp, [2*kk + j], at the lane's
            // first element (column 2*(lane % 4)): the single one among those kept, the larger one of the two after
            // them. Where a key of the warp takes neither (keys out of position order), the table's row in global
            // memory: for heads up to 128 in a second pass over the products, which the warps that need it make again;
            // for 256 by a pointer to either memory (a second pass there spills registers).
            constexpr bool hi_pass = D <= 128;
            [[maybe_unused]] const float * lo[ROT & FATTN_SE_ROT_STEPS ? 2*(KW/16) : 1];
            [[maybe_unused]] const float * hi[ROT & FATTN_SE_ROT_STEPS ? 2*(KW/16) : 1];
            [[maybe_unused]] int  r_hi[ROT & FATTN_SE_ROT_STEPS ? 2*(KW/16) : 1];
            [[maybe_unused]] bool far = false;
            if constexpr (ROT & FATTN_SE_ROT_STEPS) {
                if (pure || (cls & FATTN_SE_GROUPED)) {
                    int r_lo, r_hi0;
                    fattn_se_steps_rows(p, sP[slot*T], r_lo, r_hi0);
                    const int * pk = sP + slot*T + KW*wk + lane/4;
#pragma unroll
                    for (int i = 0; i < 2*(KW/16); ++i) {
                        fattn_se_steps_rows(p, pk[16*(i/2) + 8*(i % 2)], r_lo, r_hi[i]);
                        far = far || unsigned(r_hi[i] - r_hi0) >= 2u;
                        lo[i] = (const float *) sKg + r_lo*fattn_se_rot_stride(D) + 2*(lane % 4);
                        hi[i] = !hi_pass && unsigned(r_hi[i] - r_hi0) >= 2u
                              ? (const float *) (p.k_g + int64_t(r_hi[i])*p.nb_kg1) + 2*(lane % 4)
                              : (const float *) sKg + (FATTN_SE_STEPS_LO_MAX + min(max(r_hi[i] - r_hi0, 0), 1))*fattn_se_rot_stride(D)
                                  + 2*(lane % 4);
                    }
                    far = hi_pass && __any_sync(0xFFFFFFFF, far);
                }
            }
            // S_ (NK C tiles) = Q_g K_g^T of the warp's keys 16*kk0 .. with the rotation table or table of steps
            auto kq_rot = [&](tile<16, 16, float> * S_, auto nk, const int kk0) {
                constexpr int NK = decltype(nk)::value;
                const uint32_t K_   = K_sm + 16*kk0*SKV*sizeof(half);
                const float *  tab_ = tab + 16*kk0*fattn_se_rot_stride(D);
                fattn_se_kq_rot<D, NK, SKV, ROT>(S_, Qg_A, K_, tab_, lo + 2*kk0, hi + 2*kk0);
                if constexpr ((ROT & FATTN_SE_ROT_STEPS) && hi_pass) {
                    if (far) {
                        const float * hg[2*NK];
#pragma unroll
                        for (int i = 0; i < 2*NK; ++i) {
                            hg[i] = (const float *) (p.k_g + int64_t(r_hi[2*kk0 + i])*p.nb_kg1) + 2*(lane % 4);
                        }
                        fattn_se_kq_rot<D, NK, SKV, ROT>(S_, Qg_A, K_, tab_, lo + 2*kk0, hg);
                    }
                }
            };
            if (pure || (cls & FATTN_SE_CLASS) == FATTN_SE_GROUPED) {
                if constexpr (ROT) {
                    kq_rot(S, std::integral_constant<int, KW/16>(), 0);
                } else {
                    fattn_se_kq<D, KW/16, SKV>(S, Qg_A, 0, Kg_sm);
                }
            } else {
                fattn_se_kq<D, KW/16, SKV>(S, nullptr, Q_sm, K_sm);
                if ((cls & FATTN_SE_CLASS) == FATTN_SE_MIXED) {
                    // the tile straddles pos_q - pos_k = W: both products, the positions pick one per (column, key)
                    const int * pk = sP + slot*T + KW*wk;
#pragma unroll
                    for (int kk = 0; kk < KW/16; ++kk) {
                        tile<16, 16, float> Sg;
                        if constexpr (ROT) {
                            kq_rot(&Sg, std::integral_constant<int, 1>(), kk);
                        } else {
                            fattn_se_kq<D, 1, SKV>(&Sg, Qg_A, 0, Kg_sm + 16*kk*SKV*sizeof(half));
                        }
#pragma unroll
                        for (int l = 0; l < Sg.ne; ++l) {
                            if (pq[(l/2) % 2] - pk[16*kk + Sg.get_j(l)] >= p.W) {
                                S[kk].x[l] = Sg.x[l];
                            }
                        }
                    }
                }
            }

            if constexpr (use_softcap) {
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; ++l) {
                        S[kk].x[l] = P.logit_mul*tanhf(S[kk].x[l]);
                    }
                }
            }
            if (!pure && mask_rows && (cls & FATTN_SE_MASKED)) {
                const half * mt = sM + slot*P.RPB*SM + KW*wk;
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; l += 2) {
                        const float2 m2 = __half22float2(*(const half2 *) (mt + mrow[(l/2) % 2]*SM + 16*kk + S[kk].get_j(l)));
                        S[kk].x[l + 0] += FATTN_SE_LOG2E*m2.x;
                        S[kk].x[l + 1] += FATTN_SE_LOG2E*m2.y;
                    }
                }
            }
            if (nvalid < T) {
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; ++l) {
                        if (KW*wk + 16*kk + S[kk].get_j(l) >= nvalid) {
                            S[kk].x[l] = -INFINITY;
                        }
                    }
                }
            }

            // online softmax; lanes with the same lane/4 hold keys of the same columns. The thread's maxima and sums
            // are trees over its KW/4 keys of a column, not chains of dependent instructions: with two warps per
            // scheduler little else hides their latency.
            float KQ_max_new[2];
            fattn_se_col_reduce<KW/16>(S, [](const float a, const float b) { return fmaxf(a, b); }, KQ_max_new);
            float KQ_scale[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                KQ_max_new[j] = fmaxf(KQ_max_new[j], __shfl_xor_sync(0xFFFFFFFF, KQ_max_new[j], 1, WARP_SIZE));
                KQ_max_new[j] = fmaxf(KQ_max_new[j], __shfl_xor_sync(0xFFFFFFFF, KQ_max_new[j], 2, WARP_SIZE));
                KQ_max_new[j] = fmaxf(KQ_max_new[j], KQ_max[j]);
                KQ_scale[j]   = exp2_approx(KQ_max[j] - KQ_max_new[j]);
                KQ_max[j]     = KQ_max_new[j];
            }
            if constexpr (pv_fused) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    KQ_sum[j] *= KQ_scale[j];
                }
            } else {
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; ++l) {
                        S[kk].x[l] = exp2_approx(S[kk].x[l] - KQ_max[(l/2) % 2]);
                    }
                    P_A[kk] = get_half2(S[kk]);
                }
                float KQ_sum_add[2];
                fattn_se_col_reduce<KW/16>(S, [](const float a, const float b) { return a + b; }, KQ_sum_add);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    KQ_sum[j] = KQ_scale[j]*KQ_sum[j] + KQ_sum_add[j];
                }
            }
            // once the maxima have settled the scales are 1: skip the rescaling when it is so for the whole warp
            if (__any_sync(0xFFFFFFFF, KQ_scale[0] != 1.0f || KQ_scale[1] != 1.0f)) {
#pragma unroll
                for (int d16 = 0; d16 < D/16; ++d16) {
#pragma unroll
                    for (int l = 0; l < O[d16].ne; ++l) {
                        O[d16].x[l] *= KQ_scale[(l/2) % 2];
                    }
                }
            }
        }

        cp_async_wait_all();
        __syncthreads(); // (B): V(t) is here, every warp is done with K part(t) (decode: has classified its part of t + 1)

        if constexpr (decode) {
            cls_next = class_merge();
        }
        if (cls_next != FATTN_SE_SKIP) {
            load_k(t + 1, cls_next);
        }
        if (t + 2 < ntb) {
            load_pos_mask(t + 2, slot, cls_next2);
        }

        if (work) {
            if constexpr (pv_fused) {
                // P of 16 keys right before their products with V: the exponentials of the next 16 keys issue while the
                // tensor cores work on these
                float KQ_sum_add[2][KW/16];
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; ++l) {
                        S[kk].x[l] = exp2_approx(S[kk].x[l] - KQ_max[(l/2) % 2]);
                    }
                    P_A[0] = get_half2(S[kk]);
                    float r[2];
                    fattn_se_col_reduce<1>(&S[kk], [](const float a, const float b) { return a + b; }, r);
                    KQ_sum_add[0][kk] = r[0];
                    KQ_sum_add[1][kk] = r[1];
#pragma unroll
                    for (int d16 = 0; d16 < D/16; ++d16) {
                        tile<16, 8, half2> V_B; // V^T: dims x keys
                        fattn_se_ldsm<FATTN_SE_LDSM_BT>(V_B, V_sm + (16*kk*SKV + 16*d16)*sizeof(half));
                        mma(O[d16], P_A[0], V_B);
                    }
                }
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    KQ_sum[j] += fattn_se_tree<KW/16>(KQ_sum_add[j], [](const float a, const float b) { return a + b; });
                }
            } else {
#pragma unroll
                for (int d16 = 0; d16 < D/16; ++d16) {
#pragma unroll
                    for (int kk = 0; kk < KW/16; ++kk) {
                        tile<16, 8, half2> V_B; // V^T: dims x keys
                        fattn_se_ldsm<FATTN_SE_LDSM_BT>(V_B, V_sm + (16*kk*SKV + 16*d16)*sizeof(half));
                        mma(O[d16], P_A[kk], V_B);
                    }
                }
            }
        }

        cls       = cls_next;
        cls_next  = cls_next2;
        cls_next2 = cls_next3;
    };
    for (int t = 0; t < ntb; ++t) {
        if (cls == FATTN_SE_GROUPED && (kt0 + t + 1)*T <= p.n_kv) {
            step(t, std::true_type());
        } else {
            step(t, std::false_type());
        }
    }

    // Epilogue: the key groups of the warps (decode) are merged through shared memory, which also makes the writes
    // coalesced. Nothing is in flight anymore, the K/V tiles are reused.
    cp_async_wait_all();
    __syncthreads();

#pragma unroll
    for (int j = 0; j < 2; ++j) {
        KQ_sum[j] += __shfl_xor_sync(0xFFFFFFFF, KQ_sum[j], 1, WARP_SIZE);
        KQ_sum[j] += __shfl_xor_sync(0xFFFFFFFF, KQ_sum[j], 2, WARP_SIZE);
    }
    float  * eO  = (float *) fattn_se_smem;     // [NWK][NC][SO]
    float2 * eML = (float2 *) (eO + NWK*NC*SO); // [NWK][NC]: running max and sum
    if (lane % 4 == 0) {
        eML[wk*NC + 16*wc + lane/4 + 0] = make_float2(KQ_max[0], KQ_sum[0]);
        eML[wk*NC + 16*wc + lane/4 + 8] = make_float2(KQ_max[1], KQ_sum[1]);
    }
#pragma unroll
    for (int d16 = 0; d16 < D/16; ++d16) {
#pragma unroll
        for (int l = 0; l < O[d16].ne; l += 2) {
            const int c = 16*wc + O[d16].get_i(l);
            const int d = 16*d16 + O[d16].get_j(l);
            *(float2 *) (eO + (wk*NC + c)*SO + d) = make_float2(O[d16].x[l], O[d16].x[l + 1]);
        }
    }
    __syncthreads();

    for (int c = w; c < NC; c += FATTN_SE_NWARPS) {
        const int r = c / P.NHB;
        if (r >= rows) {
            continue;
        }
        float M = eML[c].x;
#pragma unroll
        for (int k = 1; k < NWK; ++k) {
            M = fmaxf(M, eML[k*NC + c].x);
        }
        float wgt[NWK];
        float L = 0.0f;
#pragma unroll
        for (int k = 0; k < NWK; ++k) {
            wgt[k] = exp2_approx(eML[k*NC + c].x - M);
            L     += wgt[k]*eML[k*NC + c].y;
        }
        const int64_t row = (int64_t(s)*p.n_q + i0 + r)*p.n_head + h0 + c % P.NHB;
        const bool    fin = P.nsplit == 1;
        // a column without any visible key is 0
        const float   inv = !fin ? 1.0f : L > 0.0f ? 1.0f/L : 0.0f;
        float * out = fin ? p.dst + row*D : P.part_O + (row*P.nsplit + split)*D;
        for (int d = lane; d < D; d += WARP_SIZE) {
            float o = 0.0f;
#pragma unroll
            for (int k = 0; k < NWK; ++k) {
                o += wgt[k]*eO[(k*NC + c)*SO + d];
            }
            out[d] = o*inv;
        }
        if (!fin && lane == 0) {
            P.part_ML[row*P.nsplit + split] = make_float2(M, L);
        }
    }
#else
    GGML_UNUSED_VARS(p, P);
    NO_DEVICE_CODE;
#endif // defined(AMPERE_MMA_AVAILABLE)
}

// Prefill: the class (and FATTN_SE_MASKED) of every tile of FATTN_SE_TC keys for every block of RPB queries of every stream,
// from the mask and the positions as fattn_se_class_part makes it, and per block of queries the first and last + 1 tile
// with a visible key. A warp classifies P.tpw_c consecutive tiles, two keys per lane.
__launch_bounds__(FATTN_SE_NTHREADS, 1)
static __global__ void flash_attn_ext_se_classify(const fattn_se_params p, const fattn_se_plan P) {
    fattn_se_chain();
    constexpr int T = FATTN_SE_TC;
    static_assert(T == 2*WARP_SIZE, "one tile per warp, two keys per lane");

    const int lane = threadIdx.x;
    const int w    = threadIdx.y;
    const int rg   = blockIdx.x;
    const int s    = blockIdx.z;
    const int i0   = rg*P.RPB;
    const int rows = min(P.RPB, p.n_q - i0);
    const char * mask_rows = p.mask ? p.mask + (s % p.ne_m3)*p.nb_m3 + i0*p.nb_m1 : nullptr;
    const int  * pos_q     = (const int *) (p.pos_q + s*p.nb_pq1) + i0;
    const int  * pos_k     = (const int *) (p.pos_k + s*p.nb_pk1);

    int pq_min, pq_max;
    fattn_se_pos_range(pos_q, rows, pq_min, pq_max);

    uint8_t * tiles = P.tiles + (int64_t(s)*P.n_rg + rg)*P.ntiles_c;
    const int kt0 = (blockIdx.y*FATTN_SE_NWARPS + w)*P.tpw_c;
    int lo = INT_MAX; // first and last + 1 tile with a visible key, warp-uniform
    int hi = INT_MIN;
    for (int kt = kt0; kt < min(kt0 + P.tpw_c, P.ntiles_c); ++kt) {
        const int k = kt*T + 2*lane;
        bool vis0 = k     < p.n_kv; // visible to some row
        bool vis1 = k + 1 < p.n_kv;
        bool nz   = false;          // some row has a non-zero mask value for one of the keys
        if (mask_rows && vis0) {
            uint32_t any_vis = 0;   // per half: some row is not -inf
            uint32_t any_nz  = 0;   // per half: some row is not +-0
#pragma unroll 8
            for (int r = 0; r < rows; ++r) {
                // mask rows are padded to 8 keys: reading key k + 1 is safe
                const uint32_t m2 = *(const uint32_t *) (mask_rows + r*p.nb_m1 + int64_t(k)*sizeof(half));
                any_vis |= ((m2 & 0xFFFF) != 0xFC00) | uint32_t((m2 >> 16) != 0xFC00) << 1; // 0xFC00: f16 -inf
                any_nz  |= m2 & 0x7FFF7FFF;
            }
            vis0 = any_vis & 1;
            vis1 = vis1 && (any_vis & 2);
            nz   = (any_nz & 0x7FFF) || (k + 1 < p.n_kv && (any_nz >> 16));
        }
        int pk_min = INT_MAX;
        int pk_max = INT_MIN;
        if (vis0) {
            pk_min = min(pk_min, pos_k[k]);
            pk_max = max(pk_max, pos_k[k]);
        }
        if (vis1) {
            pk_min = min(pk_min, pos_k[k + 1]);
            pk_max = max(pk_max, pos_k[k + 1]);
        }
        pk_min = __reduce_min_sync(0xFFFFFFFF, pk_min);
        pk_max = __reduce_max_sync(0xFFFFFFFF, pk_max);
        const bool any_vis = __any_sync(0xFFFFFFFF, vis0 || vis1);
        const int  masked  = __any_sync(0xFFFFFFFF, nz) ? int(FATTN_SE_MASKED) : 0;

        int cls = FATTN_SE_SKIP;
        if (any_vis) {
            cls = pq_max - pk_min <  p.W ? FATTN_SE_NEIGHBOUR | masked :
                  pq_min - pk_max >= p.W ? FATTN_SE_GROUPED   | masked : FATTN_SE_MIXED | masked;
            lo = min(lo, kt);
            hi = kt + 1;
        }
        if (lane == 0) {
            tiles[kt] = uint8_t(cls);
        }
    }
    if (lane == 0 && hi > lo) {
        atomicMax(&P.range[int64_t(s)*P.n_rg + rg].x, P.ntiles_c - lo);
        atomicMax(&P.range[int64_t(s)*P.n_rg + rg].y, hi);
    }
}

// dst row = sum_s 2^(M_s - M) O_s / sum_s 2^(M_s - M) L_s over the splits s of the row; 0 if no split saw a key.
// Many splits (decode): a block takes FATTN_SE_COMBINE_DC dimensions of one row (grid: rows x D/FATTN_SE_COMBINE_DC), its
// threads read NG splits at a time, FATTN_SE_COMBINE_UNROLL of those batches in flight per thread; the rows' partials are
// in L2, so what costs is latency, not bytes. (One block per row, each thread walking every NG-th split of it one load
// after the other: 11.4 us for Gemma 3's 4 rows of 256 dimensions in 262 splits; this way 9.3 us; ncu, H200.)
#define FATTN_SE_COMBINE_DC     32 // dimensions per block
#define FATTN_SE_COMBINE_UNROLL 4

template <int D>
__launch_bounds__(FATTN_SE_NTHREADS)
static __global__ void flash_attn_ext_se_combine(
        const float * part_O, const float2 * part_ML, float * dst, const int nsplit) {
    fattn_se_chain();
    constexpr int C4 = FATTN_SE_COMBINE_DC/4;  // float4 per block and split
    constexpr int NG = FATTN_SE_NTHREADS/C4;   // splits read at once
    constexpr int U  = FATTN_SE_COMBINE_UNROLL;
    static_assert(D % FATTN_SE_COMBINE_DC == 0 && FATTN_SE_NTHREADS % C4 == 0, "bad head size");

    __shared__ float  red[FATTN_SE_NWARPS];
    __shared__ float4 acc_part[NG][C4];
    __shared__ float  L_part[NG];

    const int tid  = threadIdx.x;
    const int lane = tid % WARP_SIZE;
    const int w    = tid / WARP_SIZE;
    const int g    = tid / C4;                            // the thread's splits: g, g + NG, ...
    const int d4   = blockIdx.y*C4 + tid % C4;            // its float4 of the row
    const int64_t row = blockIdx.x;
    const float2 * ML = part_ML + row*nsplit;
    const float4 * O4 = (const float4 *) (part_O + row*nsplit*D) + d4;

    float M = -FLT_MAX;
    for (int i = tid; i < nsplit; i += FATTN_SE_NTHREADS) {
        M = fmaxf(M, ML[i].x);
    }
    M = warp_reduce_max(M);
    if (lane == 0) {
        red[w] = M;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < FATTN_SE_NWARPS; ++i) {
        M = fmaxf(M, red[i]);
    }

    // every thread of a split's group weighs it alike and sums L alike; one of them hands L on
    float  L   = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i0 = g; i0 < nsplit; i0 += U*NG) {
        float2 ml[U];
        float4 o[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u*NG;
            ml[u] = i < nsplit ? ML[i] : make_float2(-INFINITY, 0.0f);
            o[u]  = i < nsplit ? O4[int64_t(i)*(D/4)] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float wgt = exp2f(ml[u].x - M);
            L     += wgt*ml[u].y;
            acc.x += wgt*o[u].x;
            acc.y += wgt*o[u].y;
            acc.z += wgt*o[u].z;
            acc.w += wgt*o[u].w;
        }
    }
    acc_part[g][tid % C4] = acc;
    if (tid % C4 == 0) {
        L_part[g] = L;
    }
    __syncthreads();

    if (tid < C4) {
        acc = acc_part[0][tid];
        L   = L_part[0];
#pragma unroll
        for (int gg = 1; gg < NG; ++gg) {
            acc.x += acc_part[gg][tid].x;
            acc.y += acc_part[gg][tid].y;
            acc.z += acc_part[gg][tid].z;
            acc.w += acc_part[gg][tid].w;
            L     += L_part[gg];
        }
        const float inv = L > 0.0f ? 1.0f/L : 0.0f;
        ((float4 *) (dst + row*D))[d4] = make_float4(acc.x*inv, acc.y*inv, acc.z*inv, acc.w*inv);
    }
}

// The same merge for few splits (prefill): one thread per 4 dimensions of a row, FATTN_SE_NTHREADS/(D/4) rows per block,
// each thread reading its row's nsplit (max, sum) pairs itself; no shared memory, no barriers. (One block per row, as
// above, leaves the GPU between tiny blocks: 16K rows of D = 64 took 16 us per launch in a 1.1B-shaped prefill of 512
// queries, a sixth of the attention kernel's time.)
#define FATTN_SE_COMBINE_FEW 8 // the most splits merged this way

template <int D>
__launch_bounds__(FATTN_SE_NTHREADS)
static __global__ void flash_attn_ext_se_combine_few(
        const float * part_O, const float2 * part_ML, float * dst,
        const int64_t nrows, const int nsplit) {
    fattn_se_chain();
    constexpr int D4 = D/4;
    static_assert(D % 4 == 0 && FATTN_SE_NTHREADS % D4 == 0, "bad head size");

    const int64_t row = int64_t(blockIdx.x)*(FATTN_SE_NTHREADS/D4) + threadIdx.x/D4;
    const int     d4  = threadIdx.x % D4;
    if (row >= nrows) {
        return;
    }
    const float2 * ML = part_ML + row*nsplit;
    const float4 * O4 = (const float4 *) (part_O + row*nsplit*D);

    float M = -FLT_MAX;
    for (int i = 0; i < nsplit; ++i) {
        M = fmaxf(M, ML[i].x);
    }
    float  L   = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i = 0; i < nsplit; ++i) {
        const float2 ml  = ML[i];
        const float  wgt = exp2f(ml.x - M);
        const float4 o   = O4[i*D4 + d4];
        L     += wgt*ml.y;
        acc.x += wgt*o.x;
        acc.y += wgt*o.y;
        acc.z += wgt*o.z;
        acc.w += wgt*o.w;
    }
    const float inv = L > 0.0f ? 1.0f/L : 0.0f;
    ((float4 *) (dst + row*D))[d4] = make_float4(acc.x*inv, acc.y*inv, acc.z*inv, acc.w*inv);
}

// Rotation-table form (ggml_flash_attn_ext_se_rot), prefill: the grouped keys made from K and the table, once per op, into
// a contiguous F16 scratch [D, n_kv, n_head_kv, ne3] that the attention kernel then reads as K_g (a prefill reads every
// grouped tile once per block of queries; rotating in there would repeat the work for each). A thread makes 8
// consecutive dimensions of a K row with 16-byte loads and stores: those of rotated pairs (dimensions (2i, 2i + 1), or
// (i, i + n_rot/2) for NEOX, i < n_rot/2; the partner 8 of a NEOX pair is read as well), the others copied. A table whose
// pairs do not fall on whole 8-dimension pieces that way is taken one dimension at a time. A table of steps
// (p.k_steps_G > 0): the key's row is the product of its two steps, made for the thread's pairs as it reads them.
#define FATTN_SE_ROT_NTHREADS 256

template <int D>
__launch_bounds__(FATTN_SE_ROT_NTHREADS)
static __global__ void flash_attn_ext_se_rotate_k(const fattn_se_params p, half * k_g, const int n_rot, const bool neox) {
    fattn_se_chain();
    constexpr int CH  = D/8;                        // pieces of 8 dimensions per row
    constexpr int RPB = FATTN_SE_ROT_NTHREADS/CH;   // rows per block
    static_assert(FATTN_SE_ROT_NTHREADS % CH == 0, "bad head size");

    const int j  = blockIdx.x*RPB + threadIdx.x/CH; // key; head blockIdx.y, stream blockIdx.z
    const int d0 = 8*(threadIdx.x % CH);
    if (j >= p.n_kv) {
        return;
    }
    const half  * x = (const half *) (p.k + j*p.nb_k1 + blockIdx.y*p.nb_k2 + blockIdx.z*p.nb_k3);
    const float * t = (const float *) (p.k_g + j*p.nb_kg1 + blockIdx.z*p.nb_kg3);
    const float * t_hi = nullptr; // a table of steps: t the key's single-position step, t_hi its larger one
    if (p.k_steps_G > 0) {
        int r_lo, r_hi;
        fattn_se_steps_rows(p, ((const int *) (p.pos_k + blockIdx.z*p.nb_pk1))[j], r_lo, r_hi);
        t    = (const float *) (p.k_g + int64_t(r_lo)*p.nb_kg1);
        t_hi = (const float *) (p.k_g + int64_t(r_hi)*p.nb_kg1);
    }
    // cos and sin of the pair (a, b): the table's, or the product of the two steps'
    auto cs_of = [&](const int a, const int b, float & c, float & sn) {
        c  = t[a];
        sn = t[b];
        if (t_hi) {
            const float c2 = t_hi[a], s2 = t_hi[b], c1 = c;
            c  = c1*c2 - sn*s2;
            sn = sn*c2 + c1*s2;
        }
    };
    half * y = k_g + ((int64_t(blockIdx.z)*gridDim.y + blockIdx.y)*p.n_kv + j)*D + d0;
    const int half_rot = n_rot/2;

    half2 out[4];
    *(uint4 *) out = *(const uint4 *) (x + d0);
    if (d0 >= n_rot) {
        // past the rotated dimensions: copied
    } else if (d0 + 8 <= n_rot && n_rot % 4 == 0 && (!neox || half_rot % 8 == 0)) {
        if (!neox) {
            // pairs (d0 + 2m, d0 + 2m + 1): cos, sin at the same dimensions of the table
            float4 cs[2];
            float * c = (float *) cs;
            if (t_hi) {
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    cs_of(d0 + 2*m, d0 + 2*m + 1, c[2*m], c[2*m + 1]);
                }
            } else {
                cs[0] = *(const float4 *) (t + d0);
                cs[1] = *(const float4 *) (t + d0 + 4);
            }
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const float2 v = __half22float2(out[m]);
                out[m] = __floats2half2_rn(v.x*c[2*m] - v.y*c[2*m + 1], v.x*c[2*m + 1] + v.y*c[2*m]);
            }
        } else {
            // pairs (i, i + n_rot/2), i = i0 .. i0 + 7: cos at i, sin at i + n_rot/2
            const bool first = d0 < half_rot;
            const int  i0    = first ? d0 : d0 - half_rot;
            half2 other[4];
            *(uint4 *) other = *(const uint4 *) (x + (first ? d0 + half_rot : i0));
            float4 cv[2], sv[2];
            float * c  = (float *) cv;
            float * sn = (float *) sv;
            if (t_hi) {
#pragma unroll
                for (int m = 0; m < 8; ++m) {
                    cs_of(i0 + m, i0 + m + half_rot, c[m], sn[m]);
                }
            } else {
                cv[0] = *(const float4 *) (t + i0);
                cv[1] = *(const float4 *) (t + i0 + 4);
                sv[0] = *(const float4 *) (t + i0 + half_rot);
                sv[1] = *(const float4 *) (t + i0 + half_rot + 4);
            }
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const float2 v = __half22float2(out[m]);
                const float2 o = __half22float2(other[m]);
                out[m] = first ? __floats2half2_rn(v.x*c[2*m]      - o.x*sn[2*m],      v.y*c[2*m + 1]      - o.y*sn[2*m + 1])
                               : __floats2half2_rn(o.x*sn[2*m]     + v.x*c[2*m],       o.y*sn[2*m + 1]     + v.y*c[2*m + 1]);
            }
        }
    } else {
        half * e = (half *) out;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            const int d = d0 + m;
            if (d >= n_rot) {
                continue;
            }
            int a, b;
            fattn_se_rot_pair(d, n_rot, neox ? FATTN_SE_ROT_NEOX : FATTN_SE_ROT_NORM, a, b);
            float c, sn;
            cs_of(a, b, c, sn);
            const float xa = __half2float(x[a]), xb = __half2float(x[b]);
            e[m] = __float2half(d == a ? xa*c - xb*sn : xa*sn + xb*c);
        }
    }
    *(uint4 *) y = *(const uint4 *) out;
}

// ------------------------------------------------------------------------------------------------------------------
// host side

typedef void (* fattn_se_kernel_t)(const fattn_se_params p, const fattn_se_plan P);

// The kernel of a configuration, its shared memory limit raised (per device) to at least nbytes_shared.
template <int D, bool decode, bool use_softcap, int ROT = FATTN_SE_ROT_NONE>
static fattn_se_kernel_t fattn_se_kernel_instance(const size_t nbytes_shared) {
    constexpr int NWC = decode ? 1 : 4;
    const fattn_se_kernel_t kernel = flash_attn_ext_se_f16<D, NWC, fattn_se_T(D, decode), use_softcap, ROT>;

    static size_t smem_limit[GGML_CUDA_MAX_DEVICES] = {0};
    int device;
    CUDA_CHECK(cudaGetDevice(&device));
    if (nbytes_shared > smem_limit[device]) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(nbytes_shared)));
        smem_limit[device] = nbytes_shared;
    }
    return kernel;
}

template <int D, bool use_softcap>
static fattn_se_kernel_t fattn_se_kernel_decode(const int rot, const size_t nbytes_shared) {
    switch (rot) {
        case FATTN_SE_ROT_NORM: return fattn_se_kernel_instance<D, true, use_softcap, FATTN_SE_ROT_NORM>(nbytes_shared);
        case FATTN_SE_ROT_NEOX: return fattn_se_kernel_instance<D, true, use_softcap, FATTN_SE_ROT_NEOX>(nbytes_shared);
        case FATTN_SE_ROT_NORM | FATTN_SE_ROT_STEPS:
            return fattn_se_kernel_instance<D, true, use_softcap, FATTN_SE_ROT_NORM | FATTN_SE_ROT_STEPS>(nbytes_shared);
        case FATTN_SE_ROT_NEOX | FATTN_SE_ROT_STEPS:
            return fattn_se_kernel_instance<D, true, use_softcap, FATTN_SE_ROT_NEOX | FATTN_SE_ROT_STEPS>(nbytes_shared);
        default:                return fattn_se_kernel_instance<D, true, use_softcap>(nbytes_shared);
    }
}

template <int D>
static fattn_se_kernel_t fattn_se_kernel_d(const bool decode, const bool use_softcap, const int rot,
                                           const size_t nbytes_shared) {
    if (decode) {
        return use_softcap ? fattn_se_kernel_decode<D, true>(rot, nbytes_shared)
                           : fattn_se_kernel_decode<D, false>(rot, nbytes_shared);
    }
    GGML_ASSERT(rot == FATTN_SE_ROT_NONE);
    return use_softcap ? fattn_se_kernel_instance<D, false, true>(nbytes_shared)
                       : fattn_se_kernel_instance<D, false, false>(nbytes_shared);
}

static fattn_se_kernel_t fattn_se_kernel(const fattn_se_params & p, const fattn_se_plan & P) {
    const bool use_softcap = p.softcap != 0.0f;
    switch (p.D) {
        case  64: return fattn_se_kernel_d< 64>(P.decode, use_softcap, p.k_rot, P.nbytes_shared);
        case 128: return fattn_se_kernel_d<128>(P.decode, use_softcap, p.k_rot, P.nbytes_shared);
        case 256: return fattn_se_kernel_d<256>(P.decode, use_softcap, p.k_rot, P.nbytes_shared);
        default:  GGML_ABORT("%s: unsupported head size %d", __func__, p.D);
    }
}

// Resident blocks per SM of a kernel with nbytes_shared of dynamic shared memory on the current device. The driver is
// asked once per (kernel, device, size): a plan is made for every op of every graph, and the answer never changes.
static int fattn_se_blocks_per_sm(const fattn_se_kernel_t kernel, const size_t nbytes_shared) {
    static std::mutex mutex;
    static std::map<std::tuple<const void *, int, size_t>, int> known;
    int device;
    CUDA_CHECK(cudaGetDevice(&device));
    const auto key = std::make_tuple((const void *) kernel, device, nbytes_shared);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = known.find(key);
    if (it == known.end()) {
        int n = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, FATTN_SE_NTHREADS, nbytes_shared));
        GGML_ASSERT(n > 0);
        it = known.emplace(key, n).first;
    }
    return it->second;
}

static size_t fattn_se_pad_ws(const size_t n) {
    return GGML_PAD(n, 256);
}

// The device memory of a plan with its P.nsplit: the layouts of the tile classes and of the split workspace.
static void fattn_se_plan_memory(const fattn_se_params & p, fattn_se_plan & P) {
    GGML_ASSERT(int64_t(p.ne3)*P.nsplit <= 65535);
    P.off_tiles = P.nbytes_cls = P.off_O = P.nbytes_ws = 0;
    if (P.classify) {
        P.off_tiles  = fattn_se_pad_ws(size_t(p.ne3)*P.n_rg*sizeof(int2));
        P.nbytes_cls = P.off_tiles + fattn_se_pad_ws(size_t(p.ne3)*P.n_rg*P.ntiles_c);
    }
    if (P.nsplit > 1) {
        const size_t nrows = size_t(p.ne3)*p.n_q*p.n_head;
        P.off_O     = fattn_se_pad_ws(nrows*P.nsplit*sizeof(float2));
        P.nbytes_ws = P.off_O + fattn_se_pad_ws(nrows*P.nsplit*p.D*sizeof(float));
    }
}

// nsm: streaming multiprocessors of the current device, which the kernels will run on.
static fattn_se_plan fattn_se_make_plan(const fattn_se_params & p, const int nsm) {
    fattn_se_plan P = {};

    fattn_se_block_shape(p.n_q, p.n_head/p.n_head_kv, P.decode, P.NHB, P.RPB);
    P.n_rg = (p.n_q + P.RPB - 1)/P.RPB;

    const int T = fattn_se_T(p.D, P.decode);
    P.ntiles    = (p.n_kv + T - 1)/T;
    P.ntiles_c  = (p.n_kv + FATTN_SE_TC - 1)/FATTN_SE_TC;
    P.classify  = !P.decode;
    // few tiles per warp: a tile's classification is a chain of dependent loads, which many warps hide best (8 tiles
    // -> 2: 15.5 -> 6.9 us per launch in an 8K-token prefill of an 8B shape, n_ubatch 512, H200); more tiles only
    // where the grid's y dimension would pass its limit
    P.tpw_c     = std::max(2, (P.ntiles_c + 65535*FATTN_SE_NWARPS - 1)/(65535*FATTN_SE_NWARPS));

    P.q_scale   = p.softcap != 0.0f ? p.scale/p.softcap : p.scale*FATTN_SE_LOG2E;
    P.logit_mul = p.softcap*FATTN_SE_LOG2E;

    P.nbytes_shared = fattn_se_nbytes_shared(p.D, P.decode, P.RPB, p.k_rot);

    const int64_t nslots = int64_t(fattn_se_blocks_per_sm(fattn_se_kernel(p, P), P.nbytes_shared))*nsm;

    // Split the keys when the blocks of columns cannot fill the GPU (decode, short prompts), or when a few splits even
    // out a poorly filled last wave (prefill): the fewest splits whose waves are the fullest, counting every slot of the
    // last wave (with 128 blocks on 264 slots, 2 splits fill 97 % of one wave where 3 would fill 73 % of two);
    // prefill takes more splits only for 3 points more, decode for any (Gemma 3's 64K decode: 262 splits 36.4 us, the
    // whole wave of 264 33.9 us; fattn-self-extend-selftest --splits, H200). Each split keeps a few tiles so that its
    // pipeline gets going.
    const int64_t nblocks_base = int64_t(P.n_rg)*(p.n_head/P.NHB)*p.ne3;
    const int64_t nsplit_fill  = (nslots + nblocks_base - 1)/nblocks_base; // splits that make one full wave
    const int     nsplit_max   = int(std::min<int64_t>(std::max<int64_t>(nsplit_fill, P.decode ? 1 : 4),
                                                       std::max(1, P.ntiles/(P.decode ? 2 : 4))));
    P.nsplit = 1;
    int64_t eff_best = 0;
    for (int nsplit = 1; nsplit <= nsplit_max; ++nsplit) {
        const int64_t nblocks = nblocks_base*nsplit;
        const int64_t nwaves  = (nblocks + nslots - 1)/nslots;
        const int64_t eff     = 100*nblocks/(nwaves*nslots);
        if (eff > eff_best + (P.decode ? 0 : 2)) {
            eff_best = eff;
            P.nsplit = nsplit;
        }
    }
    fattn_se_plan_memory(p, P);
    return P;
}

template <int D>
static void fattn_se_launch_combine(const fattn_se_params & p, const fattn_se_plan & P, cudaStream_t stream) {
    const int64_t nrows = int64_t(p.ne3)*p.n_q*p.n_head;
    if (P.nsplit <= FATTN_SE_COMBINE_FEW) {
        constexpr int rows_block = FATTN_SE_NTHREADS/(D/4);
        ggml_cuda_kernel_launch(flash_attn_ext_se_combine_few<D>,
            ggml_cuda_kernel_launch_params((nrows + rows_block - 1)/rows_block, FATTN_SE_NTHREADS, 0, stream),
            P.part_O, P.part_ML, p.dst, nrows, P.nsplit);
    } else {
        ggml_cuda_kernel_launch(flash_attn_ext_se_combine<D>,
            ggml_cuda_kernel_launch_params(dim3((unsigned int) nrows, D/FATTN_SE_COMBINE_DC, 1), FATTN_SE_NTHREADS, 0, stream),
            P.part_O, P.part_ML, p.dst, P.nsplit);
    }
}

static void fattn_se_set_cls(fattn_se_plan & P, char * cls) {
    P.range = (int2    *) cls;
    P.tiles = (uint8_t *) (cls + P.off_tiles);
}

// Prefill (P.classify): the tile classes of the op's mask and positions into cls, P.nbytes_cls bytes of device memory.
// They depend on nothing else of the op than P's n_rg, RPB and ntiles_c, so ops of one plan shape that read the same
// mask and positions can share them.
static void fattn_se_classify(const fattn_se_params & p, fattn_se_plan P, char * cls, cudaStream_t stream) {
    fattn_se_set_cls(P, cls);
    CUDA_CHECK(cudaMemsetAsync(P.range, 0, size_t(p.ne3)*P.n_rg*sizeof(int2), stream));
    const int tiles_block = FATTN_SE_NWARPS*P.tpw_c;
    const dim3 grid(P.n_rg, (P.ntiles_c + tiles_block - 1)/tiles_block, p.ne3);
    ggml_cuda_kernel_launch(flash_attn_ext_se_classify,
        ggml_cuda_kernel_launch_params(grid, dim3(WARP_SIZE, FATTN_SE_NWARPS, 1), 0, stream), p, P);
}

// cls: the tile classes from fattn_se_classify (prefill; else unused); ws: P.nbytes_ws bytes of device memory.
static void fattn_se_run(const fattn_se_params & p, fattn_se_plan P, char * cls, char * ws, cudaStream_t stream) {
    if (P.classify) {
        fattn_se_set_cls(P, cls);
    }
    P.part_ML = P.nsplit > 1 ? (float2 *) ws              : nullptr;
    P.part_O  = P.nsplit > 1 ? (float  *) (ws + P.off_O) : nullptr;

    const dim3 block_dim(WARP_SIZE, FATTN_SE_NWARPS, 1);
    const fattn_se_kernel_t kernel = fattn_se_kernel(p, P);
    ggml_cuda_kernel_launch(kernel,
        ggml_cuda_kernel_launch_params(dim3(P.n_rg, p.n_head/P.NHB, p.ne3*P.nsplit), block_dim, P.nbytes_shared, stream), p, P);

    if (P.nsplit > 1) {
        switch (p.D) {
            case  64: fattn_se_launch_combine< 64>(p, P, stream); break;
            case 128: fattn_se_launch_combine<128>(p, P, stream); break;
            case 256: fattn_se_launch_combine<256>(p, P, stream); break;
            default:  GGML_ABORT("%s: unsupported head size %d", __func__, p.D);
        }
    }
}

template <int D>
static void fattn_se_launch_rotate_k(const fattn_se_params & p, const int n_rot, const bool neox, half * k_g,
                                     cudaStream_t stream) {
    constexpr int rows_b = FATTN_SE_ROT_NTHREADS/(D/8);
    const dim3 grid((p.n_kv + rows_b - 1)/rows_b, p.n_head_kv, p.ne3);
    ggml_cuda_kernel_launch(flash_attn_ext_se_rotate_k<D>, ggml_cuda_kernel_launch_params(grid, FATTN_SE_ROT_NTHREADS, 0, stream),
        p, k_g, n_rot, neox);
}

// Table form: whether a decode kernel reads the table itself (fattn_se_rot), rotating K as it loads its B operands: where the
// table covers the whole head and the kernel's larger tiles fit the device. Else the grouped keys go to a scratch first,
// once per op: a prefill reads every grouped tile once per block of queries, and rotating there would repeat the work
// for each block and each of its warps.
static int fattn_se_rot_in_kernel(const fattn_se_params & p, const int n_rot, const bool neox, const size_t smpbo) {
    bool decode;
    int  NHB, RPB;
    fattn_se_block_shape(p.n_q, p.n_head/p.n_head_kv, decode, NHB, RPB);
    const int rot = (neox ? FATTN_SE_ROT_NEOX : FATTN_SE_ROT_NORM) | (p.k_steps_G > 0 ? FATTN_SE_ROT_STEPS : 0);
    if (!decode || n_rot != p.D || fattn_se_nbytes_shared(p.D, true, RPB, rot) > smpbo ||
        (p.k_steps_G > 0 && p.k_steps_lo > FATTN_SE_STEPS_LO_MAX)) {
        return FATTN_SE_ROT_NONE;
    }
    return rot;
}

// The table forms where the kernel does not rotate K itself (fattn_se_rot_in_kernel gave NONE): the grouped keys made
// from K and the table, or the table of steps, into k_g (D*n_kv*n_head_kv*ne3 halves laid out as a contiguous K), which p
// then reads as K_g.
static void fattn_se_rotate_into(fattn_se_params & p, const int n_rot, const bool neox, half * k_g, cudaStream_t stream) {
    switch (p.D) {
        case  64: fattn_se_launch_rotate_k< 64>(p, n_rot, neox, k_g, stream); break;
        case 128: fattn_se_launch_rotate_k<128>(p, n_rot, neox, k_g, stream); break;
        case 256: fattn_se_launch_rotate_k<256>(p, n_rot, neox, k_g, stream); break;
        default:  GGML_ABORT("%s: unsupported head size %d", __func__, p.D);
    }
    p.k_g    = (const char *) k_g;
    p.nb_kg1 = int64_t(p.D)*sizeof(half);
    p.nb_kg2 = p.nb_kg1*p.n_kv;
    p.nb_kg3 = p.nb_kg2*p.n_head_kv;
}

// ------------------------------------------------------------------------------------------------------------------
// ggml interface (left out when the self-test includes this file)

#ifndef GGML_CUDA_FATTN_SE_SELFTEST

#include "ggml-self-extend.h"

static fattn_se_params fattn_se_params_from_tensor(const ggml_tensor * dst) {
    const ggml_flash_attn_ext_se_args a = ggml_flash_attn_ext_se_get_args(dst);
    const ggml_tensor * q = a.q, * k = a.k, * v = a.v, * mask = a.mask, * q_g = a.q_g, * k_g = a.k_g;
    const ggml_tensor * pos_q = a.pos_q, * pos_k = a.pos_k;

    fattn_se_params p = {};
    p.q   = (const char *) q->data;   p.nb_q1  = q->nb[1];   p.nb_q2  = q->nb[2];   p.nb_q3  = q->nb[3];
    p.q_g = (const char *) q_g->data; p.nb_qg1 = q_g->nb[1]; p.nb_qg2 = q_g->nb[2]; p.nb_qg3 = q_g->nb[3];
    p.k   = (const char *) k->data;   p.nb_k1  = k->nb[1];   p.nb_k2  = k->nb[2];   p.nb_k3  = k->nb[3];
    p.k_g = (const char *) k_g->data; p.nb_kg1 = k_g->nb[1]; p.nb_kg2 = k_g->nb[2]; p.nb_kg3 = k_g->nb[3];
    p.v   = (const char *) v->data;   p.nb_v1  = v->nb[1];   p.nb_v2  = v->nb[2];   p.nb_v3  = v->nb[3];
    if (mask) {
        p.mask  = (const char *) mask->data;
        p.nb_m1 = mask->nb[1];
        p.nb_m3 = mask->nb[3];
        p.ne_m3 = mask->ne[3];
    } else {
        p.ne_m3 = 1;
    }
    p.pos_q = (const char *) pos_q->data; p.nb_pq1 = pos_q->nb[1];
    p.pos_k = (const char *) pos_k->data; p.nb_pk1 = pos_k->nb[1];
    p.dst   = (float *) dst->data;

    p.D         = q->ne[0];
    p.n_q       = q->ne[1];
    p.n_head    = q->ne[2];
    p.ne3       = q->ne[3];
    p.n_kv      = k->ne[1];
    p.n_head_kv = k->ne[2];

    p.scale   = a.scale;
    p.softcap = a.logit_softcap;
    p.W       = a.n_window;
    if (a.q_rot) {
        p.q_rot   = a.rope_mode == GGML_ROPE_TYPE_NEOX ? FATTN_SE_ROT_NEOX : FATTN_SE_ROT_NORM;
        p.n_rot_q = int(q_g->ne[0]);
        p.nb_qg2  = 0; // one row per query serves its heads
    }
    return p;
}

// The tile classes of a prefill, made by the first Self-Extend op of a graph compute and read by the ops after it: every
// layer of a model reads the same mask and positions, graph inputs that a compute does not change, so one classification
// serves them all (one launch, a memset and a read of the whole mask per ubatch instead of per layer). They live in a
// pool buffer held until the backend's graph compute ends (ggml_cuda_flash_attn_ext_se_graph_end); it is allocated before
// anything else of its op, so the ops in between allocate after it and free before it, the order the pool wants. A CUDA
// graph's capture records the same launches and replays them on the same buffer.
//
// The key: within one compute a tensor keeps its data and shape, and the positions' shapes are the op's n_q, n_kv and ne3, so the
// tensors, W, the plan's queries per block and the stream say everything the classes depend on.
struct fattn_se_cls_key {
    const ggml_tensor * mask, * pos_q, * pos_k;
    int                 W, RPB, stream;

    bool operator==(const fattn_se_cls_key & o) const {
        return std::tie(mask, pos_q, pos_k, W, RPB, stream) == std::tie(o.mask, o.pos_q, o.pos_k, o.W, o.RPB, o.stream);
    }
};

struct fattn_se_cls_entry {
    fattn_se_cls_key                            key;
    std::unique_ptr<ggml_cuda_pool_alloc<char>> buf;
};

static std::mutex fattn_se_cls_mutex;
static std::map<const ggml_backend_cuda_context *, fattn_se_cls_entry> fattn_se_cls_kept;

// whether t (or what it views) is set before a compute rather than made by a node: a graph input, or the scheduler's
// copy of one on this backend (a leaf like it, flagged only when the scheduler keeps several copies), or a plain copy
// of such an input made by the graph (libllama's Self-Extend positions are views of one, made before the first op
// that reads them). A mask or positions that a node of the same graph rewrote between two Self-Extend ops would
// defeat the sharing; no graph of llama.cpp does that.
static bool fattn_se_is_input(const ggml_tensor * t) {
    if (!t) {
        return true;
    }
    auto base_of = [](const ggml_tensor * x) { return x->view_src ? x->view_src : x; };
    const ggml_tensor * base = base_of(t);
    if ((base->op == GGML_OP_CONT || base->op == GGML_OP_DUP) && base->src[0]) {
        base = base_of(base->src[0]);
    }
    return (base->flags & GGML_TENSOR_FLAG_INPUT) || base->op == GGML_OP_NONE;
}

// the op's tile classes: kept ones when an earlier op of this compute made them for the same mask, positions and plan
// shape, else made now (and kept if the mask and positions are set before the compute, else held by local until the op
// ends)
static char * fattn_se_classes(ggml_backend_cuda_context & ctx, const ggml_flash_attn_ext_se_args & a,
                               const fattn_se_params & p, const fattn_se_plan & P, ggml_cuda_pool_alloc<char> & local) {
    if (!fattn_se_is_input(a.mask) || !fattn_se_is_input(a.pos_q) || !fattn_se_is_input(a.pos_k)) {
        local.alloc(P.nbytes_cls);
        fattn_se_classify(p, P, local.get(), ctx.stream());
        return local.get();
    }
    const fattn_se_cls_key key = { a.mask, a.pos_q, a.pos_k, p.W, P.RPB, ctx.curr_stream_no };

    std::lock_guard<std::mutex> lock(fattn_se_cls_mutex);
    fattn_se_cls_entry & e = fattn_se_cls_kept[&ctx];
    if (!e.buf || !(e.key == key)) {
        e.buf.reset(); // the top of its pool's stack: nothing of this op is allocated yet
        e.key = key;
        e.buf = std::make_unique<ggml_cuda_pool_alloc<char>>(ctx.pool(), P.nbytes_cls);
        fattn_se_classify(p, P, e.buf->get(), ctx.stream());
    }
    return e.buf->get();
}

void ggml_cuda_flash_attn_ext_se_graph_end(ggml_backend_cuda_context & ctx) {
    std::lock_guard<std::mutex> lock(fattn_se_cls_mutex);
    fattn_se_cls_kept.erase(&ctx);
}

void ggml_cuda_flash_attn_ext_se(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    fattn_se_params p = fattn_se_params_from_tensor(dst);
    const ggml_flash_attn_ext_se_args a = ggml_flash_attn_ext_se_get_args(dst);
    const int  n_rot = a.k_rot ? int(a.k_g->ne[0]) : 0;
    const bool neox  = a.rope_mode == GGML_ROPE_TYPE_NEOX;
    if (a.n_group > 0) {
        fattn_se_set_steps(p, a.n_group, a.n_lo, int(a.k_g->ne[1]));
    }
    if (a.k_rot) {
        p.k_rot = fattn_se_rot_in_kernel(p, n_rot, neox, ggml_cuda_info().devices[ctx.device].smpbo);
    }
    const fattn_se_plan P = fattn_se_make_plan(p, ggml_cuda_info().devices[ctx.device].nsm);

    // first, as its buffer may outlive the op
    ggml_cuda_pool_alloc<char> cls_local(ctx.pool());
    char * cls = P.classify ? fattn_se_classes(ctx, a, p, P, cls_local) : nullptr;
    ggml_cuda_pool_alloc<half> k_g(ctx.pool());
    if (a.k_rot && p.k_rot == FATTN_SE_ROT_NONE) {
        // table form, rotated beforehand: p.k_g is the table; the grouped keys go to a scratch laid out as a contiguous K
        k_g.alloc(size_t(p.D)*p.n_kv*p.n_head_kv*p.ne3);
        fattn_se_rotate_into(p, n_rot, neox, k_g.get(), ctx.stream());
    }

    ggml_cuda_pool_alloc<char> ws(ctx.pool());
    if (P.nbytes_ws > 0) {
        ws.alloc(P.nbytes_ws);
    }
    fattn_se_run(p, P, cls, ws.get(), ctx.stream());
}

bool ggml_cuda_flash_attn_ext_se_supported(int device, const ggml_tensor * dst) {
    const ggml_flash_attn_ext_se_args a = ggml_flash_attn_ext_se_get_args(dst);
    const ggml_tensor * q = a.q, * k = a.k, * v = a.v, * mask = a.mask, * q_g = a.q_g, * k_g = a.k_g;
    const ggml_tensor * pos_q = a.pos_q, * pos_k = a.pos_k;

    if (!ampere_mma_available(ggml_cuda_info().devices[device].cc)) {
        return false;
    }
    if (!q || !k || !v || !q_g || !k_g || !pos_q || !pos_k || dst->src[4]) {
        return false;
    }

    float max_bias = 0.0f;
    memcpy(&max_bias, (const float *) dst->op_params + 1, sizeof(float));
    if (max_bias != 0.0f) {
        return false;
    }

    const int64_t D    = q->ne[0];
    const int64_t n_q  = q->ne[1];
    const int64_t ne3  = q->ne[3];
    const int64_t n_kv = k->ne[1];
    if (D != 64 && D != 128 && D != 256) {
        return false;
    }
    if (q->type != GGML_TYPE_F32 || q_g->type != GGML_TYPE_F32 || dst->type != GGML_TYPE_F32 ||
        k->type != GGML_TYPE_F16 || v->type != GGML_TYPE_F16 || pos_q->type != GGML_TYPE_I32 || pos_k->type != GGML_TYPE_I32) {
        return false;
    }
    if (a.k_rot) {
        // the rotation table [n_rot, n_kv, 1, ne3], one row per key, shared by the heads
        if (k_g->type != GGML_TYPE_F32 || k_g->nb[0] != sizeof(float) || k_g->ne[0] % 2 != 0 || k_g->ne[0] > D ||
            k_g->ne[2] != 1 || (a.rope_mode != 0 && a.rope_mode != GGML_ROPE_TYPE_NEOX)) {
            return false;
        }
        if (a.n_group > 0) {
            // or a table of steps [n_rot, n_lo + n_hi, 1, 1], for a RoPE of the whole head: with a partial one every decode
            // step would rotate the whole K view into a scratch (libllama then keeps a row per key or the grouped keys)
            if (a.n_lo < 1 || (a.n_lo & (a.n_lo - 1)) != 0 || k_g->ne[1] <= a.n_lo || k_g->ne[3] != 1 || k_g->ne[0] != D) {
                return false;
            }
        } else if (k_g->ne[1] != n_kv || k_g->ne[3] != ne3) {
            return false;
        }
    } else if (k_g->type != GGML_TYPE_F16 || !ggml_are_same_shape(k, k_g)) {
        return false;
    }
    if (a.q_rot) {
        // the query table [n_rot, n_q, 1, ne3], the same width and layout as the keys' table
        if (!a.k_rot || q_g->ne[0] != k_g->ne[0] || q_g->ne[1] != n_q || q_g->ne[2] != 1 || q_g->ne[3] != ne3) {
            return false;
        }
    } else if (!ggml_are_same_shape(q, q_g)) {
        return false;
    }
    if (!ggml_are_same_shape(k, v) ||
        k->ne[0] != D || k->ne[3] != ne3 || q->ne[2] % k->ne[2] != 0 || n_q < 1 || n_kv < 1 || n_kv > (1 << 26)) {
        return false;
    }
    if (pos_q->ne[0] != n_q || pos_q->ne[1] != ne3 || pos_k->ne[0] != n_kv || pos_k->ne[1] != ne3 ||
        pos_q->nb[0] != sizeof(int32_t) || pos_k->nb[0] != sizeof(int32_t)) {
        return false;
    }
    if (q->nb[0] != sizeof(float) || q_g->nb[0] != sizeof(float)) {
        return false;
    }
    // K, K_g and V are copied to shared memory in 16 byte pieces (the table form's K_g is a scratch of ours)
    for (const ggml_tensor * t : {k, a.k_rot ? k : k_g, v}) {
        if (t->nb[0] != sizeof(half) || !ggml_cuda_is_aligned(t, 16)) {
            return false;
        }
    }
    // so is the mask, 8 keys at a time: its rows must be aligned and padded past the last key
    if (mask && (mask->type != GGML_TYPE_F16 || mask->nb[0] != sizeof(half) || mask->ne[0] < GGML_PAD(n_kv, 8) ||
                 mask->ne[1] < n_q || mask->ne[2] != 1 || ne3 % mask->ne[3] != 0 ||
                 (uintptr_t) mask->data % 16 != 0 || mask->nb[1] % 16 != 0 || mask->nb[3] % 16 != 0)) {
        return false;
    }
    if (dst->ne[0] != D || dst->ne[1] != q->ne[2] || dst->ne[2] != n_q || dst->ne[3] != ne3 || !ggml_is_contiguous(dst)) {
        return false;
    }

    bool decode;
    int  NHB, RPB;
    fattn_se_block_shape(n_q, q->ne[2]/k->ne[2], decode, NHB, RPB);
    // (the table form always has the scratch to fall back on)
    return q->ne[2]/NHB <= 65535 && fattn_se_nbytes_shared(D, decode, RPB, FATTN_SE_ROT_NONE) <= ggml_cuda_info().devices[device].smpbo;
}

#endif // GGML_CUDA_FATTN_SE_SELFTEST
