"""The deployment files agree with each other and with the package: one image, one Ray
version, entrypoints the real CLI parses, specs that load, GPUs enough for the actors,
and the lifecycle fields that keep a scheduled run from overlapping or leaking a cluster.

No cluster here: the manifests are parsed as YAML (the Dockerfile as text) and checked
against pipeline/cli.py's parser, pipeline.spec.load.load_spec and pyproject.toml.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.cli import _parser
from pipeline.spec.config import JobSpec
from pipeline.spec.load import load_spec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11+ (tomllib) or tomli")

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBE_MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml", "kuberay-cronjob.yaml")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"imagegen:{VERSION}"
TORCH_PIN = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)  # torch==2.13.0


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def manifest(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(name) if d.get("kind") == kind]
    return doc


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def ray_clusters() -> dict[str, dict[str, Any]]:
    """Every Ray cluster the manifests describe, by where it is described."""
    return {
        "kuberay-raycluster.yaml": manifest("kuberay-raycluster.yaml", "RayCluster")["spec"],
        "kuberay-rayjob.yaml": manifest("kuberay-rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
        "kuberay-rayservice.yaml": manifest("kuberay-rayservice.yaml", "RayService")["spec"]["rayClusterConfig"],
    }


def ray_containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def gpu_workers(cluster: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, c) for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
            if "nvidia.com/gpu" in c["resources"].get("limits", {})]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def constraints() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_normal(name)] = version.strip()
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def workdir() -> str:
    (path,) = [args for word, args in dockerfile() if word == "WORKDIR"]
    return path


def repo_path(path: str) -> Path:
    """A path inside the image (or relative to its working directory) -> the file here."""
    inside = Path(path)
    return REPO / (inside.relative_to(workdir()) if inside.is_absolute() else inside)


def load_job_spec(argv: list[str]) -> JobSpec:
    """`python jobs/generate.py SPEC --set ...` as the cluster runs it: the script exists,
    its arguments parse with imagegen's real parser, and the spec loads."""
    assert argv[0] == "python", argv
    script = repo_path(argv[1])
    assert script == REPO / "jobs" / "generate.py" and script.is_file(), argv
    generate = importlib.util.module_from_spec(importlib.util.spec_from_file_location("generate_entrypoint", script))
    generate.__spec__.loader.exec_module(generate)  # defines CLUSTER_RUN; main() runs only as __main__
    args = _parser().parse_args([*generate.CLUSTER_RUN, *argv[2:]])
    assert args.command == "run"
    spec = load_spec(repo_path(args.spec), args.overrides)
    assert spec.runtime.address == "auto"  # joins the job's cluster, whatever the file says
    return spec


# -- one image, one Ray, one torch ----------------------------------------------------------


def test_every_ray_container_runs_the_project_image_from_its_working_directory():
    images = {}
    for name in KUBE_MANIFESTS:
        for node in walk(documents(name)):
            if "image" in node and node.get("name") != "launch":  # the CronJob's kubectl pod
                images.setdefault(node["image"], []).append(name)
    assert set(images) == {IMAGE}, images
    assert {name for names in images.values() for name in names} == {"kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"}
    assert f"-t {IMAGE} " in (INFRA / "Dockerfile").read_text()
    for where, cluster in ray_clusters().items():
        for container in ray_containers(cluster):
            assert container["workingDir"] == workdir() == "/app", where


def test_ray_version_is_one_across_manifests_constraints_and_pyproject():
    pins = constraints()
    versions = {where: cluster["rayVersion"] for where, cluster in ray_clusters().items()}
    assert set(versions.values()) == {pins["ray"]}, versions
    (ray_requirement,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray"]
    assert ray_requirement.specifier.contains(pins["ray"])


def test_constraints_pin_every_dependency_and_torch_as_the_makefile_does():
    pins = constraints()
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        version = pins.get(_normal(requirement.name))
        assert version, f"{requirement.name} has no pin in infra/constraints.txt"
        assert requirement.specifier.contains(version, prereleases=True), (dependency, version)
    assert f"torch=={pins['torch']}" == TORCH_PIN == "torch==2.13.0"
    assert all("+" not in v for v in pins.values()), "local version tags (+cpu) would not resolve on PyPI"


def test_dockerfile_cuda_base_torch_first_then_the_pinned_package_non_root():
    steps = dockerfile()
    text = [f"{word} {args}" for word, args in steps]
    (base,) = [args for word, args in steps if word == "ARG" and args.startswith("BASE_IMAGE=")]
    assert base.startswith("BASE_IMAGE=nvidia/cuda:") and "runtime" in base
    assert ("FROM", "${BASE_IMAGE}") in steps
    torch_at = next(i for i, line in enumerate(text) if line.startswith("RUN") and f'pip install "{TORCH_PIN}"' in line)
    package_at = next(i for i, line in enumerate(text) if line.startswith("RUN") and "pip install --constraint infra/constraints.txt ." in line)
    assert torch_at < package_at
    copies = [args.split()[0] for word, args in steps if word == "COPY"]
    assert copies.index("pipeline") < package_at and all((REPO / src).exists() for src in copies)
    # The build context lets through exactly what is copied.
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if line.strip() and not line.startswith("#")][0]] == "*"
    for source in copies:
        assert f"!{source}" in ignore, source
    (user,) = [args for word, args in steps if word == "USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", "numeric and not root"
    (volume,) = [args for word, args in steps if word == "VOLUME"]
    assert "/home/ray/.cache" in volume


# -- Ray clusters: GPUs, heads, caches ------------------------------------------------------


@pytest.mark.parametrize("where", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"])
def test_gpu_workers_request_what_they_limit_and_cache_models_where_the_image_does(where):
    cluster = ray_clusters()[where]
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "0.0.0.0" and head["num-cpus"] == "0"
    workers = gpu_workers(cluster)
    assert workers, f"{where} has no GPU worker group"
    for group, container in workers:
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] >= 1  # GPUs are not overcommitted
        assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] >= 1, "a job needing GPUs is refused if none is up at its start"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["model-cache"] == "/home/ray/.cache"
        tolerations = group["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def _capacity(cluster: dict[str, Any], replicas: str) -> tuple[int, int]:
    """(GPUs, CPUs of the biggest GPU pod) of the GPU workers at `replicas` pods per group."""
    gpus = sum(g[replicas] * int(c["resources"]["limits"]["nvidia.com/gpu"]) for g, c in gpu_workers(cluster))
    cpus = max(int(c["resources"]["limits"]["cpu"]) for _, c in gpu_workers(cluster))
    return gpus, cpus


# -- what runs: RayJob, RayCluster, RayService, cluster launcher ----------------------------


def test_rayjob_entrypoint_is_the_cli_on_a_spec_that_fits_its_cluster():
    rayjob = manifest("kuberay-rayjob.yaml", "RayJob")
    spec = load_job_spec(shlex.split(rayjob["spec"]["entrypoint"]))
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]) == {"working_dir": workdir()}
    gpus, cpus = _capacity(rayjob["spec"]["rayClusterSpec"], "replicas")
    assert spec.runtime.num_actors * spec.runtime.gpus_per_actor <= gpus
    assert spec.runtime.cpus_per_actor + spec.runtime.task_cpus <= cpus
    assert spec.model.device == "cuda"
    assert spec.output.mode == "incremental", "a retried run must resume, not start over or refuse"
    assert "://" in spec.input.url and "://" in spec.output.url, "every node must reach the data"


def test_rayjob_lifecycle_ends_the_cluster_bounds_the_run_and_names_each_run_afresh():
    rayjob = manifest("kuberay-rayjob.yaml", "RayJob")
    life = rayjob["spec"]
    assert life["shutdownAfterJobFinishes"] is True
    assert isinstance(life["ttlSecondsAfterFinished"], int) and 0 <= life["ttlSecondsAfterFinished"] <= 3600
    assert isinstance(life["activeDeadlineSeconds"], int) and life["activeDeadlineSeconds"] > 0
    assert isinstance(life["backoffLimit"], int) and life["backoffLimit"] >= 0
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"].endswith("-")


def test_raycluster_fits_the_cluster_spec_users_submit_to_it():
    cluster = manifest("kuberay-raycluster.yaml", "RayCluster")["spec"]
    text = (INFRA / "kuberay-raycluster.yaml").read_text()
    submitted = re.search(r"imagegen submit (\S+)", text).group(1)
    spec = load_job_spec(["python", "jobs/generate.py", submitted])
    gpus_now, cpus = _capacity(cluster, "minReplicas")
    gpus_max, _ = _capacity(cluster, "maxReplicas")
    assert spec.runtime.gpus_per_actor <= gpus_now  # pipeline.batch.connect.require_gpus passes at the start
    assert spec.runtime.num_actors * spec.runtime.gpus_per_actor <= gpus_max
    assert spec.runtime.cpus_per_actor + spec.runtime.task_cpus <= cpus
    name = manifest("kuberay-raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert f"svc/{name}-head-svc 8265:8265" in text
    assert name != manifest("kuberay-rayservice.yaml", "RayService")["metadata"]["name"], "their head Services would clash"


def test_rayservice_builds_the_app_from_a_spec_that_loads_and_fits():
    service = manifest("kuberay-rayservice.yaml", "RayService")["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    from pipeline.serve.app import AppArgs

    args = AppArgs.model_validate(app["args"])
    spec = load_spec(repo_path(args.spec), args.overrides)
    gpus, cpus = _capacity(service["rayClusterConfig"], "maxReplicas")
    assert spec.serve.max_replicas * (spec.runtime.gpus_per_actor or 0) <= gpus
    assert spec.runtime.cpus_per_actor <= cpus
    assert serve_config["http_options"]["host"] == "0.0.0.0"


def test_serve_config_in_jobs_names_a_spec_that_loads():
    serve_config = yaml.safe_load((REPO / "jobs" / "serve-deploy.yaml").read_text())
    from pipeline.serve.app import AppArgs

    for app in serve_config["applications"]:
        args = AppArgs.model_validate(app["args"])
        load_spec(repo_path(args.spec), args.overrides)


def test_cluster_launcher_installs_torch_first_then_the_pinned_package_on_gpu_workers():
    config = yaml.safe_load((INFRA / "ray-launcher.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    (gpu,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")), "a GPU instance family"
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if f'pip install --quiet "{TORCH_PIN}"' in c)
    package_at = next(i for i, c in enumerate(setup) if "--constraint ~/imagegen/infra/constraints.txt ~/imagegen" in c)
    assert torch_at < package_at
    assert config["file_mounts"] == {"/home/ubuntu/imagegen": "."}
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command.startswith("export PATH=$HOME/venv/bin:$PATH"), "a job's `python` must be the venv's"
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])

    # What `ray up` does with it: Ray's own schema and defaults (the provider's included).
    from ray.autoscaler._private.util import prepare_config, validate_config

    filled = prepare_config(config)
    validate_config(filled)
    for command in filled["head_setup_commands"] + filled["worker_setup_commands"]:
        for pip in re.findall(r"(\S*pip) install", command):
            assert pip == "~/venv/bin/pip", f"{command!r}: Ubuntu 24.04 refuses the system pip (PEP 668)"


# -- the schedule ---------------------------------------------------------------------------


def test_cronjob_forbids_overlap_and_waits_for_the_rayjob_it_creates_from_rayjob_yaml():
    docs = {d["kind"]: d for d in documents("kuberay-cronjob.yaml")}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), cron["schedule"]
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # retries are the RayJob's
    rayjob = manifest("kuberay-rayjob.yaml", "RayJob")["spec"]
    assert job["activeDeadlineSeconds"] > rayjob["activeDeadlineSeconds"]

    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # The ConfigMap is made from infra/kuberay-rayjob.yaml by the command in the file's header.
    made = re.search(r"kubectl create configmap (\S+) --from-file=(\S+)=infra/kuberay-rayjob\.yaml", (INFRA / "kuberay-cronjob.yaml").read_text())
    assert made and volume["configMap"]["name"] == made.group(1)
    assert f"kubectl create -f {mount['mountPath']}/{made.group(2)} " in script
    assert 'kubectl get rayjob "$name"' in script and "jobDeploymentStatus" in script  # it waits for the run

    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and {"create", "get"} <= set(rule["verbs"])


def test_rayservice_drains_within_its_pods_grace_and_takes_keys_from_a_secret():
    service = manifest("kuberay-rayservice.yaml", "RayService")["spec"]
    (app,) = yaml.safe_load(service["serveConfigV2"])["applications"]
    from pipeline.serve.app import AppArgs
    from pipeline.serve.process import SHUTDOWN_MARGIN_S

    args = AppArgs.model_validate(app["args"])
    spec = load_spec(repo_path(args.spec), args.overrides)
    grace = spec.serve.shutdown_grace_s
    cluster = service["rayClusterConfig"]
    assert service["rayClusterDeletionDelaySeconds"] >= grace, "an upgrade's old cluster must outlive its requests"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        # The drain's deadline is the grace plus imagegen's shutdown margin; the pod's own
        # stop after the preStop sleep gets at least that margin too.
        sleep = int(command[1])
        assert command[0] == "sleep" and grace + SHUTDOWN_MARGIN_S <= sleep, container["name"]
        assert sleep + SHUTDOWN_MARGIN_S <= pod["terminationGracePeriodSeconds"], container["name"]
        # The key variable the spec names comes from a Secret, on every node (Serve builds
        # the app, and reads the keys, on any of them); never a value in the manifest.
        (variable,) = [e for e in container.get("env", []) if e["name"] == spec.serve.api_keys_env]
        assert "value" not in variable and variable["valueFrom"]["secretKeyRef"]["name"]
    # It listens on 0.0.0.0: the spec must bring keys (the app refuses to start otherwise).
    assert spec.serve.api_keys_env and not spec.serve.allow_unauthenticated
