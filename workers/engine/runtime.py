"""ONNX Runtime sessions and the choice of execution provider."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_SHORT = {CUDA: "cuda", CPU: "cpu"}


class ProviderUnavailable(RuntimeError):
    pass


class ModelLoadError(RuntimeError):
    """The ONNX file exists but ONNX Runtime cannot load it (truncated, corrupt, wrong format)."""


def _session_options(threads: int, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spin:
        # Idle threads sleep instead of spinning: kinder to other work in the same process (benchmarks).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def create_session(
    model_path: Path | str, provider: str = "auto", threads: int = 0, spin: bool = True
) -> tuple[ort.InferenceSession, str]:
    """Open `model_path` on CUDA when it really loads, else on the CPU; return (session, "cuda" | "cpu").

    onnxruntime-gpu always *lists* the CUDA provider, even on a machine with no GPU or no CUDA libraries; only
    building a session tells whether it loads. ONNX Runtime then falls back to the CPU by itself and logs the
    failed library load as an error, which is expected here, so that attempt runs with its logging muted.
    """
    if provider not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"provider must be auto, cpu or cuda, not {provider!r}")
    path = str(model_path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = _session_options(threads, spin)
    if provider != "cpu" and CUDA in ort.get_available_providers():
        options.log_severity_level = 4
        ort.set_default_logger_severity(4)
        try:
            session = _open(path, options, [CUDA, CPU])
        finally:
            ort.set_default_logger_severity(2)
        chosen = session.get_providers()[0]
        if chosen == CUDA:
            log.info("ONNX Runtime session on CUDA: %s", path)
            return session, "cuda"
        if provider == "cuda":
            raise ProviderUnavailable("CUDA was requested but the CUDA execution provider did not load")
        log.info("CUDA provider did not load; running on the CPU: %s", path)
        return session, _SHORT.get(chosen, chosen)
    if provider == "cuda":
        raise ProviderUnavailable("CUDA was requested but this onnxruntime build has no CUDA provider")
    return _open(path, options, [CPU]), "cpu"


def _open(path: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for every load failure
        raise ModelLoadError(f"cannot load ONNX model {path}: {exc}") from exc
