#pragma once

// Self-Extend inside the attention graph. Upstream files call these from thin hooks; see patches/series.

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <map>
#include <vector>

struct llama_cparams;
struct llama_hparams;
struct llama_ubatch;
class  llama_kv_cache;
class  llama_kv_cache_context;

// Graph inputs of one KV cache, filled from the KV cells and the ubatch at every llama_decode().
// The fused op (cparams.se_fa) reads positions; the generic path reads 0/1 selection masks.
// All of them are parts of one graph input (pack), which llama_se_set_inp writes: the scheduler uploads each input
// that a device reads with two synchronizations (over RPC, a round trip). The fused path's parts are views of the
// pack's copy on the device of the first layer that reads it (pack_dev), so the pack travels once per ubatch.
struct llama_se_inp {
    ggml_tensor * pack     = nullptr; // I32 [n_pack]                     the input, on the host
    ggml_tensor * pack_dev = nullptr; // fused: its copy (ggml_cont); generic: pack. The parts below view it.
    int64_t off_k_pos_cur = 0, off_k_shift_cur = 0; // places reserved for the parts made on first use

    ggml_tensor * q_shift = nullptr; // I32 [n_tokens]                    grouped query position - position
    ggml_tensor * k_shift = nullptr; // I32 [n_kv*n_stream]               grouped key position - position, per cell
    // fused, grouped keys: the ubatch's keys, made when the first layer needs them (llama_se_build_layer)
    mutable ggml_tensor * k_pos_cur   = nullptr; // I32 [n_tokens]        grouped positions, for a clone of the layer's RoPE
    mutable ggml_tensor * k_shift_cur = nullptr; // I32 [n_tokens]        grouped - true position, to rotate roped keys further
    bool          k_g_rebuild = false;   // fused: this graph rewrites the stale grouped keys of its streams
    ggml_tensor * k_g_rows    = nullptr; // I32 [n_stale]                 fused: their rows in K, s*kv_size + cell
    ggml_tensor * k_g_shift   = nullptr; // I32 [n_stale]                 fused, grouped keys: grouped - true position
    ggml_tensor * k_rot_rows  = nullptr; // F32 [n_rot, n_tokens + n_stale] fused, table form: the rows to store
    ggml_tensor * q_rot_rows  = nullptr; // F32 [n_rot, n_tokens]        fused, table and steps forms: the queries' rows
    ggml_tensor * k_steps     = nullptr; // F32 [n_rot, n_rows]          fused, steps form: the table of steps (kept
                                         //                                with the cache, or an input part)
    mutable ggml_tensor * k_rot = nullptr; // table form: the table once this graph stored its rows (first layer)
    ggml_tensor * pos_q   = nullptr; // I32 [n_tps, n_stream]             fused: query positions
    ggml_tensor * pos_k   = nullptr; // I32 [n_kv, n_stream]              fused: key (cell) positions
    bool          causal  = false;   // fused: the op masks by the positions (pos_k -1: a cell the stream's sequence
                                     // lacks) and the layers leave llama.cpp's mask out, which is then neither filled
                                     // nor uploaded (se_causal_by_positions)
    ggml_tensor * nbr     = nullptr; // F32 [n_kv, n_tps, 1, n_stream]    generic: 1 where pos_q - pos_k <  W, else 0
    ggml_tensor * grp     = nullptr; // F32 [n_kv, n_tps, 1, n_stream]    generic: 1 - nbr
};

// The grouped operands of one layer, handed to build_attn_mha.
struct llama_se_attn {
    ggml_tensor * q     = nullptr; // F32 [n_embd_head_k, n_head,    n_tokens]          rotated to i/G + W - W/G
    ggml_tensor * k     = nullptr; // F32/F16 [n_embd_head_k, n_head_kv, n_kv, n_stream] rotated to j/G
                                   // (rotation-table form: the table, F16/F32 [n_rot, 1, n_kv, n_stream];
                                   //  steps form: the table of steps, F32 [n_rot, n_rows])
    ggml_tensor * nbr   = nullptr;
    ggml_tensor * grp   = nullptr;
    ggml_tensor * pos_q = nullptr; // set: build_attn_mha uses the fused op (llama_se_build_fattn)
    ggml_tensor * pos_k = nullptr;
    bool          causal = false; // the op masks by the positions, without kq_mask (ggml_flash_attn_ext_se_causal)
    int32_t       n_window = 0;
    int32_t       rope_mode = -1; // >= 0: k is the rotation table of that RoPE mode (ggml_flash_attn_ext_se_rot)
    bool          q_rot = false;  // q is the queries' rows of that table, F32 [n_rot, 1, n_tokens] (se_q_rot)
    int32_t       n_group = 0;    // > 0: k is a table of steps for this group size (ggml_flash_attn_ext_se_steps)
    int32_t       n_lo    = 0;    //      with this many single-position steps
};

// true when the context runs Self-Extend (ga_n > 1)
bool llama_se_enabled(const llama_cparams & cparams);

// the inputs for mctx's cells; all null when Self-Extend is off or no layer of mctx's cache takes it
llama_se_inp llama_se_build_inp(
        ggml_context * ctx,
        const llama_kv_cache_context * mctx,
        const llama_ubatch & ubatch,
        const llama_cparams & cparams);

void llama_se_set_inp(
        const llama_se_inp & inp,
        const llama_kv_cache_context * mctx,
        const llama_ubatch * ubatch,
        const llama_cparams & cparams);

// Builds the grouped q/k of layer il. Returns false (and leaves out untouched) when Self-Extend does not apply
// to the layer: off, a layer without RoPE, or a sliding-window layer whose window fits the trained context. q: the roped queries as the layer attends with them,
// k: the KV cache view of the layer, k_cur/k_idxs: the ubatch's keys and their cells (k_cur null when the
// layer stores no keys of its own), k_rot: the cache's Hadamard rotation (null if none).
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
        llama_se_attn & out);

// false when a graph built for inp cannot serve mctx's next ubatch: it rebuilt the grouped keys, or they
// must be rebuilt now, or the ubatch's mask would be of the other kind
bool llama_se_can_reuse(const llama_se_inp & inp, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                        const llama_cparams & cparams);

// Grouped keys go stale per cell, and are rebuilt in the next ubatch of their stream, so that one sequence's
// K-shift or state load does not rebuild the keys of the others:
// every cell (the setting changed)
void llama_se_kcache_invalidate(const llama_kv_cache & kv);
// the cells with a pending K-shift, and every cell of the streams sdst (stream copy); before llama_kv_cache::update
// applies them
void llama_se_kcache_moved(const llama_kv_cache & kv, bool do_shift, const std::vector<uint32_t> & sdst);
// cells of stream strm that a state load just wrote
void llama_se_kcache_loaded(const llama_kv_cache & kv, uint32_t strm, const std::vector<uint32_t> & cells);

// adds the grouped keys' memory to a KV cache's memory_breakdown (so llama_get_memory_breakdown and --fit count it)
void llama_se_kcache_memory_breakdown(const llama_kv_cache & kv, std::map<ggml_backend_buffer_type_t, size_t> & ret);

// The fused op: attention of the permuted q [n_embd_head_k, n_tps, n_head, n_stream] over the permuted k/v
// views, as build_attn_mha's flash-attention branch; returns [n_embd_head_v, n_head, n_tps, n_stream]. kq_mask is
// left out when se.causal.
ggml_tensor * llama_se_build_fattn(
        ggml_context * ctx,
        const llama_se_attn & se,
        ggml_tensor * q,
        ggml_tensor * k,
        ggml_tensor * v,
        ggml_tensor * kq_mask,
        float kq_scale,
        float softcap);

// Merges the neighbour logits kq [n_kv, n_tps, n_head, n_stream] (as build_attn_mha computes them) with the
// grouped ones: kq * nbr + kq_grouped * grp. Exact: the masks are 0/1, so each logit is one of the two.
ggml_tensor * llama_se_merge_kq(ggml_context * ctx, const llama_se_attn & se, ggml_tensor * kq);
