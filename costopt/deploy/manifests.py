"""Kubernetes manifests for a deployment: the same variants, at scale, as KServe resources.

`write_manifests(out_dir, plan)` writes, deterministically (no timestamps: a changed file is a changed
deployment, ready for a GitOps controller):
- `servingruntime.yaml`: the `ServingRuntime` `costopt`, costopt's KServe server (`python -m serving`)
  in the serving image, for model format `costopt-variant`, Open Inference Protocol v2;
- `isvc-<variant>.yaml`: an `InferenceService` per served variant: its runtime, resources (memory from
  the weights' size), `minReplicas`/`maxReplicas`, the autoscaling metric and target (KServe's
  `scaleMetric`: concurrency by default, the engine's batch size), and the canary setting KServe applies
  when a new revision of it rolls out (`canaryTrafficPercent`). The current variant's service also
  loads the canary candidate and the router's tiers, because the gateway's shadow judgement and
  precision routing need them on one predictor. A service that loads a variant of the `cuda` runtime
  (`costopt.runtimes.cuda`) requests `nvidia.com/gpu` (requests = limits, as Kubernetes requires for
  extended resources) and tolerates the `nvidia.com/gpu` taint GPU node pools carry; its image must
  hold a CUDA build of torch;
- `gateway.yaml`: the gateway's `Deployment` and `Service` (apps/v1, v1), pointing at the current
  variant's service, with the deployment name clients call;
- `dvc-pull-job.yaml`: a `Job` that checks out the recorded git revision and `dvc pull`s the workspace
  into the volume the services read (`storageUri: pvc://...`), so what serves is exactly what was
  measured.
`validate(manifest, crd)` checks a manifest against the CRD's `openAPIV3Schema` the way a strict API
server does: the schema itself (jsonschema) and no field the schema does not declare. The tests run
every generated KServe manifest through it with the CRDs in `schemas/kserve/`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

API_ISVC = "serving.kserve.io/v1beta1"
API_RUNTIME = "serving.kserve.io/v1alpha1"
MODEL_FORMAT = "costopt-variant"
RUNTIME_NAME = "costopt"


GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource, also the taint GPU pools carry


@dataclass(frozen=True)
class VariantPlan:
    name: str
    weights_bytes: int  # the file it runs from: memory is sized from it
    fingerprint: str
    device: str = "cpu"  # where its runtime's engine runs (`Runtime.device`): "cuda" requests a GPU


@dataclass(frozen=True)
class ManifestPlan:
    deployment: str  # the model name clients call at the gateway
    current: str
    variants: tuple[VariantPlan, ...]
    git_revision: str  # the revision whose `dvc pull` rebuilds what serves
    canary: str | None = None
    namespace: str = "costopt"
    image: str = "ghcr.io/costopt/costopt-serving:latest"  # built from this repository (infra/README.md)
    repo_url: str = "https://github.com/costopt/costopt.git"
    claim: str = "costopt-workspace"  # the PersistentVolumeClaim holding the pulled workspace
    min_replicas: int = 1
    max_replicas: int = 4
    scale_metric: str = "concurrency"  # KServe: cpu | memory | concurrency | rps
    scale_target: int = 16  # in-flight requests per replica before another starts (the measured sweet spot)
    canary_percent: int = 20  # share a new revision of a service takes first (KServe canary rollout)
    cpu: str = "2"
    gpus: int = 1  # GPUs per replica of a service that serves a GPU runtime's variant


def k8s_name(variant: str) -> str:
    """A DNS-1123 label from a variant name (underscores and dots become dashes)."""
    name = re.sub(r"[^a-z0-9-]", "-", variant.lower()).strip("-")
    return name[:63].rstrip("-") or "variant"


def _memory(weights_bytes: int) -> str:
    """Weights twice (the engine's copy and the shadow scorer's) plus 1 GiB for the KV cache and Python."""
    gib = (2 * weights_bytes) / 2**30 + 1.0
    return f"{max(1, round(gib + 0.49))}Gi"


def serving_runtime(plan: ManifestPlan) -> dict[str, Any]:
    return {"apiVersion": API_RUNTIME, "kind": "ServingRuntime",
            "metadata": {"name": RUNTIME_NAME, "namespace": plan.namespace},
            "spec": {"supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
                     "protocolVersions": ["v2"],
                     "containers": [{"name": "kserve-container", "image": plan.image,
                                     "command": ["python", "-m", "serving"],
                                     "args": ["--workspace", "/mnt/models", "--host", "0.0.0.0", "--http_port",
                                              "8080", "--enable_grpc", "false", "--allow_open"],
                                     "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                     "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                                                   "limits": {"cpu": "2", "memory": "4Gi"}}}]}}


def inference_service(plan: ManifestPlan, v: VariantPlan) -> dict[str, Any]:
    loads = [v.name]
    if v.name == plan.current:  # the gateway's predictor: the canary and the other variants beside it
        loads += [x.name for x in plan.variants if x.name != v.name]
    memory = _memory(sum(x.weights_bytes for x in plan.variants if x.name in loads))
    resources = {"requests": {"cpu": plan.cpu, "memory": memory}, "limits": {"cpu": plan.cpu, "memory": memory}}
    gpu = any(x.device == "cuda" for x in plan.variants if x.name in loads)
    if gpu:
        resources["requests"][GPU_RESOURCE] = resources["limits"][GPU_RESOURCE] = str(plan.gpus)
    isvc = {"apiVersion": API_ISVC, "kind": "InferenceService",
            "metadata": {"name": k8s_name(f"{plan.deployment}-{v.name}"), "namespace": plan.namespace,
                         "labels": {"costopt/deployment": plan.deployment, "costopt/variant": k8s_name(v.name),
                                    "costopt/role": "current" if v.name == plan.current else
                                    "canary" if v.name == plan.canary else "served"},
                         "annotations": {"costopt/fingerprint": v.fingerprint,
                                         "costopt/git-revision": plan.git_revision}},
            "spec": {"predictor": {
                "minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas,
                "scaleMetric": plan.scale_metric, "scaleTarget": plan.scale_target,
                "canaryTrafficPercent": plan.canary_percent,
                "model": {"modelFormat": {"name": MODEL_FORMAT, "version": "1"}, "runtime": RUNTIME_NAME,
                          "protocolVersion": "v2", "storageUri": f"pvc://{plan.claim}/",
                          "args": ["--variants", *loads], "resources": resources}}}}
    if gpu:
        isvc["spec"]["predictor"]["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists",
                                                     "effect": "NoSchedule"}]
    return isvc


def gateway(plan: ManifestPlan) -> list[dict[str, Any]]:
    labels = {"app": "costopt-gateway", "costopt/deployment": plan.deployment}
    predictor = f"http://{k8s_name(f'{plan.deployment}-{plan.current}')}-predictor.{plan.namespace}.svc.cluster.local"
    served = [x.name for x in plan.variants]
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "costopt-gateway", "namespace": plan.namespace, "labels": labels},
                  "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
                      "metadata": {"labels": labels},
                      "spec": {"containers": [{
                          "name": "gateway", "image": plan.image, "command": ["python", "-m", "serving.gateway"],
                          "args": ["--workspace", "/mnt/models", "--predictor_url", predictor, "--variants", *served,
                                   "--deployment", plan.deployment, "--current", plan.current, "--host", "0.0.0.0",
                                   "--http_port", "8090", "--enable_grpc", "false", "--keys", "/etc/costopt/keys.yaml"],
                          "ports": [{"containerPort": 8090}],
                          "volumeMounts": [{"name": "workspace", "mountPath": "/mnt/models", "readOnly": True},
                                           {"name": "keys", "mountPath": "/etc/costopt", "readOnly": True}],
                          "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8090}},
                          "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                                        "limits": {"cpu": "1", "memory": "2Gi"}}}],
                          "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": plan.claim,
                                                                                       "readOnly": True}},
                                      {"name": "keys", "secret": {"secretName": "costopt-tenant-keys",
                                                                  "defaultMode": 0o400}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "costopt-gateway", "namespace": plan.namespace, "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": 8090}]}}
    return [deployment, service]


def dvc_pull_job(plan: ManifestPlan) -> dict[str, Any]:
    script = (f"git clone {plan.repo_url} /work && cd /work && git checkout {plan.git_revision} && "
              f"dvc pull && cp -a artifacts /mnt/models/")
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"costopt-dvc-pull-{plan.git_revision[:12] or 'head'}", "namespace": plan.namespace},
            "spec": {"backoffLimit": 3, "template": {"spec": {
                "restartPolicy": "OnFailure",
                "containers": [{"name": "dvc-pull", "image": plan.image, "command": ["sh", "-c", script],
                                "envFrom": [{"secretRef": {"name": "costopt-s3-credentials"}}],
                                "volumeMounts": [{"name": "workspace", "mountPath": "/mnt/models"}]}],
                "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": plan.claim}}]}}}}


def write_manifests(out_dir: Path, plan: ManifestPlan) -> list[Path]:
    """Write every manifest of `plan` into `out_dir` (stale isvc-*.yaml of variants no longer served go)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"servingruntime.yaml": [serving_runtime(plan)], "gateway.yaml": gateway(plan),
             "dvc-pull-job.yaml": [dvc_pull_job(plan)]}
    for v in plan.variants:
        files[f"isvc-{k8s_name(v.name)}.yaml"] = [inference_service(plan, v)]
    for stale in out_dir.glob("isvc-*.yaml"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, docs in files.items():
        path = out_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        tmp.replace(path)
        written.append(path)
    return written


# -- validation -------------------------------------------------------------------------------------------
def crd_schema(crd_path: Path, version: str) -> dict[str, Any]:
    crd = yaml.load(Path(crd_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd_path}: no version {version!r}")


def _unknown_fields(obj: Any, schema: dict[str, Any], where: str) -> list[str]:
    """Fields a strict API server (kubectl --validate=strict) would reject: not declared by the schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, (dict, list)):
        return []
    if isinstance(obj, list):
        items = schema.get("items") or {}
        return [e for i, x in enumerate(obj) for e in _unknown_fields(x, items, f"{where}[{i}]")]
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    out = []
    for key, value in obj.items():
        if props is not None and key in props:
            out += _unknown_fields(value, props[key], f"{where}.{key}")
        elif isinstance(extra, dict):
            out += _unknown_fields(value, extra, f"{where}.{key}")
        elif props is not None and key not in ("apiVersion", "kind", "metadata") or extra is False:
            out.append(f"{where}.{key}: unknown field")
    return out


def validate(manifest: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse `manifest` under `schema` (an empty list: valid)."""
    import jsonschema

    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
    return errors + _unknown_fields(manifest, schema, "")


def plan_from(deployment: str, current: str, canary: str | None, variants: Sequence[tuple],
              git_revision: str, **settings: Any) -> ManifestPlan:
    """`variants`: (name, weights bytes, fingerprint[, device]) each; the device defaults to cpu."""
    return ManifestPlan(deployment, current, tuple(VariantPlan(*v) for v in variants), git_revision,
                        canary, **settings)
