// Self-Extend for the tools built on llama.cpp's common library; see common-self-extend.h.

#include "common-self-extend.h"

#include "common.h"
#include "log.h"
#include "llama.h"
#include "llama-self-extend.h"

#include <cstdio>

static int32_t se_capacity(int32_t n_ctx_train, int32_t ga_n, int32_t ga_w) {
    // the longest sequence whose farthest grouped position stays below n_ctx_train (as selfext_cpp's
    // SelfExtend.capacity): (L - W)*G + W when G divides W
    const int64_t cap = (int64_t) (n_ctx_train - ga_w)*ga_n + (int64_t) (ga_w/ga_n)*ga_n;
    return cap > INT32_MAX ? INT32_MAX : (int32_t) cap;
}

bool common_self_extend_apply(llama_context * ctx, const common_params & params, const char * what) {
    const int32_t ga_n = params.grp_attn_n;
    const int32_t ga_w = params.grp_attn_w;
    if (ga_n <= 1) {
        return true;
    }
    const llama_model * model = llama_get_model(ctx);
    const int32_t n_ctx_train = llama_model_n_ctx_train(model);
    if (ga_w < 1 || ga_w >= n_ctx_train) {
        LOG_ERR("%s: Self-Extend on the %s context: --grp-attn-w %d must be at least 1 and below the model's "
                "trained context (%d)\n", __func__, what, ga_w, n_ctx_train);
        return false;
    }
    const int32_t status = llama_set_self_extend(ctx, ga_n, ga_w);
    if (status != LLAMA_SELF_EXTEND_OK) {
        LOG_ERR("%s: Self-Extend (--grp-attn-n %d --grp-attn-w %d) on the %s context: %s\n",
                __func__, ga_n, ga_w, what, llama_self_extend_status_str(status));
        return false;
    }
    const int32_t cap     = se_capacity(n_ctx_train, ga_n, ga_w);
    const int32_t n_seq   = (int32_t) llama_n_ctx_seq(ctx);
    const char * keys = llama_self_extend_keys_str(llama_get_self_extend_keys(ctx));
    char path[64] = "generic attention path";
    if (keys) {
        snprintf(path, sizeof(path), "fused flash attention (keys: %s)", keys);
    }
    LOG_INF("%s: Self-Extend on the %s context: G = %d, W = %d, %s; reaches %d tokens per sequence "
            "(trained on %d; %d per sequence here)\n", __func__, what, ga_n, ga_w, path, cap, n_ctx_train, n_seq);
    if (n_seq > cap) {
        LOG_WRN("%s: the %s context holds %d tokens per sequence, more than Self-Extend reaches (%d): "
                "sequences are capped at %d\n", __func__, what, n_seq, cap, cap);
    }
    return true;
}

int32_t common_self_extend_n_ctx_max(const llama_context * ctx) {
    const int32_t n_ctx_train = llama_model_n_ctx_train(llama_get_model(ctx));
    int32_t ga_n = 1;
    int32_t ga_w = 0;
    llama_get_self_extend(ctx, &ga_n, &ga_w);
    return ga_n > 1 ? se_capacity(n_ctx_train, ga_n, ga_w) : n_ctx_train;
}

// the setting of the live fit scope (the fit runs once, before any request: no concurrent scopes)
static int32_t g_fit_ga_n = 1;
static int32_t g_fit_ga_w = 0;

common_self_extend_fit_scope::common_self_extend_fit_scope(const common_params & params) {
    g_fit_ga_n = params.grp_attn_n;
    g_fit_ga_w = params.grp_attn_w;
}

common_self_extend_fit_scope::~common_self_extend_fit_scope() {
    g_fit_ga_n = 1;
    g_fit_ga_w = 0;
}

void common_self_extend_fit_apply(llama_context * ctx) {
    if (g_fit_ga_n > 1 && g_fit_ga_w >= 1 && g_fit_ga_w < llama_model_n_ctx_train(llama_get_model(ctx))) {
        llama_set_self_extend(ctx, g_fit_ga_n, g_fit_ga_w); // an error shows when the real context is made
    }
}
