"""The C ABI of libflash_export.so as ctypes sees it: codes, struct mirrors, entry signatures.

Field for field the declarations of custom_ops/core/flash_export.h, and nothing else: the binding
that loads the library and calls it is `flash_export.runtime.native`. Imports no torch.
"""

from __future__ import annotations

import ctypes
from typing import Any, Dict, Tuple

# FLASH_EXPORT_FLOAT32 / _FLOAT16 / _BFLOAT16, by dtype name: the kernels' element types.
DTYPE_CODES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2}
# FlashExportTensor's element type codes: the kernels' and the mask's; any other name is
# FLASH_EXPORT_OTHER_TYPE.
ELEMENT_CODES: Dict[str, int] = {**DTYPE_CODES, "bool": 3, "int32": 5}
OTHER_TYPE = 4
# FLASH_EXPORT_DEVICE_CPU / _CUDA by device type ("cuda:1" is a cuda); any other is _OTHER.
DEVICE_CODES: Dict[str, int] = {"cpu": 0, "cuda": 1}
OTHER_DEVICE = 2
ERROR_SIZE = 512  # FLASH_EXPORT_ERROR_SIZE
# The CPU kernel's vector paths, the best first: the names FLASH_EXPORT_CPU_ISA takes and
# flash_export_cpu_isa answers (custom_ops/core/flash_attention_cpu_internal.h, kIsaNames, holds
# them lowest first; tests/test_native_abi.py checks the two agree).
CPU_ISAS: Tuple[str, ...] = ("amx", "avx512", "avx2", "portable")
# The entry points' status codes (FLASH_EXPORT_OK ...).
STATUS_NAMES: Dict[int, str] = {0: "ok", 1: "invalid_argument", 2: "unsupported",
                                3: "device_error", 4: "out_of_memory"}
# A bfloat16 NaN, to poison outputs held as raw 16-bit words.
BFLOAT16_NAN = 0x7FC0


class AttentionParams(ctypes.Structure):
    """Mirror of FlashExportAttentionParams, field for field; ctypes applies the C alignment."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("batch", ctypes.c_int64), ("heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
        ("seq_q", ctypes.c_int64), ("seq_k", ctypes.c_int64),
        ("q_batch_stride", ctypes.c_int64), ("q_row_stride", ctypes.c_int64),
        ("q_head_stride", ctypes.c_int64),
        ("k_batch_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64),
        ("k_head_stride", ctypes.c_int64),
        ("v_batch_stride", ctypes.c_int64), ("v_row_stride", ctypes.c_int64),
        ("v_head_stride", ctypes.c_int64),
        ("o_batch_stride", ctypes.c_int64), ("o_row_stride", ctypes.c_int64),
        ("o_head_stride", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("mask_batch_stride", ctypes.c_int64), ("mask_head_stride", ctypes.c_int64),
        ("mask_q_stride", ctypes.c_int64), ("mask_k_stride", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64), ("scale", ctypes.c_float), ("causal", ctypes.c_bool),
        ("dtype", ctypes.c_int32),
        # contract v2 (each zero keeps the v1 behaviour)
        ("kv_heads", ctypes.c_int64), ("head_dim_v", ctypes.c_int64),
        ("seqlens_k", ctypes.c_void_p), ("window_size", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("bias_batch_stride", ctypes.c_int64), ("bias_head_stride", ctypes.c_int64),
        ("bias_q_stride", ctypes.c_int64), ("bias_k_stride", ctypes.c_int64),
        ("softcap", ctypes.c_float),
    ]


class TensorDescriptor(ctypes.Structure):
    """Mirror of FlashExportTensor: one tensor of a call, as `attention_params` describes it."""

    # sizes and strides (const int64_t* in C) are addresses into an int64 array its maker keeps
    # alive (`_descriptors`): set as plain addresses, ctypes builds no pointer objects.
    _fields_ = [
        ("data", ctypes.c_void_p), ("sizes", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("type_name", ctypes.c_char_p), ("device_name", ctypes.c_char_p),
        ("rank", ctypes.c_int32), ("dtype", ctypes.c_int32), ("device", ctypes.c_int32),
    ]


class AttentionOptions(ctypes.Structure):
    """Mirror of FlashExportAttentionOptions: the op's attributes and the forward's device."""

    _fields_ = [
        ("num_heads", ctypes.c_int64), ("chunk_size", ctypes.c_int64), ("scale", ctypes.c_double),
        ("has_scale", ctypes.c_bool), ("causal", ctypes.c_bool), ("device", ctypes.c_int32),
        ("dtypes", ctypes.c_uint32),
        # contract v2 (each zero keeps the v1 behaviour)
        ("kv_num_heads", ctypes.c_int64), ("window_size", ctypes.c_int64),
        ("softcap", ctypes.c_double), ("output_layout", ctypes.c_int32),
    ]


class AttentionInputs(ctypes.Structure):
    """Mirror of FlashExportAttentionInputs: the tensors of one call, NULL where absent."""

    _fields_ = [(name, ctypes.POINTER(TensorDescriptor)) for name in
                ("query", "key", "value", "mask", "seqlens_k", "bias", "out")]


class NativeError(RuntimeError):
    """A forward entry point returned a status other than ok."""

    def __init__(self, entry: str, status: int) -> None:
        super().__init__(f"{entry} returned status {status} ({STATUS_NAMES.get(status, '?')})")
        self.entry = entry
        self.status = status


PARAMS_P = ctypes.POINTER(AttentionParams)
TENSOR_P = ctypes.POINTER(TensorDescriptor)
# name -> (argtypes, restype); every one but those in OPTIONAL_ENTRIES must be exported.
SIGNATURES: Dict[str, Tuple[list, Any]] = {
    "flash_export_params_size": ([], ctypes.c_size_t),
    "flash_export_tensor_size": ([], ctypes.c_size_t),
    "flash_export_options_size": ([], ctypes.c_size_t),
    "flash_export_inputs_size": ([], ctypes.c_size_t),
    "flash_export_attention_params_v2": ([ctypes.POINTER(AttentionInputs),
                                          ctypes.POINTER(AttentionOptions), PARAMS_P,
                                          ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32),
    "flash_export_attention_forward_cpu": ([PARAMS_P], ctypes.c_int32),
    "flash_export_attention_forward_cpu_threads": ([PARAMS_P, ctypes.c_int32], ctypes.c_int32),
    "flash_export_attention_forward_cpu_openmp": ([PARAMS_P, ctypes.c_void_p, ctypes.c_int32],
                                                  ctypes.c_int32),
    "flash_export_attention_forward_cuda": ([PARAMS_P, ctypes.c_void_p], ctypes.c_int32),
    "flash_export_cpu_isa": ([], ctypes.c_char_p),
    "flash_export_cpu_plan": ([PARAMS_P, ctypes.c_int32], ctypes.c_char_p),
    "flash_export_cpu_isa_error": ([], ctypes.c_char_p),
    "flash_export_build_info": ([], ctypes.c_char_p),
}
CUDA_FORWARD = "flash_export_attention_forward_cuda"
CPU_PLAN = "flash_export_cpu_plan"
OPENMP_FORWARD = "flash_export_attention_forward_cpu_openmp"
OPTIONAL_ENTRIES = (CUDA_FORWARD, CPU_PLAN, OPENMP_FORWARD)
