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
#include "ops-self-extend-rows.h"

namespace {

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
            se_classify_row(mp, a.causal, pk + ic, pq[t], a.n_window, nk, sel + t*SE_TILE_KV, grouped + t*SE_TILE_KV, need_n, need_g);
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
                            rot.cs     = se_k_rot_cs(a, p, ic + j, s, h);
                            rot.cs_f16 = a.k_g->type == GGML_TYPE_F16;
                            rot_key    = ic + j;
                            row_ready  = false;
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
                            const float * cs = se_tab_f32(a.k_g->type, rot.cs, rot.n_rot, w.cs);
                            se_rotate_row(row, cs, rot.n_rot, a.rope_mode);
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
    GGML_ASSERT(!a.k_rot || ((a.k_g->type == GGML_TYPE_F32 || (a.n_group == 0 && a.k_g->type == GGML_TYPE_F16)) &&
                             a.k_g->ne[0] <= a.k->ne[0]));
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
