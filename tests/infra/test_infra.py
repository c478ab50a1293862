"""Static checks of infra/: manifests render, validate against the schemas the API server uses, pin the Ray
version from pyproject, keep credentials out of command lines, and point at real code.

Nothing here talks to Kubernetes, Docker or a cloud. The kustomizations are rendered by `_render` below, a
pure-Python implementation of the part of `kustomize build` they use (when `kubectl` is installed, a test
checks that it renders exactly what `kubectl kustomize` does); KubeRay resources are validated against
KubeRay's own CRD schemas, core kinds against the fields the Kubernetes API requires of them.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

pytestmark = [pytest.mark.own_process, pytest.mark.process_group("beside-main"), pytest.mark.cost(12)]

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"
CPU_COMPONENT = KUBERAY / "components" / "cpu-workers"
SERVE_COMPONENT = KUBERAY / "components" / "serve"
JOBS = ("train", "tune", "register")
LAUNCHER = INFRA / "ray-cluster-launcher" / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
# The shared fixtures sit next to the repository (CI checks them out beside it).
KUBERAY_CRDS = ROOT.parent / "shared" / "fixtures" / "kuberay-crds"
RAYSERVICE_CRD = Path(__file__).resolve().parent / "kuberay-crds" / "rayservices.yaml"  # not among those
NAMESPACE = "yolov9-ray"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
# Everything a user reads or applies and that can name an entry point or a config file.
TEXT_FILES = YAML_FILES + [INFRA / "README.md", DOCKERFILE]

JOB_MODULE = re.compile(r"python -m jobs\.(\w+)")
CONFIG_ARG = re.compile(r"--config[= ]+(\S+)")
SCRIPT = re.compile(r"python ((?:[\w-]+/)*[\w-]+\.py)\b")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair in a parsed YAML tree, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


# --- a pure-Python `kustomize build` -------------------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "components",
    "generatorOptions",
    "secretGenerator",
    "configMapGenerator",
    "images",
    "patches",
}
CLUSTER_SCOPED = {"Namespace"}


class KustomizeError(Exception):
    """A kustomization uses something `_render` does not implement, or refers to a missing file."""


def _inside(root: Path, path: Path) -> Path:
    """`path`, refused when it leaves `root` (kustomize's default load restrictor)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise KustomizeError(f"{path} is outside the kustomization root {root}")
    return resolved


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a generator's env file. `X.example` is read in place of `X` when it exists: the
    real secret files are git-ignored, and tests must never see (or print) a real secret."""
    example = path.with_name(path.name + ".example")
    source = example if example.is_file() else path
    if not source.is_file():
        raise KustomizeError(f"generator env file {path} does not exist")
    pairs = {}
    for line in source.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            pairs[key.strip()] = value
    return pairs


def _generate(root: Path, kustomization: dict) -> list[dict]:
    """The Secrets and ConfigMaps of secretGenerator / configMapGenerator (`envs` sources only)."""
    if not kustomization.get("secretGenerator") and not kustomization.get("configMapGenerator"):
        return []
    options = kustomization.get("generatorOptions", {})
    if options != {"disableNameSuffixHash": True}:
        raise KustomizeError(f"{root}: generatorOptions {options} (only disableNameSuffixHash: true)")
    resources = []
    for key, kind in (("secretGenerator", "Secret"), ("configMapGenerator", "ConfigMap")):
        for gen in kustomization.get(key, []):
            if set(gen) != {"name", "envs"}:
                raise KustomizeError(
                    f"{root}: {key} {gen['name']} uses {sorted(set(gen) - {'name', 'envs'})}"
                )
            data = {}
            for env in gen["envs"]:
                data.update(_env_file(_inside(root, root / env)))
            resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
            if kind == "Secret":
                resource["type"] = "Opaque"
                data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            resource["data"] = data
            resources.append(resource)
    return resources


def _set_images(node: object, images: list[dict]) -> None:
    """kustomize's `images`: retag every container image, at any depth, whose name matches."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                for container in value:
                    name = container["image"].rsplit(":", 1)[0]
                    for image in images:
                        if image["name"] == name:
                            container["image"] = f"{name}:{image['newTag']}"
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def _json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[key]
        elif op["op"] == "replace":
            node[key]  # noqa: B018 - replace needs an existing target, as in RFC 6902
            node[key] = copy.deepcopy(op["value"])
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else key, copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            node[key] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"patch op {op['op']!r}")


def _patch(resources: list[dict], patches: list[dict]) -> None:
    for patch in patches:
        target = patch["target"]
        matches = [
            r
            for r in resources
            if r["kind"] == target["kind"]
            and r["metadata"]["name"] == target.get("name", r["metadata"]["name"])
            and r["apiVersion"] == "/".join(p for p in (target.get("group"), target.get("version")) if p)
        ]
        if not matches:
            raise KustomizeError(f"patch target {target} matches no resource")
        for resource in matches:
            _json_patch(resource, yaml.safe_load(patch["patch"]))


def _render(root: Path, components: tuple[Path, ...] = ()) -> list[dict]:
    """`kustomize build root` for the features this repository uses: resources (files and directories),
    components (plus extra `components`, as if listed), secret/configMap generators from env files,
    namespace, labels, images, JSON patches. Anything else raises KustomizeError."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    if unknown := set(kustomization) - KUSTOMIZATION_KEYS:
        raise KustomizeError(f"{root}: kustomization fields not implemented here: {sorted(unknown)}")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = root / entry
        resources += _render(path.resolve()) if path.is_dir() else _docs(_inside(root, path))
    for component in [root / c for c in kustomization.get("components", [])] + list(components):
        resources = _apply_component(component.resolve(), resources)
    resources += _generate(root, kustomization)
    _transform(kustomization, resources)
    return resources


def _apply_component(root: Path, resources: list[dict]) -> list[dict]:
    component = yaml.safe_load((root / "kustomization.yaml").read_text())
    if component.get("kind") != "Component":
        raise KustomizeError(f"{root} is not a kind: Component")
    if set(component) - {"apiVersion", "kind", "images", "patches", "resources"}:
        raise KustomizeError(f"{root}: component fields not implemented here: {sorted(component)}")
    # a component's resources (files only here) join the list before its own transformers run over it all
    added = [doc for entry in component.get("resources", []) for doc in _docs(_inside(root, root / entry))]
    resources = copy.deepcopy(resources) + added
    _transform(component, resources)
    return resources


def _transform(kustomization: dict, resources: list[dict]) -> None:
    _patch(resources, kustomization.get("patches", []))
    for resource in resources:
        if "namespace" in kustomization and resource["kind"] not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            if set(label) != {"pairs"}:
                raise KustomizeError(f"labels entry {label} (only `pairs`, metadata labels)")
            resource["metadata"].setdefault("labels", {}).update(label["pairs"])
        _set_images(resource, kustomization.get("images", []))


def _by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


STACK = _render(KUBERAY)
STACK_CPU = _render(KUBERAY, components=(CPU_COMPONENT,))
STACK_SERVE = _render(KUBERAY, components=(SERVE_COMPONENT,))
JOB_RENDERS = {name: _render(KUBERAY / "jobs" / name) for name in JOBS}
# Everything `kubectl apply -k` creates, in every combination the README documents.
ALL_RESOURCES = (
    [("infra/kuberay", r) for r in STACK]
    + [("infra/kuberay + cpu-workers", r) for r in STACK_CPU if r["kind"] == "RayCluster"]
    + [("infra/kuberay + serve", r) for r in STACK_SERVE if r["kind"] == "RayService"]
    + [(f"infra/kuberay/jobs/{name}", r) for name, rs in JOB_RENDERS.items() for r in rs]
)


def _resource_params(kinds: set[str] | None = None) -> list:
    return [
        pytest.param(r, id=f"{where}: {r['kind']}/{r['metadata']['name']}")
        for where, r in ALL_RESOURCES
        if kinds is None or r["kind"] in kinds
    ]


# --- Ray version, images, cluster specs -----------------------------------------------------------------


def _pinned_ray_minor() -> str:
    """'2.60' from pyproject's `ray[...]==2.60.*`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[\w,]+\])?==(\d+\.\d+)\.\*", d))]
    assert len(pins) == 1, f"expected one `ray[...]==X.Y.*` pin in pyproject dependencies, got {deps}"
    return pins[0]


def _dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, comments dropped, continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _base_images() -> dict[str, str]:
    """{variant: base image}: the one FROM, with the VARIANT build argument set to each value it may take."""
    instructions = _dockerfile_instructions()
    (from_,) = [args for instr, args in instructions if instr == "FROM"]
    (default,) = [args.split("=", 1)[1] for instr, args in instructions if instr == "ARG" and "=" in args]
    variants = {default, "cpu", "gpu"}
    return {v: from_.replace("${VARIANT}", v) for v in sorted(variants)}


def _base_ray_version() -> str:
    """'2.60.0' from `FROM rayproject/ray:2.60.0-py311-${VARIANT}`."""
    versions = set()
    for variant, image in _base_images().items():
        match = re.fullmatch(rf"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-{variant}", image)
        assert match, (
            f"{_rel(DOCKERFILE)}: base {image!r} is not an exact rayproject/ray:X.Y.Z-pyNNN-{variant}"
        )
        versions.add(match.group(1))
    assert len(versions) == 1, versions
    return versions.pop()


def _ray_images() -> list[tuple[str, str]]:
    """(where, image) for every Ray container of the rendered manifests and of the launcher."""
    found = {
        (where, value)
        for where, r in ALL_RESOURCES
        if r["kind"] in RAY_KINDS
        for key, value in _walk(r)
        if key == "image"
    }
    found |= {
        (_rel(LAUNCHER), value)
        for key, value in _walk(yaml.safe_load(LAUNCHER.read_text()))
        if key in {"image", "head_image", "worker_image"} and isinstance(value, str)
    }
    return sorted(found)


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for every RayCluster and every RayJob's and RayService's own cluster."""
    own = {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }
    return [
        (f"{where}: {r['kind']}/{r['metadata']['name']}", own[r["kind"]](r["spec"]))
        for where, r in ALL_RESOURCES
        if r["kind"] in RAY_KINDS
    ]


def _pod_specs() -> list[tuple[str, dict]]:
    """(where: group, pod spec) for every Ray head and worker group and every Deployment."""
    specs = []
    for where, cluster in _ray_cluster_specs():
        specs.append((f"{where}: head", cluster["headGroupSpec"]["template"]["spec"]))
        specs += [
            (f"{where}: {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])
        ]
    return specs


def _ray_pod_specs() -> list[tuple[str, dict]]:
    return _pod_specs()


def _all_pod_specs() -> list[tuple[str, dict]]:
    deployments = [
        (f"{where}: Deployment/{r['metadata']['name']}", r["spec"]["template"]["spec"])
        for where, r in ALL_RESOURCES
        if r["kind"] == "Deployment"
    ]
    return _ray_pod_specs() + deployments


def _containers(pod: dict) -> list[dict]:
    return pod["containers"] + pod.get("initContainers", [])


def _mentions(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted({(_rel(p), m.group(1)) for p in TEXT_FILES for m in pattern.finditer(p.read_text())})


def _by_where(pairs: list[tuple[str, object]]) -> list:
    """pytest params named after the first element (a file, or file: what), so failures say where."""
    return [
        pytest.param(where, value, id=f"{where}: {value}" if isinstance(value, str) else where)
        for where, value in pairs
    ]


def _rayjob(name: str) -> dict:
    (job,) = [r for r in JOB_RENDERS[name] if r["kind"] == "RayJob"]
    return job


# --- the kustomizations render the stack ----------------------------------------------------------------


def test_stack_renders_the_namespace_mlflow_postgres_raycluster_volume_and_secrets() -> None:
    assert sorted((r["kind"], r["metadata"]["name"]) for r in STACK) == sorted(
        [
            ("Namespace", NAMESPACE),
            ("PersistentVolumeClaim", "yolov9-shared"),
            ("RayCluster", "yolov9"),
            ("Deployment", "mlflow"),
            ("Service", "mlflow"),
            ("PersistentVolumeClaim", "mlflow-auth-db"),
            ("Deployment", "mlflow-postgres"),
            ("Service", "mlflow-postgres"),
            ("PersistentVolumeClaim", "mlflow-postgres-data"),
            ("Secret", "yolov9-ray-auth"),
            ("Secret", "mlflow-auth"),
            ("Secret", "mlflow-server"),
            ("ConfigMap", "mlflow-server-config"),
        ]
    )


def test_stack_has_no_rayjob() -> None:
    # RayJobs are one-shot and optional: applying the stack must not start a training run.
    assert [r for r in STACK if r["kind"] == "RayJob"] == []


@pytest.mark.parametrize(
    ("where", "resource"),
    [pytest.param(w, r, id=f"{w}: {r['kind']}/{r['metadata']['name']}") for w, r in ALL_RESOURCES],
)
def test_every_resource_lands_in_the_stack_namespace(where: str, resource: dict) -> None:
    expected = None if resource["kind"] in CLUSTER_SCOPED else NAMESPACE
    assert resource["metadata"].get("namespace") == expected, where


@pytest.mark.parametrize("name", JOBS)
def test_job_kustomization_renders_one_rayjob(name: str) -> None:
    assert [(r["kind"], r["metadata"]["name"]) for r in JOB_RENDERS[name]] == [("RayJob", f"yolov9-{name}")]


def test_cpu_component_runs_the_cpu_image_on_gpu_free_workers() -> None:
    gpu, cpu = (_by_kind(resources, "RayCluster")["yolov9"] for resources in (STACK, STACK_CPU))
    gpu_images = {value for key, value in _walk(gpu) if key == "image"}
    assert {value for key, value in _walk(cpu) if key == "image"} == {
        image.removesuffix("-gpu") + "-cpu" for image in gpu_images
    }
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_cpu_component_changes_only_the_raycluster() -> None:
    def others(resources: list[dict]) -> list[dict]:
        return [r for r in resources if r["kind"] != "RayCluster"]

    assert others(STACK_CPU) == others(STACK)


def test_serve_component_adds_only_the_rayservice() -> None:
    added = [r for r in STACK_SERVE if r not in STACK]
    assert [(r["kind"], r["metadata"]["name"]) for r in added] == [("RayService", "yolov9-detector")]
    assert len(STACK_SERVE) == len(STACK) + 1


def _serve_config() -> dict:
    (service,) = [r for r in STACK_SERVE if r["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_one_ray_serve_accepts() -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(_serve_config())


def test_rayservice_application_builds_from_its_import_path_and_args(monkeypatch) -> None:
    (app,) = _serve_config()["applications"]
    module, _, name = app["import_path"].partition(":")
    build = getattr(importlib.import_module(module), name)
    # the replicas' MLFLOW_TRACKING_URI comes from the pod's env, as the manifest sets it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    application = build(app["args"])
    options = application._bound_deployment.init_args[2]
    assert options.gpu and options.max_replicas == 8 and options.max_batch_size == 16
    assert app["args"]["model"].startswith("models:/yolov9-det@")


def test_rayservice_listens_where_its_pods_declare_the_serve_port() -> None:
    port = _serve_config()["http_options"]["port"]
    (service,) = [r for r in STACK_SERVE if r["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert {"containerPort": port, "name": "serve"} in container["ports"]


@pytest.mark.parametrize(
    ("root", "components"),
    [
        pytest.param("", (), id="infra/kuberay"),
        pytest.param("", ("components/cpu-workers",), id="infra/kuberay + cpu-workers"),
        pytest.param("", ("components/serve",), id="infra/kuberay + serve"),
        *[pytest.param(f"jobs/{name}", (), id=f"infra/kuberay/jobs/{name}") for name in JOBS],
    ],
)
def test_render_equals_kubectl_kustomize(tmp_path: Path, root: str, components: tuple[str, ...]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the pure-Python render is not cross-checked")
    # kubectl reads the real secret files: give it a copy whose secret files are the examples.
    tree = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, tree, ignore=shutil.ignore_patterns("*.env"))
    for example in tree.rglob("*.env.example"):
        shutil.copy(example, example.with_name(example.name.removesuffix(".example")))
    (tree / "mlflow" / "server.env").write_text((KUBERAY / "mlflow" / "server.env").read_text())
    if components:
        kustomization = yaml.safe_load((tree / "kustomization.yaml").read_text())
        kustomization["components"] = list(components)
        (tree / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(
        [kubectl, "kustomize", str(tree / root)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    ours = _render(KUBERAY / root, tuple(KUBERAY / c for c in components))

    def normalised(resources: list[dict]) -> list[dict]:
        # kubectl wraps long base64 values over several lines.
        for r in resources:
            if r["kind"] == "Secret":
                r["data"] = {k: "".join(v.split()) for k, v in r["data"].items()}
        return sorted(resources, key=lambda r: (r["kind"], r["metadata"]["name"]))

    assert normalised(list(yaml.safe_load_all(built))) == normalised(ours)


# --- KubeRay resources against KubeRay's CRDs -----------------------------------------------------------


@functools.cache
def _crd_schema(kind: str) -> dict:
    crds = {"RayCluster": KUBERAY_CRDS / "rayclusters.yaml", "RayJob": KUBERAY_CRDS / "rayjobs.yaml"}
    (crd,) = _docs(crds.get(kind, RAYSERVICE_CRD))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _unknown_fields(value: object, schema: dict, path: str) -> list[str]:
    """Fields of `value` that `schema` does not declare: the API server prunes them without an error."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        if "properties" not in schema:
            extra = schema.get("additionalProperties")
            return (
                [u for k, v in value.items() for u in _unknown_fields(v, extra, f"{path}.{k}")]
                if isinstance(extra, dict)
                else []
            )
        return [
            u
            for k, v in value.items()
            for u in (
                _unknown_fields(v, schema["properties"][k], f"{path}.{k}")
                if k in schema["properties"]
                else [f"{path}.{k}"]
            )
        ]
    if isinstance(value, list) and "items" in schema:
        return [
            u for i, item in enumerate(value) for u in _unknown_fields(item, schema["items"], f"{path}[{i}]")
        ]
    return []


@pytest.mark.parametrize("resource", _resource_params(RAY_KINDS))
def test_kuberay_resource_validates_against_its_crd(resource: dict) -> None:
    assert resource["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(_crd_schema(resource["kind"])).validate(resource)


@pytest.mark.parametrize("resource", _resource_params(RAY_KINDS))
def test_kuberay_resource_sets_only_fields_its_crd_declares(resource: dict) -> None:
    assert _unknown_fields(resource, _crd_schema(resource["kind"]), resource["kind"]) == []
    # The CRD leaves metadata to the API server, which knows these.
    assert set(resource["metadata"]) <= {"name", "namespace", "labels", "annotations"}


def test_unknown_field_check_finds_a_misspelled_field() -> None:
    (cluster,) = copy.deepcopy(_by_kind(STACK, "RayCluster")).values()
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert _unknown_fields(cluster, _crd_schema("RayCluster"), "RayCluster") == [
        "RayCluster.spec.headGroupSpec.rayStartParam"
    ]


# --- core kinds against the fields the API requires -----------------------------------------------------

API_VERSIONS = {
    "Namespace": "v1",
    "Secret": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "RayService": "ray.io/v1",
}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@pytest.mark.parametrize("resource", _resource_params())
def test_resource_kind_is_known_with_its_api_version(resource: dict) -> None:
    assert API_VERSIONS.get(resource["kind"]) == resource["apiVersion"]


@pytest.mark.parametrize("resource", _resource_params())
def test_resource_name_is_a_valid_object_name(resource: dict) -> None:
    pattern = DNS_LABEL if resource["kind"] in {"Namespace", "Service", "RayCluster"} else DNS_SUBDOMAIN
    assert pattern.fullmatch(resource["metadata"]["name"])


@pytest.mark.parametrize("resource", _resource_params({"Deployment"}))
def test_deployment_has_a_selector_matching_its_pod_template(resource: dict) -> None:
    spec = resource["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] and spec["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize(("where", "pod"), _by_where(_all_pod_specs()))
def test_pod_containers_have_a_name_and_an_image(where: str, pod: dict) -> None:
    assert pod["containers"], where
    for container in _containers(pod):
        assert DNS_LABEL.fullmatch(container["name"]) and container["image"], where


@pytest.mark.parametrize(("where", "pod"), _by_where(_all_pod_specs()))
def test_pod_mounts_only_volumes_it_declares(where: str, pod: dict) -> None:
    volumes = {v["name"] for v in pod.get("volumes", [])}
    mounts = {m["name"] for c in _containers(pod) for m in c.get("volumeMounts", [])}
    assert mounts - volumes == set(), where


@pytest.mark.parametrize("resource", _resource_params({"Service"}))
def test_service_selects_a_deployment_and_targets_a_named_port(resource: dict) -> None:
    spec = resource["spec"]
    (pod,) = [
        d["spec"]["template"]
        for d in _by_kind(STACK, "Deployment").values()
        if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert spec["ports"] and all(
        isinstance(p["port"], int) and p["targetPort"] in ports for p in spec["ports"]
    )


@pytest.mark.parametrize("resource", _resource_params({"PersistentVolumeClaim"}))
def test_claim_has_access_modes_and_a_storage_request(resource: dict) -> None:
    spec = resource["spec"]
    assert spec["accessModes"] and set(spec["accessModes"]) <= {
        "ReadWriteOnce",
        "ReadOnlyMany",
        "ReadWriteMany",
        "ReadWriteOncePod",
    }
    assert re.fullmatch(r"\d+(Ki|Mi|Gi|Ti)", spec["resources"]["requests"]["storage"])


@pytest.mark.parametrize("resource", _resource_params({"Secret", "ConfigMap"}))
def test_secret_and_configmap_data_are_strings_under_valid_keys(resource: dict) -> None:
    data = resource["data"]
    assert data and all(re.fullmatch(r"[-._a-zA-Z0-9]+", k) and isinstance(v, str) for k, v in data.items())
    if resource["kind"] == "Secret":
        assert resource["type"] == "Opaque"
        assert all(base64.b64decode(v, validate=True) is not None for v in data.values())


# --- references between resources resolve --------------------------------------------------------------


def _references(pod: dict) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) for every Secret/ConfigMap/claim a pod spec uses."""
    for container in _containers(pod):
        for env in container.get("env", []):
            for kind, ref in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if ref in env.get("valueFrom", {}):
                    r = env["valueFrom"][ref]
                    yield kind, r["name"], r["key"], r.get("optional", False)
        for source in container.get("envFrom", []):
            for kind, ref in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if ref in source:
                    yield kind, source[ref]["name"], None, source[ref].get("optional", False)
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None, False


@pytest.mark.parametrize(("where", "pod"), _by_where(_all_pod_specs()))
def test_pod_references_resolve_to_resources_of_the_stack(where: str, pod: dict) -> None:
    # RayJobs are applied after the stack, into its namespace: they may use its Secrets and volumes.
    for kind, name, key, optional in _references(pod):
        resource = _by_kind(STACK, kind).get(name)
        assert resource is not None, f"{where}: {kind} {name} is not part of infra/kuberay"
        if key is not None and not optional:
            assert key in resource["data"], f"{where}: {kind} {name} has no key {key!r}"


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_token_secret_is_part_of_the_stack_with_an_auth_token(where: str, spec: dict) -> None:
    secret = _by_kind(STACK, "Secret")[spec["authOptions"]["secretName"]]
    assert "auth_token" in secret["data"], where


# --- exposure and credentials ---------------------------------------------------------------------------

SECRET_WORDS = re.compile(r"password|secret|token|access_key|credential|://[^/\s:@]+:[^/\s@]+@", re.I)


@pytest.mark.parametrize("resource", _resource_params({"ConfigMap"}))
def test_configmap_holds_no_credential(resource: dict) -> None:
    assert [f"{k}={v}" for k, v in resource["data"].items() if SECRET_WORDS.search(f"{k}={v}")] == []


@pytest.mark.parametrize(("where", "pod"), _by_where(_all_pod_specs()))
def test_no_credential_on_a_container_command_line(where: str, pod: dict) -> None:
    for container in _containers(pod):
        words = container.get("command", []) + container.get("args", [])
        # $(VAR) in command/args is expanded by the kubelet into the process's arguments (visible in ps).
        assert [w for w in words if "$(" in w or SECRET_WORDS.search(w)] == [], where
        literal = [
            e["name"] for e in container.get("env", []) if "value" in e and SECRET_WORDS.search(e["name"])
        ]
        assert literal == [], f"{where}: {literal} set literally instead of from a Secret"


@pytest.mark.parametrize("resource", _resource_params({"Service"}))
def test_service_is_cluster_internal(resource: dict) -> None:
    assert resource["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_head_service_is_cluster_internal(where: str, spec: dict) -> None:
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where


@pytest.mark.parametrize(("where", "pod"), _by_where(_all_pod_specs()))
def test_mlflow_server_on_all_interfaces_requires_a_login(where: str, pod: dict) -> None:
    for container in _containers(pod):
        words = container.get("command", []) + container.get("args", [])
        if "server" in words and any(w in {"--host=0.0.0.0", "-h=0.0.0.0"} for w in words):
            assert "--app-name=basic-auth" in words, where


def test_mlflow_server_reads_every_credential_from_a_secret() -> None:
    (container,) = _by_kind(STACK, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    from_secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
    } <= from_secrets


def test_mlflow_server_serves_artifacts_from_the_configured_object_store() -> None:
    (container,) = _by_kind(STACK, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    assert "--serve-artifacts" in container["args"]
    config = _by_kind(STACK, "ConfigMap")[container["envFrom"][0]["configMapRef"]["name"]]["data"]
    assert re.match(r"(s3|gs|wasbs)://", config["MLFLOW_ARTIFACTS_DESTINATION"])


@pytest.mark.parametrize(("where", "pod"), _by_where(_ray_pod_specs()))
def test_ray_pods_log_in_to_mlflow_with_credentials_from_a_secret(where: str, pod: dict) -> None:
    for container in pod["containers"]:
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", where
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}, where


def test_mlflow_admin_password_example_is_long_enough_for_mlflow() -> None:
    # MLflow's basic-auth app refuses to create its admin with a password under 12 characters.
    password = base64.b64decode(_by_kind(STACK, "Secret")["mlflow-auth"]["data"]["password"]).decode()
    assert len(password) >= 12


def _kustomization_env_files() -> list[Path]:
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    return [KUBERAY / env for gen in kustomization["secretGenerator"] for env in gen["envs"]]


@pytest.mark.parametrize("path", _kustomization_env_files(), ids=_rel)
def test_secret_env_file_is_git_ignored_and_has_an_example(path: Path) -> None:
    patterns = [
        line
        for line in (path.parent / ".gitignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert any(fnmatch.fnmatch(path.name, p) for p in patterns)
    assert path.with_name(path.name + ".example").is_file()


# --- docker compose -------------------------------------------------------------------------------------


def _compose_default(value: str) -> str:
    """A compose string with every `${VAR:-default}` / `${VAR}` as it reads when VAR is not set."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def test_compose_publishes_mlflow_on_localhost_by_default() -> None:
    ports = [_compose_default(p) for p in _compose_service("mlflow")["ports"]]
    assert ports == ["127.0.0.1:5000:5000"]


def test_compose_does_not_publish_postgres() -> None:
    assert "ports" not in _compose_service("postgres")


def test_compose_mlflow_runs_basic_auth_and_serves_artifacts() -> None:
    command = _compose_service("mlflow")["command"]
    assert {"--app-name=basic-auth", "--serve-artifacts"} <= set(command)


def test_compose_keeps_credentials_off_the_command_line() -> None:
    command = _compose_service("mlflow")["command"]
    assert [w for w in command if "$" in w or SECRET_WORDS.search(w)] == []
    assert _compose_service("mlflow")["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


# --- the image ------------------------------------------------------------------------------------------


def _pip_installs() -> list[tuple[int, str]]:
    """(instruction index, arguments) of every RUN that installs with pip."""
    return [
        (i, args)
        for i, (instr, args) in enumerate(_dockerfile_instructions())
        if instr == "RUN" and "pip install" in args
    ]


def _copied(instruction: str) -> list[str]:
    return [w.rstrip("/") for w in shlex.split(instruction) if not w.startswith("--")][:-1]


def test_dockerfile_base_is_the_pinned_ray_version_for_every_variant() -> None:
    assert set(_base_images()) == {"cpu", "gpu"}
    assert _base_ray_version().startswith(_pinned_ray_minor() + ".")


def test_dockerfile_installs_dependencies_before_copying_the_sources() -> None:
    instructions = _dockerfile_instructions()
    (deps_at, _), (project_at, _) = _pip_installs()
    before = [
        s for i, (instr, args) in enumerate(instructions[:deps_at]) if instr == "COPY" for s in _copied(args)
    ]
    after = [s for instr, args in instructions[deps_at:project_at] if instr == "COPY" for s in _copied(args)]
    # A code change must leave the dependency layer cached: only the files that define it come first.
    assert sorted(before) == ["constraints.txt", "pyproject.toml"]
    assert {"yolov9", "pipeline", "jobs"} <= set(after)


def test_dependency_layer_installs_pyprojects_dependencies_under_the_constraints() -> None:
    (_, deps), _ = _pip_installs()
    words = shlex.split(deps.split("pip install", 1)[1])
    assert words[words.index("-c") + 1] == "constraints.txt"
    requirements = words[words.index("-r") + 1]
    # The requirement file is written by a python one-liner from pyproject.toml: run it here.
    (code,) = re.findall(r'python -c "(.*?)"\s*> ' + re.escape(requirements), deps)
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    deps_list = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert printed.splitlines() == deps_list


def test_project_layer_installs_the_project_alone() -> None:
    _, (_, project) = _pip_installs()
    words = shlex.split(project.split("pip install", 1)[1])
    assert "--no-deps" in words and [w for w in words if not w.startswith("-")] == ["."]


def test_cpu_variant_takes_pytorchs_cpu_wheels() -> None:
    (_, deps), _ = _pip_installs()
    assert re.search(
        r'if \[ "\$VARIANT" = cpu \]; then torch_index="--extra-index-url https://download\.pytorch\.org/whl/cpu"',
        deps,
    )


def test_dockerfile_copies_what_pip_install_dot_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {s for instr, args in _dockerfile_instructions() if instr == "COPY" for s in _copied(args)}
    assert {"pyproject.toml", project["project"]["readme"], *packages} - copied == set()


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, INFRA / "mlflow" / "Dockerfile"], ids=_rel)
def test_dockerfile_copies_only_existing_paths(dockerfile: Path) -> None:
    # Both images build from the repository root.
    sources = [
        s for instr, args in _dockerfile_instructions(dockerfile) if instr == "COPY" for s in _copied(args)
    ]
    assert [s for s in sources if not (ROOT / s).exists()] == []


def test_dockerignore_excludes_local_state_and_data() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "mlruns", "*.db", "shards", "data", "ray_results"} - patterns == set()


@pytest.mark.parametrize(("where", "image"), _by_where(_ray_images()))
def test_image_tag_names_the_base_ray_version(where: str, image: str) -> None:
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    assert re.search(rf"(?<![\d.]){re.escape(_base_ray_version())}(?![\d.])", tag), (
        f"{where}: image {image!r} does not name Ray {_base_ray_version()} in its tag"
    )


@pytest.mark.parametrize(("where", "image"), _by_where(_ray_images()))
def test_image_tag_names_a_variant_the_dockerfile_builds(where: str, image: str) -> None:
    assert image.rsplit("-", 1)[-1] in _base_images(), f"{where}: {image}"


def test_ray_manifests_use_one_image_in_its_variants() -> None:
    assert len({image.rsplit("-", 1)[0] for _, image in _ray_images()}) == 1, _ray_images()


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_version_field_matches_the_image(where: str, spec: dict) -> None:
    assert spec.get("rayVersion") == _base_ray_version(), f"{where}: rayVersion {spec.get('rayVersion')!r}"


# --- entry points and the Ray clusters ------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_file_parses(path: Path) -> None:
    assert _docs(path), f"{_rel(path)} holds no YAML document"


def test_manifests_and_readme_name_the_train_tune_register_entry_points() -> None:
    assert {"train", "tune", "register"} <= {module for _, module in _mentions(JOB_MODULE)}


@pytest.mark.parametrize(("where", "module"), _by_where(_mentions(JOB_MODULE)))
def test_entry_point_module_exists(where: str, module: str) -> None:
    assert (ROOT / "jobs" / f"{module}.py").is_file(), (
        f"{where}: python -m jobs.{module} has no jobs/{module}.py"
    )


@pytest.mark.parametrize(("where", "config"), _by_where(_mentions(CONFIG_ARG)))
def test_config_file_exists(where: str, config: str) -> None:
    assert (ROOT / config).is_file(), f"{where}: --config {config} is not a file in the repository"


@pytest.mark.parametrize(("where", "script"), _by_where(_mentions(SCRIPT)))
def test_script_exists(where: str, script: str) -> None:
    assert (ROOT / script).is_file(), f"{where}: python {script} is not a file in the repository"


@pytest.mark.parametrize("name", JOBS)
def test_rayjob_entry_point_runs_in_the_image_workdir(name: str) -> None:
    workdir = next(args for instr, args in _dockerfile_instructions() if instr == "WORKDIR")
    # Config paths in the entrypoint are relative to the project checkout baked into the image.
    assert _rayjob(name)["spec"]["entrypoint"].startswith(f"cd {workdir} && python -m jobs.{name} ")


@pytest.mark.parametrize("name", JOBS)
def test_rayjob_deletes_its_cluster_after_a_ttl(name: str) -> None:
    spec = _rayjob(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_register_job_registers_the_experiment_the_train_job_logs_to() -> None:
    train = yaml.safe_load((ROOT / "jobs" / "configs" / "coco-yolov9-c.yaml").read_text())
    assert f"--run {train['mlflow']['experiment']} " in _rayjob("register")["spec"]["entrypoint"]
    assert "--config jobs/configs/coco-yolov9-c.yaml" in _rayjob("train")["spec"]["entrypoint"]


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_cluster_uses_token_auth(where: str, spec: dict) -> None:
    assert spec.get("authOptions", {}).get("mode") == "token", where


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_head_has_no_gpus(where: str, spec: dict) -> None:
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0", where


def _gpus(group: dict) -> int:
    (container,) = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_raycluster_autoscales_8_gpu_workers_by_default_and_1_gpu_workers_as_variants() -> None:
    spec = _by_kind(STACK, "RayCluster")["yolov9"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert [_gpus(g) for g in groups] == [8, 1, 1]  # the first group is the default the docs size
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in groups)


def test_the_spot_group_holds_the_elastic_coco_run_and_tolerates_spot_nodes() -> None:
    from pipeline.config import load_config

    cfg = load_config(ROOT / "jobs" / "configs" / "coco-yolov9-c.yaml")
    assert cfg.ray.elastic and cfg.ray.max_failures == -1
    (spot,) = [g for g in _by_kind(STACK, "RayCluster")["yolov9"]["spec"]["workerGroupSpecs"]
               if g["groupName"] == "gpu-spot"]  # fmt: skip
    pod = spot["template"]["spec"]
    assert _gpus(spot) == 1 and spot["maxReplicas"] >= cfg.ray.max_workers
    assert int(pod["containers"][0]["resources"]["limits"]["cpu"]) >= cfg.ray.cpus_per_worker
    assert any("spot" in t["key"] for t in pod["tolerations"])
    assert any("spot" in k for k in pod["nodeSelector"])


def test_cpu_component_leaves_one_cpu_worker_group() -> None:
    (group,) = _by_kind(STACK_CPU, "RayCluster")["yolov9"]["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and _gpus(group) == 0


@pytest.mark.parametrize(("where", "pod"), _by_where(_ray_pod_specs()))
def test_pod_mounts_the_shared_claim_at_mnt_shared(where: str, pod: dict) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/mnt/shared"]
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "yolov9-shared", where


@pytest.mark.parametrize(("where", "pod"), _by_where(_ray_pod_specs()))
def test_pod_mounts_memory_backed_dev_shm(where: str, pod: dict) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", where


def test_shared_claim_is_read_write_many() -> None:
    assert _by_kind(STACK, "PersistentVolumeClaim")["yolov9-shared"]["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_launcher_has_a_head_and_gpu_workers_in_docker_with_file_mounts() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["docker"]["image"]
    assert config["file_mounts"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert config["head_node_type"] in config["available_node_types"]
    assert any(w["max_workers"] > 0 for w in workers.values())
