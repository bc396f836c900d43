#pragma once

// Self-Extend flash attention on CUDA (fattn-self-extend.cu): the op as the kernels see it (parameters, plan, tile
// shapes, shared memory per configuration).

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
    int          causal;                                // no mask: key j is visible to query i when 0 <= pos_k[j] <= pos_q[i]
    const char * pos_q; int64_t nb_pq1;                 // I32 [n_q,  ne3]
    const char * pos_k; int64_t nb_pk1;                 // I32 [n_kv, ne3]
    float      * dst;                                   // F32 [D, n_head, n_q, ne3], contiguous

    int   D, n_q, n_kv, n_head, n_head_kv, ne3;
    int   W;
    float scale, softcap;
    int   k_rot;                                        // fattn_se_rot: NONE, or k_g is a rotation table of D halves
                                                        // per key (decode only), F16 [D, n_kv, 1, ne3], nb_kg2 unused
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
// halves per key (ggml-self-extend.h; laid out like a K_g tile), the pairs (2i, 2i + 1) or (i, i + D/2) rotated as the B
// operands are loaded. With FATTN_SE_ROT_STEPS the kernel keeps the single-position steps of a table of steps (f32) in
// place of the table tile, and applies each key's larger step as the B operands are rotated.
enum fattn_se_rot { FATTN_SE_ROT_NONE = 0, FATTN_SE_ROT_NORM = 1, FATTN_SE_ROT_NEOX = 2, FATTN_SE_ROT_PAIRS = 3,
                    FATTN_SE_ROT_STEPS = 4 };

// Single-position steps that a decode kernel keeps whole in shared memory (libllama makes 128).
#define FATTN_SE_STEPS_LO_MAX 128

// Row stride of the steps kept in shared memory (FATTN_SE_ROT_STEPS) in floats: rows 32 bytes apart modulo 128, so that
// the float2 reads of a half warp (4 rows x 4 lanes) hit distinct banks.
static constexpr __host__ __device__ int fattn_se_rot_stride(const int D) {
    return D + 8;
}

// Rows of those steps: the single steps and two larger ones.
#define FATTN_SE_STEPS_ROWS (FATTN_SE_STEPS_LO_MAX + 2)

// Whether the K/V tiles of a configuration are swizzled rows of D halves (fattn_se_chunk) rather than rows padded to D + 8:
// prefill with heads up to 128. For 256 the swizzle did not pay: this address arithmetic spilled registers, and an XOR per
// ldmatrix address that does not made the prefill 2.6-5.4 % slower (a padded row of 512 bytes wastes less of its lines).
static constexpr __host__ __device__ bool fattn_se_swizzled(const int D, const bool decode) {
    return !decode && D <= 128;
}

// Must match the carving of shared memory in flash_attn_ext_se_f16. rot (fattn_se_rot): K_g is the grouped keys' tile or a
// rotation table tile (both T rows like K's), or a table of steps' single steps and two larger steps.
static size_t fattn_se_nbytes_shared(const int D, const bool decode, const int RPB, const int rot) {
    const int T  = fattn_se_T(D, decode);
    const int SK = fattn_se_swizzled(D, decode) ? D : D + 8; // rows of a K/V tile: swizzled, or padded by 16 bytes
    return 2*T*SK*sizeof(half)                          // K, V tiles
         + (rot & FATTN_SE_ROT_STEPS ? FATTN_SE_STEPS_ROWS*fattn_se_rot_stride(D)*sizeof(float) // steps,
                                     : T*SK*sizeof(half))                                    // K_g or table
         + 2*RPB*(T + 8)*sizeof(half)                   // mask, 2 slots
         + 2*T*sizeof(int)                              // pos_k, 2 slots
         + FATTN_SE_NWARPS*sizeof(int4)                 // per warp parts of the class of the next tile
         + fattn_se_ncols(decode)*(D + 8)*sizeof(half); // Q
}
