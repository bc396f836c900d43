// Self-Extend: the C API (llama-self-extend.h), and the choice of the fused path and the form of its grouped keys
// per context. The attention graph is in llama-self-extend-graph.cpp, the state per KV cache in
// llama-self-extend-kcache.cpp.

#include "llama-self-extend.h"
#include "llama-self-extend-impl.h"
#include "llama-self-extend-kcache.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-self-extend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifndef SELFEXT_LLAMA_CPP_COMMIT
#define SELFEXT_LLAMA_CPP_COMMIT "unknown"
#endif

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

const char * llama_self_extend_keys_str(int32_t keys) {
    switch (keys) {
        case LLAMA_SELF_EXTEND_KEYS_AUTO:  return "auto";
        case LLAMA_SELF_EXTEND_KEYS_STEPS: return "steps";
        case LLAMA_SELF_EXTEND_KEYS_TABLE: return "table";
        case LLAMA_SELF_EXTEND_KEYS_CACHE: return "cache";
        default:                           return nullptr;
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
                ggml_tensor * k_rot = ggml_new_tensor_2d(c, se_grouped_key_type(layer.k), n_rot, n);
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
// costs n_rot values per cell (halves, or floats for an f32 K, as the grouped keys) where the cache costs one more K,
// unless
//  - a Self-Extend layer's K lives on a device and its RoPE does not turn the whole head: the CUDA decode kernel rotates
//    the keys by the table as it loads them only for a whole head, else every decode step would rotate the whole K view
//    into a scratch first (0.69-0.85 of vanilla's decode at 32K on an H200; with the rotation in the kernel 0.92-1.00,
//    as with the cache; docs/RESULTS.md 4.5). The table's price on CUDA is that scratch in prefill, once per op: about
//    2 % of a whole document's prefill at 512-token ubatches, where the cache costs 1.2-1.5x vanilla's memory.
//  - the table is more than half the grouped keys' size: a decode reads the table next to K, which costs more than
//    reading the grouped keys once the table is as large as they are (Gemma 3 270M on 2 cores, a 64K document: 1 KiB of
//    f32 table per cell against 1.5 KiB of grouped keys; decode 0.80 of vanilla with the table, 1.09 with the grouped
//    keys; RESULTS 7.1). Its f16 table is a third of them: on an H200 the context's memory 1.04-1.06 of vanilla's
//    instead of 1.12-1.19, decode 0.95-0.97 where the grouped keys give 0.96-0.99 (RESULTS 4.5).
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
            table = std::max<size_t>(table, ggml_row_size(se_grouped_key_type(layer.k), hp.n_rot(layer.il)));
            keys += ggml_row_size(se_grouped_key_type(layer.k), layer.k->ne[0]);
        }
        if (2*table > keys) {
            return false;
        }
    }
    return true;
}

// Whether a Self-Extend layer's K lives on a GPU of this host (not in host memory, not on an RPC server). There the
// CUDA decode kernel is faster with the rotation table than with the table of steps at short depths (RESULTS 4.5).
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
    if (!v || !*v) {
        return LLAMA_SELF_EXTEND_KEYS_AUTO;
    }
    for (int32_t keys = LLAMA_SELF_EXTEND_KEYS_AUTO; llama_self_extend_keys_str(keys); ++keys) {
        if (strcmp(v, llama_self_extend_keys_str(keys)) == 0) {
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
    if (asked != LLAMA_SELF_EXTEND_KEYS_AUTO) {
        const se_keys form = se_keys(asked);
        return form == se_keys::cache || se_fused_supported(ctx, form) ? form : se_keys::cache;
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
    bool changed = rebuild || ga_n != cparams.se_n || ga_w != cparams.se_w; // whether the graphs change
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
            fused   = se_kcache_alloc(const_cast<llama_kv_cache *>(kv), cparams, form);
            changed = true;
        }
    }
    if (!fused) {
        for (const llama_kv_cache * kv : se_kv_caches(ctx)) {
            changed = changed || llama_se_access::kcache(kv);
            llama_se_access::kcache(const_cast<llama_kv_cache *>(kv)).reset();
        }
    }
    changed = changed || fused != cparams.se_fa;
    if (ga_n > 1 && cparams.flash_attn && !fused) {
        LLAMA_LOG_INFO("%s: a device lacks the fused Self-Extend attention op: using the exact non-flash path\n", who);
    }
    LLAMA_LOG_INFO("%s: ga_n = %d, ga_w = %d%s\n", who, ga_n, ga_w, fused ? " (fused flash attention)" : "");
    cparams.se_n  = ga_n;
    cparams.se_w  = ga_w;
    cparams.se_fa = fused;
    if (changed) {
        // the graph changes shape and size: drop cached graphs and re-reserve the compute buffers (asking for the form
        // already in use changes nothing)
        llama_se_access::need_reserve(ctx);
    }
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
            return int32_t(kc->form);
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
