#pragma once

// CPU kernel of GGML_OP_FLASH_ATTN_EXT_SE (patches/ggml/include/ggml-self-extend.h), called from ggml-cpu.c

#include "ggml-cpu-impl.h"

#ifdef __cplusplus
extern "C" {
#endif

void   ggml_compute_forward_flash_attn_ext_se(const struct ggml_compute_params * params, struct ggml_tensor * dst);
size_t ggml_cpu_flash_attn_ext_se_work_size(const struct ggml_tensor * dst, int n_tasks);

#ifdef __cplusplus
}
#endif
