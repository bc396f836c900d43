#pragma once

// Self-Extend in llama.cpp's common library, for the tools built on it (llama-server): -gan/--ga-n and
// -gaw/--ga-w set it on every context that common creates. Upstream files call these from thin hooks
// (patches/0004-*.patch).

#include <cstdint>

struct common_params;
struct llama_context;

// Applies params.grp_attn_n/grp_attn_w to ctx with llama_set_self_extend (nothing when grp_attn_n <= 1).
// `what` names the context in messages ("target", "draft"). Returns false, after logging why, when the
// setting does not fit the model (W not below the trained context, an architecture Self-Extend cannot run).
bool common_self_extend_apply(llama_context * ctx, const common_params & params, const char * what);

// The most tokens one sequence of ctx may hold: the model's trained context, or with Self-Extend on
// everything it reaches, (n_ctx_train - W)*G + W.
int32_t common_self_extend_n_ctx_max(const llama_context * ctx);

// While one is alive, the contexts that --fit creates to measure memory (common_fit_params) get params'
// Self-Extend too, so the fit counts its grouped keys (a rotation table, or one more K cache, on the fused path).
struct common_self_extend_fit_scope {
    explicit common_self_extend_fit_scope(const common_params & params);
    ~common_self_extend_fit_scope();
};

// fit.cpp: Self-Extend on a context that --fit measures, as the live common_self_extend_fit_scope says
void common_self_extend_fit_apply(llama_context * ctx);
