"""Operator-wide settings, read once from the environment (DLLM_OPERATOR_*); every limit is a setting."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_RUNTIME_IMAGE = "quay.io/dllm-serve/dllm-serve:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    #: dllm-serve image used for the ServingRuntime and the download Job when spec.runtime.image is unset
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    #: namespace of KServe's `inferenceservice-config` ConfigMap (RHOAI: redhat-ods-applications)
    kserve_namespace: str = "kserve"
    #: seconds between level-based re-applies (drift repair, status refresh)
    resync_seconds: float = 30.0
    #: first and largest pause between download Jobs after a failed one (doubling in between)
    download_retry_base_seconds: float = 30.0
    download_retry_max_seconds: float = 1800.0
    #: how long the serving container may take to load weights before the startup probe gives up
    #: (8B bf16 from a network PVC: several minutes; 30 min leaves room for slow storage)
    startup_budget_seconds: int = 1800
    #: bytes of the download pod's log read to find the last progress line
    progress_log_bytes: int = 16384

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ

        def num(name: str, default: float, minimum: float) -> float:
            raw = env.get(f"DLLM_OPERATOR_{name}")
            if raw in (None, ""):
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"DLLM_OPERATOR_{name}: expected a number, got {raw!r}") from None
            if value < minimum:
                raise ValueError(f"DLLM_OPERATOR_{name}: must be >= {minimum}, got {raw!r}")
            return value

        return cls(
            runtime_image=env.get("DLLM_OPERATOR_RUNTIME_IMAGE") or cls.runtime_image,
            kserve_namespace=env.get("DLLM_OPERATOR_KSERVE_NAMESPACE") or cls.kserve_namespace,
            resync_seconds=num("RESYNC_SECONDS", cls.resync_seconds, 0.5),
            download_retry_base_seconds=num("DOWNLOAD_RETRY_BASE_SECONDS", cls.download_retry_base_seconds, 0),
            download_retry_max_seconds=num("DOWNLOAD_RETRY_MAX_SECONDS", cls.download_retry_max_seconds, 0),
            startup_budget_seconds=int(num("STARTUP_BUDGET_SECONDS", cls.startup_budget_seconds, 60)),
            progress_log_bytes=int(num("PROGRESS_LOG_BYTES", cls.progress_log_bytes, 512)),
        )
