#pragma once

// CUDA kernels of GGML_OP_FLASH_ATTN_EXT_SE (exact Self-Extend attention, see ggml-self-extend.h).

#include "common.cuh"

void ggml_cuda_flash_attn_ext_se(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// The end of a graph compute on ctx: releases what its Self-Extend ops kept for one another (their tile classes).
void ggml_cuda_flash_attn_ext_se_graph_end(ggml_backend_cuda_context & ctx);

// false: the op has to run elsewhere (the kernels need Ampere tensor cores, F16 K/K_g/V, F32 Q/Q_g, D = 64, 128 or 256,
// and D = 256 decode needs 112 KiB of shared memory per block).
bool ggml_cuda_flash_attn_ext_se_supported(int device, const ggml_tensor * dst);
