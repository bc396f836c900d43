// GGML_OP_FLASH_ATTN_EXT_SE: the graph-building side (patches/ggml/include/ggml-self-extend.h)

#include "ggml-self-extend.h"
#include "ggml-impl.h"

// k_rot < 0: k_g holds grouped keys; else k_g is a rotation table with that RoPE mode: a row per key (n_group 0), or
// steps for group size n_group
static struct ggml_tensor * ggml_flash_attn_ext_se_impl(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        struct ggml_tensor  * mask,
        struct ggml_tensor  * q_g,
        struct ggml_tensor  * k_g,
        int32_t               k_rot,
        int32_t               n_group,
        int32_t               n_lo,
        struct ggml_tensor  * pos_q,
        struct ggml_tensor  * pos_k,
        int32_t               n_window,
        float                 scale,
        float                 logit_softcap) {
    GGML_ASSERT(k->ne[0] == q->ne[0]);
    GGML_ASSERT(ggml_are_same_shape(q, q_g) || k_rot >= 0); // a table form's q_g may become a table (se_q_rot)
    if (k_rot < 0) {
        GGML_ASSERT(ggml_are_same_shape(k, k_g));
    } else {
        GGML_ASSERT(k_rot == 0 || k_rot == GGML_ROPE_TYPE_NEOX);
        GGML_ASSERT(k_g->ne[0] % 2 == 0 && k_g->ne[0] <= k->ne[0] && k_g->ne[2] == 1);
        GGML_ASSERT(k_g->nb[0] == ggml_type_size(k_g->type));
        if (n_group > 0) {
            GGML_ASSERT(k_g->type == GGML_TYPE_F32 && "a table of steps is F32");
            GGML_ASSERT(n_lo >= 1 && (n_lo & (n_lo - 1)) == 0 && "n_lo must be a power of two");
            GGML_ASSERT(k_g->ne[1] > n_lo && k_g->ne[3] == 1 && ggml_is_contiguous(k_g));
        } else {
            GGML_ASSERT((k_g->type == GGML_TYPE_F16 || k_g->type == GGML_TYPE_F32) && "a table of rows is F16 or F32");
            GGML_ASSERT(k_g->ne[1] == k->ne[1] && k_g->ne[3] == k->ne[3]);
        }
    }
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q_g->type == GGML_TYPE_F32);
    GGML_ASSERT(q->ne[3] == k->ne[3] && q->ne[3] == v->ne[3]);
    GGML_ASSERT(k->ne[1] == v->ne[1] && k->ne[2] == v->ne[2]);
    GGML_ASSERT(q->ne[2] % k->ne[2] == 0);
    GGML_ASSERT(v->nb[0] == ggml_type_size(v->type) && "V must not be transposed");
    GGML_ASSERT(pos_q->type == GGML_TYPE_I32 && pos_q->ne[0] == q->ne[1] && pos_q->ne[1] == q->ne[3]);
    GGML_ASSERT(pos_k->type == GGML_TYPE_I32 && pos_k->ne[0] == k->ne[1] && pos_k->ne[1] == k->ne[3]);
    GGML_ASSERT(ggml_is_contiguous(pos_q) && ggml_is_contiguous(pos_k));
    GGML_ASSERT(n_window >= 1);
    if (mask) {
        GGML_ASSERT(mask->type == GGML_TYPE_F16);
        GGML_ASSERT(ggml_is_contiguous(mask));
        GGML_ASSERT(mask->ne[0] == k->ne[1] && mask->ne[1] >= q->ne[1] && mask->ne[2] == 1);
        GGML_ASSERT(q->ne[3] % mask->ne[3] == 0);
    }

    // permute(0, 2, 1, 3), as ggml_flash_attn_ext
    const int64_t ne[4] = { v->ne[0], q->ne[2], q->ne[1], q->ne[3] };
    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, 4, ne);

    const float max_bias = 0.0f;
    ggml_set_op_params_f32(result, 0, scale);
    ggml_set_op_params_f32(result, 1, max_bias);
    ggml_set_op_params_f32(result, 2, logit_softcap);
    ggml_set_op_params_i32(result, 3, GGML_PREC_F32);
    ggml_set_op_params_i32(result, 4, n_window);
    ggml_set_op_params_i32(result, 5, k_rot >= 0);
    ggml_set_op_params_i32(result, 6, k_rot >= 0 ? k_rot : 0);
    ggml_set_op_params_i32(result, 8, k_rot >= 0 ? n_group : 0);
    ggml_set_op_params_i32(result, 9, k_rot >= 0 && n_group > 0 ? n_lo : 0);

    result->op     = GGML_OP_FLASH_ATTN_EXT_SE;
    result->src[0] = q;
    result->src[1] = k;
    result->src[2] = v;
    result->src[3] = mask;
    result->src[5] = q_g;
    result->src[6] = k_g;
    result->src[7] = pos_q;
    result->src[8] = pos_k;

    return result;
}

struct ggml_tensor * ggml_flash_attn_ext_se(
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
        float                 logit_softcap) {
    return ggml_flash_attn_ext_se_impl(ctx, q, k, v, mask, q_g, k_g, -1, 0, 0, pos_q, pos_k, n_window, scale,
                                       logit_softcap);
}

struct ggml_tensor * ggml_flash_attn_ext_se_rot(
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
        float                 logit_softcap) {
    GGML_ASSERT(rope_mode >= 0);
    return ggml_flash_attn_ext_se_impl(ctx, q, k, v, mask, q_g, k_rot, rope_mode, 0, 0, pos_q, pos_k, n_window, scale,
                                       logit_softcap);
}

struct ggml_tensor * ggml_flash_attn_ext_se_steps(
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
        float                 logit_softcap) {
    GGML_ASSERT(rope_mode >= 0 && n_group >= 1);
    return ggml_flash_attn_ext_se_impl(ctx, q, k, v, mask, q_g, k_steps, rope_mode, n_group, n_lo, pos_q, pos_k,
                                       n_window, scale, logit_softcap);
}

void ggml_flash_attn_ext_se_q_rot(struct ggml_tensor * op) {
    GGML_ASSERT(op->op == GGML_OP_FLASH_ATTN_EXT_SE && op->op_params[5] && "needs ggml_flash_attn_ext_se_rot");
    const struct ggml_tensor * q = op->src[0], * q_g = op->src[5], * k_rot = op->src[6];
    GGML_ASSERT(q_g->type == GGML_TYPE_F32 && q_g->nb[0] == sizeof(float));
    GGML_ASSERT(q_g->ne[0] == k_rot->ne[0] && q_g->ne[1] == q->ne[1] && q_g->ne[2] == 1 && q_g->ne[3] == q->ne[3]);
    op->op_params[7] = 1;
}

void ggml_flash_attn_ext_se_causal(struct ggml_tensor * op) {
    GGML_ASSERT(op->op == GGML_OP_FLASH_ATTN_EXT_SE && op->src[3] == NULL && "the positions replace the mask");
    op->op_params[10] = 1;
}
