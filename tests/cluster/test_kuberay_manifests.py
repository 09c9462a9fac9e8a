"""The KubeRay manifests (``cluster/kuberay/``) validate offline (issue 14).

- Against the KubeRay CRDs (``RAYCP_KUBERAY_CRDS``, default ``../shared/schemas/kuberay``: KubeRay
  1.7's ``ray.io_rayclusters.yaml`` / ``ray.io_rayjobs.yaml``), **strictly**: every object of the
  schema that lists its properties rejects unknown keys (the API server would prune them silently),
  and ``x-kubernetes-int-or-string`` fields take an integer or a string, as the CRD marks them.
- Against the operator's own rules that a schema cannot express, as KubeRay's
  ``ray-operator/controllers/ray/utils/validation.go`` (``ValidateRayClusterSpec``,
  ``ValidateRayJobSpec``, ``ValidateRay*Metadata``) and the autoscaler apply them.
- Against raycp's: token auth, nothing reachable from outside the Kubernetes cluster, a head that
  runs no work, GPUs from zero, ``rayVersion`` equal to the lock's Ray, code from the image.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = Path(os.environ.get("RAYCP_KUBERAY_CRDS", ROOT.parent / "shared" / "schemas" / "kuberay"))
IMAGE_ROOT = "/home/ray/raycp"      # cluster/Dockerfile's WORKDIR: the repository inside the image
MAX_NAME = {"RayCluster": 63, "RayJob": 47}   # KubeRay's MaxRayClusterNameLength / MaxRayJobNameLength

needs_crds = pytest.mark.skipif(not (CRDS / "ray.io_rayclusters.yaml").is_file(),
                                reason=f"KubeRay CRDs not found at {CRDS} (set RAYCP_KUBERAY_CRDS)")


def _locked_ray() -> str:
    return re.search(r"^ray==(\S+)$", (ROOT / "requirements" / "lock.txt").read_text(), re.M).group(1)


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _strict(schema):
    """The CRD's OpenAPI schema made strict: objects with listed properties allow no other key."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict = {}


def _validator(kind: str):
    import jsonschema

    if kind not in _VALIDATORS:
        crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert version["served"] and version["storage"]
        _VALIDATORS[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return _VALIDATORS[kind]


def _schema_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator(doc["kind"]).iter_errors(doc)]


def _pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs") or []:
        yield group["groupName"], group


def _operator_errors(doc: dict) -> list[str]:
    """KubeRay's validation.go rules (and the autoscaler's replica bounds) for a RayCluster or RayJob."""
    errors = []
    name = doc["metadata"]["name"]
    if len(name) > MAX_NAME[doc["kind"]] or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME[doc['kind']]} characters")
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        job, spec = spec, spec.get("rayClusterSpec")
        if spec is None and not (job.get("clusterSelector") or {}).get("ray.io/cluster"):
            errors.append("one of rayClusterSpec or clusterSelector must be set")
        if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
            errors.append("a RayJob that is not shut down after it finishes cannot be suspended")
        if job.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished must be >= 0")
        if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
            errors.append("activeDeadlineSeconds must be > 0")
        if job.get("backoffLimit", 0) < 0:
            errors.append("backoffLimit must be >= 0")
        if job.get("submissionMode") == "InteractiveMode" and job.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit is incompatible with InteractiveMode")
        try:
            yaml.safe_load(job.get("runtimeEnvYAML") or "")
        except yaml.YAMLError as exc:
            errors.append(f"runtimeEnvYAML is not YAML: {exc}")
        if spec is None:
            return errors
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    groups = [g["groupName"] for g in spec.get("workerGroupSpecs") or []]
    if len(groups) != len(set(groups)):
        errors.append(f"worker group names repeat: {groups}")
    for group_name, group in _pod_templates(spec):
        pod = group["template"].get("spec") or {}
        if not pod.get("containers"):
            errors.append(f"{group_name}: at least one container")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{group_name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{group_name}: rayStartParams['labels'] is not supported")
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errors.append(f"{group_name}: restartPolicy must be Never or unset with autoscaler v2")
        if group_name != "head" or "minReplicas" in group:
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            replicas = group.get("replicas", lo)
            if not lo <= hi:
                errors.append(f"{group_name}: minReplicas {lo} > maxReplicas {hi}")
            elif not lo <= replicas <= hi:
                errors.append(f"{group_name}: replicas {replicas} outside [{lo}, {hi}]")
            if group.get("suspend") and autoscaling:
                errors.append(f"{group_name}: a worker group cannot be suspended with the autoscaler on")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = spec.get("rayVersion", "")
        if not re.fullmatch(r"\d+\.\d+\.\d+", version) or tuple(map(int, version.split("."))) < (2, 52, 0):
            errors.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {version!r}")
    return errors


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


MANIFESTS = ["raycluster.yaml", "rayjob.yaml"]
# a credential written out: a key name with a literal value (not a `$(...)` lookup, a <placeholder> or "...")
CREDENTIAL = r"""(?i)(aws_secret_access_key|aws_access_key_id|private_key|password|auth_token)\s*[:=]\s*(?!["']?[$<.])\S"""


@needs_crds
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_the_crd_strictly_and_the_operator_rules(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(doc) == []
    assert _operator_errors(doc) == []


@needs_crds
@pytest.mark.parametrize("name", MANIFESTS)
def test_mistakes_fail_the_validation(name):
    doc = _manifest(name)
    spec = _cluster_spec(copy.deepcopy(doc))

    def broken(change) -> dict:
        bad = copy.deepcopy(doc)
        change(_cluster_spec(bad))
        return bad

    typo = broken(lambda s: s["workerGroupSpecs"][1].update(maxReplica=s["workerGroupSpecs"][1].pop("maxReplicas")))
    assert any("maxReplica" in e for e in _schema_errors(typo))        # unknown key (strict)
    assert _schema_errors(broken(lambda s: s["workerGroupSpecs"][0].update(minReplicas="0")))  # int as text
    nested = broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always"))
    assert _schema_errors(nested)
    # int-or-string quantities take both forms, as the CRD marks them
    cpu = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert _schema_errors(broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]
                                 ["resources"]["limits"].update(cpu=int(cpu)))) == []
    assert _schema_errors(broken(lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]
                                 ["resources"]["limits"].update(cpu=[cpu])))
    # the operator's rules
    assert _operator_errors(broken(lambda s: s["workerGroupSpecs"][1].update(minReplicas=20)))
    assert _operator_errors(broken(lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(containers=[])))
    assert _operator_errors(broken(lambda s: s.update(rayVersion="2.40.0")))
    assert _operator_errors(broken(lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(restartPolicy="Always")))
    assert _operator_errors(broken(lambda s: s["workerGroupSpecs"][1].update(groupName="cpu")))


@pytest.mark.parametrize("name", MANIFESTS)
def test_cluster_is_secure_autoscales_gpus_from_zero_and_runs_the_locked_ray(name):
    spec = _cluster_spec(_manifest(name))
    assert spec["rayVersion"] == _locked_ray()
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] != "0.0.0.0"
    for group_name, group in _pod_templates(spec):
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "raycp-ray", group_name
        for container in pod["containers"]:
            for env in container.get("env") or []:
                assert "value" not in env or not re.search(r"(?i)token|secret|key|password", env["name"]), env
            assert "hostPort" not in str(container.get("ports")), group_name
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0 and gpu[0].get("replicas", 0) == 0
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu[0]["template"]["spec"]["tolerations"])
    cpu = [g for g in spec["workerGroupSpecs"] if g not in gpu]
    assert cpu and all(g["minReplicas"] == 0 for g in cpu)


def test_the_rayjob_runs_the_image_s_code_with_the_clusters_spec():
    from ray.runtime_env import RuntimeEnv

    job, cluster = _manifest("rayjob.yaml"), _manifest("raycluster.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]        # one cluster definition, twice
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)                                               # Ray accepts it
    assert "working_dir" not in env and "py_modules" not in env     # a RayJob cannot upload local code
    assert set(env.get("env_vars", {})) <= set(yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # the entrypoint's files are the image's copies of this repository's files
    paths = re.findall(rf"{IMAGE_ROOT}/(\S+)", job["spec"]["entrypoint"])
    assert paths and all((ROOT / p).is_file() for p in paths), paths
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in docker
    assert all(re.search(rf"^COPY .* {p.split('/')[0]} {p.split('/')[0]}$", docker, re.M) for p in paths)


def test_the_service_account_gives_bucket_access_by_identity_not_keys():
    account = _manifest("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "raycp-ray"
    notes = account["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in notes and "iam.gke.io/gcp-service-account" in notes
    assert set(account) == {"apiVersion", "kind", "metadata"}       # no secrets, no tokens


def test_every_file_in_cluster_is_covered_by_a_secure_by_default_test():
    """A new file in cluster/ must be checked by one of these tests (launcher, KubeRay or image),
    and no file there may carry a credential (only ``$(...)`` lookups or ``<placeholders>``) or open a
    public port."""
    covered = {"README.md", "Dockerfile", "aws.yaml", "gcp.yaml", *(f"kuberay/{n}" for n in MANIFESTS),
               "kuberay/serviceaccount.yaml"}
    files = {p.relative_to(ROOT / "cluster").as_posix() for p in (ROOT / "cluster").rglob("*") if p.is_file()}
    assert files == covered
    for rel in files:
        text = (ROOT / "cluster" / rel).read_text()
        assert not re.search(CREDENTIAL, text), rel
        if rel.endswith(".yaml"):     # the settings, not the comments that explain them
            values = " ".join(_strings(list(yaml.safe_load_all(text))))
            assert not re.search(r"LoadBalancer|NodePort|0\.0\.0\.0", values), rel


def _strings(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in (str(k), *_strings(v))]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [str(tree)]
