#pragma once

// Self-Extend (Jin et al. 2024, "LLM Maybe LongLM") for libllama.
//
// For a query at position i and a key at position j, with group size G (ga_n) and neighbour window W (ga_w):
//   i - j <  W: normal RoPE attention logit (query rotated at i, key at j);
//   i - j >= W: query rotated at i/G + W - W/G, key rotated at j/G (integer division);
// the two logit sets are merged per (i, j), then one softmax, then V. G = 1 is vanilla attention.
//
// Positions are the true token positions stored in the KV cells, so prompt caching, llama_memory_seq_rm,
// several sequences per batch and state save/load behave as without Self-Extend.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMA_SELF_EXTEND_API_VERSION 4

enum llama_self_extend_status {
    LLAMA_SELF_EXTEND_OK                =  0,
    LLAMA_SELF_EXTEND_ERR_INVALID_ARG   = -1, // ga_n < 1, ga_w < 1 (with ga_n > 1) or a null pointer
    LLAMA_SELF_EXTEND_ERR_NO_ROPE       = -2, // the model has no rotary position embedding
    LLAMA_SELF_EXTEND_ERR_ROPE_TYPE     = -3, // multi-section RoPE (M-RoPE, vision RoPE): not supported
    LLAMA_SELF_EXTEND_ERR_MEMORY        = -4, // recurrent, hybrid or no KV cache
    LLAMA_SELF_EXTEND_ERR_ARCH          = -5, // the architecture's attention path is not covered
};

// LLAMA_SELF_EXTEND_API_VERSION of the loaded library; lets bindings check they talk to a patched libllama.
LLAMA_API int32_t llama_self_extend_api_version(void);

// The upstream llama.cpp commit this library was built from (short hash).
LLAMA_API const char * llama_self_extend_upstream_commit(void);

// A short English description of a llama_self_extend_status value.
LLAMA_API const char * llama_self_extend_status_str(int32_t status);

// Whether Self-Extend can run exactly on this model, judged from its architecture and RoPE type:
// LLAMA_SELF_EXTEND_OK or a negative llama_self_extend_status. The memory type is checked per context.
LLAMA_API int32_t llama_model_self_extend_support(const struct llama_model * model);

// Enable Self-Extend on a context with group size ga_n >= 1 and neighbour window ga_w >= 1.
// ga_n == 1 disables it (vanilla attention; ga_w is then ignored and stored as 0).
// Takes effect from the next llama_decode(). Cached keys keep their true positions, so the KV cache stays
// usable, but the cells already decoded were computed under the previous setting (deeper layers saw other
// attention): to get the same results as a fresh run, clear the memory (llama_memory_clear) after a change.
// Returns LLAMA_SELF_EXTEND_OK or a negative llama_self_extend_status (the context is then unchanged).
// With flash attention on, the Self-Extend layers run the fused op (llama_self_extend_fused).
LLAMA_API int32_t llama_set_self_extend(struct llama_context * ctx, int32_t ga_n, int32_t ga_w);

// Current setting of a context: *ga_n == 1 and *ga_w == 0 when Self-Extend is off (or ctx is null). Either
// pointer may be null.
LLAMA_API void llama_get_self_extend(const struct llama_context * ctx, int32_t * ga_n, int32_t * ga_w);

// Whether the context's Self-Extend layers run the fused flash-attention op (one pass, one dot product per
// query/key pair): Self-Extend and flash attention are on and every device holding the KV cache has the op
// (CPU; CUDA for f16 caches). Otherwise they run the exact generic path: two KQ products merged before
// one softmax, several times slower at long context. Both give the same results up to rounding.
LLAMA_API bool llama_self_extend_fused(const struct llama_context * ctx);

// What the fused path keeps to rotate cached keys on to their grouped positions (the keys are cached roped at their
// true positions):
enum llama_self_extend_keys {
    LLAMA_SELF_EXTEND_KEYS_NONE  = -1, // (llama_get_self_extend_keys only) no fused path: Self-Extend off, or generic
    LLAMA_SELF_EXTEND_KEYS_AUTO  =  0, // the library chooses per context (LLAMA_SELF_EXTEND_KEYS in the environment
                                       // may ask for one of the three below by name: steps, table, cache)
    LLAMA_SELF_EXTEND_KEYS_STEPS =  1, // nothing per cell: the kernels compose each key's rotation from a small table
    LLAMA_SELF_EXTEND_KEYS_TABLE =  2, // one rotation table, n_rot values per cell (halves; floats for an f32 K)
    LLAMA_SELF_EXTEND_KEYS_CACHE =  3, // the grouped keys themselves: one more K per Self-Extend layer
};

// Ask for a form of the fused path's grouped keys (AUTO: the library's choice, the default). Takes effect at once
// where the fused path runs (what was kept in another form is rebuilt from K by the next llama_decode()), else with
// the next llama_set_self_extend that turns it on. A form that a device holding the KV cache lacks gives the grouped
// keys instead: llama_get_self_extend_keys says which form is in use.
// Returns LLAMA_SELF_EXTEND_OK or LLAMA_SELF_EXTEND_ERR_INVALID_ARG (null ctx, or keys not AUTO, STEPS, TABLE, CACHE).
LLAMA_API int32_t llama_set_self_extend_keys(struct llama_context * ctx, int32_t keys);

// The form of the grouped keys in use: STEPS, TABLE or CACHE, or NONE where the context does not run the fused path.
LLAMA_API int32_t llama_get_self_extend_keys(const struct llama_context * ctx);

// The name of a llama_self_extend_keys value: "auto", "steps", "table" or "cache" (the names LLAMA_SELF_EXTEND_KEYS in
// the environment takes); NULL for NONE and any other value.
LLAMA_API const char * llama_self_extend_keys_str(int32_t keys);

#ifdef __cplusplus
}
#endif
