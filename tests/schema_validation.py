"""Strict offline schema validation of Kubernetes objects (reusable by every test tier).

Why: the API server silently *prunes* unknown fields of custom resources and most clients ignore
unknown fields of core kinds, so a misspelled field in a builder, chart or manifest would only show
up as "the setting has no effect" in production. This module rejects it in unit tests instead:

* custom resources are checked against the ``openAPIV3Schema`` of the real CRDs (``tests/crds``: KServe,
  OpenShift, prometheus-operator; ``manifests/crd``: ours), converted to JSON Schema with unknown fields
  forbidden wherever the CRD does not preserve them;
* core kinds (PersistentVolumeClaim, Job, Deployment, RBAC, CRDs themselves ...) are checked against the
  ``kubernetes`` python client's generated models (the Kubernetes OpenAPI), walking every field and
  rejecting unknown keys, wrong types and missing required fields;
* ``metadata`` of every object is checked as ``ObjectMeta``.

API::

    from tests.schema_validation import validate, errors, validate_documents, SchemaError, SchemaValidator

    validate(obj)                  # raises SchemaError listing every problem
    errors(obj) -> list[str]       # the problems, empty when valid
    validate_documents(yaml_text)  # every document of a multi-document YAML string (None/empty skipped)
    SchemaValidator(crd_paths=[...]).validate(obj)   # with other CRD files
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client
import yaml

ROOT = Path(__file__).resolve().parent.parent
# libyaml when available: the KServe InferenceService CRD alone is 2 MB of YAML.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DEFAULT_CRD_DIRS = (ROOT / "tests" / "crds", ROOT / "manifests" / "crd")

# apiVersion/kind pairs whose python class name is not simply <Version><Kind>.
_MODEL_OVERRIDES = {
    ("v1", "Event"): "CoreV1Event",
    ("events.k8s.io/v1", "Event"): "EventsV1Event",
    ("v1", "EndpointPort"): "CoreV1EndpointPort",
    ("discovery.k8s.io/v1", "EndpointPort"): "DiscoveryV1EndpointPort",
}
# Value types the OpenAPI declares as string but which YAML authors legitimately write as numbers
# (resource.Quantity maps such as requests/limits/capacity).
_QUANTITY_MAPS = ("dict(str, str)", "Dict[str, str]")


class SchemaError(AssertionError):
    """The object does not validate; ``problems`` lists every finding with its field path."""

    def __init__(self, obj: dict, problems: list[str]):
        self.problems = problems
        ident = f"{obj.get('apiVersion')}/{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
        super().__init__(f"{ident} is invalid:\n  " + "\n  ".join(problems))


def _crd_to_jsonschema(schema: dict) -> dict:
    """Convert a structural CRD schema node to JSON Schema, forbidding unknown fields like a strict decoder."""
    out: dict[str, Any] = {}
    for key in ("enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
                "maxLength", "minItems", "maxItems", "required", "minProperties", "maxProperties", "multipleOf",
                "uniqueItems"):
        if key in schema:
            out[key] = copy.deepcopy(schema[key])
    # OpenAPI v3.0 booleans for exclusive bounds -> draft-7 numbers.
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(flag), bool):
            if out.pop(flag) and bound in out:
                out[flag] = out.pop(bound)
    types: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        types = ["integer", "string"]
    elif "type" in schema:
        types = [schema["type"]]
    if types and schema.get("nullable"):
        types.append("null")
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if types:
        out["type"] = types if len(types) > 1 else types[0]
    if "properties" in schema:
        out["properties"] = {k: _crd_to_jsonschema(v) for k, v in schema["properties"].items()}
    if "items" in schema and isinstance(schema["items"], dict):
        out["items"] = _crd_to_jsonschema(schema["items"])
    if "additionalProperties" in schema:
        ap = schema["additionalProperties"]
        out["additionalProperties"] = _crd_to_jsonschema(ap) if isinstance(ap, dict) else ap
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out[key] = [_crd_to_jsonschema(s) for s in schema[key]]
    if isinstance(schema.get("not"), dict):
        out["not"] = _crd_to_jsonschema(schema["not"])
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-embedded-resource")
    if schema.get("type") == "object" and "additionalProperties" not in schema and not preserve:
        # A structural schema prunes everything it does not list: treat that as an error here.
        out["additionalProperties"] = False
    return out


def _iter_yaml_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.exists():
            yield path


class SchemaValidator:
    """Validates objects against CRD schemas (custom kinds) or the kubernetes client models (core kinds)."""

    def __init__(self, crd_paths: Iterable[Path] = DEFAULT_CRD_DIRS):
        self._crds: dict[tuple[str, str], dict] = {}
        for path in _iter_yaml_files(crd_paths):
            for doc in yaml.load_all(path.read_text(), Loader=_LOADER):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    self.add_crd(doc)

    def add_crd(self, crd: dict) -> None:
        """Register every served version of a CRD document."""
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                continue
            converted = _crd_to_jsonschema(schema)
            # metadata is checked as ObjectMeta separately; apiVersion/kind are checked by lookup.
            converted.setdefault("properties", {})["metadata"] = {"type": "object"}
            self._crds[(f"{group}/{version['name']}", kind)] = converted

    def known_custom_kinds(self) -> list[tuple[str, str]]:
        return sorted(self._crds)

    def errors(self, obj: Any) -> list[str]:
        """Every problem of ``obj`` as ``path: message`` strings; empty when valid."""
        if not isinstance(obj, dict):
            return [f"<root>: expected an object, got {type(obj).__name__}"]
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return ["<root>: apiVersion and kind are required strings"]
        if kind == "List" and api_version == "v1":
            problems = []
            for i, item in enumerate(obj.get("items") or []):
                problems += [f"items[{i}].{p}" for p in self.errors(item)]
            return problems
        problems: list[str] = []
        if "metadata" in obj:
            _check_model(obj["metadata"], "V1ObjectMeta", "metadata", problems)
        schema = self._crds.get((api_version, kind))
        if schema is not None:
            validator = jsonschema.Draft7Validator(schema)
            for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                where = ".".join(str(p) for p in err.absolute_path) or "<root>"
                problems.append(f"{where}: {err.message}")
            return problems
        model = _model_name(api_version, kind)
        if model is None:
            return [f"<root>: no schema known for {api_version}/{kind} (add its CRD to the validator)"]
        _check_model(obj, model, "", problems)
        return problems

    def validate(self, obj: Any) -> None:
        problems = self.errors(obj)
        if problems:
            raise SchemaError(obj if isinstance(obj, dict) else {}, problems)


def _model_name(api_version: str, kind: str) -> str | None:
    name = _MODEL_OVERRIDES.get((api_version, kind))
    if name is None:
        version = api_version.rsplit("/", 1)[-1]
        name = version[:1].upper() + version[1:] + kind
    return name if hasattr(kubernetes.client, name) else None


# The client spells containers both ways depending on its generator version.
_LIST_RE = re.compile(r"^[lL]ist\[(.*)\]$")
_DICT_RE = re.compile(r"^(?:dict\(([^,]*), (.*)\)|Dict\[([^,]*), (.*)\])$")


def _check_model(data: Any, model: str, path: str, problems: list[str]) -> None:
    """Walk ``data`` against a kubernetes client model: unknown keys, wrong types, missing required fields."""
    klass = getattr(kubernetes.client, model)
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected an object ({model}), got {type(data).__name__}")
        return
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        attr = by_json.get(key)
        if attr is None:
            problems.append(f"{where}: unknown field (not in {model})")
            continue
        if value is None:
            continue
        _check_type(value, klass.openapi_types[attr], where, problems)
    for attr in _required_attrs(model):
        if data.get(klass.attribute_map[attr]) is None:
            problems.append(f"{path + '.' if path else ''}{klass.attribute_map[attr]}: required field is missing")


@functools.lru_cache(maxsize=None)
def _required_attrs(model: str) -> tuple[str, ...]:
    """Attributes the generated model marks required (pydantic models in kubernetes>=35, setters before)."""
    klass = getattr(kubernetes.client, model)
    fields = getattr(klass, "model_fields", None)
    if fields is not None:
        return tuple(name for name, field in fields.items() if field.is_required() and name in klass.attribute_map)
    config = kubernetes.client.Configuration()
    config.client_side_validation = True
    probe = klass.__new__(klass)
    probe.local_vars_configuration = config
    required = []
    for attr in klass.openapi_types:
        try:
            setattr(probe, attr, None)
        except ValueError:
            required.append(attr)
    return tuple(required)


def _check_type(value: Any, typ: str, path: str, problems: list[str], quantity: bool = False) -> None:
    match_list, match_dict = _LIST_RE.match(typ), _DICT_RE.match(typ)
    if match_list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check_type(item, match_list.group(1), f"{path}[{i}]", problems)
    elif match_dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        value_type = match_dict.group(2) or match_dict.group(4)
        for key, item in value.items():
            _check_type(item, value_type, f"{path}.{key}", problems, quantity=typ in _QUANTITY_MAPS)
    elif typ == "str":
        ok = isinstance(value, str) or (quantity and isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            problems.append(f"{path}: expected a string, got {type(value).__name__}")
    elif typ == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {type(value).__name__}")
    elif typ == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"{path}: expected a number, got {type(value).__name__}")
    elif typ == "bool":
        if not isinstance(value, bool):
            problems.append(f"{path}: expected a boolean, got {type(value).__name__}")
    elif typ in ("datetime", "date"):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a timestamp string, got {type(value).__name__}")
    elif typ == "object":
        return  # IntOrString, RawExtension, JSON: anything goes
    else:
        _check_model(value, typ, path, problems)


@functools.lru_cache(maxsize=1)
def default_validator() -> SchemaValidator:
    return SchemaValidator()


def errors(obj: Any) -> list[str]:
    return default_validator().errors(obj)


def validate(obj: Any) -> None:
    default_validator().validate(obj)


def validate_documents(text: str, validator: SchemaValidator | None = None) -> list[dict]:
    """Validate every document of a (multi-document) YAML string; returns the parsed objects."""
    validator = validator or default_validator()
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        validator.validate(doc)
    return docs
