#pragma once

// Self-Extend's state per KV cache (the grouped keys, or what the kernels rotate K by) and the helpers that the C API
// (llama-self-extend.cpp), the graph (llama-self-extend-graph.cpp) and the cache's upkeep (llama-self-extend-kcache.cpp)
// share.

#include "llama-self-extend.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <complex>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

// Self-Extend's grouped keys of one KV cache: every cached key rotated on to its grouped position j/G, written
// once, when the key is stored. The fused path reads them instead of rotating the whole cache every ubatch;
// they cost one more K cache of memory (f16, or f32 for an f32 cache). A cell whose key moves or is replaced
// (K-shift, stream copy, state load) goes stale, all of them when the setting changes; the next ubatch of its
// stream rotates the stale cells' keys again from K, so one sequence's shift or restore costs the others nothing.
//
// Rotation-table form (the backends' kernels make the grouped keys from K themselves): instead of one grouped K per
// layer, one table per cache, [n_rot, kv_size, n_stream] of the grouped keys' type (F16, or F32 for an f32 K), whose
// row for a cell holds the cos/sin that rotate a key roped at its position p on to p/G (ggml-self-extend.h). Every
// layer and head shares it, so it costs n_rot values per cell instead of a second K cache; the rows are computed on
// the host, in double precision, for the cells each ubatch writes (and the stale ones), and stored with set_rows like
// the grouped keys.
//
// Steps form (ggml_flash_attn_ext_se_steps, where every device has it): the kernels compose each key's row from two
// rows of a small table of steps; nothing is kept per cell, so the context's memory is vanilla's and nothing goes
// stale. The table, which depends on the RoPE parameters alone, is made once and kept next to the first Self-Extend
// layer's K, sized for positions up to the cache's size (0.06 MiB for SmolLM2 at 16K, about 1 MiB for Gemma 3 at 128K);
// a graph whose positions go past it takes a larger table as an input instead. (As an input of every graph it was
// uploaded with every ubatch: 64-200 KB per decode step at 8K-32K, sent to each device or RPC server.)
enum class se_keys : int32_t { // the C API's values (llama_self_extend_keys), so that a form converts by a cast
    cache = LLAMA_SELF_EXTEND_KEYS_CACHE, // the grouped keys, one more K per layer
    table = LLAMA_SELF_EXTEND_KEYS_TABLE, // the rotation table, a row per cell
    steps = LLAMA_SELF_EXTEND_KEYS_STEPS, // a table of steps
};

struct llama_se_kcache {
    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
    std::vector<ggml_tensor *>           k_g;     // per KV layer, as llama_kv_cache::layers: [n_embd_k_gqa, kv_size, n_stream]
    ggml_tensor *                        tab = nullptr; // table form (k_g empty): [n_rot, kv_size, n_stream]
    ggml_tensor *                        steps = nullptr; // steps form: the table of steps kept, [n_rot, steps_rows(kv_size)]
    se_keys                              form = se_keys::cache;
    int32_t                              n_rot = 0;     // table and steps: the rotated dimensions of a row
    int32_t                              rope_mode = 0; // table and steps: the pairs' layout (LLAMA_ROPE_TYPE_NORM/NEOX)
    std::vector<double>                  freq;          // table and steps: [n_rot/2] angle of each pair per position step
    std::vector<float>                   step_rows;     // steps: the table as last made, [n_rows][n_rot]
    // table form, host side: e^{i m f} of every pair for m = r < SE_ROT_B and m = q*SE_ROT_B (grown as needed), so that
    // a row is one complex product per pair (m = q*SE_ROT_B + r) instead of a cos and a sin: those took 0.7 ms of host
    // time per 512-token ubatch for a 128-dimension head, time that every prefill waited for
    static constexpr int64_t             SE_ROT_B = 1024;
    std::vector<std::complex<double>>    rot_lo, rot_hi; // [SE_ROT_B][n_rot/2], [q][n_rot/2]
    std::vector<std::vector<uint8_t>>    stale;   // [n_stream][kv_size]: 1 where the grouped key must be rebuilt
    std::map<ggml_backend_buffer_type_t, size_t> bytes; // per buffer type (also for a no_alloc measuring context)
    std::vector<uint32_t>                n_stale; // [n_stream]: cells flagged

    void mark(uint32_t s, uint32_t cell) {
        if (!stale[s][cell]) {
            stale[s][cell] = 1;
            n_stale[s]++;
        }
    }
    void mark_all(uint32_t s) {
        std::fill(stale[s].begin(), stale[s].end(), 1);
        n_stale[s] = stale[s].size();
    }
    void clear(uint32_t s) {
        if (n_stale[s]) {
            std::fill(stale[s].begin(), stale[s].end(), 0);
            n_stale[s] = 0;
        }
    }

    // table form: the row of a cell whose key is rotated by shift positions (grouped - true position, <= 0 but for
    // negative positions): cos and sin of shift*f per pair, pairs interleaved (NORM) or cos then sin halves (NEOX)
    void rot_row(int64_t shift, float * out) {
        const int64_t half = (int64_t) freq.size();
        const bool    neox = rope_mode == LLAMA_ROPE_TYPE_NEOX;
        auto put = [&](int64_t i, double c, double s) {
            out[neox ? i        : 2*i]     = (float) c;
            out[neox ? i + half : 2*i + 1] = (float) s;
        };
        if (shift > 0 || -shift >= SE_ROT_B*SE_ROT_B) { // negative positions, or past a million: directly
            for (int64_t i = 0; i < half; ++i) {
                put(i, std::cos(shift*freq[i]), std::sin(shift*freq[i]));
            }
            return;
        }
        const int64_t m = -shift, q = m/SE_ROT_B, r = m%SE_ROT_B; // e^{i shift f} = conj(e^{i q B f} e^{i r f})
        auto powers = [&](std::vector<std::complex<double>> & t, int64_t n, int64_t step) {
            for (int64_t k = (int64_t) t.size()/half; k < n; ++k) {
                for (int64_t i = 0; i < half; ++i) {
                    t.push_back(std::polar(1.0, double(k*step)*freq[i]));
                }
            }
        };
        powers(rot_lo, SE_ROT_B, 1);
        powers(rot_hi, q + 1, SE_ROT_B);
        const std::complex<double> * hi = &rot_hi[q*half], * lo = &rot_lo[r*half];
        for (int64_t i = 0; i < half; ++i) {
            const std::complex<double> e = hi[i]*lo[i];
            put(i, e.real(), -e.imag());
        }
    }

    // steps form: the table of n_rows rows (ggml_flash_attn_ext_se_steps): back by r < SE_STEP_LO positions, then by
    // multiples of SE_STEP_LO. The same for every ubatch until n_rows changes, so it is made once.
    const float * steps_table(int64_t n_rows) {
        if ((int64_t) step_rows.size() != n_rows*n_rot) {
            step_rows.resize(n_rows*n_rot);
            for (int64_t r = 0; r < n_rows; ++r) {
                rot_row(r < SE_STEP_LO ? -r : -(r - SE_STEP_LO)*SE_STEP_LO, &step_rows[r*n_rot]);
            }
        }
        return step_rows.data();
    }

    // steps form: the single-position steps. A decode step rotates each grouped key by one of these rows, so they
    // must stay in the caches next to the K/V rows streaming past: 128 rows are 32 KiB for a 64-dimension head, 128 KiB
    // for 256; the queries are rotated by the larger step, again every 128 positions. (The CUDA decode kernel keeps
    // up to 128 of them in shared memory, FATTN_SE_STEPS_LO_MAX; with more it would rotate K into a scratch first.)
    static constexpr int64_t             SE_STEP_LO = 128;

    // steps form: the rows of a table of steps that covers positions below n_pos (at least one larger step)
    static int64_t steps_rows(int64_t n_pos) {
        return SE_STEP_LO + std::max<int64_t>(1, (n_pos + SE_STEP_LO - 1)/SE_STEP_LO);
    }
};

// the one friend of the upstream classes whose internals we read
struct llama_se_access {
    static llama_cparams & cparams(llama_context & ctx)             { return ctx.cparams; }
    static const llama_cparams & cparams(const llama_context & ctx) { return ctx.cparams; }
    static void            need_reserve(llama_context & ctx)         { ctx.sched_need_reserve = true; }
    static const llama_kv_cache * kv(const llama_kv_cache_context * m) { return m->kv; }
    static uint32_t        stream0(const llama_kv_cache_context * m) { return m->sinfos[m->i_cur].s0; }
    static const llama_model & model(const llama_kv_cache * kv)     { return kv->model; }
    static const llama_kv_cells & cells(const llama_kv_cache * kv, uint32_t s) { return kv->v_cells[s]; }
    static llama_swa_type  swa_type(const llama_kv_cache * kv)       { return kv->swa_type; }
    static uint32_t        stream_of(const llama_kv_cache * kv, llama_seq_id seq) { return kv->seq_to_stream[seq]; }
    static const auto &    layers(const llama_kv_cache * kv)        { return kv->layers; }
    static int32_t         layer_index(const llama_kv_cache * kv, int32_t il) { return kv->map_layer_ids.at(il); }
    static uint32_t        stream1(const llama_kv_cache_context * m) { return m->sinfos[m->i_cur].s1; }
    static const llama_kv_cache::slot_info & sinfo(const llama_kv_cache_context * m) { return m->sinfos[m->i_cur]; }
    static std::shared_ptr<llama_se_kcache> & kcache(llama_kv_cache * kv)   { return kv->se_kcache; }
    static llama_se_kcache * kcache(const llama_kv_cache * kv)              { return kv->se_kcache.get(); }
};

// the grouped keys or table rows that a cache keeps per cell; null where it keeps none (Self-Extend off, or steps)
inline llama_se_kcache * se_per_cell(const llama_kv_cache * kv) {
    llama_se_kcache * kc = llama_se_access::kcache(kv);
    return kc && kc->form != se_keys::steps ? kc : nullptr;
}

// Whether layer il takes Self-Extend: a RoPE layer that may see distances past the trained context. A sliding-window
// layer whose window fits the trained context (Gemma 2/3, Cohere 2, ...) never sees such a distance (the mask hides keys
// n_swa or more behind the query), so it stays vanilla: exact as it is, and no grouped keys are kept for it.
inline bool se_layer_applies(const llama_hparams & hp, int32_t il) {
    return hp.has_rope(il) && !(hp.is_swa(il) && hp.n_swa <= hp.n_ctx_train);
}

// whether some layer of the cache takes Self-Extend (an iSWA context's SWA cache holds only sliding-window layers)
inline bool se_cache_applies(const llama_kv_cache * kv) {
    const llama_hparams & hp = llama_se_access::model(kv).hparams;
    for (const auto & layer : llama_se_access::layers(kv)) {
        if (se_layer_applies(hp, layer.il)) {
            return true;
        }
    }
    return false;
}

// grouped positions: neighbour window W, group size G
inline llama_pos se_q_pos(llama_pos i, int32_t G, int32_t W) { return i/G + W - W/G; }
inline llama_pos se_k_pos(llama_pos j, int32_t G)            { return j/G; }

// the type of a layer's grouped keys: f32 for an f32 K cache, else f16 (also for a quantized K)
inline ggml_type se_grouped_key_type(const ggml_tensor * k) {
    return k->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

// Whether a cache can take the rotation-table or steps form (llama-self-extend-kcache.cpp)
bool se_table_form_fits(const llama_kv_cache * kv, const llama_cparams & cparams);

// allocates the grouped keys (or, table form, the rotation table; steps form: nothing) of a cache next to its K
// tensors (same buffer types); false when out of memory
bool se_kcache_alloc(llama_kv_cache * kv, const llama_cparams & cparams, se_keys form);

// whether the streams of mctx's ubatch have stale grouped keys
bool se_kcache_stale(const llama_kv_cache_context * mctx);

// Calls f(row, pos) for each stale cell of the ubatch's streams that holds a key and that the ubatch does not
// overwrite (those keys go through the ubatch's own grouped-key write): row = stream*kv_size + cell, as in K.
template <typename F>
inline void se_kcache_for_stale(const llama_kv_cache_context * mctx, F f) {
    const llama_kv_cache * kv = llama_se_access::kv(mctx);
    const llama_se_kcache * kc = llama_se_access::kcache(kv);
    const auto & sinfo = llama_se_access::sinfo(mctx);
    std::vector<uint8_t> mine;
    for (uint32_t s = llama_se_access::stream0(mctx); s <= llama_se_access::stream1(mctx); ++s) {
        if (!kc->n_stale[s]) {
            continue;
        }
        const llama_kv_cells & cells = llama_se_access::cells(kv, s);
        mine.assign(cells.size(), 0);
        for (size_t k = 0; k < sinfo.strm.size() && k < sinfo.idxs.size(); ++k) {
            if ((uint32_t) sinfo.strm[k] == s) {
                for (uint32_t i : sinfo.idxs[k]) {
                    mine[i] = 1;
                }
            }
        }
        for (uint32_t i = 0; i < cells.size(); ++i) {
            if (kc->stale[s][i] && !mine[i] && !cells.is_empty(i)) {
                f((int64_t) s*cells.size() + i, cells.pos_get(i));
            }
        }
    }
}
