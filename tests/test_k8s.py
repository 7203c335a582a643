"""The Kubernetes manifests under k8s/: every kustomize target renders, every rendered object validates
(built-in kinds with kubernetes-validate, the KubeRay kinds against the v1 schemas of the KubeRay CRDs),
the checks can fail, and what the manifests promise holds: the RayService serves the Serve config of the
pipeline on workers that provide the resources it asks for, the RayJob runs real resops commands, every
Ray pod mounts the shared storage. No cluster, no Docker, no Ray: `kubectl kustomize` works offline."""
from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERAY_SCHEMAS = K8S / "schemas" / "kuberay"  # the CRDs of the KubeRay release the manifests target (README there)
OVERLAYS = ("cpu", "gpu", "edge")
TARGETS = ("base", *OVERLAYS)
KUBE_VERSION = "1.32.0"  # schemas kubernetes-validate ships; the kubectl here is 1.32
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz",
             "RayService": "ray.io_rayservices.yaml.gz"}


def missing_tool(what: str) -> None:
    """A tool these tests need is not installed: a failure in CI (``CI`` set, as .ci/run and CI services
    do), a skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must have it)")
    pytest.skip(what)
CLUSTER_SPEC = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"),
                "RayService": ("spec", "rayClusterConfig")}
# KubeRay's own limits (ray-operator/controllers/ray/utils/constant.go): names get suffixes.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The int8 ONNX edge model runs inside the ingress (serve.edge.placement auto): the Router carries the edge tier.
SERVE_DEPLOYMENTS = {"Router", "CloudClassifier"}
EDGE_DEPLOYMENT = "Router"


# --------------------------------------------------------------------------- rendering

def _target_dir(target: str) -> Path:
    return K8S / "base" if target == "base" else K8S / "overlays" / target


@lru_cache(maxsize=None)
def _render(target: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_tool("kubectl is not installed: `kubectl kustomize` renders the manifests")
    r = subprocess.run([kubectl, "kustomize", str(_target_dir(target))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {_target_dir(target)} failed:\n{r.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(r.stdout) if doc)


def rendered(target: str) -> list[dict]:
    return copy.deepcopy(list(_render(target)))


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_spec(obj: dict) -> dict:
    node = obj
    for key in CLUSTER_SPEC[obj["kind"]]:
        node = node[key]
    return node


def groups(obj: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head and every worker group of a Ray object's cluster."""
    spec = cluster_spec(obj)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


# --------------------------------------------------------------------------- schemas

def _openapi_to_jsonschema(node, *, strict: bool, root: bool = True):
    """A CRD's OpenAPI v3 (structural) schema as JSON Schema (draft 7).

    ``nullable`` becomes a null type, ``x-kubernetes-int-or-string`` an integer-or-string ``anyOf``
    (when the schema does not spell it out). With ``strict``, an object that declares no
    ``additionalProperties`` and does not preserve unknown fields refuses fields it does not list:
    the API server would prune them silently, ``kubectl apply --validate=strict`` rejects them. The
    root ``metadata`` (ObjectMeta, an opaque object in CRDs) is left open and checked separately.
    """
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n, strict=strict, root=False) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _openapi_to_jsonschema(sub, strict=strict, root=False) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _openapi_to_jsonschema(value, strict=strict, root=False)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_openapi_to_jsonschema(sub, strict=strict, root=False) for sub in value]
        elif key != "nullable":
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                 "metadata": {"type": "object"}})
    if (strict and out.get("type") == "object" and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields") and not node.get("x-kubernetes-embedded-resource")):
        out["additionalProperties"] = False
    if root and "metadata" in out.get("properties", {}):
        out["properties"]["metadata"] = {"type": "object"}
    return out


def _list_type(validator, list_type, instance, schema):
    """``x-kubernetes-list-type``: ``map`` lists have unique keys, ``set`` lists unique items (the
    API server rejects duplicates, e.g. two env entries or volumes of the same name)."""
    from jsonschema import ValidationError

    if not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = {}
    for i, item in enumerate(instance):
        if list_type == "map" and isinstance(item, dict):
            ident = json.dumps([item.get(k) for k in keys])
        elif list_type == "set":
            ident = json.dumps(item, sort_keys=True)
        else:
            continue
        if ident in seen:
            what = dict(zip(keys, json.loads(ident))) if list_type == "map" else item
            yield ValidationError(f"duplicate entry {what} (items {seen[ident]} and {i} of a list-type {list_type})")
        seen[ident] = i


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    """The ``openAPIV3Schema`` of version v1 of the KubeRay CRD of ``kind``."""
    import gzip

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each: libyaml reads them 4x faster
    crd = yaml.load(gzip.decompress((KUBERAY_SCHEMAS / CRD_FILES[kind]).read_bytes()).decode(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def crd_validator(kind: str, strict: bool = True):
    import jsonschema

    schema = _openapi_to_jsonschema(crd_schema(kind), strict=strict)
    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(obj: dict, *, strict: bool = True) -> list[str]:
    """Every schema violation of one rendered object, as ``kind/name: path: message``."""
    import kubernetes_validate

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") == "ray.io/v1":
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in crd_validator(obj["kind"], strict).iter_errors(obj)]
        # ObjectMeta is opaque in a CRD schema: check it as the API server does, strictly.
        meta_carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        try:
            kubernetes_validate.validate(meta_carrier, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
        return errors
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=strict)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    return []


# --------------------------------------------------------------------------- Ray resources of the pods

def _quantity(value) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def ray_start_resources(group: dict) -> dict:
    """The custom resources of a group's ``rayStartParams.resources``, as `ray start` reads them
    after the shell has removed KubeRay's quoting: ``'"{\\"edge\\": 1}"'`` -> ``{"edge": 1}``."""
    text = group.get("rayStartParams", {}).get("resources")
    if text is None:
        return {}
    words = shlex.split(text)
    assert len(words) == 1, f"rayStartParams.resources {text!r} is not one shell word"
    parsed = json.loads(words[0])
    assert isinstance(parsed, dict) and all(isinstance(v, (int, float)) for v in parsed.values()), text
    return parsed


def ray_node(group: dict) -> dict:
    """The Ray resources one pod of a group advertises (num-cpus / num-gpus or the container limits)."""
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    res = container.get("resources", {})
    limits = {**res.get("requests", {}), **res.get("limits", {})}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get("nvidia.com/gpu", 0))
    return {"CPU": cpus, "GPU": gpus, **{k: float(v) for k, v in ray_start_resources(group).items()}}


def ray_nodes(obj: dict) -> list[tuple[str, dict]]:
    """Every Ray node a Ray object's cluster can have at once (autoscaled groups at maxReplicas)."""
    spec = cluster_spec(obj)
    autoscaled = bool(spec.get("enableInTreeAutoscaling"))
    nodes = [("head", ray_node(spec["headGroupSpec"]))]
    for g in spec.get("workerGroupSpecs", []):
        count = g["maxReplicas"] if autoscaled else g.get("replicas", g["minReplicas"])
        nodes += [(f"{g['groupName']}-{i}", ray_node(g)) for i in range(count)]
    return nodes


def place(replicas: list[tuple[str, dict]], nodes: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """First-fit-decreasing placement of actors (name, demand) on nodes; raises when one does not fit."""
    free = [(name, dict(res)) for name, res in nodes]
    where: dict[str, list[str]] = {}
    for name, demand in sorted(replicas, key=lambda r: -r[1].get("CPU", 0)):
        for node_name, res in free:
            if all(res.get(k, 0.0) + 1e-9 >= v for k, v in demand.items()):
                for k, v in demand.items():
                    res[k] -= v
                where.setdefault(name, []).append(node_name.rsplit("-", 1)[0] if node_name != "head" else "head")
                break
        else:
            raise AssertionError(f"no node has room for a {name} replica needing {demand}; nodes: {nodes}")
    return where


def serve_replicas(serve_config: dict) -> list[tuple[str, dict]]:
    out = []
    for app in serve_config["applications"]:
        for d in app["deployments"]:
            opts = d.get("ray_actor_options", {})
            demand = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0)),
                      **{k: float(v) for k, v in (opts.get("resources") or {}).items()}}
            auto = d.get("autoscaling_config")
            count = int(auto.get("initial_replicas") or auto.get("min_replicas", 1)) if auto else int(d.get("num_replicas", 1))
            out += [(d["name"], {k: v for k, v in demand.items() if v})] * count
    return out


# --------------------------------------------------------------------------- rendering and validation

@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders_every_target(target):
    objs = rendered(target)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    expected = [("RayCluster", "resops"), ("RayJob", "resops-pipeline"), ("RayService", "resops-serve")]
    if target != "base":
        expected += [("ConfigMap", "resops-serve-env"), ("ConfigMap", "resops-storage"),
                     ("PersistentVolumeClaim", "resops-shared")]
    assert kinds == sorted(expected)
    for o in objs:  # build-time helpers never reach the cluster
        assert not o["metadata"].get("annotations", {}).get("config.kubernetes.io/local-config")
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "resops"


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_validates(target):
    errors = [err for obj in rendered(target) for err in schema_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_rules_the_schema_cannot_express(target):
    """What KubeRay's validation (utils/validation.go) refuses at reconcile time, and our own invariants."""
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    for obj in rendered(target):
        if obj["apiVersion"] != "ray.io/v1":
            continue
        name = obj["metadata"]["name"]
        assert DNS1035.match(name) and len(name) <= MAX_NAME[obj["kind"]], f"{obj['kind']} name {name!r}"
        spec = cluster_spec(obj)
        assert spec["rayVersion"] == ray_pin, f"{obj['kind']}: rayVersion {spec['rayVersion']} but the image has ray {ray_pin}"
        names = [n for n, _ in groups(obj)]
        assert len(names) == len(set(names)), f"{obj['kind']}: duplicate worker group names {names}"
        for gname, g in groups(obj):
            containers = g["template"]["spec"]["containers"]
            assert containers, f"{obj['kind']} {gname}: no container"
            params = g.get("rayStartParams", {})
            assert "labels" not in params, "KubeRay refuses rayStartParams['labels']"
            uses_params = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
            assert not (uses_params and g.get("resources")), f"{gname}: resources in both rayStartParams and resources"
            ray_start_resources(g)  # parses as `ray start --resources` will see it
            res = containers[0].get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})) and {"cpu", "memory"} <= set(res.get("limits", {})), \
                f"{obj['kind']} {gname}: CPU and memory requests and limits must be set (Ray sizes itself from them)"
            assert res["requests"]["memory"] == res["limits"]["memory"], f"{gname}: memory request != limit"
            if gname != "head":
                assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], gname
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head runs no Ray tasks"
        if obj["kind"] == "RayJob":
            assert obj["spec"]["shutdownAfterJobFinishes"] is True
            assert obj["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_gets_the_image_storage_and_pod_defaults(overlay):
    objs = rendered(overlay)
    maps = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    storage = maps["resops-storage"]
    # Serve's HAProxy ingress in every pod, as params.yaml ray.env gives a local Ray
    assert maps["resops-serve-env"] == yaml.safe_load((ROOT / "params.yaml").read_text())["ray"]["env"]
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "workers on several nodes share the volume"
    shared = storage["RESOPS_SHARED_DIR"]
    for key in ("RESOPS_WORKSPACE", "DVC_REMOTE_URL"):
        assert storage[key].startswith(shared.rstrip("/") + "/"), f"{key} {storage[key]} is not on the shared volume"
    images = set()
    for obj in objs:
        if obj["apiVersion"] != "ray.io/v1":
            continue
        for gname, g in groups(obj):
            where = f"{obj['kind']} {gname}"
            pod = g["template"]["spec"]
            c = pod["containers"][0]
            images.add(c["image"])
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], where
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", where
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            assert mounts == {"shared": shared, "dshm": "/dev/shm"}, where
            assert c["envFrom"] == [{"configMapRef": {"name": "resops-storage"}},
                                    {"configMapRef": {"name": "resops-serve-env"}}], where
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["RESOPS_HOME"]["value"] == "/app", where
            token = env.get("RESOPS_API_TOKEN")
            if obj["kind"] == "RayJob":
                assert token is None, f"{where}: training pods have no use for the API token"
            else:
                assert token["valueFrom"]["secretKeyRef"] == {"name": "resops-api-token", "key": "token", "optional": True}
            sc = pod["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
    assert len(images) == 1 and ":" in images.pop(), "every Ray container runs the one tagged resops image"


# --------------------------------------------------------------------------- the checks can fail

def test_broken_kuberay_objects_fail_validation():
    raycluster = one(rendered("cpu"), "RayCluster")
    assert not schema_errors(raycluster)

    def broken(edit) -> list[str]:
        obj = copy.deepcopy(raycluster)
        edit(obj)
        return schema_errors(obj)

    def set_path(obj, path, value):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    errors = broken(lambda o: set_path(o, ("spec", "workerGroupSpecs", 0, "replicas"), "two"))
    assert any("workerGroupSpecs.0.replicas" in e and "'two' is not of type 'integer'" in e for e in errors), errors
    # rayStartParams values are strings: an unquoted number is the classic mistake.
    errors = broken(lambda o: set_path(o, ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0))
    assert any("rayStartParams.num-cpus" in e and "not of type 'string'" in e for e in errors), errors
    errors = broken(lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"))
    assert any("'groupName' is a required property" in e for e in errors), errors
    errors = broken(lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
        {"name": "shared", "emptyDir": {}}))
    assert any("duplicate entry {'name': 'shared'}" in e for e in errors), errors
    errors = broken(lambda o: set_path(o, ("metadata", "labels"), ["not", "a", "map"]))
    assert any(e.startswith("RayCluster/resops: metadata.labels") for e in errors), errors
    # A misspelled field: the API server would drop it without a word (structural pruning);
    # strict validation, like `kubectl apply --validate=strict`, names it.
    typo = copy.deepcopy(raycluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert not schema_errors(typo, strict=False)
    errors = schema_errors(typo, strict=True)
    assert any("'workerGroupSpec' was unexpected" in e for e in errors), errors

    rayjob = one(rendered("cpu"), "RayJob")
    rayjob["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in schema_errors(rayjob))
    rayservice = one(rendered("cpu"), "RayService")
    rayservice["spec"]["serveConfigV2"] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])  # a map, not a YAML string
    assert any("serveConfigV2" in e and "not of type 'string'" in e for e in schema_errors(rayservice))


def test_broken_builtin_objects_fail_validation():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}},
                           "template": {"metadata": {"labels": {"app": "x"}},
                                        "spec": {"containers": [{"name": "x", "image": "resops:0.1.0"}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 8000}]}}
    pvc = copy.deepcopy(one(rendered("cpu"), "PersistentVolumeClaim"))
    for good in (deployment, service, pvc):
        assert not schema_errors(good), good["kind"]
    cases = [
        (deployment, ("spec", "replicas"), "two"),
        (service, ("spec", "ports", 0, "port"), "eighty"),
        (pvc, ("spec", "accessModes"), "ReadWriteMany"),
    ]
    for good, path, value in cases:
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        errors = schema_errors(bad)
        assert errors and ".".join(map(str, path)) in errors[0], (good["kind"], errors)
    typo = copy.deepcopy(pvc)
    typo["spec"]["acessModes"] = typo["spec"].pop("accessModes")
    assert any("acessModes" in e for e in schema_errors(typo))


# --------------------------------------------------------------------------- the RayService

def _serve_config(objs: list[dict]) -> dict:
    text = one(objs, "RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string"
    return yaml.safe_load(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serves_the_pipeline_serve_config(overlay):
    from ray.serve.schema import ServeDeploySchema

    objs = rendered(overlay)
    config = _serve_config(objs)
    assert config == yaml.safe_load((K8S / "base" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what KubeRay's Serve API call would refuse
    assert config["http_options"]["host"] == "0.0.0.0"
    head = cluster_spec(one(objs, "RayService"))["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == config["http_options"]["port"]
    for app in config["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert callable(builder)
        from components.serve.app import build_app

        args = dict(app["args"])
        inspect.signature(build_app).bind(args.pop("cloud_model"), args.pop("edge_model", None), **args)
        assert "base_dir" not in app["args"], "a local absolute base_dir would not exist in the pods"
        for key in ("cloud_model", "edge_model", "edge_onnx"):
            if app["args"].get(key):
                path = Path(app["args"][key])
                assert not path.is_absolute() and path.parts[:2] == ("models", "promoted"), (key, path)
                assert path.name in app["args"]["files_sha256"], f"{path.name} is not pinned by files_sha256"
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == SERVE_DEPLOYMENTS
        assert "edge" in deployments[EDGE_DEPLOYMENT]["ray_actor_options"]["resources"]
        assert "cloud" in deployments["CloudClassifier"]["ray_actor_options"]["resources"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_the_cluster_provides_what_the_serve_deployments_ask_for(overlay, kind):
    """Every replica of the Serve config fits on the cluster's nodes (CPU and custom resources): the
    RayService's, and the interactive RayCluster's (`resops serve` there)."""
    objs = rendered(overlay)
    obj = one(objs, kind)
    config = _serve_config(objs)
    nodes = ray_nodes(obj)
    asked = {k for _, demand in serve_replicas(config) for k in demand} - {"CPU", "GPU"}
    offered = {k for _, res in nodes for k in res} - {"CPU", "GPU"}
    assert asked <= offered, f"{kind} ({overlay}): nothing provides {asked - offered}"
    where = place(serve_replicas(config), nodes)
    assert set(where) == SERVE_DEPLOYMENTS
    edge_groups = {name for name, g in groups(obj) if "edge" in ray_start_resources(g)}
    if overlay == "edge":
        assert edge_groups == {"edge"}, "the edge overlay puts the edge tier on the edge group only"
        edge = dict(groups(obj))["edge"]["template"]["spec"]
        assert "node-role.kubernetes.io/edge" in edge["nodeSelector"]
        assert any(t["key"] == "node-role.kubernetes.io/edge" for t in edge["tolerations"])
        assert set(where[EDGE_DEPLOYMENT]) == {"edge"} and "edge" not in where["CloudClassifier"]
    else:
        assert edge_groups == {"cpu"}, "without edge nodes the CPU workers carry the edge tier"


# --------------------------------------------------------------------------- the RayJob

def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell list (`a && b; c`), as argument vectors."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "&", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def _entrypoint(rayjob: dict) -> tuple[list[str], list[list[str]]]:
    """The RayJob entrypoint's -S overrides of k8s/workspace.sh and the commands it runs there."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["bash", "/app/k8s/workspace.sh"], "the pipeline runs in the shared workspace"
    assert (ROOT / "k8s" / "workspace.sh").is_file()
    rest, overrides = argv[2:], []
    while rest[:1] == ["-S"]:
        overrides.append(rest[1])
        rest = rest[2:]
    if rest[:2] == ["bash", "-c"]:
        assert len(rest) == 3, rest
        return overrides, _shell_commands(rest[2])
    return overrides, [rest]


def _resops_cli_accepts(argv: list[str], monkeypatch) -> list:
    """Parse argv with the real `resops` CLI, without running the command."""
    from pipelines import cli

    calls = []
    monkeypatch.setattr(cli, "cmd_run", lambda args: calls.append(args) or 0)
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        raise AssertionError(f"`resops {' '.join(argv)}` is not a valid resops command (argparse exit {exc.code})")
    assert code == 0 and len(calls) == 1, argv
    return calls


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoint_runs_resops_commands_that_exist(overlay, monkeypatch):
    from pipelines.params import load_params
    from pipelines.stages import STAGES

    rayjob = one(rendered(overlay), "RayJob")
    overrides, commands = _entrypoint(rayjob)
    params = load_params(ROOT / "params.yaml")
    for item in overrides:
        key = item.split("=", 1)[0]
        params(key)  # the key exists in params.yaml (a typo would be added silently)
    load_params(ROOT / "params.yaml", overrides)
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    ran = []
    for argv in commands:
        if argv[0] == "resops":
            ran += [s for c in _resops_cli_accepts(argv[1:], monkeypatch) for s in c.stages]
        elif argv[:2] == ["dvc", "repro"]:
            targets = [a for a in argv[2:] if not a.startswith("-")]
            assert not targets, f"the job reproduces the whole pipeline, not {targets}"
            for stage in dvc_yaml.values():
                cmd = shlex.split(stage["cmd"])
                assert cmd[0] == "resops", stage["cmd"]
                ran += [s for c in _resops_cli_accepts(cmd[1:], monkeypatch) for s in c.stages]
        else:
            assert argv[:2] == ["dvc", "push"], f"unexpected command {argv}"
    assert (set(STAGES) if "all" in ran else set(ran)) == set(STAGES), "the job runs the whole pipeline"
    assert ["dvc", "push"] in commands, "the outputs go to the DVC remote on the shared volume"
    has_gpu = any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
                  for _, g in groups(rayjob))
    assert has_gpu == (overlay == "gpu")
    assert ("train.use_gpu=true" in overrides) == has_gpu, "GPU workers and train.use_gpu go together"


def test_workspace_script_prepares_the_workspace(tmp_path):
    """k8s/workspace.sh for real, with this checkout as the image's /app and a command that reports."""
    bindir = Path(sys.executable).parent
    if not (bindir / "dvc").exists():
        missing_tool(f"dvc is not installed next to {sys.executable}")
    ws = tmp_path / "shared" / "workspace"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "RESOPS_SOURCE": str(ROOT),
           "RESOPS_WORKSPACE": str(ws), "DVC_REMOTE_URL": str(tmp_path / "shared" / "dvc-remote")}
    env.pop("RAY_ADDRESS", None)
    report = ("import json, os, yaml; p = yaml.safe_load(open('params.yaml')); "
              "print(json.dumps({'cwd': os.getcwd(), 'ray': os.environ['RAY_ADDRESS'], "
              "'use_gpu': p['train']['use_gpu'], 'epochs': p['train']['epochs'], "
              "'local': open('.dvc/config.local').read()}))")
    r = subprocess.run(["bash", str(K8S / "workspace.sh"), "-S", "train.use_gpu=true", "-S", "train.epochs=2",
                        sys.executable, "-c", report], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["cwd"]) == ws and out["ray"] == "auto"
    assert out["use_gpu"] is True and out["epochs"] == 2
    assert "no_scm = true" in out["local"] and str(tmp_path / "shared" / "dvc-remote") in out["local"]
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", "components/serve/app.py", "pipelines/stages.py",
                 "data/extra"):
        assert (ws / name).exists(), name
    assert (tmp_path / "shared" / "dvc-remote").is_dir()
    r = subprocess.run(["bash", str(K8S / "workspace.sh"), "-S", "train.epochs", "true"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "key.path=value" in r.stderr
    env.pop("RESOPS_WORKSPACE")
    r = subprocess.run(["bash", str(K8S / "workspace.sh"), "true"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "RESOPS_WORKSPACE is not set" in r.stderr


# --------------------------------------------------------------------------- serve config sync, image, docs

def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", K8S / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in k8s/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def test_checked_in_serve_config_is_what_the_sync_script_writes(tmp_path):
    sync = _sync_module()
    checked_in = K8S / "base" / "serve_config.yaml"
    local = yaml.safe_load(checked_in.read_text())  # as the calibrate stage writes it for `resops serve`
    local["http_options"] = {"host": "127.0.0.1", "port": 8123}
    local["applications"][0]["args"]["base_dir"] = "/home/someone/resops"
    source = tmp_path / "serve_config.yaml"
    source.write_text(yaml.safe_dump(local, sort_keys=False))
    out = tmp_path / "k8s_serve_config.yaml"
    assert sync.main([str(source), "--out", str(out)]) == 0
    assert out.read_text() == checked_in.read_text()
    assert sync.main([str(source), "--out", str(checked_in), "--check"]) == 0
    local["applications"][0]["args"]["threshold"] = 0.9
    source.write_text(yaml.safe_dump(local, sort_keys=False))
    assert sync.main([str(source), "--out", str(checked_in), "--check"]) == 1
    local["applications"][0]["args"]["cloud_model"] = "/home/someone/resops/models/promoted/full.pt"
    source.write_text(yaml.safe_dump(local, sort_keys=False))
    assert sync.main([str(source), "--out", str(out)]) == 2
    assert sync.main([str(tmp_path / "absent.yaml"), "--out", str(out)]) == 2


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories wins."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, pat) or fnmatch.fnmatchcase(c, pat.replace("**/", "")) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_installs_the_lock_then_resops_as_non_root():
    lines = [ln.strip() for ln in (K8S / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    text = "\n".join(lines)
    assert lines[0] == "FROM python:3.11-slim"
    lock = text.index("pip install -r requirements.lock")
    assert lock < text.index("pip install --no-deps /app"), "dependencies from the lock, then resops without deps"
    assert "WORKDIR /app" in lines and re.search(r"^COPY (--chown=\S+ )?\. /app$", text, re.M)
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    pod_user = yaml.safe_load((K8S / "components" / "pod-defaults" / "ray-pod.yaml").read_text())
    assert int(user[-1]) == pod_user["template"]["spec"]["securityContext"]["runAsUser"]
    patterns = [ln.strip() for ln in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    needed = ["k8s/workspace.sh", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "requirements.lock",
              "pyproject.toml", "components/serve/app.py", "pipelines/cli.py", "models/promoted/full.pt",
              "models/promoted/edge_int8.onnx", "models/serve/serve_config.yaml", "models/serve/drift_reference.json"]
    assert [p for p in needed if _dockerignore_excludes(patterns, p)] == []
    left_out = [".venv/bin/python", ".git/HEAD", "data/raw/elpv/x.png", ".dvc/cache/files/md5/ab/cd",
                "models/train/checkpoints/run/epoch_0001", "components/__pycache__/x.pyc"]
    assert [p for p in left_out if not _dockerignore_excludes(patterns, p)] == []


def test_readme_paths_and_commands_exist():
    text = (K8S / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k k8s/overlays/{overlay}" in text
    paths = set(re.findall(r"\bk8s/[\w./-]*\w", text))
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"k8s/README.md names paths that do not exist: {missing}"
    assert "python k8s/sync_serve_config.py" in text and "docker build -f k8s/Dockerfile" in text
