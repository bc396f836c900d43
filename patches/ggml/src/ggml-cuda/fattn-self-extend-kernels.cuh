#pragma once

// Self-Extend flash attention on CUDA (fattn-self-extend.cu): its kernels (the attention kernel, the prefill
// classification, the merges of split KV ranges, the rotation of K into a scratch).

#include "fattn-self-extend-device.cuh"

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
    constexpr int  SKV    = D + 8;               // row stride of the Q tiles (and decode's K/V tiles) in halves
    constexpr bool SWZ    = fattn_se_swizzled(D, NWC == 1); // K/K_g/V tiles without padding, swizzled (fattn_se_chunk)
    constexpr int  SKVT   = SWZ ? D : SKV;       // row stride of the K/K_g/V tiles in halves
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
    static_assert(NWK*NC*(SO*sizeof(float) + sizeof(float2)) <= (3*T*SKVT + NC*SKV)*sizeof(half), "epilogue does not fit");

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
    half * sKg = sK  + T*SKVT;              // or the table tile, or (steps) single and larger steps, rows of D + 8 floats
    half * sV  = sKg + (ROT & FATTN_SE_ROT_STEPS ? 2*FATTN_SE_STEPS_ROWS*fattn_se_rot_stride(D) : T*SKVT);
    half * sM  = sV  + T*SKVT;              // mask of tile t at sM + (t % 2)*P.RPB*SM
    int  * sP  = (int *) (sM + 2*P.RPB*SM); // pos_k of tile t at sP + (t % 2)*T
    int4 * sC  = (int4 *) (sP + 2*T);       // quarters of the class of the next tile
    half * sQ  = (half *) (sC + FATTN_SE_NWARPS);
    // Q_g is staged (rows of SKV halves) where no load is in flight yet: decode: V; prefill: K and what follows it (K_g,
    // V), whose loads start once Q_g is in registers
    half * sQg = decode ? sV : sK;
    static_assert(NC*SKV <= (decode ? T*SKVT : 3*T*SKVT), "Q_g does not fit");

    auto nvalid_of = [&](const int t) {
        return t < ntb ? min(T, p.n_kv - (kt0 + t)*T) : 0;
    };
    // what tile t needs of its keys' positions and mask (decode: everything, its class is yet to be made); a grouped,
    // unmasked tile needs nothing, and then no address is computed
    auto load_pos_mask = [&](const int t, const int slot, const int cls) {
        // (causal: a masked tile is masked by its positions)
        const bool pos  = decode || (cls & FATTN_SE_CLASS) == FATTN_SE_MIXED || (p.causal && (cls & FATTN_SE_MASKED));
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
            fattn_se_load_kv<D, T, SKVT, SWZ>(sK, K, p.nb_k1, k0, p.n_kv, tid);
        }
        if (cls & FATTN_SE_GROUPED) {
            if constexpr (ROT & FATTN_SE_ROT_STEPS) { // positions of tile t: in its slot since (A) of the step before
                fattn_se_load_steps_hi<2*D, 2*fattn_se_rot_stride(D)>(sKg, p, nvalid_of(t) > 0 ? sP[(t % 2)*T] : 0, tid);
            } else { // the grouped keys, or the table tile (f16 rows of D, like K)
                fattn_se_load_kv<D, T, SKVT, SWZ>(sKg, Kg, p.nb_kg1, k0, p.n_kv, tid);
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
    // Only the columns with a query (the first rows*NHB) are read and converted: a one-token decode with 4 query heads
    // per KV head has 4 of its 16, and the decode op is bound by the latency of its instructions (RESULTS 4.5).
    constexpr int QK = 8;
    static_assert((NC*D) % (QK*FATTN_SE_NTHREADS) == 0, "bad Q staging");
    const int nc   = rows*P.NHB; // columns with a query
    const int ne_q = nc*D;
    for (int e0 = 0; e0 < ne_q; e0 += QK*FATTN_SE_NTHREADS) {
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
            if (e < ne_q) { // (r < rows)
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
            if (e < ne_q) {
                sQ [(e / D)*SKV + e % D] = __float2half(P.q_scale*x[k]);
                sQg[(e / D)*SKV + e % D] = __float2half(P.q_scale*y[k]);
            }
        }
    }
    for (int e = ne_q + 8*tid; e < NC*D; e += 8*FATTN_SE_NTHREADS) { // the other columns: 0, 16 bytes a store
        *(uint4 *) (sQ  + (e / D)*SKV + e % D) = make_uint4(0, 0, 0, 0);
        *(uint4 *) (sQg + (e / D)*SKV + e % D) = make_uint4(0, 0, 0, 0);
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
    // the lane's ldmatrix addresses of its warp's Q rows, first K/K_g row and first V row; a load of dimensions 16*d16 ..
    // adds 32*(d16 ^ swz) bytes (fattn_se_lane_swz; swz = 0 where the tiles are padded)
    const uint32_t Q_sm = ggml_cuda_cvta_generic_to_shared(sQ + (16*wc + fattn_se_lane_row<FATTN_SE_LDSM_A>(lane))*SKV
                                                                + fattn_se_lane_col<FATTN_SE_LDSM_A>(lane));
    const int swz = SWZ ? fattn_se_lane_swz(lane) : 0;
    const uint32_t K_sm = ggml_cuda_cvta_generic_to_shared(
        sK + KW*wk*SKVT + fattn_se_lane_offset<FATTN_SE_LDSM_B, SWZ>(lane, SKVT));
    const uint32_t Kg_sm = K_sm + T*SKVT*sizeof(half); // sKg follows sK
    // (ROT) the lane's first table element: row lane/4 of the warp's first key, column 2*(lane % 4)
    const half * tab = sKg + (KW*wk + lane/4)*SKV + 2*(lane % 4);
    const uint32_t V_sm = ggml_cuda_cvta_generic_to_shared(
        sV + KW*wk*SKVT + fattn_se_lane_offset<FATTN_SE_LDSM_BT, SWZ>(lane, SKVT));

    if constexpr (decode) {
        fattn_se_class_part<T>(sC + w, sP, mask_rows ? sM : nullptr, p.causal, pq_min, pq_max, rows, nvalid_of(0));
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
            fattn_se_load_kv<D, T, SKVT, SWZ>(sV, V, p.nb_v1, (kt0 + t)*T, p.n_kv, tid);
        }
        int cls_next3 = 0; // prefill: class of tile t + 3, for the next step
        if constexpr (decode) {
            fattn_se_class_part<T>(sC + w, sP + (1 - slot)*T, mask_rows ? sM + (1 - slot)*P.RPB*SM : nullptr, p.causal,
                                   pq_min, pq_max, rows, nvalid_of(t + 1));
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
                const half *   tab_ = tab + 16*kk0*SKV;
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
                    fattn_se_kq<D, KW/16, SKVT>(S, Qg_A, 0, Kg_sm, swz);
                }
            } else {
                fattn_se_kq<D, KW/16, SKVT>(S, nullptr, Q_sm, K_sm, swz);
                if ((cls & FATTN_SE_CLASS) == FATTN_SE_MIXED) {
                    // the tile straddles pos_q - pos_k = W: both products, the positions pick one per (column, key)
                    const int * pk = sP + slot*T + KW*wk;
#pragma unroll
                    for (int kk = 0; kk < KW/16; ++kk) {
                        tile<16, 16, float> Sg;
                        if constexpr (ROT) {
                            kq_rot(&Sg, std::integral_constant<int, 1>(), kk);
                        } else {
                            fattn_se_kq<D, 1, SKVT>(&Sg, Qg_A, 0, Kg_sm + 16*kk*SKVT*sizeof(half), swz);
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
            } else if (!pure && p.causal && (cls & FATTN_SE_MASKED)) {
                // keys after the column's query, and empty cells (pos_k -1)
                const int * pk = sP + slot*T + KW*wk;
#pragma unroll
                for (int kk = 0; kk < KW/16; ++kk) {
#pragma unroll
                    for (int l = 0; l < S[kk].ne; ++l) {
                        const int pkl = pk[16*kk + S[kk].get_j(l)];
                        if (pkl < 0 || pkl > pq[(l/2) % 2]) {
                            S[kk].x[l] = -INFINITY;
                        }
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
                        fattn_se_ldsm<FATTN_SE_LDSM_BT>(V_B, V_sm + 16*kk*SKVT*sizeof(half) + 32*(d16 ^ swz));
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
                        fattn_se_ldsm<FATTN_SE_LDSM_BT>(V_B, V_sm + 16*kk*SKVT*sizeof(half) + 32*(d16 ^ swz));
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
    // (O of the columns with a query only, as Q above)
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
            if (c < nc) {
                *(float2 *) (eO + (wk*NC + c)*SO + d) = make_float2(O[d16].x[l], O[d16].x[l + 1]);
            }
        }
    }
    __syncthreads();

    for (int c = w; c < nc; c += FATTN_SE_NWARPS) {
        const int r = c / P.NHB;
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
        if (p.causal) { // visible to the rows at pq_max or before, and to all of them at pq_min or before
            const int pk0 = vis0 ? pos_k[k]     : 0;
            const int pk1 = vis1 ? pos_k[k + 1] : 0;
            nz   = (vis0 && !(pk0 >= 0 && pk0 <= pq_min)) || (vis1 && !(pk1 >= 0 && pk1 <= pq_min));
            vis0 = vis0 && pk0 >= 0 && pk0 <= pq_max;
            vis1 = vis1 && pk1 >= 0 && pk1 <= pq_max;
        } else if (mask_rows && vis0) {
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
    const half  * x  = (const half *) (p.k + j*p.nb_k1 + blockIdx.y*p.nb_k2 + blockIdx.z*p.nb_k3);
    const half  * th = nullptr; // a table of rows: the key's row
    const float * t  = nullptr; // a table of steps: t the key's single-position step, t_hi its larger one
    const float * t_hi = nullptr;
    if (p.k_steps_G == 0) {
        th = (const half *) (p.k_g + j*p.nb_kg1 + blockIdx.z*p.nb_kg3);
    } else {
        int r_lo, r_hi;
        fattn_se_steps_rows(p, ((const int *) (p.pos_k + blockIdx.z*p.nb_pk1))[j], r_lo, r_hi);
        t    = (const float *) (p.k_g + int64_t(r_lo)*p.nb_kg1);
        t_hi = (const float *) (p.k_g + int64_t(r_hi)*p.nb_kg1);
    }
    // cos and sin of the pair (a, b): the table's, or the product of the two steps'
    auto cs_of = [&](const int a, const int b, float & c, float & sn) {
        if (!t_hi) {
            c  = __half2float(th[a]);
            sn = __half2float(th[b]);
            return;
        }
        const float2 cs = fattn_se_steps_cs(make_float2(t[a], t[b]), make_float2(t_hi[a], t_hi[b]));
        c  = cs.x;
        sn = cs.y;
    };
    // the table's values of 8 consecutive dimensions from i, as floats
    auto tab8 = [&](const int i, float * out) {
        half2 h[4];
        *(uint4 *) h = *(const uint4 *) (th + i);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const float2 f = __half22float2(h[m]);
            out[2*m] = f.x;
            out[2*m + 1] = f.y;
        }
    };
    // a table of steps: 8 consecutive floats of row r from i, 16 bytes at a time
    auto row8 = [](const float * r, const int i, float * out) {
        *(float4 *) out       = *(const float4 *) (r + i);
        *(float4 *) (out + 4) = *(const float4 *) (r + i + 4);
    };
    half * y = k_g + ((int64_t(blockIdx.z)*gridDim.y + blockIdx.y)*p.n_kv + j)*D + d0;
    const int half_rot = n_rot/2;

    half2 out[4];
    *(uint4 *) out = *(const uint4 *) (x + d0);
    if (d0 >= n_rot) {
        // past the rotated dimensions: copied
    } else if (d0 + 8 <= n_rot && n_rot % 8 == 0 && (!neox || half_rot % 8 == 0)) { // (16-byte loads)
        if (!neox) {
            // pairs (d0 + 2m, d0 + 2m + 1): cos, sin at the same dimensions of the table
            float c[8];
            if (t_hi) {
                float a[8], b[8];
                row8(t, d0, a);
                row8(t_hi, d0, b);
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    const float2 cs = fattn_se_steps_cs(make_float2(a[2*m], a[2*m + 1]), make_float2(b[2*m], b[2*m + 1]));
                    c[2*m]     = cs.x;
                    c[2*m + 1] = cs.y;
                }
            } else {
                tab8(d0, c);
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
            float c[8], sn[8];
            if (t_hi) {
                float ac[8], as[8], bc[8], bs[8];
                row8(t, i0, ac);
                row8(t, i0 + half_rot, as);
                row8(t_hi, i0, bc);
                row8(t_hi, i0 + half_rot, bs);
#pragma unroll
                for (int m = 0; m < 8; ++m) {
                    const float2 cs = fattn_se_steps_cs(make_float2(ac[m], as[m]), make_float2(bc[m], bs[m]));
                    c[m]  = cs.x;
                    sn[m] = cs.y;
                }
            } else {
                tab8(i0, c);
                tab8(i0 + half_rot, sn);
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
