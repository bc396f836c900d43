// Self-Extend in the attention graph: the inputs of each ubatch and the grouped operands of each layer, called from
// the hooks in llama-graph.cpp.
//
// Per layer, the neighbour logits are the layer's own (cached keys carry RoPE at their true position j, the
// queries at i). The grouped logits come from the same tensors rotated further, the way llama.cpp's K-shift
// rotates cached keys: queries by (i/G + W - W/G) - i, keys by j/G - j. A rotation composes exactly with the
// one already applied (same frequencies, same YaRN ramp), so these are RoPE at the grouped positions. Both
// logit sets are merged with 0/1 masks, then the usual softmax and V product run once.

#include "llama-self-extend-impl.h"
#include "llama-self-extend-kcache.h"

#include "llama-graph.h"
#include "llama-impl.h"

#include "ggml-self-extend.h"

#include <cstring>

bool llama_se_enabled(const llama_cparams & cparams) {
    return cparams.se_n > 1;
}

// Steps form: the rows of the table of steps that the cells of mctx's streams need: SE_STEP_LO single steps, then
// larger ones up to the highest position (a key at p goes back p - p/G <= p positions). At least as many as the cache
// has cells, so that a graph keeps its shape while the positions stay below that.
static int64_t se_step_rows(const llama_kv_cache_context * mctx) {
    const llama_kv_cache * kv = llama_se_access::kv(mctx);
    int64_t n_pos = 0;
    for (uint32_t s = llama_se_access::stream0(mctx); s <= llama_se_access::stream1(mctx); ++s) {
        const llama_kv_cells & cells = llama_se_access::cells(kv, s);
        n_pos = std::max<int64_t>(n_pos, cells.size());
        for (llama_seq_id seq = 0; seq < LLAMA_MAX_SEQ; ++seq) {
            n_pos = std::max<int64_t>(n_pos, cells.seq_pos_max(seq) + 1);
        }
    }
    return llama_se_kcache::steps_rows(n_pos);
}

// Whether the fused op masks ubatch's queries by the positions alone (llama_se_inp::causal): what llama.cpp's mask of
// the cache holds then is, per stream, "the cell holds the stream's sequence and 0 <= its position <= the query's".
// So: causal attention without ALiBi, SWA or 2-D positions, and in each stream the tokens of one sequence (llama.cpp's
// mask reads a token's first sequence id). A context whose one stream holds several sequences (a unified cache with
// n_seq_max > 1, llama-server's default) keeps the mask for every ubatch: the graph that llama.cpp reserves memory with
// has one sequence, and a later ubatch that mixes them would need more than it reserved.
static bool se_causal_by_positions(const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                                   const llama_cparams & cparams) {
    const llama_kv_cache * kv = llama_se_access::kv(mctx);
    if (!cparams.se_fa || !cparams.causal_attn || llama_se_access::model(kv).hparams.use_alibi ||
        llama_se_access::swa_type(kv) != LLAMA_SWA_TYPE_NONE || ubatch.is_pos_2d() ||
        (cparams.kv_unified && cparams.n_seq_max > 1)) {
        return false;
    }
    const int64_t n_stream = cparams.kv_unified ? 1 : ubatch.n_seqs_unq;
    const int64_t n_tps    = ubatch.n_tokens/n_stream;
    for (int64_t i = 0; i < ubatch.n_tokens; ++i) {
        if (ubatch.n_seq_id[i] < 1 || ubatch.seq_id[i][0] != ubatch.seq_id[(i/n_tps)*n_tps][0]) {
            return false;
        }
    }
    return true;
}

bool llama_se_can_reuse(const llama_se_inp & inp, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                        const llama_cparams & cparams) {
    if (!inp.q_shift) {
        return true;
    }
    // a graph that rebuilt the grouped keys must not run again, and a stale cache needs that graph; a table of steps
    // must cover the positions; the mask is of the same kind, and a graph without llama.cpp's mask has the cells' count
    // (which llama.cpp checks on its mask only where it has one)
    return !inp.k_g_rebuild && !(inp.pos_q && se_kcache_stale(mctx)) &&
           !(inp.k_steps && inp.k_steps->ne[1] < se_step_rows(mctx)) &&
           inp.causal == se_causal_by_positions(mctx, ubatch, cparams) &&
           !(inp.pos_k && inp.pos_k->ne[0] != mctx->get_n_kv());
}

// A part of the pack: a contiguous view of pack_dev at element offset off. Every part has 4-byte elements and the pack
// is I32: an F32 part holds the bits of its floats, which the device copy moves as they are.
static ggml_tensor * se_part(ggml_context * ctx, const llama_se_inp & inp, ggml_type type, int64_t off,
                             const char * name, int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1, int64_t ne3 = 1) {
    GGML_ASSERT(ggml_type_size(type) == sizeof(int32_t) && ggml_blck_size(type) == 1);
    const size_t nb1 = ne0*sizeof(int32_t);
    ggml_tensor * t = ggml_view_4d(ctx, inp.pack_dev, ne0, ne1, ne2, ne3, nb1, nb1*ne1, nb1*ne1*ne2,
                                   off*sizeof(int32_t));
    t->type = type;
    ggml_set_name(t, name);
    return t;
}

llama_se_inp llama_se_build_inp(
        ggml_context * ctx,
        const llama_kv_cache_context * mctx,
        const llama_ubatch & ubatch,
        const llama_cparams & cparams) {
    llama_se_inp inp;
    if (!llama_se_enabled(cparams) || !se_cache_applies(llama_se_access::kv(mctx))) {
        return inp;
    }
    const int64_t n_kv     = mctx->get_n_kv();
    const int64_t n_tokens = ubatch.n_tokens;
    const int64_t n_stream = cparams.kv_unified ? 1 : ubatch.n_seqs_unq;

    // the parts' places in the pack, 256 bytes apart at least (the CUDA op reads positions 16 bytes at a time)
    struct part { ggml_tensor ** t; ggml_type type; const char * name; int64_t ne[4]; int64_t off; };
    std::vector<part> parts;
    int64_t n_pack = 0;
    auto reserve = [&](int64_t n) {
        const int64_t off = n_pack;
        n_pack += GGML_PAD(n, 64);
        return off;
    };
    auto add = [&](ggml_tensor ** t, ggml_type type, const char * name, int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1,
                   int64_t ne3 = 1) {
        parts.push_back({ t, type, name, { ne0, ne1, ne2, ne3 }, reserve(ne0*ne1*ne2*ne3) });
    };

    add(&inp.q_shift, GGML_TYPE_I32, "se_q_shift", n_tokens);

    // keys: the fused path rotates the ubatch's keys into the grouped-key cache, and the stale cells' keys again;
    // the generic path rotates every cached key
    inp.k_g_rebuild = cparams.se_fa && se_kcache_stale(mctx);
    if (cparams.se_fa) {
        // table form: instead of the keys' shifts, the table rows of the ubatch's cells, then of the stale ones; steps
        // form: the table of steps
        const llama_se_kcache * kc = llama_se_access::kcache(llama_se_access::kv(mctx));
        int64_t n_rows = 0;
        if (inp.k_g_rebuild) {
            se_kcache_for_stale(mctx, [&](int64_t, llama_pos) { n_rows++; });
        }
        if (n_rows > 0) {
            add(&inp.k_g_rows, GGML_TYPE_I32, "se_k_g_rows", n_rows);
            if (kc->form == se_keys::cache) {
                add(&inp.k_g_shift, GGML_TYPE_I32, "se_k_g_shift", n_rows);
            }
        }
        if (kc->form == se_keys::table) {
            add(&inp.k_rot_rows, GGML_TYPE_F32, "se_k_rot_rows", kc->n_rot, n_tokens + n_rows);
        }
        if (kc->form == se_keys::steps) {
            // the table kept with the cache, or where the positions go past it a larger one as an input
            const int64_t n_rows = se_step_rows(mctx);
            if (kc->steps && n_rows <= kc->steps->ne[1]) {
                inp.k_steps = kc->steps;
            } else {
                add(&inp.k_steps, GGML_TYPE_F32, "se_k_steps", kc->n_rot, n_rows);
            }
        }
        if (kc->form != se_keys::cache) {
            // and the queries' rows (ggml_flash_attn_ext_se_q_rot): the kernels rotate q as they stage it, where a RoPE
            // node per layer would cost a launch and a pass over the queries (docs/RESULTS.md 4.5)
            add(&inp.q_rot_rows, GGML_TYPE_F32, "se_q_rot_rows", kc->n_rot, n_tokens);
        } else {
            // the ubatch's keys: grouped positions or shifts, as the layers need them (se_input_cur)
            inp.off_k_pos_cur   = reserve(n_tokens);
            inp.off_k_shift_cur = reserve(n_tokens);
        }
        add(&inp.pos_q, GGML_TYPE_I32, "se_pos_q", n_tokens/n_stream, n_stream);
        add(&inp.pos_k, GGML_TYPE_I32, "se_pos_k", n_kv, n_stream);
        inp.causal = se_causal_by_positions(mctx, ubatch, cparams);
    } else {
        add(&inp.k_shift, GGML_TYPE_I32, "se_k_shift", n_kv*n_stream);
        add(&inp.nbr, GGML_TYPE_F32, "se_nbr", n_kv, n_tokens/n_stream, 1, n_stream);
        add(&inp.grp, GGML_TYPE_F32, "se_grp", n_kv, n_tokens/n_stream, 1, n_stream);
    }

    inp.pack = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_pack);
    ggml_set_input(inp.pack);
    ggml_set_name(inp.pack, "se_inp");
    // the fused path's pack is small (positions, table rows); the generic path's holds two n_kv x n_tokens selections,
    // which a device copy would double on the device: its parts view the host pack, each uploaded where it is read
    inp.pack_dev = inp.pack;
    if (cparams.se_fa) {
        inp.pack_dev = ggml_cont(ctx, inp.pack);
        ggml_set_name(inp.pack_dev, "se_inp_dev");
    }
    for (const part & pt : parts) {
        *pt.t = se_part(ctx, inp, pt.type, pt.off, pt.name, pt.ne[0], pt.ne[1], pt.ne[2], pt.ne[3]);
    }
    return inp;
}

// where llama_se_set_inp writes part t: its place in the pack on the host
template <typename T>
static T * se_host(const llama_se_inp & inp, const ggml_tensor * t) {
    GGML_ASSERT(t->view_src == inp.pack_dev);
    return (T *) ((char *) inp.pack->data + t->view_offs);
}

void llama_se_set_inp(
        const llama_se_inp & inp,
        const llama_kv_cache_context * mctx,
        const llama_ubatch * ubatch,
        const llama_cparams & cparams) {
    if (!inp.pack || !inp.pack->buffer) {
        return;
    }
    const int32_t G = cparams.se_n;
    const int32_t W = cparams.se_w;

    const llama_kv_cache * kv = llama_se_access::kv(mctx);

    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t n_stream = cparams.kv_unified ? 1 : ubatch->n_seqs_unq;
    const int64_t n_kv     = mctx->get_n_kv();

    GGML_ASSERT(ggml_backend_buffer_is_host(inp.pack->buffer));

    // queries: [n_tokens]
    int32_t * q_shift = se_host<int32_t>(inp, inp.q_shift);
    for (int64_t i = 0; i < n_tokens; ++i) {
        const llama_pos p = ubatch->pos[i];
        q_shift[i] = se_q_pos(p, G, W) - p;
    }

    // keys: the cells of the streams the layer's K view covers, in view order
    const uint32_t s0 = llama_se_access::stream0(mctx);
    if (inp.k_shift) {
        int32_t * k_shift = se_host<int32_t>(inp, inp.k_shift);
        for (int64_t s = 0; s < n_stream; ++s) {
            const llama_kv_cells & cells = llama_se_access::cells(kv, s0 + s);
            for (int64_t j = 0; j < n_kv; ++j) {
                k_shift[s*n_kv + j] = cells.is_empty(j) ? 0 : se_k_pos(cells.pos_get(j), G) - cells.pos_get(j);
            }
        }
    }
    // or the ubatch's keys only, in ubatch order: grouped positions, or shifts from the true ones
    if (inp.k_pos_cur) {
        int32_t * k_pos = se_host<int32_t>(inp, inp.k_pos_cur);
        for (int64_t i = 0; i < n_tokens; ++i) {
            k_pos[i] = se_k_pos(ubatch->pos[i], G);
        }
    }
    if (inp.k_shift_cur) {
        int32_t * k_shift = se_host<int32_t>(inp, inp.k_shift_cur);
        for (int64_t i = 0; i < n_tokens; ++i) {
            k_shift[i] = se_k_pos(ubatch->pos[i], G) - ubatch->pos[i];
        }
    }
    // table form: per row, cos/sin of each pair's angle for the shift from the cell's position to its grouped one;
    // the rows of the ubatch's cells, then those of the stale ones
    float * rot_out = nullptr;
    llama_se_kcache * kcache = llama_se_access::kcache(kv);
    auto rot_row = [&](llama_pos pos) {
        kcache->rot_row(se_k_pos(pos, G) - pos, rot_out);
        rot_out += kcache->n_rot;
    };
    if (inp.k_steps && inp.k_steps->view_src == inp.pack_dev) { // (not the table kept with the cache)
        memcpy(se_host<float>(inp, inp.k_steps), kcache->steps_table(inp.k_steps->ne[1]), ggml_nbytes(inp.k_steps));
    }
    if (inp.k_rot_rows) {
        rot_out = se_host<float>(inp, inp.k_rot_rows);
        for (int64_t i = 0; i < n_tokens; ++i) {
            rot_row(ubatch->pos[i]);
        }
    }
    if (inp.q_rot_rows) {
        // the queries' rows: their shift from the true to the grouped query position
        float * q_rot = se_host<float>(inp, inp.q_rot_rows);
        for (int64_t i = 0; i < n_tokens; ++i) {
            kcache->rot_row(se_q_pos(ubatch->pos[i], G, W) - ubatch->pos[i], q_rot + i*kcache->n_rot);
        }
    }
    if (inp.k_g_rebuild) {
        // this graph rotates the stale keys of its streams again (the rows its build counted: same state)
        if (inp.k_g_rows) {
            int32_t * rows  = se_host<int32_t>(inp, inp.k_g_rows);
            int32_t * shift = inp.k_g_shift ? se_host<int32_t>(inp, inp.k_g_shift) : nullptr;
            int64_t n = 0;
            se_kcache_for_stale(mctx, [&](int64_t row, llama_pos pos) {
                GGML_ASSERT(n < inp.k_g_rows->ne[0]);
                rows[n] = (int32_t) row;
                if (shift) {
                    shift[n] = se_k_pos(pos, G) - pos;
                }
                if (rot_out) {
                    rot_row(pos);
                }
                n++;
            });
            GGML_ASSERT(n == inp.k_g_rows->ne[0]);
        }
        llama_se_kcache * kc = llama_se_access::kcache(kv);
        for (uint32_t s = s0; s <= llama_se_access::stream1(mctx); ++s) {
            kc->clear(s);
        }
    }

    if (inp.pos_q) {
        // queries: token i is row i % n_tps of stream i / n_tps, so [n_tps, n_stream] is the ubatch order
        int32_t * pos_q = se_host<int32_t>(inp, inp.pos_q);
        for (int64_t i = 0; i < n_tokens; ++i) {
            pos_q[i] = ubatch->pos[i];
        }
        // keys: empty cells are masked; -1 classifies them with the distant (grouped) keys, and (causal) hides them and
        // the cells that the stream's sequence lacks
        int32_t * pos_k = se_host<int32_t>(inp, inp.pos_k);
        const int64_t n_tps = n_tokens/n_stream;
        for (int64_t s = 0; s < n_stream; ++s) {
            const llama_kv_cells & cells = llama_se_access::cells(kv, s0 + s);
            const llama_seq_id seq = inp.causal ? ubatch->seq_id[s*n_tps][0] : -1;
            for (int64_t j = 0; j < n_kv; ++j) {
                pos_k[s*n_kv + j] = cells.is_empty(j) || (inp.causal && !cells.seq_has(j, seq)) ? -1 : cells.pos_get(j);
            }
        }
        return;
    }

    // neighbour/grouped selection per (key, query); cells outside the causal mask get 1/0 (masked anyway)
    float * nbr = se_host<float>(inp, inp.nbr);
    float * grp = se_host<float>(inp, inp.grp);
    for (int64_t i = 0; i < n_tokens; ++i) { // token i is row i % n_tps of stream i / n_tps: offset i*n_kv
        const llama_pos p1 = ubatch->pos[i];
        const llama_kv_cells & cells = llama_se_access::cells(kv, llama_se_access::stream_of(kv, ubatch->seq_id[i][0]));
        float * nr = nbr + i*n_kv;
        float * gr = grp + i*n_kv;
        for (int64_t j = 0; j < n_kv; ++j) {
            const bool neighbour = cells.is_empty(j) || p1 - cells.pos_get(j) < W;
            nr[j] = neighbour ? 1.0f : 0.0f;
            gr[j] = neighbour ? 0.0f : 1.0f;
        }
    }
}

// rotate x [n_embd_head, n_head, n] (already roped at true positions) by the per-row shift, as K-shift does
static ggml_tensor * se_rotate(
        ggml_context * ctx,
        ggml_tensor * x,
        ggml_tensor * shift,
        ggml_tensor * factors,
        const llama_hparams & hparams,
        const llama_cparams & cparams,
        int il) {
    const float freq_base  = hparams.is_swa(il) ? hparams.rope_freq_base_train_swa  : cparams.rope_freq_base;
    const float freq_scale = hparams.is_swa(il) ? hparams.rope_freq_scale_train_swa : cparams.rope_freq_scale;
    // ggml's YaRN multiplies cos/sin by 1 + 0.1 ln(1/freq_scale) when ext_factor != 0; the extra rotation must
    // not scale a second time
    const float mscale = cparams.yarn_ext_factor != 0.0f ? 1.0f/(1.0f + 0.1f*logf(1.0f/freq_scale)) : 1.0f;
    return ggml_rope_ext(ctx, x, shift, factors, hparams.n_rot(il), hparams.rope_type, cparams.n_ctx_orig_yarn,
            freq_base, freq_scale, cparams.yarn_ext_factor, mscale, cparams.yarn_beta_fast, cparams.yarn_beta_slow);
}

// The ubatch's per-key part t (I32 [n_tokens]) at its reserved place, made on first use: llama_se_set_inp fills only
// the parts that the graph's layers read.
static ggml_tensor * se_input_cur(ggml_context * ctx, const llama_se_inp & inp, ggml_tensor *& t, int64_t off,
                                  int64_t n_tokens, const char * name) {
    if (!t) {
        t = se_part(ctx, inp, GGML_TYPE_I32, off, name, n_tokens);
    }
    return t;
}

// whether t is a plain RoPE node (normal or NeoX, not in place) that se_rope_like can apply at other positions
static bool se_is_plain_rope(const ggml_tensor * t) {
    if (t->op != GGML_OP_ROPE || t->view_src) {
        return false;
    }
    const int32_t mode = ((const int32_t *) t->op_params)[2];
    return mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX;
}

// roped = RoPE(x, positions) as the model built it: the same RoPE (every parameter, the frequency factors) of x at pos
static ggml_tensor * se_rope_like(ggml_context * ctx, const ggml_tensor * roped, ggml_tensor * pos) {
    const int32_t * params = (const int32_t *) roped->op_params;
    ggml_tensor * r = ggml_rope_ext(ctx, roped->src[0], pos, roped->src[2], params[1], params[2], 0,
                                    0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
    memcpy(r->op_params, roped->op_params, sizeof(r->op_params));
    return r;
}

bool llama_se_build_layer(
        ggml_context * ctx,
        const llama_se_inp & inp,
        const llama_kv_cache_context * mctx,
        const llama_hparams & hparams,
        const llama_cparams & cparams,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * k_cur,
        ggml_tensor * k_idxs,
        ggml_tensor * k_rot,
        int il,
        llama_se_attn & out) {
    if (!inp.q_shift || !se_layer_applies(hparams, il)) {
        return false;
    }
    const llama_model & model = llama_se_access::model(llama_se_access::kv(mctx));
    ggml_tensor * factors = model.get_rope_factors(cparams, il);

    ggml_tensor * qg = nullptr;
    if (inp.q_rot_rows && !k_rot) {
        // the queries' rows of the rotation table [n_rot, 1, n_tokens], which the op applies to q itself
        qg = ggml_reshape_3d(ctx, inp.q_rot_rows, inp.q_rot_rows->ne[0], 1, inp.q_rot_rows->ne[1]);
        out.q_rot = true;
    } else {
        // queries [n_embd_head_k, n_head, n_tokens]; undo the cache's Hadamard rotation (H*H = I) so RoPE applies
        // to the true coordinates; the dot product is the same either way since H is orthogonal
        qg = ggml_is_contiguous(q) ? q : ggml_cont(ctx, q);
        if (k_rot) {
            qg = llama_mul_mat_hadamard(ctx, qg, k_rot);
        }
        qg = se_rotate(ctx, qg, inp.q_shift, factors, hparams, cparams, il);
        ggml_format_name(qg, "se_q_grouped-%d", il);
    }

    const int64_t d = k->ne[0], h = k->ne[1], n_kv = k->ne[2], ns = k->ne[3];

    // keys [n_embd_head_k, n_head_kv, n_kv, n_stream] -> f32, rotated per cell
    auto rotate_view = [&]() {
        ggml_tensor * r = ggml_cast(ctx, k, GGML_TYPE_F32);
        if (k_rot) {
            r = llama_mul_mat_hadamard(ctx, r, k_rot);
        }
        r = ggml_reshape_3d(ctx, r, d, h, n_kv*ns);
        r = se_rotate(ctx, r, inp.k_shift, factors, hparams, cparams, il);
        return ggml_reshape_4d(ctx, r, d, h, n_kv, ns);
    };

    ggml_tensor * kg = nullptr;
    if (!cparams.se_fa) {
        // generic path: rotate the whole view; keep the grouped keys at the cache's precision (f16 for
        // f16/quantized caches): half the memory traffic, and the same fast KQ kernels as the neighbour logits
        kg = rotate_view();
        if (k->type != GGML_TYPE_F32) {
            kg = ggml_cast(ctx, kg, GGML_TYPE_F16);
        }
    } else {
        // fused path: the table of steps, the rotation table, or the grouped-key cache viewed like the K cache
        const llama_kv_cache * kv = llama_se_access::kv(mctx);
        const llama_se_kcache * cache = llama_se_access::kcache(kv);
        if (cache->form == se_keys::steps) {
            kg = ggml_reshape_2d(ctx, inp.k_steps, inp.k_steps->ne[0], inp.k_steps->ne[1]); // [n_rot, n_rows]
            out.rope_mode = cache->rope_mode;
            out.n_group   = cparams.se_n;
            out.n_lo      = llama_se_kcache::SE_STEP_LO;
        } else if (cache->tab) {
            // table form: the first Self-Extend layer of the graph writes the rows of this ubatch's (and the stale)
            // cells; every layer reads the table as [n_rot, 1, n_kv, n_stream], the kernel rotates K by it
            ggml_tensor * tab = cache->tab;
            const int64_t n_rot = tab->ne[0], kv_size = tab->ne[1];
            if (!inp.k_rot) {
                ggml_tensor * rows = ggml_reshape_2d(ctx, tab, n_rot, kv_size*tab->ne[2]);
                const size_t  rs   = inp.k_rot_rows->nb[1];
                const int64_t n_cur = inp.k_rot_rows->ne[1] - (inp.k_g_rows ? inp.k_g_rows->ne[0] : 0);
                if (inp.k_g_rows) {
                    rows = ggml_set_rows(ctx, rows, ggml_view_2d(ctx, inp.k_rot_rows, n_rot, inp.k_g_rows->ne[0], rs,
                                                                 rs*n_cur), inp.k_g_rows);
                }
                rows = ggml_set_rows(ctx, rows, ggml_view_2d(ctx, inp.k_rot_rows, n_rot, n_cur, rs, 0), k_idxs);
                inp.k_rot = ggml_reshape_3d(ctx, rows, n_rot, kv_size, tab->ne[2]);
            }
            const size_t row = ggml_row_size(tab->type, n_rot);
            kg = ggml_view_4d(ctx, inp.k_rot, n_rot, 1, n_kv, ns, row, row, row*kv_size,
                              row*kv_size*llama_se_access::stream0(mctx));
            out.rope_mode = cache->rope_mode;
        } else {
            ggml_tensor * all = cache->k_g[llama_se_access::layer_index(kv, il)];
            const int64_t n_embd = all->ne[0], kv_size = all->ne[1];
            GGML_ASSERT(n_embd == d*h);
            auto view = [&](ggml_tensor * base) {
                const size_t row = ggml_row_size(all->type, n_embd), strm = row*kv_size;
                return ggml_view_4d(ctx, base, d, h, n_kv, ns, ggml_row_size(all->type, d), row, strm,
                                    strm*llama_se_access::stream0(mctx));
            };
            if (k_cur) {
                // one stream: the cache itself, as cpy_k stores K (RoPE, view, store: a sequence backends fuse)
                ggml_tensor * rows = all->ne[2] == 1 ? all : ggml_reshape_2d(ctx, all, n_embd, kv_size*all->ne[2]);
                if (inp.k_g_rows) {
                    // the stale cells' keys [n_embd_head_k, n_head_kv, n_stale], read again from K (none of them is
                    // written by this ubatch) and rotated to their grouped positions
                    ggml_tensor * k_all = llama_se_access::layers(kv)[llama_se_access::layer_index(kv, il)].k;
                    ggml_tensor * ks = ggml_get_rows(ctx, ggml_reshape_2d(ctx, k_all, n_embd, kv_size*k_all->ne[2]), inp.k_g_rows);
                    ks = ggml_reshape_3d(ctx, ks, d, h, ks->ne[1]);
                    if (k_rot) {
                        ks = llama_mul_mat_hadamard(ctx, ks, k_rot);
                    }
                    ks = se_rotate(ctx, ks, inp.k_g_shift, factors, hparams, cparams, il);
                    rows = ggml_set_rows(ctx, rows, ggml_reshape_2d(ctx, ks, n_embd, ks->ne[2]), inp.k_g_rows);
                }
                // the ubatch's keys [n_embd_head_k, n_head_kv, n_tokens], stored at their cells as cpy_k does: the
                // layer's own RoPE again, at the grouped positions (exactly RoPE at j/G, and k_cur keeps its one use, so
                // a backend may fuse its RoPE with the store as it does without Self-Extend, and ours alike); else
                // k_cur rotated further
                ggml_tensor * kc = nullptr;
                if (!k_rot && se_is_plain_rope(k_cur)) {
                    ggml_tensor * pos = se_input_cur(ctx, inp, inp.k_pos_cur, inp.off_k_pos_cur, k_cur->ne[2],
                                                     "se_k_pos_cur");
                    kc = se_rope_like(ctx, k_cur, pos);
                } else {
                    kc = ggml_is_contiguous(k_cur) ? k_cur : ggml_cont(ctx, k_cur);
                    if (k_rot) {
                        kc = llama_mul_mat_hadamard(ctx, kc, k_rot);
                    }
                    ggml_tensor * shift = se_input_cur(ctx, inp, inp.k_shift_cur, inp.off_k_shift_cur, k_cur->ne[2],
                                                       "se_k_shift_cur");
                    kc = se_rotate(ctx, kc, shift, factors, hparams, cparams, il);
                }
                kc = ggml_view_2d(ctx, kc, n_embd, kc->ne[2], kc->nb[2], 0);
                kg = view(ggml_set_rows(ctx, rows, kc, k_idxs));
            } else {
                kg = view(all); // a layer that reads another layer's keys: that layer stored them
            }
        }
    }
    ggml_format_name(kg, "se_k_grouped-%d", il);

    out.q        = qg;
    out.k        = kg;
    out.nbr      = inp.nbr;
    out.grp      = inp.grp;
    out.pos_q    = inp.pos_q;
    out.pos_k    = inp.pos_k;
    out.causal   = inp.causal;
    out.n_window = cparams.se_w;
    return true;
}

// the grouped queries split into streams and permuted the way build_attn_mha treats q
static ggml_tensor * se_q_streams(ggml_context * ctx, ggml_tensor * q, int64_t n_stream) {
    q = ggml_view_4d(ctx, q, q->ne[0], q->ne[1], q->ne[2]/n_stream, n_stream,
            q->nb[1], q->nb[2], q->nb[2]*(q->ne[2]/n_stream), 0);
    return ggml_permute(ctx, q, 0, 2, 1, 3);
}

ggml_tensor * llama_se_build_fattn(
        ggml_context * ctx,
        const llama_se_attn & se,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq_mask,
        float kq_scale,
        float softcap) {
    GGML_ASSERT(se.pos_q && v->nb[0] == ggml_type_size(v->type)); // flash attention: V not transposed
    ggml_tensor * qg   = se_q_streams(ctx, se.q, k->ne[3]);
    ggml_tensor * mask = se.causal ? nullptr : kq_mask;
    ggml_tensor * op   = nullptr;
    if (se.n_group > 0) {
        op = ggml_flash_attn_ext_se_steps(ctx, q, k, v, mask, qg, se.k, se.rope_mode, se.n_group, se.n_lo, se.pos_q,
                                          se.pos_k, se.n_window, kq_scale, softcap);
    } else if (se.rope_mode >= 0) {
        op = ggml_flash_attn_ext_se_rot(ctx, q, k, v, mask, qg, ggml_permute(ctx, se.k, 0, 2, 1, 3), se.rope_mode,
                                        se.pos_q, se.pos_k, se.n_window, kq_scale, softcap);
    } else {
        op = ggml_flash_attn_ext_se(ctx, q, k, v, mask, qg, ggml_permute(ctx, se.k, 0, 2, 1, 3), se.pos_q, se.pos_k,
                                    se.n_window, kq_scale, softcap);
    }
    if (se.q_rot) {
        ggml_flash_attn_ext_se_q_rot(op);
    }
    if (se.causal) {
        ggml_flash_attn_ext_se_causal(op);
    }
    return op;
}

ggml_tensor * llama_se_merge_kq(ggml_context * ctx, const llama_se_attn & se, ggml_tensor * kq) {
    // same stream split and permutes as build_attn_mha applies to q and k
    ggml_tensor * q = se_q_streams(ctx, se.q, se.k->ne[3]);
    ggml_tensor * k = ggml_permute(ctx, se.k, 0, 2, 1, 3);

    ggml_tensor * kq_g = ggml_mul_mat(ctx, k, q); // [n_kv, n_tps, n_head, n_stream]
    ggml_prec_set_acc(kq_g, GGML_PREC_F32);

    kq   = ggml_mul_inplace(ctx, kq,   se.nbr);
    kq_g = ggml_mul_inplace(ctx, kq_g, se.grp);
    return ggml_add_inplace(ctx, kq, kq_g);
}
