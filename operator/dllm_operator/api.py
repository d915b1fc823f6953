"""The DiffusionLM spec as typed values: defaults, and the validation a CRD schema cannot express.

The CRD (manifests/crd/serving.dllm.io_diffusionlms.yaml) rejects malformed fields at admission; the
defaults here equal the schema's `default:` values (a unit test keeps them in step) so that objects
stored before a default existed, or created with the schema's defaulting off, behave the same.
Cross-field rules become `SpecError`, which the operator reports as `Ready=False, reason=InvalidSpec`
instead of retrying: retrying cannot fix a spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dllm_runtime.decoding.params import ALGORITHMS, DecodingParams

from .config import OperatorSettings

DEPLOYMENT_MODES = ("Auto", "Standard", "RawDeployment", "Knative", "Serverless")
CACHE_MODES = ("Managed", "Existing", "None")

# spec.decoding field -> (dllm-serve flag, DecodingParams field or None when it is a server setting)
DECODING_FLAGS: dict[str, tuple[str, str]] = {
    "algorithm": ("--algorithm", "algorithm"),
    "steps": ("--steps", "steps"),
    "maxTokens": ("--default-max-tokens", "max_tokens"),
    "blockLength": ("--block-length", "block_length"),
    "threshold": ("--threshold", "threshold"),
    "factor": ("--factor", "factor"),
    "cache": ("--cache", "cache"),
    "temperature": ("--temperature", "temperature"),
    "topP": ("--top-p", "top_p"),
    "topK": ("--top-k", "top_k"),
    "remasking": ("--remasking", "remasking"),
    "alg": ("--alg", "alg"),
    "algTemp": ("--alg-temp", "alg_temp"),
    "cfgScale": ("--cfg-scale", "cfg_scale"),
    "eps": ("--eps", "eps"),
    "blockAddThreshold": ("--block-add-threshold", "block_add_threshold"),
    "decodedTokenThreshold": ("--decoded-token-threshold", "decoded_token_threshold"),
}
# Flags the operator owns: a user arg repeating them would fight the rendered runtime.
RESERVED_FLAGS = ("--model", "--served-model-name", "--port", "--host")

_URI = re.compile(r"^(?P<scheme>hf|pvc|oci|s3)://(?P<rest>\S+)$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A spec the schema admits but the operator cannot serve; `field` is the spec path at fault."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        super().__init__(f"{field_path}: {message}")


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    scheme: str
    revision: str = "main"
    credentials_secret: str | None = None
    credentials_key: str = "HF_TOKEN"
    served_model_name: str = ""

    @property
    def hf_repo(self) -> str | None:
        return self.uri[len("hf://"):] if self.scheme == "hf" else None


@dataclass(frozen=True)
class DownloadSpec:
    backoff_limit: int = 3
    max_attempts: int = 5
    active_deadline_seconds: int = 21600


@dataclass(frozen=True)
class CacheSpec:
    mode: str
    size: str = "50Gi"
    storage_class_name: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteOnce",)
    existing_claim_name: str | None = None
    retain_on_delete: bool = False
    download: DownloadSpec = DownloadSpec()

    @property
    def downloads(self) -> bool:
        """Whether the operator runs a download Job into a claim (Managed or Existing)."""
        return self.mode in ("Managed", "Existing")


@dataclass(frozen=True)
class RuntimeSpec:
    image: str
    image_pull_policy: str | None = None
    serving_runtime_name: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    args: tuple[str, ...] = ()
    env: tuple[dict, ...] = ()


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    gpu_resource_name: str = "nvidia.com/gpu"
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    shared_memory_size: str = "2Gi"


@dataclass(frozen=True)
class SchedulingSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    affinity: Mapping[str, Any] | None = None
    runtime_class_name: str | None = None
    priority_class_name: str | None = None


@dataclass(frozen=True)
class ServingSpec:
    deployment_mode: str = "Auto"
    min_replicas: int = 1
    max_replicas: int = 1
    external: bool = False
    auth: bool = False
    timeout_seconds: int | None = None
    service_account_name: str | None = None
    display_name: str = ""


@dataclass(frozen=True)
class DiffusionLM:
    """One DiffusionLM object: identity plus its fully defaulted, validated spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: ModelSpec
    cache: CacheSpec
    decoding: Mapping[str, Any]
    runtime: RuntimeSpec
    resources: ResourcesSpec
    scheduling: SchedulingSpec
    serving: ServingSpec
    suspend: bool = False


def _get(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(key, f"must be an object, got {type(value).__name__}")
    return value


def _quantity(value: Any) -> str:
    return str(value)


def parse(body: Mapping[str, Any], settings: OperatorSettings | None = None) -> DiffusionLM:
    """Defaults and cross-field validation of a DiffusionLM object (as read from the API server)."""
    settings = settings or OperatorSettings()
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    name = meta.get("name") or ""
    if not _DNS1123.match(name) or len(name) > 53:
        # InferenceService names become DNS labels and KServe appends "-predictor" (10 chars).
        raise SpecError("metadata.name", f"must be a DNS-1123 label of at most 53 characters, got {name!r}")
    model = _parse_model(_get(spec, "model"), name)
    cache = _parse_cache(_get(spec, "cache"), model)
    decoding = _parse_decoding(_get(spec, "decoding"))
    runtime = _parse_runtime(_get(spec, "runtime"), settings)
    resources = _parse_resources(_get(spec, "resources"))
    scheduling = _parse_scheduling(_get(spec, "scheduling"))
    serving = _parse_serving(_get(spec, "serving"), name)
    return DiffusionLM(
        name=name,
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid") or "",
        generation=int(meta.get("generation") or 0),
        model=model,
        cache=cache,
        decoding=decoding,
        runtime=runtime,
        resources=resources,
        scheduling=scheduling,
        serving=serving,
        suspend=bool(spec.get("suspend", False)),
    )


def _parse_model(model: Mapping[str, Any], name: str) -> ModelSpec:
    uri = model.get("uri")
    if not isinstance(uri, str) or not (m := _URI.match(uri)):
        raise SpecError("model.uri", f"must be hf://ORG/NAME, pvc://CLAIM/PATH, oci://IMAGE or s3://BUCKET/PATH, got {uri!r}")
    scheme = m.group("scheme")
    if scheme == "hf" and not _HF_REPO.match(m.group("rest")):
        raise SpecError("model.uri", f"hf:// URIs name a repository as ORG/NAME, got {uri!r}")
    creds = model.get("credentialsSecretRef") or {}
    return ModelSpec(
        uri=uri,
        scheme=scheme,
        revision=str(model.get("revision") or "main"),
        credentials_secret=creds.get("name"),
        credentials_key=creds.get("key") or "HF_TOKEN",
        served_model_name=model.get("servedModelName") or name,
    )


def _parse_cache(cache: Mapping[str, Any], model: ModelSpec) -> CacheSpec:
    mode = cache.get("mode") or ("Managed" if model.scheme == "hf" else "None")
    if mode not in CACHE_MODES:
        raise SpecError("cache.mode", f"must be one of {CACHE_MODES}, got {mode!r}")
    if mode in ("Managed", "Existing") and model.scheme != "hf":
        raise SpecError(
            "cache.mode",
            f"{mode} downloads from Hugging Face and needs an hf:// model.uri; use mode None for "
            f"{model.scheme}:// (KServe's storage initializer fetches it)",
        )
    existing = cache.get("existingClaimName")
    if mode == "Existing" and not existing:
        raise SpecError("cache.existingClaimName", "is required when cache.mode is Existing")
    if existing and mode != "Existing":
        raise SpecError("cache.existingClaimName", f"only applies to cache.mode Existing (mode is {mode})")
    dl = cache.get("download") or {}
    return CacheSpec(
        mode=mode,
        size=_quantity(cache.get("size", "50Gi")),
        storage_class_name=cache.get("storageClassName"),
        access_modes=tuple(cache.get("accessModes") or ("ReadWriteOnce",)),
        existing_claim_name=existing,
        retain_on_delete=bool(cache.get("retainOnDelete", False)),
        download=DownloadSpec(
            backoff_limit=int(dl.get("backoffLimit", 3)),
            max_attempts=int(dl.get("maxAttempts", 5)),
            active_deadline_seconds=int(dl.get("activeDeadlineSeconds", 21600)),
        ),
    )


def _parse_decoding(decoding: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields that are set (the runtime's own defaults fill the rest), checked by the runtime's rules."""
    unknown = sorted(set(decoding) - set(DECODING_FLAGS))
    if unknown:
        raise SpecError(f"decoding.{unknown[0]}", "unknown decoding setting")
    values = {k: v for k, v in decoding.items() if v is not None}
    snake = {DECODING_FLAGS[k][1]: v for k, v in values.items()}
    # One set of rules for the server, the engine and the operator: DecodingParams.validate(). Without an
    # algorithm the server picks the model family's own, which is unknown here: any algorithm that
    # accepts the settings will do, else the runtime default's complaint is reported.
    candidates = [snake] if "algorithm" in snake else [snake] + [{**snake, "algorithm": a} for a in ALGORITHMS]
    first_error: ValueError | None = None
    for candidate in candidates:
        try:
            DecodingParams.from_dict(candidate).validate()
            break
        except ValueError as exc:
            first_error = first_error or exc
    else:
        assert first_error is not None
        field_name, _, message = str(first_error).partition(": ")
        camel = {s: crd for crd, (_, s) in DECODING_FLAGS.items()}.get(field_name, field_name)
        raise SpecError(f"decoding.{camel}", message or str(first_error))
    return {k: values[k] for k in DECODING_FLAGS if k in values}


def _parse_runtime(runtime: Mapping[str, Any], settings: OperatorSettings) -> RuntimeSpec:
    args = tuple(str(a) for a in runtime.get("args") or ())
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise SpecError("runtime.args", f"{flag} is set by the operator (use spec.model instead)")
    return RuntimeSpec(
        image=runtime.get("image") or settings.runtime_image,
        image_pull_policy=runtime.get("imagePullPolicy"),
        serving_runtime_name=runtime.get("servingRuntimeName"),
        dtype=runtime.get("dtype"),
        max_model_len=runtime.get("maxModelLen"),
        max_num_seqs=runtime.get("maxNumSeqs"),
        args=args,
        env=tuple(dict(e) for e in runtime.get("env") or ()),
    )


def _parse_resources(resources: Mapping[str, Any]) -> ResourcesSpec:
    requests = {k: _quantity(v) for k, v in (resources.get("requests") or {}).items()}
    limits = {k: _quantity(v) for k, v in (resources.get("limits") or {}).items()}
    gpu_name = resources.get("gpuResourceName") or "nvidia.com/gpu"
    gpus = int(resources.get("gpus", 1))
    if gpu_name in limits or gpu_name in requests:
        raise SpecError("resources.limits", f"set GPUs with resources.gpus, not as {gpu_name} requests/limits")
    for key in sorted(set(requests) & set(limits)):
        # Only comparable for plain numbers here; the API server rejects the rest at pod creation.
        try:
            over = float(requests[key]) > float(limits[key])
        except ValueError:
            over = False
        if over:
            raise SpecError(f"resources.requests.{key}", f"{requests[key]} exceeds the limit {limits[key]}")
    return ResourcesSpec(
        gpus=gpus,
        gpu_resource_name=gpu_name,
        requests=requests,
        limits=limits,
        shared_memory_size=_quantity(resources.get("sharedMemorySize", "2Gi")),
    )


def _parse_scheduling(scheduling: Mapping[str, Any]) -> SchedulingSpec:
    return SchedulingSpec(
        node_selector=dict(scheduling.get("nodeSelector") or {}),
        tolerations=tuple(dict(t) for t in scheduling.get("tolerations") or ()),
        affinity=scheduling.get("affinity"),
        runtime_class_name=scheduling.get("runtimeClassName"),
        priority_class_name=scheduling.get("priorityClassName"),
    )


def _parse_serving(serving: Mapping[str, Any], name: str) -> ServingSpec:
    mode = serving.get("deploymentMode") or "Auto"
    if mode not in DEPLOYMENT_MODES:
        raise SpecError("serving.deploymentMode", f"must be one of {DEPLOYMENT_MODES}, got {mode!r}")
    min_replicas = int(serving.get("minReplicas", 1))
    max_replicas = int(serving.get("maxReplicas", 1))
    if max_replicas < max(min_replicas, 1):
        raise SpecError("serving.maxReplicas", f"must be >= minReplicas ({min_replicas}) and >= 1, got {max_replicas}")
    return ServingSpec(
        deployment_mode=mode,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        external=bool(serving.get("external", False)),
        auth=bool(serving.get("auth", False)),
        timeout_seconds=serving.get("timeoutSeconds"),
        service_account_name=serving.get("serviceAccountName"),
        display_name=serving.get("displayName") or name,
    )
