// Self-Extend: the C API and the attention-graph pieces called from the hooks in llama-graph.cpp.
//
// Per layer, the neighbour logits are the layer's own (cached keys carry RoPE at their true position j, the
// queries at i). The grouped logits come from the same tensors rotated further, the way llama.cpp's K-shift
// rotates cached keys: queries by (i/G + W - W/G) - i, keys by j/G - j. A rotation composes exactly with the
// one already applied (same frequencies, same YaRN ramp), so these are RoPE at the grouped positions. Both
// logit sets are merged with 0/1 masks, then the usual softmax and V product run once.

#include "llama-self-extend.h"
#include "llama-self-extend-impl.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-self-extend.h"

#include <cmath>
#include <algorithm>
#include <complex>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>

#ifndef SELFEXT_LLAMA_CPP_COMMIT
#define SELFEXT_LLAMA_CPP_COMMIT "unknown"
#endif

// Self-Extend's grouped keys of one KV cache: every cached key rotated on to its grouped position j/G, written
// once, when the key is stored. The fused path reads them instead of rotating the whole cache every ubatch;
// they cost one more K cache of memory (f16, or f32 for an f32 cache). A cell whose key moves or is replaced
// (K-shift, stream copy, state load) goes stale, all of them when the setting changes; the next ubatch of its
// stream rotates the stale cells' keys again from K, so one sequence's shift or restore costs the others nothing.
//
// Rotation-table form (the backends' kernels make the grouped keys from K themselves): instead of one grouped K per
// layer, one table per cache, F32 [n_rot, kv_size, n_stream], whose row for a cell holds the cos/sin that rotate a
// key roped at its position p on to p/G (ggml-self-extend.h). Every layer and head shares it, so it costs n_rot
// floats per cell instead of a second K cache; the rows are computed on the host, in double precision, for the
// cells each ubatch writes (and the stale ones), and stored with set_rows like the grouped keys.
//
// Steps form (ggml_flash_attn_ext_se_steps, where every device has it): the kernels compose each key's row from two
// rows of a small table of steps; nothing is kept per cell, so the context's memory is vanilla's and nothing goes
// stale. The table, which depends on the RoPE parameters alone, is made once and kept next to the first Self-Extend
// layer's K, sized for positions up to the cache's size (0.06 MiB for SmolLM2 at 16K, about 1 MiB for Gemma 3 at 128K);
// a graph whose positions go past it takes a larger table as an input instead. (As an input of every graph it was
// uploaded with every ubatch: 64-200 KB per decode step at 8K-32K, sent to each device or RPC server.)
enum class se_keys {
    cache, // the grouped keys, one more K per layer
    table, // the rotation table, a row per cell
    steps, // a table of steps
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
    static uint32_t        stream_of(const llama_kv_cache * kv, llama_seq_id seq) { return kv->seq_to_stream[seq]; }
    static const auto &    layers(const llama_kv_cache * kv)        { return kv->layers; }
    static int32_t         layer_index(const llama_kv_cache * kv, int32_t il) { return kv->map_layer_ids.at(il); }
    static uint32_t        stream1(const llama_kv_cache_context * m) { return m->sinfos[m->i_cur].s1; }
    static const llama_kv_cache::slot_info & sinfo(const llama_kv_cache_context * m) { return m->sinfos[m->i_cur]; }
    static std::shared_ptr<llama_se_kcache> & kcache(llama_kv_cache * kv)   { return kv->se_kcache; }
    static llama_se_kcache * kcache(const llama_kv_cache * kv)              { return kv->se_kcache.get(); }
};

// the grouped keys or table rows that a cache keeps per cell; null where it keeps none (Self-Extend off, or steps)
static llama_se_kcache * se_per_cell(const llama_kv_cache * kv) {
    llama_se_kcache * kc = llama_se_access::kcache(kv);
    return kc && kc->form != se_keys::steps ? kc : nullptr;
}

// Whether layer il takes Self-Extend: a RoPE layer that may see distances past the trained context. A sliding-window
// layer whose window fits the trained context (Gemma 2/3, Cohere 2, ...) never sees such a distance (the mask hides keys
// n_swa or more behind the query), so it stays vanilla: exact as it is, and no grouped keys are kept for it.
static bool se_layer_applies(const llama_hparams & hp, int32_t il) {
    return hp.has_rope(il) && !(hp.is_swa(il) && hp.n_swa <= hp.n_ctx_train);
}

// whether some layer of the cache takes Self-Extend (an iSWA context's SWA cache holds only sliding-window layers)
static bool se_cache_applies(const llama_kv_cache * kv) {
    const llama_hparams & hp = llama_se_access::model(kv).hparams;
    for (const auto & layer : llama_se_access::layers(kv)) {
        if (se_layer_applies(hp, layer.il)) {
            return true;
        }
    }
    return false;
}

// grouped positions: neighbour window W, group size G
static llama_pos se_q_pos(llama_pos i, int32_t G, int32_t W) { return i/G + W - W/G; }
static llama_pos se_k_pos(llama_pos j, int32_t G)            { return j/G; }

//
// C API
//

int32_t llama_self_extend_api_version(void) {
    return LLAMA_SELF_EXTEND_API_VERSION;
}

const char * llama_self_extend_upstream_commit(void) {
    return SELFEXT_LLAMA_CPP_COMMIT;
}

const char * llama_self_extend_status_str(int32_t status) {
    switch (status) {
        case LLAMA_SELF_EXTEND_OK:              return "ok";
        case LLAMA_SELF_EXTEND_ERR_INVALID_ARG: return "invalid argument: need ga_n >= 1 and ga_w >= 1";
        case LLAMA_SELF_EXTEND_ERR_NO_ROPE:     return "the model has no rotary position embedding";
        case LLAMA_SELF_EXTEND_ERR_ROPE_TYPE:   return "the model's multi-section RoPE (M-RoPE/vision) is not supported";
        case LLAMA_SELF_EXTEND_ERR_MEMORY:      return "the model's memory is not a plain KV cache (recurrent or hybrid)";
        case LLAMA_SELF_EXTEND_ERR_ARCH:        return "the model's architecture is not covered by Self-Extend";
        default:                                return "unknown status";
    }
}

// architectures whose attention goes through build_attn with a KV cache (plain or iSWA) and plain RoPE on q/k,
// without position-dependent query scaling
static bool se_arch_covered(llm_arch arch) {
    switch (arch) {
        case LLM_ARCH_LLAMA:
        case LLM_ARCH_QWEN2:
        case LLM_ARCH_QWEN2MOE:
        case LLM_ARCH_QWEN3:
        case LLM_ARCH_QWEN3MOE:
        case LLM_ARCH_PHI3:
        case LLM_ARCH_GEMMA:
        case LLM_ARCH_GEMMA2:
        case LLM_ARCH_GEMMA3:
        case LLM_ARCH_GRANITE:
        case LLM_ARCH_STARCODER2:
        case LLM_ARCH_OLMO:
        case LLM_ARCH_OLMO2:
        case LLM_ARCH_INTERNLM2:
        case LLM_ARCH_STABLELM:
        case LLM_ARCH_EXAONE:
        case LLM_ARCH_COHERE2:
        case LLM_ARCH_SMOLLM3:
        case LLM_ARCH_ERNIE4_5:
        case LLM_ARCH_SEED_OSS:
        case LLM_ARCH_APERTUS:
            return true;
        default:
            return false;
    }
}

int32_t llama_model_self_extend_support(const llama_model * model) {
    if (!model) {
        return LLAMA_SELF_EXTEND_ERR_INVALID_ARG;
    }
    const auto & hp = model->hparams;
    switch (hp.rope_type) {
        case LLAMA_ROPE_TYPE_NORM:
        case LLAMA_ROPE_TYPE_NEOX:
            break;
        case LLAMA_ROPE_TYPE_NONE:
            return LLAMA_SELF_EXTEND_ERR_NO_ROPE;
        default:
            return LLAMA_SELF_EXTEND_ERR_ROPE_TYPE;
    }
    if (!se_arch_covered(model->arch) || hp.n_lora_kv > 0 || hp.use_alibi) {
        return LLAMA_SELF_EXTEND_ERR_ARCH;
    }
    return LLAMA_SELF_EXTEND_OK;
}

// the KV caches of a context's memory (one, or base + SWA)
static std::vector<const llama_kv_cache *> se_kv_caches(const llama_context & ctx) {
    llama_memory_t mem = ctx.get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return { kv };
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return { iswa->get_base(), iswa->get_swa() };
    }
    return {};
}

// The RoPE parameters of layer il's extra rotation, as se_rotate passes them to ggml_rope_ext
struct se_rope_params {
    int32_t       n_rot;
    float         freq_base, freq_scale;
    ggml_tensor * factors;

    se_rope_params(const llama_model & model, const llama_cparams & cparams, int il)
        : n_rot(model.hparams.n_rot(il)),
          freq_base (model.hparams.is_swa(il) ? model.hparams.rope_freq_base_train_swa  : cparams.rope_freq_base),
          freq_scale(model.hparams.is_swa(il) ? model.hparams.rope_freq_scale_train_swa : cparams.rope_freq_scale),
          factors(model.get_rope_factors(cparams, il)) {}

    bool operator==(const se_rope_params & o) const {
        return n_rot == o.n_rot && freq_base == o.freq_base && freq_scale == o.freq_scale && factors == o.factors;
    }

    // the angle of each rotated pair per position step: ggml's rope (rope_yarn, ggml_rope_cache_init) is linear in
    // the position per pair, with this slope
    std::vector<double> freq(const llama_cparams & cparams) const {
        std::vector<float> ff(n_rot/2, 1.0f);
        if (factors && factors->buffer) { // (a context that only measures memory has no weights)
            ggml_backend_tensor_get(factors, ff.data(), 0, std::min(ggml_nbytes(factors), ff.size()*sizeof(float)));
        }
        float corr[2];
        ggml_rope_yarn_corr_dims(n_rot, cparams.n_ctx_orig_yarn, freq_base, cparams.yarn_beta_fast,
                                 cparams.yarn_beta_slow, corr);
        std::vector<double> out(n_rot/2);
        for (int32_t i = 0; i < n_rot/2; ++i) {
            const double extrap = std::pow((double) freq_base, -2.0*i/n_rot)/ff[i];
            double mix = 0.0; // ggml's rope_yarn_ramp(corr, i0 = 2i) * ext_factor
            if (cparams.yarn_ext_factor != 0.0f) {
                const double y = (i - corr[0])/std::max(0.001f, corr[1] - corr[0]);
                mix = (1.0 - std::min(1.0, std::max(0.0, y)))*cparams.yarn_ext_factor;
            }
            out[i] = extrap*(freq_scale*(1.0 - mix) + mix);
        }
        return out;
    }
};

// Whether a cache can take the rotation-table or steps form: K not quantized (a quantized K may carry llama.cpp's Hadamard
// rotation, which the kernels do not undo) and one set of RoPE parameters for all its Self-Extend layers.
static bool se_table_form_fits(const llama_kv_cache * kv, const llama_cparams & cparams) {
    const llama_model & model = llama_se_access::model(kv);
    std::unique_ptr<se_rope_params> first;
    for (const auto & layer : llama_se_access::layers(kv)) {
        if (!se_layer_applies(model.hparams, layer.il)) {
            continue;
        }
        const se_rope_params rp(model, cparams, layer.il);
        if (ggml_is_quantized(layer.k->type) || (first && !(rp == *first))) {
            return false;
        }
        if (!first) {
            first = std::make_unique<se_rope_params>(rp);
        }
    }
    return first != nullptr;
}

// the type of a layer's grouped keys: f32 for an f32 K cache, else f16 (also for a quantized K)
static ggml_type se_grouped_key_type(const ggml_tensor * k) {
    return k->type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
}

// allocates the grouped keys (or, table form, the rotation table; steps form: nothing) of a cache next to its K
// tensors (same buffer types); false when out of memory
static bool se_kcache_alloc(llama_kv_cache * kv, const llama_cparams & cparams, se_keys form) {
    auto kc = std::make_shared<llama_se_kcache>();
    kc->form = form;
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    auto ctx_for = [&](ggml_backend_buffer_type_t buft) { // a context per buffer type that receives a tensor
        if (!ctx_of.count(buft)) {
            ggml_init_params ip = { llama_se_access::layers(kv).size()*ggml_tensor_overhead(), nullptr, true };
            kc->ctxs.emplace_back(ggml_init(ip));
            ctx_of[buft] = kc->ctxs.back().get();
        }
        return ctx_of[buft];
    };
    const llama_model & model = llama_se_access::model(kv);
    for (const auto & layer : llama_se_access::layers(kv)) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        if (form != se_keys::cache) {
            if (!kc->n_rot && se_layer_applies(model.hparams, layer.il)) { // next to the first Self-Extend layer's K
                const se_rope_params rp(model, cparams, layer.il);
                if (form == se_keys::table) {
                    kc->tab = ggml_new_tensor_3d(ctx_for(buft), GGML_TYPE_F32, rp.n_rot, layer.k->ne[1], layer.k->ne[2]);
                    ggml_set_name(kc->tab, "se_k_rot");
                } else {
                    kc->steps = ggml_new_tensor_2d(ctx_for(buft), GGML_TYPE_F32, rp.n_rot,
                                                   llama_se_kcache::steps_rows(layer.k->ne[1]));
                    ggml_set_name(kc->steps, "se_k_steps_kept");
                }
                kc->n_rot     = rp.n_rot;
                kc->rope_mode = model.hparams.rope_type;
                kc->freq      = rp.freq(cparams);
            }
            continue;
        }
        ggml_tensor * t = ggml_new_tensor_3d(ctx_for(buft), se_grouped_key_type(layer.k), layer.k->ne[0], layer.k->ne[1],
                                             layer.k->ne[2]);
        ggml_format_name(t, "se_k_grouped_l%d", layer.il);
        kc->k_g.push_back(t);
    }
    size_t total = 0;
    const bool no_alloc = llama_se_access::model(kv).hparams.no_alloc; // a context that only measures memory (--fit)
    for (auto & [buft, c] : ctx_of) {
        ggml_backend_buffer_t buf;
        size_t size;
        if (no_alloc) {
            size = ggml_backend_alloc_ctx_tensors_from_buft_size(c, buft);
            buf  = ggml_backend_buft_alloc_buffer(buft, 0); // dummy, as the KV cache's own
            for (ggml_tensor * t = ggml_get_first_tensor(c); t != nullptr; t = ggml_get_next_tensor(c, t)) {
                t->buffer = buf;
            }
        } else {
            buf  = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
            size = buf ? ggml_backend_buffer_get_size(buf) : 0;
        }
        if (!buf) {
            LLAMA_LOG_WARN("%s: cannot allocate Self-Extend's grouped keys in %s\n", __func__, ggml_backend_buft_name(buft));
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        total += size;
        kc->bytes[buft] += size;
        kc->bufs.emplace_back(buf);
    }
    if (kc->steps && !no_alloc) {
        ggml_backend_tensor_set(kc->steps, kc->steps_table(kc->steps->ne[1]), 0, ggml_nbytes(kc->steps));
    }
    const ggml_tensor * some = kc->tab ? kc->tab : kc->k_g.empty() ? nullptr : kc->k_g[0];
    const uint32_t n_stream = some ? some->ne[2] : 0;
    const uint32_t kv_size  = some ? some->ne[1] : 0;
    kc->stale.assign(n_stream, std::vector<uint8_t>(kv_size, 1)); // nothing built yet
    kc->n_stale.assign(n_stream, kv_size);
    const char * what = form == se_keys::cache ? "grouped keys" : form == se_keys::table ?
        "grouped-key rotations (one table, kernels rotate K)" : "grouped-key rotations (steps, kernels rotate K)";
    LLAMA_LOG_INFO("%s: %s: %.2f MiB\n", __func__, what, total/1024.0/1024.0);
    llama_se_access::kcache(kv) = std::move(kc);
    return true;
}

void llama_se_kcache_invalidate(const llama_kv_cache & kv) {
    if (llama_se_kcache * kc = se_per_cell(&kv)) {
        for (uint32_t s = 0; s < kc->stale.size(); ++s) {
            kc->mark_all(s);
        }
    }
}

void llama_se_kcache_moved(const llama_kv_cache & kv, bool do_shift, const std::vector<uint32_t> & sdst) {
    llama_se_kcache * kc = se_per_cell(&kv);
    if (!kc) {
        return;
    }
    for (uint32_t s : sdst) {
        kc->mark_all(s); // a copied stream: every cell new
    }
    if (!do_shift) {
        return;
    }
    for (uint32_t s = 0; s < kc->stale.size(); ++s) {
        const llama_kv_cells & cells = llama_se_access::cells(&kv, s);
        if (!cells.get_has_shift()) {
            continue;
        }
        for (uint32_t i = 0; i < cells.size(); ++i) {
            if (!cells.is_empty(i) && cells.get_shift(i) != 0) {
                kc->mark(s, i);
            }
        }
    }
}

void llama_se_kcache_loaded(const llama_kv_cache & kv, uint32_t strm, const std::vector<uint32_t> & cells) {
    if (llama_se_kcache * kc = se_per_cell(&kv)) {
        for (uint32_t i : cells) {
            kc->mark(strm, i);
        }
    }
}

void llama_se_kcache_memory_breakdown(const llama_kv_cache & kv, std::map<ggml_backend_buffer_type_t, size_t> & ret) {
    if (const llama_se_kcache * kc = llama_se_access::kcache(&kv)) {
        for (const auto & [buft, size] : kc->bytes) {
            ret[buft] += size;
        }
    }
}

// whether the streams of mctx's ubatch have stale grouped keys
static bool se_kcache_stale(const llama_kv_cache_context * mctx) {
    const llama_se_kcache * kc = se_per_cell(llama_se_access::kv(mctx));
    if (!kc) {
        return false;
    }
    for (uint32_t s = llama_se_access::stream0(mctx); s <= llama_se_access::stream1(mctx); ++s) {
        if (kc->n_stale[s]) {
            return true;
        }
    }
    return false;
}

// Calls f(row, pos) for each stale cell of the ubatch's streams that holds a key and that the ubatch does not
// overwrite (those keys go through the ubatch's own grouped-key write): row = stream*kv_size + cell, as in K.
template <typename F>
static void se_kcache_for_stale(const llama_kv_cache_context * mctx, F f) {
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

// the device whose memory holds a cache tensor (the CPU for the CPU buffer type, which names no device), or null
static ggml_backend_dev_t se_buffer_device(const ggml_tensor * t) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    return dev || !ggml_backend_buft_is_host(buft) ? dev : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

// whether the device of every Self-Extend KV layer runs GGML_OP_FLASH_ATTN_EXT_SE for that layer's shapes and cache
// types, in the given form of the grouped keys
static bool se_fused_supported(llama_context & ctx, se_keys form) {
    const llama_hparams & hp = ctx.get_model().hparams;
    const bool table = form != se_keys::cache;
    for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
        if (table && se_cache_applies(kv) && !se_table_form_fits(kv, llama_se_access::cparams(ctx))) {
            return false;
        }
        for (const auto & layer : llama_se_access::layers(kv)) {
            if (!se_layer_applies(hp, layer.il)) {
                continue; // runs llama.cpp's own attention
            }
            ggml_init_params ip = { 16*ggml_tensor_overhead(), nullptr, true };
            ggml_context_ptr tmp { ggml_init(ip) };
            ggml_context * c = tmp.get();
            const int64_t dk = hp.n_embd_head_k(layer.il), dv = hp.n_embd_head_v(layer.il);
            const int64_t nh = hp.n_head(layer.il), nkv = hp.n_head_kv(layer.il), n = 256;
            ggml_tensor * q   = ggml_new_tensor_3d(c, GGML_TYPE_F32, dk, 1, nh);
            ggml_tensor * k   = ggml_new_tensor_3d(c, layer.k->type, dk, n, nkv);
            ggml_tensor * v   = ggml_new_tensor_3d(c, layer.v->type, dv, n, nkv);
            ggml_tensor * m   = ggml_new_tensor_2d(c, GGML_TYPE_F16, n, 1);
            ggml_tensor * q_g = ggml_new_tensor_3d(c, GGML_TYPE_F32, dk, 1, nh);
            ggml_tensor * p_q = ggml_new_tensor_1d(c, GGML_TYPE_I32, 1);
            ggml_tensor * p_k = ggml_new_tensor_1d(c, GGML_TYPE_I32, n);
            std::vector<ggml_tensor *> ops;
            if (form == se_keys::table) {
                // with the grouped queries (a RoPE node), and with the queries' rows of the table (what the graph builds)
                const int64_t n_rot = hp.n_rot(layer.il);
                ggml_tensor * k_rot = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_rot, n);
                ggml_tensor * q_rot = ggml_new_tensor_3d(c, GGML_TYPE_F32, n_rot, 1, 1);
                ops.push_back(ggml_flash_attn_ext_se_rot(c, q, k, v, m, q_g, k_rot, hp.rope_type, p_q, p_k, 1, 1.0f, 0.0f));
                ops.push_back(ggml_flash_attn_ext_se_rot(c, q, k, v, m, q_rot, k_rot, hp.rope_type, p_q, p_k, 1, 1.0f, 0.0f));
                ggml_flash_attn_ext_se_q_rot(ops.back());
            } else if (form == se_keys::steps) {
                // with the queries' rows of the table, as the graph builds it
                const int64_t n_rot = hp.n_rot(layer.il), n_lo = llama_se_kcache::SE_STEP_LO;
                ggml_tensor * k_steps = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_rot, n_lo + 2);
                ggml_tensor * q_rot   = ggml_new_tensor_3d(c, GGML_TYPE_F32, n_rot, 1, 1);
                ops.push_back(ggml_flash_attn_ext_se_steps(c, q, k, v, m, q_rot, k_steps, hp.rope_type, 2, n_lo, p_q, p_k,
                                                           1, 1.0f, 0.0f));
                ggml_flash_attn_ext_se_q_rot(ops.back());
            } else {
                ggml_tensor * k_g = ggml_new_tensor_3d(c, se_grouped_key_type(layer.k), dk, n, nkv);
                ops.push_back(ggml_flash_attn_ext_se(c, q, k, v, m, q_g, k_g, p_q, p_k, 1, 1.0f, 0.0f));
            }
            ggml_backend_dev_t dev = se_buffer_device(layer.k);
            for (ggml_tensor * op : ops) {
                if (!dev || !ggml_backend_dev_supports_op(dev, op)) {
                    return false;
                }
            }
        }
    }
    return true;
}

// Between the table and the cache, where auto does not take the steps form (se_keys_form): it takes the table, which
// costs n_rot floats per cell where the cache costs one more K, unless
//  - a Self-Extend layer's K lives on a device and its RoPE does not turn the whole head: the CUDA decode kernel rotates
//    the keys by the table as it loads them only for a whole head, else every decode step would rotate the whole K view
//    into a scratch first (0.69-0.85 of vanilla's decode at 32K on an H200; with the rotation in the kernel 0.92-1.00,
//    as with the cache; docs/RESULTS.md 4.5). The table's price on CUDA is that scratch in prefill, once per op: about
//    2 % of a whole document's prefill at 512-token ubatches, where the cache costs 1.2-1.5x vanilla's memory.
//  - the table is more than half the grouped keys' size: a decode reads the table next to K, which costs more than
//    reading the grouped keys once the table is as large as they are (Gemma 3 270M on 2 cores, a 64K document: 1 KiB of
//    table per cell against 1.5 KiB of grouped keys; decode 0.80 of vanilla with the table, 1.09 with the grouped keys;
//    RESULTS 7.1).
static bool se_prefer_table(llama_context & ctx) {
    const llama_hparams & hp = ctx.get_model().hparams;
    for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
        size_t table = 0; // bytes per cell: the table's, and the grouped keys' of all layers
        size_t keys  = 0;
        for (const auto & layer : llama_se_access::layers(kv)) {
            if (!se_layer_applies(hp, layer.il)) {
                continue;
            }
            if (!ggml_backend_buffer_is_host(layer.k->buffer) && hp.n_rot(layer.il) != hp.n_embd_head_k(layer.il)) {
                return false;
            }
            table = std::max<size_t>(table, hp.n_rot(layer.il)*sizeof(float));
            keys += ggml_row_size(se_grouped_key_type(layer.k), layer.k->ne[0]);
        }
        if (2*table > keys) {
            return false;
        }
    }
    return true;
}

// Whether a Self-Extend layer's K lives on a GPU of this host (not in host memory, not on an RPC server). There the
// CUDA decode kernel is faster with the rotation table than with the table of steps at short depths, and for few
// layers of one KV head the grouped keys are faster than both (RESULTS 4.5).
static bool se_keys_on_local_gpu(llama_context & ctx) {
    const llama_hparams & hp = ctx.get_model().hparams;
    for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
        for (const auto & layer : llama_se_access::layers(kv)) {
            ggml_backend_dev_t dev = se_buffer_device(layer.k);
            if (!se_layer_applies(hp, layer.il) || ggml_backend_buffer_is_host(layer.k->buffer) || !dev) {
                continue;
            }
            ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
            const bool rpc = reg && strncmp(ggml_backend_reg_name(reg), "RPC", 3) == 0; // RPC[host:port]
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU && !rpc) {
                return true;
            }
        }
    }
    return false;
}

// The form of the grouped keys asked for by name in the environment, LLAMA_SELF_EXTEND_KEYS=steps, table or cache, for
// the contexts that leave it to auto (programs that do not call llama_set_self_extend_keys: llama-server); 0 (auto)
// when unset, auto or unknown.
static int32_t se_keys_from_env() {
    const char * v = getenv("LLAMA_SELF_EXTEND_KEYS");
    if (!v || !*v || strcmp(v, "auto") == 0) {
        return LLAMA_SELF_EXTEND_KEYS_AUTO;
    }
    for (auto [name, keys] : { std::pair("steps", LLAMA_SELF_EXTEND_KEYS_STEPS), std::pair("table", LLAMA_SELF_EXTEND_KEYS_TABLE),
                               std::pair("cache", LLAMA_SELF_EXTEND_KEYS_CACHE) }) {
        if (strcmp(v, name) == 0) {
            return keys;
        }
    }
    LLAMA_LOG_WARN("%s: LLAMA_SELF_EXTEND_KEYS=%s is not auto, steps, table or cache: using auto\n", __func__, v);
    return LLAMA_SELF_EXTEND_KEYS_AUTO;
}

// The form of the fused path's grouped keys: the one asked for (llama_set_self_extend_keys, else the environment), the
// grouped keys where a device lacks it; auto takes the steps form, which keeps nothing per cell and reads no table per
// cell, where every device has it and none is a GPU of this host (the CPU, RPC servers, whose table rows would travel
// with every ubatch), else chooses between the table and the cache (se_prefer_table).
static se_keys se_keys_form(llama_context & ctx) {
    int32_t asked = llama_se_access::cparams(ctx).se_keys;
    if (asked == LLAMA_SELF_EXTEND_KEYS_AUTO) {
        asked = se_keys_from_env();
    }
    if (asked == LLAMA_SELF_EXTEND_KEYS_CACHE) {
        return se_keys::cache;
    }
    if (asked != LLAMA_SELF_EXTEND_KEYS_AUTO) {
        const se_keys form = asked == LLAMA_SELF_EXTEND_KEYS_STEPS ? se_keys::steps : se_keys::table;
        return se_fused_supported(ctx, form) ? form : se_keys::cache;
    }
    if (!se_keys_on_local_gpu(ctx) && se_fused_supported(ctx, se_keys::steps)) {
        return se_keys::steps;
    }
    return se_prefer_table(ctx) && se_fused_supported(ctx, se_keys::table) ? se_keys::table : se_keys::cache;
}

// Makes the Self-Extend state of every cache for the setting ga_n/ga_w and the form se_keys_form chooses: the fused
// path where every KV device has the op and its memory fits, else the generic path. Grouped keys kept in the form
// wanted are rebuilt where rebuild says so (the setting changed), kept in another form they are made anew. who: the
// API function, for the log.
static void se_configure(llama_context & ctx, int32_t ga_n, int32_t ga_w, bool rebuild, const char * who) {
    auto & cparams = llama_se_access::cparams(ctx);
    bool fused = ga_n > 1 && cparams.flash_attn && se_fused_supported(ctx, se_keys::cache);
    const se_keys form = fused ? se_keys_form(ctx) : se_keys::cache;
    for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
        if (!fused) {
            break;
        }
        if (!se_cache_applies(kv)) {
            continue; // no Self-Extend layer reads this cache
        }
        const llama_se_kcache * kc = llama_se_access::kcache(kv);
        if (kc && kc->form == form) {
            if (rebuild) {
                llama_se_kcache_invalidate(*kv); // built under the previous setting, in the form wanted now
            }
        } else {
            fused = se_kcache_alloc(const_cast<llama_kv_cache *>(kv), cparams, form);
        }
    }
    if (!fused) {
        for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
            llama_se_access::kcache(const_cast<llama_kv_cache *>(kv)).reset();
        }
    }
    if (ga_n > 1 && cparams.flash_attn && !fused) {
        LLAMA_LOG_INFO("%s: a device lacks the fused Self-Extend attention op: using the exact non-flash path\n", who);
    }
    LLAMA_LOG_INFO("%s: ga_n = %d, ga_w = %d%s\n", who, ga_n, ga_w, fused ? " (fused flash attention)" : "");
    cparams.se_n  = ga_n;
    cparams.se_w  = ga_w;
    cparams.se_fa = fused;
    // the graph changes shape and size: drop cached graphs and re-reserve the compute buffers
    llama_se_access::need_reserve(ctx);
}

int32_t llama_set_self_extend(llama_context * ctx, int32_t ga_n, int32_t ga_w) {
    if (!ctx || ga_n < 1 || (ga_n > 1 && ga_w < 1)) {
        return LLAMA_SELF_EXTEND_ERR_INVALID_ARG;
    }
    if (ga_n > 1) {
        const int32_t support = llama_model_self_extend_support(&ctx->get_model());
        if (support != LLAMA_SELF_EXTEND_OK) {
            return support;
        }
        llama_memory_t mem = ctx->get_memory();
        if (!dynamic_cast<llama_kv_cache *>(mem) && !dynamic_cast<llama_kv_cache_iswa *>(mem)) {
            return LLAMA_SELF_EXTEND_ERR_MEMORY;
        }
    } else {
        ga_w = 0;
    }
    const auto & cparams = llama_se_access::cparams(*ctx);
    if (cparams.se_n != ga_n || cparams.se_w != ga_w) {
        se_configure(*ctx, ga_n, ga_w, true, __func__);
    }
    return LLAMA_SELF_EXTEND_OK;
}

int32_t llama_set_self_extend_keys(llama_context * ctx, int32_t keys) {
    if (!ctx || keys < LLAMA_SELF_EXTEND_KEYS_AUTO || keys > LLAMA_SELF_EXTEND_KEYS_CACHE) {
        return LLAMA_SELF_EXTEND_ERR_INVALID_ARG;
    }
    auto & cparams = llama_se_access::cparams(*ctx);
    if (cparams.se_keys != keys) {
        cparams.se_keys = keys;
        if (cparams.se_n > 1) {
            se_configure(*ctx, cparams.se_n, cparams.se_w, false, __func__);
        }
    }
    return LLAMA_SELF_EXTEND_OK;
}

int32_t llama_get_self_extend_keys(const llama_context * ctx) {
    if (!ctx || !llama_se_access::cparams(*ctx).se_fa) {
        return LLAMA_SELF_EXTEND_KEYS_NONE;
    }
    for (const llama_kv_cache * kv : se_kv_caches(*ctx)) {
        if (const llama_se_kcache * kc = llama_se_access::kcache(kv)) {
            return kc->form == se_keys::steps ? LLAMA_SELF_EXTEND_KEYS_STEPS :
                   kc->form == se_keys::table ? LLAMA_SELF_EXTEND_KEYS_TABLE : LLAMA_SELF_EXTEND_KEYS_CACHE;
        }
    }
    return LLAMA_SELF_EXTEND_KEYS_NONE;
}

void llama_get_self_extend(const llama_context * ctx, int32_t * ga_n, int32_t * ga_w) {
    const int32_t n = ctx ? llama_se_access::cparams(*ctx).se_n : 1;
    const int32_t w = ctx ? llama_se_access::cparams(*ctx).se_w : 0;
    if (ga_n) {
        *ga_n = n;
    }
    if (ga_w) {
        *ga_w = w;
    }
}

bool llama_self_extend_fused(const llama_context * ctx) {
    return ctx && llama_se_access::cparams(*ctx).se_fa;
}

//
// graph
//

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

bool llama_se_can_reuse(const llama_se_inp & inp, const llama_kv_cache_context * mctx) {
    if (!inp.q_shift) {
        return true;
    }
    // a graph that rebuilt the grouped keys must not run again, and a stale cache needs that graph; a table of steps
    // must cover the positions
    return !inp.k_g_rebuild && !(inp.pos_q && se_kcache_stale(mctx)) &&
           !(inp.k_steps && inp.k_steps->ne[1] < se_step_rows(mctx));
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
        // keys: empty cells are masked; -1 classifies them with the distant (grouped) keys
        int32_t * pos_k = se_host<int32_t>(inp, inp.pos_k);
        for (int64_t s = 0; s < n_stream; ++s) {
            const llama_kv_cells & cells = llama_se_access::cells(kv, s0 + s);
            for (int64_t j = 0; j < n_kv; ++j) {
                pos_k[s*n_kv + j] = cells.is_empty(j) ? -1 : cells.pos_get(j);
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
            const size_t row = ggml_row_size(GGML_TYPE_F32, n_rot);
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
    ggml_tensor * qg = se_q_streams(ctx, se.q, k->ne[3]);
    if (se.n_group > 0) {
        ggml_tensor * op = ggml_flash_attn_ext_se_steps(ctx, q, k, v, kq_mask, qg, se.k, se.rope_mode, se.n_group, se.n_lo,
                                                        se.pos_q, se.pos_k, se.n_window, kq_scale, softcap);
        if (se.q_rot) {
            ggml_flash_attn_ext_se_q_rot(op);
        }
        return op;
    }
    ggml_tensor * kg = ggml_permute(ctx, se.k, 0, 2, 1, 3);
    if (se.rope_mode >= 0) {
        ggml_tensor * op = ggml_flash_attn_ext_se_rot(ctx, q, k, v, kq_mask, qg, kg, se.rope_mode, se.pos_q, se.pos_k,
                                                      se.n_window, kq_scale, softcap);
        if (se.q_rot) {
            ggml_flash_attn_ext_se_q_rot(op);
        }
        return op;
    }
    return ggml_flash_attn_ext_se(ctx, q, k, v, kq_mask, qg, kg, se.pos_q, se.pos_k, se.n_window, kq_scale, softcap);
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
