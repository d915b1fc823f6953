"""Pure builders: a parsed DiffusionLM (+ resolved facts about the cluster) -> child manifests (dicts).

No API calls here; everything the operator renders is decided in these functions and unit-tested.
"""

from .download import DownloadTarget, build_download_job, download_target
from .inference_service import build_inference_service
from .meta import child_labels, owner_reference
from .mode import resolve_deployment_mode
from .pvc import build_pvc, cache_claim_name
from .serving_runtime import build_serving_runtime, runtime_args

__all__ = [
    "DownloadTarget",
    "build_download_job",
    "build_inference_service",
    "build_pvc",
    "build_serving_runtime",
    "cache_claim_name",
    "child_labels",
    "download_target",
    "owner_reference",
    "resolve_deployment_mode",
    "runtime_args",
]
