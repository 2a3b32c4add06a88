"""ONNX Runtime session options with a memory cap, bounded threads and no custom ops.

ONNX Runtime's CPU arena (BFCArena) refuses an allocation beyond ``max_mem`` with an error
instead of growing (onnxruntime/core/framework/bfc_arena.cc), but only for an arena
registered with the environment (``CreateAndRegisterAllocator``) and used by sessions that
set ``session.use_env_allocators``. With ``session.use_device_allocator_for_initializers``
the initializers and constant folding at load go through the same arena, so a model whose
constants would fold into gigabytes fails to load rather than taking the process down
(measured: a ConstantOfShape of 2 GiB fails at 68 MB resident with a 256 MiB cap).

The environment arena is one per process, shared by every session made here: the cap is
the total ONNX Runtime memory of all loaded models and their in-flight runs.
"""

from __future__ import annotations

import threading

import onnxruntime as ort

from gateway.errors import ConfigError

_lock = threading.Lock()
_registered: int | None = None


def _register_arena(memory_limit_bytes: int) -> None:
    global _registered
    with _lock:
        if _registered == memory_limit_bytes:
            return
        if _registered is not None:
            raise ConfigError(
                f"the ONNX Runtime memory cap is already {_registered} bytes in this process; "
                f"it cannot change to {memory_limit_bytes} without a restart")
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        # arena_extend_strategy 1 (kSameAsRequested): grow by what is asked, not by doubling,
        # so the arena never reserves past the cap.
        cfg = ort.OrtArenaCfg({"max_mem": memory_limit_bytes, "arena_extend_strategy": 1})
        ort.create_and_register_allocator(info, cfg)
        _registered = memory_limit_bytes


def session_options(memory_limit_bytes: int, intra_op_threads: int,
                    inter_op_threads: int) -> ort.SessionOptions:
    """Session options for an admitted model: capped memory, bounded threads, no custom ops.

    No custom-op library is ever registered (``register_custom_ops_library`` is not called),
    so a node in a custom domain fails to load even if the scanner were bypassed.
    """
    if memory_limit_bytes <= 0 or intra_op_threads <= 0 or inter_op_threads <= 0:
        raise ConfigError("memory limit and thread counts must be positive")
    _register_arena(memory_limit_bytes)
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    # Idle worker threads sleep instead of spinning: the machine is shared by many models.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def run_options() -> ort.RunOptions:
    """Run options that hand arena memory a run no longer needs back to the system.

    Why: without shrinkage one large request keeps its peak reserved in the shared arena.
    """
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro
