// CUDA kernel of GGML_OP_FLASH_ATTN_EXT_SE (patches/ggml/include/ggml-self-extend.h).
//
// A block takes one query, the query heads of one KV head (GQA group) and one chunk of keys; each of its warps
// walks every SE_WARPS-th key of the chunk. Per key the positions choose the operand pair (k/q or k_g/q_g), so
// each (query, key) costs one dot product, the key row is read once for the whole head group, and the V row is
// shared the same way. Masked keys are skipped before any load. Each warp keeps an online softmax (max, sum, O)
// per head; the warps of a block merge in shared memory and leave one partial per chunk; a second kernel merges
// the chunks exactly. Chunks are sized so that even one query fills the GPU (decode).

#include "fattn-self-extend.cuh"

#include <cfloat>

namespace {

constexpr int SE_WARPS   = 4;
constexpr int SE_MAX_GQA = 8;

struct se_params {
    const char * q, * q_g, * k, * k_g, * v, * mask;
    const int32_t * pos_q, * pos_k;
    float * part; // [n_rows][n_chunk][2 + D]: max, sum, unnormalized O
    int n_q, n_kv, n_head, n_head_kv, gqa, chunk, n_chunk, mask_ne3;
    size_t nbq1, nbq2, nbq3, nbqg1, nbqg2, nbqg3;
    size_t nbk1, nbk2, nbk3, nbkg1, nbkg2, nbkg3, nbv1, nbv2, nbv3, nbm1, nbm3;
    int pos_q_s, pos_k_s; // stream strides of pos_q/pos_k in elements
    float scale, softcap;
    int W;
};

template <int D, int GQA>
__global__ void __launch_bounds__(SE_WARPS*WARP_SIZE)
se_fattn_partial(const se_params p) {
    constexpr int E = D/WARP_SIZE; // elements per lane

    const int c  = blockIdx.x;                 // chunk
    const int i  = blockIdx.y;                 // query
    const int hk = blockIdx.z % p.n_head_kv;   // KV head
    const int s  = blockIdx.z / p.n_head_kv;   // stream
    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;

    float q[GQA][E], qg[GQA][E], o[GQA][E], m[GQA], l[GQA];
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        const float * qr  = (const float *) (p.q   + i*p.nbq1  + (hk*GQA + h)*p.nbq2  + s*p.nbq3);
        const float * qgr = (const float *) (p.q_g + i*p.nbqg1 + (hk*GQA + h)*p.nbqg2 + s*p.nbqg3);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            q[h][e]  = qr [e*WARP_SIZE + lane]*p.scale;
            qg[h][e] = qgr[e*WARP_SIZE + lane]*p.scale;
            o[h][e]  = 0.0f;
        }
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
    }

    const int32_t pq = p.pos_q[s*p.pos_q_s + i];
    const int32_t * pk = p.pos_k + s*p.pos_k_s;
    const half * mrow = p.mask ? (const half *) (p.mask + i*p.nbm1 + (s % p.mask_ne3)*p.nbm3) : nullptr;

    const int j0 = c*p.chunk;
    const int j1 = min(j0 + p.chunk, p.n_kv);
    for (int j = j0 + warp; j < j1; j += SE_WARPS) {
        const float mv = mrow ? __half2float(mrow[j]) : 0.0f;
        if (mv == -INFINITY) {
            continue;
        }
        const bool grouped = pq - pk[j] >= p.W;
        const half * kr = grouped ? (const half *) (p.k_g + j*p.nbkg1 + hk*p.nbkg2 + s*p.nbkg3)
                                  : (const half *) (p.k   + j*p.nbk1  + hk*p.nbk2  + s*p.nbk3);
        const half * vr = (const half *) (p.v + j*p.nbv1 + hk*p.nbv2 + s*p.nbv3);
        float kx[E], vx[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            kx[e] = __half2float(kr[e*WARP_SIZE + lane]);
            vx[e] = __half2float(vr[e*WARP_SIZE + lane]);
        }
#pragma unroll
        for (int h = 0; h < GQA; ++h) {
            float x = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                x += (grouped ? qg[h][e] : q[h][e])*kx[e];
            }
            x = warp_reduce_sum(x);
            if (p.softcap != 0.0f) {
                x = p.softcap*tanhf(x);
            }
            x += mv;
            const float m_new = fmaxf(m[h], x);
            const float alpha = expf(m[h] - m_new);
            const float w     = expf(x - m_new);
            l[h] = l[h]*alpha + w;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                o[h][e] = o[h][e]*alpha + w*vx[e];
            }
            m[h] = m_new;
        }
    }

    // merge the warps: each writes its (m, l, o) per head, warp 0 combines
    __shared__ float sm[SE_WARPS][GQA][2];
    __shared__ float so[SE_WARPS][GQA][D];
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        if (lane == 0) {
            sm[warp][h][0] = m[h];
            sm[warp][h][1] = l[h];
        }
#pragma unroll
        for (int e = 0; e < E; ++e) {
            so[warp][h][e*WARP_SIZE + lane] = o[h][e];
        }
    }
    __syncthreads();
    if (warp != 0) {
        return;
    }
#pragma unroll
    for (int h = 0; h < GQA; ++h) {
        float mm = -FLT_MAX;
        for (int w = 0; w < SE_WARPS; ++w) {
            mm = fmaxf(mm, sm[w][h][0]);
        }
        float ll = 0.0f, oo[E] = {};
        for (int w = 0; w < SE_WARPS; ++w) {
            const float a = sm[w][h][1] == 0.0f ? 0.0f : expf(sm[w][h][0] - mm);
            ll += a*sm[w][h][1];
#pragma unroll
            for (int e = 0; e < E; ++e) {
                oo[e] += a*so[w][h][e*WARP_SIZE + lane];
            }
        }
        const int64_t row = ((int64_t) s*p.n_q + i)*p.n_head + hk*GQA + h;
        float * out = p.part + (row*p.n_chunk + c)*(2 + D);
        if (lane == 0) {
            out[0] = mm;
            out[1] = ll;
        }
#pragma unroll
        for (int e = 0; e < E; ++e) {
            out[2 + e*WARP_SIZE + lane] = oo[e];
        }
    }
}

// dst row = sum_c exp(m_c - m) o_c / sum_c exp(m_c - m) l_c; a row that saw no key is 0
template <int D>
__global__ void se_fattn_combine(const float * part, float * dst, const int n_chunk) {
    const int64_t row = blockIdx.x;
    const float * pr = part + row*n_chunk*(2 + D);
    float mm = -FLT_MAX;
    for (int c = 0; c < n_chunk; ++c) {
        if (pr[c*(2 + D) + 1] != 0.0f) {
            mm = fmaxf(mm, pr[c*(2 + D)]);
        }
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float ll = 0.0f, oo = 0.0f;
        for (int c = 0; c < n_chunk; ++c) {
            const float * pc = pr + c*(2 + D);
            if (pc[1] != 0.0f) {
                const float a = expf(pc[0] - mm);
                ll += a*pc[1];
                oo += a*pc[2 + d];
            }
        }
        dst[row*D + d] = ll == 0.0f ? 0.0f : oo/ll;
    }
}

template <int D, int GQA>
void se_launch(ggml_backend_cuda_context & ctx, const se_params & p, dim3 grid, float * dst, int64_t n_rows) {
    cudaStream_t stream = ctx.stream();
    se_fattn_partial<D, GQA><<<grid, SE_WARPS*WARP_SIZE, 0, stream>>>(p);
    CUDA_CHECK(cudaGetLastError());
    se_fattn_combine<D><<<n_rows, D, 0, stream>>>(p.part, dst, p.n_chunk);
    CUDA_CHECK(cudaGetLastError());
}

template <int D>
void se_launch_gqa(ggml_backend_cuda_context & ctx, const se_params & p, dim3 grid, float * dst, int64_t n_rows) {
    switch (p.gqa) {
        case 1: se_launch<D, 1>(ctx, p, grid, dst, n_rows); break;
        case 2: se_launch<D, 2>(ctx, p, grid, dst, n_rows); break;
        case 4: se_launch<D, 4>(ctx, p, grid, dst, n_rows); break;
        case 8: se_launch<D, 8>(ctx, p, grid, dst, n_rows); break;
        default: GGML_ABORT("unsupported GQA ratio %d", p.gqa);
    }
}

} // namespace

bool ggml_cuda_flash_attn_ext_se_supported(int device, const ggml_tensor * dst) {
    GGML_UNUSED(device);
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * qg = dst->src[5], * kg = dst->src[6];
    const int64_t D = k->ne[0];
    const int64_t gqa = q->ne[2]/k->ne[2];
    float max_bias = 0.0f;
    memcpy(&max_bias, (const float *) dst->op_params + 1, sizeof(float));
    return (D == 64 || D == 128) && v->ne[0] == D &&
        q->type == GGML_TYPE_F32 && qg->type == GGML_TYPE_F32 &&
        k->type == GGML_TYPE_F16 && kg->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 &&
        (!mask || mask->type == GGML_TYPE_F16) && dst->src[4] == nullptr && max_bias == 0.0f &&
        (gqa == 1 || gqa == 2 || gqa == 4 || gqa == 8);
}

void ggml_cuda_flash_attn_ext_se(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * qg = dst->src[5], * kg = dst->src[6], * pos_q = dst->src[7], * pos_k = dst->src[8];

    se_params p;
    p.q = (const char *) q->data;   p.q_g = (const char *) qg->data;
    p.k = (const char *) k->data;   p.k_g = (const char *) kg->data;
    p.v = (const char *) v->data;   p.mask = mask ? (const char *) mask->data : nullptr;
    p.pos_q = (const int32_t *) pos_q->data;
    p.pos_k = (const int32_t *) pos_k->data;
    p.n_q = q->ne[1]; p.n_kv = k->ne[1]; p.n_head = q->ne[2]; p.n_head_kv = k->ne[2];
    p.gqa = p.n_head/p.n_head_kv;
    p.mask_ne3 = mask ? mask->ne[3] : 1;
    p.nbq1 = q->nb[1];  p.nbq2 = q->nb[2];  p.nbq3 = q->nb[3];
    p.nbqg1 = qg->nb[1]; p.nbqg2 = qg->nb[2]; p.nbqg3 = qg->nb[3];
    p.nbk1 = k->nb[1];  p.nbk2 = k->nb[2];  p.nbk3 = k->nb[3];
    p.nbkg1 = kg->nb[1]; p.nbkg2 = kg->nb[2]; p.nbkg3 = kg->nb[3];
    p.nbv1 = v->nb[1];  p.nbv2 = v->nb[2];  p.nbv3 = v->nb[3];
    p.nbm1 = mask ? mask->nb[1] : 0; p.nbm3 = mask ? mask->nb[3] : 0;
    p.pos_q_s = pos_q->ne[0];
    p.pos_k_s = pos_k->ne[0];
    memcpy(&p.scale,   (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&p.softcap, (const float *) dst->op_params + 2, sizeof(float));
    p.W = ggml_get_op_params_i32(dst, 4);
    if (p.softcap != 0.0f) {
        p.scale /= p.softcap;
    }

    // enough blocks to fill the GPU several times over, chunks of at least 128 keys
    const int ne3 = q->ne[3];
    const int n_sm = ggml_cuda_info().devices[ctx.device].nsm;
    const int64_t base = (int64_t) p.n_q*p.n_head_kv*ne3;
    const int64_t want = (4*n_sm + base - 1)/base;
    p.n_chunk = (int) std::max<int64_t>(1, std::min<int64_t>(want, (p.n_kv + 127)/128));
    p.chunk   = (p.n_kv + p.n_chunk - 1)/p.n_chunk;

    const int D = k->ne[0];
    const int64_t n_rows = (int64_t) ne3*p.n_q*p.n_head;
    ggml_cuda_pool_alloc<float> part(ctx.pool(), n_rows*p.n_chunk*(2 + D));
    p.part = part.get();

    const dim3 grid(p.n_chunk, p.n_q, p.n_head_kv*ne3);
    float * out = (float *) dst->data;
    switch (D) {
        case 64:  se_launch_gqa<64>(ctx, p, grid, out, n_rows);  break;
        case 128: se_launch_gqa<128>(ctx, p, grid, out, n_rows); break;
        default:  GGML_ABORT("unsupported head size %d", D);
    }
}
