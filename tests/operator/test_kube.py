"""The generic client's URL layout (the verbs themselves run against the real API server in test_cluster)."""

from dllm_operator.kube import KubeError, resource_path


def test_resource_paths():
    assert resource_path("v1", "PersistentVolumeClaim", "ns", "c") == "/api/v1/namespaces/ns/persistentvolumeclaims/c"
    assert resource_path("batch/v1", "Job", "ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert (resource_path("serving.dllm.io/v1alpha1", "DiffusionLM", "ns", "m", "status")
            == "/apis/serving.dllm.io/v1alpha1/namespaces/ns/diffusionlms/m/status")
    assert (resource_path("serving.kserve.io/v1alpha1", "ClusterServingRuntime", None, "r")
            == "/apis/serving.kserve.io/v1alpha1/clusterservingruntimes/r")
    assert resource_path("v1", "Pod", "ns", "p", "log") == "/api/v1/namespaces/ns/pods/p/log"


def test_retryable_errors():
    assert KubeError(0, "Unreachable", "").retryable and KubeError(503, "", "").retryable
    assert KubeError(429, "", "").retryable and KubeError(409, "Conflict", "").retryable
    assert not KubeError(422, "Invalid", "").retryable and not KubeError(403, "Forbidden", "").retryable
