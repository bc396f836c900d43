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

// The pieces: fattn-self-extend-common.cuh (parameters, plan, shapes), fattn-self-extend-device.cuh (device helpers),
// fattn-self-extend-kernels.cuh (kernels); the host side below.

#include "fattn-self-extend-kernels.cuh"

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
        p.ne_m3  = 1;
        p.causal = a.causal;
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
    int                 causal, W, RPB, stream;

    bool operator==(const fattn_se_cls_key & o) const {
        return std::tie(mask, pos_q, pos_k, causal, W, RPB, stream) ==
               std::tie(o.mask, o.pos_q, o.pos_k, o.causal, o.W, o.RPB, o.stream);
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
    const fattn_se_cls_key key = { a.mask, a.pos_q, a.pos_k, p.causal, p.W, P.RPB, ctx.curr_stream_no };

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
        // the rotation table [n_rot, n_kv, 1, ne3], one F16 row per key, shared by the heads (rows 16-byte aligned)
        if (k_g->ne[0] % 2 != 0 || k_g->ne[0] > D || k_g->ne[2] != 1 ||
            (a.rope_mode != 0 && a.rope_mode != GGML_ROPE_TYPE_NEOX)) {
            return false;
        }
        if (a.n_group > 0) {
            // or an F32 table of steps [n_rot, n_lo + n_hi, 1, 1], for a RoPE of the whole head: with a partial one every
            // decode step would rotate the whole K view into a scratch (libllama then keeps a row per key or the grouped keys)
            if (k_g->type != GGML_TYPE_F32 || k_g->nb[0] != sizeof(float) ||
                a.n_lo < 1 || (a.n_lo & (a.n_lo - 1)) != 0 || k_g->ne[1] <= a.n_lo || k_g->ne[3] != 1 || k_g->ne[0] != D) {
                return false;
            }
        } else if (k_g->type != GGML_TYPE_F16 || k_g->nb[0] != sizeof(half) || k_g->nb[1] % 16 != 0 ||
                   !ggml_cuda_is_aligned(k_g, 16) || k_g->ne[1] != n_kv || k_g->ne[3] != ne3) {
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
    // K, K_g and V are copied to shared memory in 16 byte pieces (the table forms' K_g: checked above, or a scratch of ours)
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
