"""dllm-operator: reconciles DiffusionLM resources into KServe ServingRuntime/InferenceService, a model-cache
PVC and a download Job, and reports their state (kopf, level-based)."""

GROUP = "serving.dllm.io"
VERSION = "v1alpha1"
PLURAL = "diffusionlms"
KIND = "DiffusionLM"
API_VERSION = f"{GROUP}/{VERSION}"
