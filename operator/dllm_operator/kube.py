"""A small generic Kubernetes REST client: get/list/server-side apply/delete/log for any kind.

Why not the typed client: the children are plain dicts from the builders (some are custom resources),
server-side apply needs `application/apply-patch+yaml`, and typed models would round-trip through
classes that drop fields they do not know. Authentication and TLS come from the kubernetes client's
`Configuration` (kubeconfig or in-cluster), so every credential type it supports works here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import kubernetes

FIELD_MANAGER = "dllm-operator"

# kind -> plural for everything the operator touches (other kinds: lower-case kind + "s").
PLURALS: dict[str, str] = {
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Job": "jobs",
    "Pod": "pods",
    "ConfigMap": "configmaps",
    "ServingRuntime": "servingruntimes",
    "ClusterServingRuntime": "clusterservingruntimes",
    "InferenceService": "inferenceservices",
    "DiffusionLM": "diffusionlms",
}


class KubeError(Exception):
    """A non-2xx answer of the API server (status, reason and the server's message)."""

    def __init__(self, status: int, reason: str, message: str):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}")

    @property
    def retryable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


def load_config() -> kubernetes.client.Configuration:
    """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    return config


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base
    if namespace is not None:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{PLURALS.get(kind) or kind.lower() + 's'}"
    if name is not None:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class Kube:
    def __init__(self, config: kubernetes.client.Configuration | None = None, timeout_s: float = 30.0):
        self._api = kubernetes.client.ApiClient(config or load_config())
        self._timeout = timeout_s

    def close(self) -> None:
        self._api.close()

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        params = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()
                  if v is not None]
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, _, _ = self._api.param_serialize(
            method=method, resource_path=path, query_params=params, header_params=headers,
            auth_settings=["BearerToken"],
        )
        try:
            # The client's REST layer serializes dict bodies as JSON for json and apply-patch+yaml types.
            response = self._api.call_api(method, url, header_params=headers, body=body,
                                          _request_timeout=self._timeout)
        except Exception as exc:  # connection refused, TLS, timeout: the API server is unreachable
            raise KubeError(0, "Unreachable", str(exc)) from exc
        response.read()
        payload = response.data or b""
        if response.status >= 300:
            try:
                status = json.loads(payload)
                reason, message = status.get("reason", ""), status.get("message", "")
            except ValueError:
                reason, message = "", payload.decode(errors="replace")[:500]
            raise KubeError(response.status, reason or str(response.status), message)
        if raw:
            return payload.decode(errors="replace")
        return json.loads(payload) if payload else None

    # ------------------------------------------------------------------ verbs
    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", resource_path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None) -> list[dict]:
        out = self.request("GET", resource_path(api_version, kind, namespace), query={"labelSelector": label_selector})
        return list(out.get("items") or [])

    def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict:
        """Server-side apply: creates or converges the fields we own; hand edits of them are reverted."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", path, query={"fieldManager": FIELD_MANAGER, "force": force}, body=obj,
                            content_type="application/apply-patch+yaml")

    def create(self, obj: Mapping[str, Any]) -> dict:
        meta = obj["metadata"]
        return self.request("POST", resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                            query={"fieldManager": FIELD_MANAGER}, body=obj)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str,
               propagation: str = "Background") -> bool:
        """True when something was deleted, False when it was already gone."""
        try:
            self.request("DELETE", resource_path(api_version, kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> dict:
        return self.request("PATCH", resource_path(api_version, kind, namespace, name, "status"),
                            body={"status": status}, content_type="application/merge-patch+json")

    def pod_log(self, namespace: str, name: str, limit_bytes: int, container: str | None = None) -> str | None:
        """The tail of a pod's log, or None when there is none (not started, no kubelet, gone)."""
        try:
            return self.request("GET", resource_path("v1", "Pod", namespace, name, "log"),
                                query={"limitBytes": limit_bytes, "container": container, "tailLines": 50},
                                raw=True)
        except KubeError as exc:
            if exc.status in (400, 404) or exc.status >= 500:
                return None
            raise
