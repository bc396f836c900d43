"""ctypes access to the libggml next to our libllama: just enough of ggml to build one attention op on one
backend and run it, for the op's own test (tests/native/test_op_self_extend.py) and its benchmark
(benchmarks/op_speed.py), and to ask its devices how much memory they have (engine.machine_memory)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from . import compat
from ._lib import lib_dir, lib_file, load_llama_cpp

_ll = load_llama_cpp().llama_cpp
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_I32 = (compat.ggml_type(_ll, t) for t in ("F32", "F16", "Q8_0",
                                                                                                 "I32"))
GGML_PREC_F32 = 10  # enum ggml_prec (ggml.h); llama_cpp does not define it
DEVICE_CPU, DEVICE_GPU = 0, 1  # enum ggml_backend_dev_type


class InitParams(ctypes.Structure):
    # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_p, _i64, _i32, _f32, _sz, _int = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_size_t,
                                   ctypes.c_int)
_SIGNATURES = {
    "ggml_init": ([InitParams], _p), "ggml_free": ([_p], None),
    "ggml_new_tensor_4d": ([_p, _int, _i64, _i64, _i64, _i64], _p),
    "ggml_permute": ([_p, _p, _int, _int, _int, _int], _p),
    # q, k, v, mask, q_g, k_g, pos_q, pos_k, n_window, scale, logit_softcap
    "ggml_flash_attn_ext_se": ([_p, _p, _p, _p, _p, _p, _p, _p, _p, _i32, _f32, _f32], _p),
    # q, k, v, mask, q_g, k_rot, rope_mode, pos_q, pos_k, n_window, scale, logit_softcap
    "ggml_flash_attn_ext_se_rot": ([_p, _p, _p, _p, _p, _p, _p, _i32, _p, _p, _i32, _f32, _f32], _p),
    # q, k, v, mask, q_g, k_steps, rope_mode, n_group, n_lo, pos_q, pos_k, n_window, scale, logit_softcap
    "ggml_flash_attn_ext_se_steps": ([_p, _p, _p, _p, _p, _p, _p, _i32, _i32, _i32, _p, _p, _i32, _f32, _f32], _p),
    "ggml_flash_attn_ext_se_q_rot": ([_p], None),
    "ggml_flash_attn_ext_se_causal": ([_p], None),
    # q, k, v, mask, scale, max_bias, logit_softcap
    "ggml_flash_attn_ext": ([_p, _p, _p, _p, _p, _f32, _f32, _f32], _p),
    "ggml_prec_set_acc": ([_p, _int], None),
    "ggml_get_name": ([_p], ctypes.c_char_p),
    "ggml_new_graph": ([_p], _p), "ggml_build_forward_expand": ([_p, _p], None),
    "ggml_nbytes": ([_p], _sz), "ggml_quantize_chunk": ([_int, _p, _p, _i64, _i64, _i64, _p], _sz),
    "ggml_backend_init_by_type": ([_int, ctypes.c_char_p], _p),
    "ggml_backend_dev_by_type": ([_int], _p),
    "ggml_backend_name": ([_p], ctypes.c_char_p),
    "ggml_backend_supports_op": ([_p, _p], ctypes.c_bool),
    "ggml_backend_alloc_ctx_tensors": ([_p, _p], _p), "ggml_backend_buffer_free": ([_p], None),
    "ggml_backend_tensor_set": ([_p, _p, _sz, _sz], None), "ggml_backend_tensor_get": ([_p, _p, _sz, _sz], None),
    "ggml_backend_graph_compute": ([_p, _p], _int), "ggml_backend_free": ([_p], None),
    "ggml_backend_dev_count": ([], _sz), "ggml_backend_dev_get": ([_sz], _p), "ggml_backend_dev_type": ([_p], _int),
    "ggml_backend_dev_memory": ([_p, _p, _p], None),
    "ggml_backend_get_device": ([_p], _p), "ggml_backend_dev_backend_reg": ([_p], _p),
    "ggml_backend_reg_get_proc_address": ([_p, ctypes.c_char_p], _p),
}
_SET_N_THREADS = ctypes.CFUNCTYPE(None, _p, _int)  # ggml_backend_set_n_threads_t (ggml-backend.h)


@dataclass
class Ggml:
    """libggml with its prototypes set, and the backends opened on it (name -> ggml_backend_t)."""
    lib: ctypes.CDLL
    backends: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for backend in self.backends.values():
            self.lib.ggml_backend_free(backend)
        self.backends.clear()


def libggml() -> ctypes.CDLL:
    """libggml from lib_dir(), its prototypes set."""
    lib = ctypes.CDLL(str(lib_file(lib_dir(), "ggml")), mode=ctypes.RTLD_GLOBAL)
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def gpu_memory_total() -> int:
    """Bytes of memory of every discrete GPU that ggml sees (an iGPU shares the host's)."""
    lib, total = libggml(), 0
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == DEVICE_GPU:
            free, size = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(size))
            total += size.value
    return total


def open_ggml(gpu: bool, n_threads: int | None = None) -> Ggml:
    """libggml from lib_dir() with the CPU backend (on ``n_threads`` threads, if given), and the first GPU's when
    ``gpu`` and the build has one."""
    lib = libggml()
    g = Ggml(lib, {"CPU": lib.ggml_backend_init_by_type(DEVICE_CPU, None)})
    if n_threads:  # through the backend's registry, as llama.cpp sets it
        cpu = g.backends["CPU"]
        reg = lib.ggml_backend_dev_backend_reg(lib.ggml_backend_get_device(cpu))
        _SET_N_THREADS(lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads"))(cpu, n_threads)
    if gpu and lib.ggml_backend_dev_by_type(DEVICE_GPU):
        g.backends["GPU"] = lib.ggml_backend_init_by_type(DEVICE_GPU, None)
    return g
