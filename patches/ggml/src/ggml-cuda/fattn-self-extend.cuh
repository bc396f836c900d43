#pragma once

// CUDA kernel of GGML_OP_FLASH_ATTN_EXT_SE (patches/ggml/include/ggml-self-extend.h), called from ggml-cuda.cu

#include "common.cuh"

void ggml_cuda_flash_attn_ext_se(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_flash_attn_ext_se_supported(int device, const ggml_tensor * dst);
