// Self-Extend's state per KV cache: allocation in the form chosen (llama-self-extend-kcache.h), and its upkeep
// when cells move, load or go stale.

#include "llama-self-extend-kcache.h"
#include "llama-self-extend-impl.h"

#include "llama-impl.h"

#include "ggml-backend.h"

#include <cmath>

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
bool se_table_form_fits(const llama_kv_cache * kv, const llama_cparams & cparams) {
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

bool se_kcache_alloc(llama_kv_cache * kv, const llama_cparams & cparams, se_keys form) {
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
                    kc->tab = ggml_new_tensor_3d(ctx_for(buft), se_grouped_key_type(layer.k), rp.n_rot, layer.k->ne[1],
                                                 layer.k->ne[2]);
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

bool se_kcache_stale(const llama_kv_cache_context * mctx) {
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
