"""Cluster security and sizing of the KubeRay manifests: every Ray object turns on Ray token
authentication with the token from one Secret, nothing exposes the head (dashboard, Jobs API, GCS)
outside the cluster, and the RayService can grow its workers. Rendered with `kubectl kustomize` and
validated against the KubeRay CRD schemas by the helpers of tests/test_k8s.py (no cluster needed)."""
from __future__ import annotations

import copy

import pytest

from tests.test_k8s import OVERLAYS, TARGETS, cluster_spec, groups, one, rendered, schema_errors

TOKEN_SECRET = "resops-ray-token"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
HEAD_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray client


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", RAY_KINDS)
def test_every_ray_cluster_uses_token_auth_from_the_secret(target, kind):
    spec = cluster_spec(one(rendered(target), kind))
    assert spec.get("authOptions") == {"mode": "token", "secretName": TOKEN_SECRET}, spec.get("authOptions")
    # A RAY_AUTH_MODE set by hand in a pod could disagree with authOptions (the GCS and the workers must agree).
    for gname, g in groups(one(rendered(target), kind)):
        for c in g["template"]["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{kind} {gname}: set by KubeRay from authOptions"


@pytest.mark.parametrize("target", TARGETS)
def test_nothing_exposes_the_head_outside_the_cluster(target):
    objs = rendered(target)
    for kind in RAY_KINDS:
        head = cluster_spec(one(objs, kind))["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{kind}: head Service {head.get('serviceType')}"
    for obj in objs:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        assert obj["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), \
            f"{obj['kind']} {obj['metadata']['name']}: the head is reached with kubectl port-forward"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_autoscales_its_workers(overlay):
    service = one(rendered(overlay), "RayService")
    spec = cluster_spec(service)
    assert spec.get("enableInTreeAutoscaling") is True
    workers = dict(groups(service))
    workers.pop("head", None)
    assert any(g["maxReplicas"] > g["minReplicas"] for g in workers.values()), \
        {n: (g["minReplicas"], g["maxReplicas"]) for n, g in workers.items()}


def test_the_schema_refuses_a_broken_auth_block():
    raycluster = one(rendered("cpu"), "RayCluster")
    assert not schema_errors(raycluster)
    bad = copy.deepcopy(raycluster)
    bad["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in e and "password" in e for e in schema_errors(bad)), schema_errors(bad)
    typo = copy.deepcopy(raycluster)
    typo["spec"]["authOptions"]["secret"] = typo["spec"]["authOptions"].pop("secretName")
    assert any("'secret' was unexpected" in e for e in schema_errors(typo, strict=True)), schema_errors(typo)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_tiers_autoscale_and_fit_the_cluster_at_their_ceiling(overlay):
    """k8s/sync_serve_config.py gives every tier Serve's autoscaling_config, the same in the deployments and
    in the app's (typed) args, and at max_replicas every replica still has a node of the cluster at maxReplicas."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from components.serve.args import AppArgs
    from tests.test_k8s import place, ray_nodes

    service = one(rendered(overlay), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    args = AppArgs.model_validate(app["args"])  # what Serve hands the typed app builder
    deployments = {d["name"]: d for d in app["deployments"]}
    owner = {"CloudClassifier": args.cloud, "EdgeClassifier": args.edge,
             "Router": args.edge if "EdgeClassifier" not in deployments else None}
    replicas = []
    for name, dep in deployments.items():
        auto = dep.get("autoscaling_config")
        if owner.get(name) is not None:
            assert auto and auto["min_replicas"] < auto["max_replicas"] and "num_replicas" not in dep, (name, dep)
            assert owner[name].autoscaling_config == auto, name  # the built app and the config agree
        opts = dep["ray_actor_options"]
        demand = {"CPU": float(opts.get("num_cpus", 1)), **{k: float(v) for k, v in (opts.get("resources") or {}).items()}}
        replicas += [(name, demand)] * int(auto["max_replicas"] if auto else dep.get("num_replicas", 1))
    place(replicas, ray_nodes(service))  # raises when a replica at the ceiling has no room


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_workers_are_ready_only_while_the_apps_healthz_answers(overlay):
    """Every RayService worker group probes the app's /healthz (both tiers answer) on the Serve port the
    app listens on, after the raylet's own check; the head keeps KubeRay's probes; the schema takes it."""
    import yaml

    service = one(rendered(overlay), "RayService")
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    workers = dict(groups(service))
    head = workers.pop("head")
    assert workers and "readinessProbe" not in head["template"]["spec"]["containers"][0]
    for name, g in workers.items():
        probe = g["template"]["spec"]["containers"][0]["readinessProbe"]
        script = probe["exec"]["command"][-1]
        raylet, app = script.split("&&")
        assert "local_raylet_healthz" in raylet and f"http://localhost:{port}/healthz" in app, (name, script)
        assert probe["timeoutSeconds"] > 4 and probe["failureThreshold"] >= 2, (name, probe)
    assert not schema_errors(service)
