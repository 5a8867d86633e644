"""Kubernetes manifests (`costopt.deploy.manifests`) against KServe's CRD schemas (schemas/kserve/), strictly."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from costopt.deploy import manifests as M

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "schemas" / "kserve"


@pytest.fixture(scope="module")
def schemas():
    return {"InferenceService": M.crd_schema(CRDS / "serving.kserve.io_inferenceservices.yaml", "v1beta1"),
            "ServingRuntime": M.crd_schema(CRDS / "serving.kserve.io_servingruntimes.yaml", "v1alpha1")}


def _plan(**kw):
    return M.plan_from("assistant", "gguf_q8_0_fa", "gguf_q6_k",
                       [("fp32", 538_000_000, "f" * 16), ("gguf_q8_0_fa", 145_000_000, "a" * 16),
                        ("gguf_q6_k", 138_000_000, "b" * 16)], "0123456789abcdef", **kw)


def test_every_generated_kserve_manifest_validates(tmp_path, schemas):
    files = M.write_manifests(tmp_path, _plan())
    kinds = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            kinds.append(doc["kind"])
            if doc["kind"] in schemas:
                errors = M.validate(doc, schemas[doc["kind"]])
                assert not errors, f"{f.name}: the API server would refuse it: {errors}"
    assert kinds.count("InferenceService") == 3 and "ServingRuntime" in kinds, kinds
    assert {"Deployment", "Service", "Job"} <= set(kinds), kinds


def test_the_current_variant_service_carries_the_canary_and_scales_on_concurrency(tmp_path):
    M.write_manifests(tmp_path, _plan())
    isvc = yaml.safe_load((tmp_path / "isvc-gguf-q8-0-fa.yaml").read_text())
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["args"][:2] == ["--variants", "gguf_q8_0_fa"] and "gguf_q6_k" in pred["model"]["args"], pred
    assert pred["scaleMetric"] == "concurrency" and pred["minReplicas"] <= pred["maxReplicas"], pred
    assert isvc["metadata"]["annotations"]["costopt/git-revision"] == "0123456789abcdef"
    gateway = next(yaml.safe_load_all((tmp_path / "gateway.yaml").read_text()))
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--deployment") + 1] == "assistant" and args[args.index("--current") + 1] == "gguf_q8_0_fa"
    assert "assistant-gguf-q8-0-fa-predictor" in args[args.index("--predictor_url") + 1], args


def test_a_manifest_the_schema_rejects_is_caught(schemas):
    isvc = M.inference_service(_plan(), _plan().variants[0])
    isvc["spec"]["predictor"]["scaleMetric"] = "gpu"  # not one of KServe's metrics
    isvc["spec"]["predictor"]["replicas"] = 3  # not a field of the predictor
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    errors = " ".join(M.validate(isvc, schemas["InferenceService"]))
    assert "scaleMetric" in errors and "replicas: unknown field" in errors and "minReplicas" in errors, errors


def test_stale_variant_manifests_are_removed_and_names_are_dns_labels(tmp_path):
    M.write_manifests(tmp_path, _plan())
    plan = M.plan_from("assistant", "gguf_q8_0_fa", None, [("gguf_q8_0_fa", 145_000_000, "a" * 16)], "rev")
    M.write_manifests(tmp_path, plan)
    assert sorted(p.name for p in tmp_path.glob("isvc-*.yaml")) == ["isvc-gguf-q8-0-fa.yaml"]
    assert M.k8s_name("Student_GGUF.Q8") == "student-gguf-q8"


def test_a_service_serving_a_cuda_variant_requests_a_gpu_and_still_validates(tmp_path, schemas):
    plan = M.plan_from("assistant", "int8_weight_only", None,
                       [("int8_weight_only", 150_000_000, "a" * 16), ("cuda_int8", 150_000_000, "c" * 16, "cuda")],
                       "rev", gpus=1)
    M.write_manifests(tmp_path, plan)
    for name in ("isvc-cuda-int8.yaml", "isvc-int8-weight-only.yaml"):  # the current one loads cuda_int8 beside it
        isvc = yaml.safe_load((tmp_path / name).read_text())
        errors = M.validate(isvc, schemas["InferenceService"])
        assert not errors, f"{name}: the API server would refuse it: {errors}"
        pred = isvc["spec"]["predictor"]
        res = pred["model"]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1", f"{name}: {res}"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pred["tolerations"], pred
    cpu_only = M.inference_service(_plan(), _plan().variants[0])
    assert "nvidia.com/gpu" not in cpu_only["spec"]["predictor"]["model"]["resources"]["limits"], "torch needs no GPU"
    assert "tolerations" not in cpu_only["spec"]["predictor"], "a CPU service stays off the GPU pool"
