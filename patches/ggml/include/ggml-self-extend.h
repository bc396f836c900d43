#pragma once

// GGML_OP_FLASH_ATTN_EXT_SE: exact Self-Extend attention in one flash-attention pass.
//
// For query row i (stream s) and key cell j, with W = the neighbour window:
//
//   neighbour (pos_q[i,s] - pos_k[j,s] <  W):  x = q  [:, i, h] . k  [:, j, h/r]
//   grouped   (pos_q[i,s] - pos_k[j,s] >= W):  x = q_g[:, i, h] . k_g[:, j, h/r]
//   logit     = softcap ? softcap*tanh(scale*x/softcap) : scale*x,   plus mask[j, i]
//   out[:, h, i, s] = sum_j softmax_j(logit) v[:, j, h/r]              (one softmax over all j)
//
// r = n_head/n_head_kv (GQA). q_g/k_g are the same queries/keys rotated to the grouped positions
// (i/G + W - W/G and j/G); the op never needs G itself. Kernels evaluate only the dot products the rule
// selects: a tile of (queries, keys) entirely on one side of i - j = W uses one operand pair.
//
// Shapes and types (as ggml_flash_attn_ext, plus the grouped operands and the positions):
//   q, q_g : F32          [DK, n_q,  n_head,    ne3]
//   k      : F16/F32/Q8_0 [DK, n_kv, n_head_kv, ne3]  rows contiguous (a view of a KV cache)
//   k_g    : F16/F32      [DK, n_kv, n_head_kv, ne3]
//   v      : F16/F32      [DV, n_kv, n_head_kv, ne3]  not transposed
//   mask   : F16          [n_kv, n_q_pad >= n_q, 1, ne3 or 1], or NULL
//   pos_q  : I32          [n_q,  ne3]
//   pos_k  : I32          [n_kv, ne3]
//   result : F32          [DV, n_head, n_q, ne3]      (permuted like ggml_flash_attn_ext)
//
// src[0..3] = q, k, v, mask (src[4], the sinks slot of ggml_flash_attn_ext, stays NULL), src[5..8] = q_g, k_g,
// pos_q, pos_k; op_params = { scale, max_bias (must be 0), logit_softcap, precision, W, k_g is a rotation table
// (0/1), its RoPE mode, q_g is a rotation table (0/1), G of a table of steps (0: none), its n_lo, causal by the
// positions (0/1) }.
//
// ggml_flash_attn_ext_se_rot: the same op without grouped keys. Its k_g is a rotation table
//   k_rot  : F16/F32      [n_rot, n_kv, 1, ne3]      n_rot <= DK, even
// whose row j turns RoPE at pos_k[j] into RoPE at key j's grouped position: for each rotated pair (a, b) of
// dimensions (rope_mode 0: (2i, 2i + 1); GGML_ROPE_TYPE_NEOX: (i, i + n_rot/2)) it holds cos at a and sin at b,
// and the kernel takes k_g[a] = k[a] cos - k[b] sin, k_g[b] = k[a] sin + k[b] cos (k dequantized; dimensions past
// n_rot as they are). One table serves every layer and head that share the RoPE parameters, in place of a second
// K cache. For an f16 or quantized K its cos and sin are best kept as halves (a row of a whole head is the size of one
// head's f16 K row), so that a decode, which reads the table next to K, loads half the bytes of f32 rows; their
// rounding is of the order of the f16 grouped keys' that the table replaces (CUDA takes F16 only). Backends without
// this form report it unsupported (supports_op).
//
// ggml_flash_attn_ext_se_steps: the rotation-table form without a row per key. Its k_g is a table of steps
//   k_steps: F32          [n_rot, n_lo + n_hi, 1, 1]  the same pair layout, shared by the streams
// whose row r < n_lo rotates by -r positions and row n_lo + h by -h*n_lo positions (n_lo a power of two). Key j at
// position p = pos_k[j] goes back m = p - p/G positions (on to p/G; G = n_group; m = 0 for p < 0, an empty cell): its
// row is the product of rows m % n_lo and n_lo + m/n_lo, per pair (c, s) = (c1 c2 - s1 s2, s1 c2 + c1 s2). The table
// must cover every key: m/n_lo < n_hi. It costs nothing per cell, where the table of rows costs n_rot values per cell.
// Backends without this form report it unsupported (supports_op).
//
// ggml_flash_attn_ext_se_q_rot(op), on a node of ggml_flash_attn_ext_se_rot (or _steps) whose q_g is
//   q_rot  : F32          [n_rot, n_q, 1, ne3]       the same n_rot and layout as k_rot
// makes q_g a rotation table as well: row i turns q (roped at pos_q[i]) into the grouped query, q_g[a] = q[a] cos -
// q[b] sin, q_g[b] = q[a] sin + q[b] cos. The queries then need no RoPE node of their own; a kernel rotates each
// query row as it loads it.
//
// ggml_flash_attn_ext_se_causal(op), on a node without a mask, masks by the positions instead: key j is visible to
// query row i when 0 <= pos_k[j] <= pos_q[i] (an empty cell, or a cell of another sequence, at pos_k -1). That is the
// causal mask of one sequence per stream, which the op then needs in no other form: no n_q x n_kv mask is made,
// filled or read (for a long document on a fast GPU, filling and uploading it took a third of a ubatch's time).

#include "ggml.h"

#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

GGML_API struct ggml_tensor * ggml_flash_attn_ext_se(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * q_g,
        struct ggml_tensor  * k_g,
        struct ggml_tensor  * pos_q,
        struct ggml_tensor  * pos_k,
        int32_t               n_window,
        float                 scale,
        float                 logit_softcap);

GGML_API struct ggml_tensor * ggml_flash_attn_ext_se_rot(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * q_g,
        struct ggml_tensor  * k_rot,
        int32_t               rope_mode,
        struct ggml_tensor  * pos_q,
        struct ggml_tensor  * pos_k,
        int32_t               n_window,
        float                 scale,
        float                 logit_softcap);

GGML_API struct ggml_tensor * ggml_flash_attn_ext_se_steps(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * q_g,
        struct ggml_tensor  * k_steps,
        int32_t               rope_mode,
        int32_t               n_group,
        int32_t               n_lo,
        struct ggml_tensor  * pos_q,
        struct ggml_tensor  * pos_k,
        int32_t               n_window,
        float                 scale,
        float                 logit_softcap);

GGML_API void ggml_flash_attn_ext_se_q_rot(struct ggml_tensor * op);
GGML_API void ggml_flash_attn_ext_se_causal(struct ggml_tensor * op);

// The operands and parameters of a GGML_OP_FLASH_ATTN_EXT_SE node, read back from where ggml_flash_attn_ext_se
// stores them: the one place backends learn the node's layout.
struct ggml_flash_attn_ext_se_args {
    const struct ggml_tensor * q, * k, * v, * mask, * q_g, * k_g, * pos_q, * pos_k;
    float   scale;
    float   logit_softcap;
    int32_t n_window;
    int32_t k_rot;     // 1: k_g is a rotation table (ggml_flash_attn_ext_se_rot), 0: grouped keys
    int32_t rope_mode; // the table's pair layout: 0 or GGML_ROPE_TYPE_NEOX
    int32_t q_rot;     // 1: q_g is a rotation table too (ggml_flash_attn_ext_se_q_rot)
    int32_t n_group;   // > 0: k_g is a table of steps (ggml_flash_attn_ext_se_steps) for this group size, 0: a row per key
    int32_t n_lo;      // steps: the rows of single positions, before the rows of n_lo positions each
    int32_t causal;    // 1: no mask; key j is visible to row i when 0 <= pos_k[j] <= pos_q[i] (ggml_flash_attn_ext_se_causal)
};

static inline struct ggml_flash_attn_ext_se_args ggml_flash_attn_ext_se_get_args(const struct ggml_tensor * op) {
    struct ggml_flash_attn_ext_se_args a;
    a.q     = op->src[0];
    a.k     = op->src[1];
    a.v     = op->src[2];
    a.mask  = op->src[3];
    a.q_g   = op->src[5];
    a.k_g   = op->src[6];
    a.pos_q = op->src[7];
    a.pos_k = op->src[8];
    memcpy(&a.scale,         (const float *) op->op_params + 0, sizeof(float));
    memcpy(&a.logit_softcap, (const float *) op->op_params + 2, sizeof(float));
    a.n_window  = op->op_params[4];
    a.k_rot     = op->op_params[5];
    a.rope_mode = op->op_params[6];
    a.q_rot     = op->op_params[7];
    a.n_group   = op->op_params[8];
    a.n_lo      = op->op_params[9];
    a.causal    = op->op_params[10];
    return a;
}

#ifdef __cplusplus
}
#endif
