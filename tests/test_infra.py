"""Static checks of infra/: manifests parse, pin the Ray version from pyproject, and point at real code.

Nothing here talks to Kubernetes, Docker or a cloud; the files are read as text and YAML so that a
renamed module, a moved config or a Ray upgrade that forgets the images fails in CI, not on a cluster.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "ray-cluster-launcher" / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})
# Files that run Ray: their images must carry the project's Ray version. The MLflow compose file is not
# one of them (postgres and mlflow images have their own versions).
RAY_FILES = sorted(KUBERAY.glob("*.yaml")) + [LAUNCHER]
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


def _pinned_ray_minor() -> str:
    """'2.60' from pyproject's `ray[...]==2.60.*`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[\w,]+\])?==(\d+\.\d+)\.\*", d))]
    assert len(pins) == 1, f"expected one `ray[...]==X.Y.*` pin in pyproject dependencies, got {deps}"
    return pins[0]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, comments dropped, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _base_image() -> str:
    froms = [args for instr, args in _dockerfile_instructions() if instr == "FROM"]
    assert len(froms) == 1, f"expected one FROM in {_rel(DOCKERFILE)}, got {froms}"
    return froms[0]


def _base_ray_version() -> str:
    """'2.60.0' from `FROM rayproject/ray:2.60.0-py311-gpu`."""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", _base_image())
    assert match, f"{_rel(DOCKERFILE)} must build FROM an exact rayproject/ray:X.Y.Z-pyNNN-gpu tag"
    return match.group(1)


def _ray_images() -> list[tuple[str, str]]:
    return sorted(
        {
            (_rel(path), value)
            for path in RAY_FILES
            for doc in _docs(path)
            for key, value in _walk(doc)
            if key in {"image", "head_image", "worker_image"} and isinstance(value, str)
        }
    )


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(file, RayCluster spec) for every RayCluster and every RayJob's own cluster."""
    return [
        (_rel(path), doc["spec"].get("rayClusterSpec", doc["spec"]))
        for path in sorted(KUBERAY.glob("*.yaml"))
        for doc in _docs(path)
        if doc["kind"] in {"RayCluster", "RayJob"}
    ]


def _pod_specs() -> list[tuple[str, dict]]:
    """(file: group, pod spec) for every Ray head and worker group in the KubeRay manifests."""
    specs = []
    for where, cluster in _ray_cluster_specs():
        specs.append((f"{where}: head", cluster["headGroupSpec"]["template"]["spec"]))
        specs += [
            (f"{where}: {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])
        ]
    return specs


def _mentions(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted({(_rel(p), m.group(1)) for p in TEXT_FILES for m in pattern.finditer(p.read_text())})


def _by_where(pairs: list[tuple[str, object]]) -> list:
    """pytest params named after the first element (a file, or file: what), so failures say where."""
    return [
        pytest.param(where, value, id=f"{where}: {value}" if isinstance(value, str) else where)
        for where, value in pairs
    ]


def _rayjob(name: str) -> dict:
    (doc,) = _docs(KUBERAY / f"rayjob-{name}.yaml")
    return doc


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_file_parses(path: Path) -> None:
    assert _docs(path), f"{_rel(path)} holds no YAML document"


def test_issue_files_exist() -> None:
    expected = [
        "docker/Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-register.yaml",
        "ray-cluster-launcher/cluster.yaml",
        "mlflow/docker-compose.yaml",
        "README.md",
    ]
    assert [f for f in expected if not (INFRA / f).is_file()] == []


def test_dockerfile_base_is_the_pinned_ray_version() -> None:
    assert _base_ray_version().startswith(_pinned_ray_minor() + ".")


@pytest.mark.parametrize(("where", "image"), _by_where(_ray_images()))
def test_image_tag_names_the_base_ray_version(where: str, image: str) -> None:
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    assert re.search(rf"(?<![\d.]){re.escape(_base_ray_version())}(?![\d.])", tag), (
        f"{where}: image {image!r} does not name Ray {_base_ray_version()} in its tag"
    )


def test_ray_manifests_all_use_one_image() -> None:
    assert len({image for _, image in _ray_images()}) == 1, _ray_images()


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_version_field_matches_the_image(where: str, spec: dict) -> None:
    assert spec.get("rayVersion") == _base_ray_version(), f"{where}: rayVersion {spec.get('rayVersion')!r}"


def test_dockerfile_installs_the_project_and_nothing_else() -> None:
    installs = [
        args for instr, args in _dockerfile_instructions() if instr == "RUN" and "pip install" in args
    ]
    assert installs, f"{_rel(DOCKERFILE)} never runs pip install"
    for args in installs:
        words = shlex.split(args.split("pip install", 1)[1].split("&&")[0])
        # Only the project itself: a second dependency list would drift from pyproject.
        assert [w for w in words if not w.startswith("-")] == ["."], f"pip install {' '.join(words)}"


def test_dockerfile_copies_what_pip_install_dot_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set()
    for instr, args in _dockerfile_instructions():
        if instr == "COPY":
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    assert needed - copied == set()


def test_dockerfile_copies_only_existing_paths() -> None:
    sources = [
        s
        for instr, args in _dockerfile_instructions()
        if instr == "COPY"
        for s in [w for w in shlex.split(args) if not w.startswith("--")][:-1]
    ]
    assert [s for s in sources if not (ROOT / s).exists()] == []


def test_dockerignore_excludes_local_state_and_data() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "mlruns", "*.db", "shards", "data", "ray_results"} - patterns == set()


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


@pytest.mark.parametrize("name", ["train", "tune", "register"])
def test_rayjob_entry_point_runs_in_the_image_workdir(name: str) -> None:
    workdir = next(args for instr, args in _dockerfile_instructions() if instr == "WORKDIR")
    # Config paths in the entrypoint are relative to the project checkout baked into the image.
    assert _rayjob(name)["spec"]["entrypoint"].startswith(f"cd {workdir} && python -m jobs.{name} ")


@pytest.mark.parametrize("name", ["train", "tune", "register"])
def test_rayjob_deletes_its_cluster_after_a_ttl(name: str) -> None:
    spec = _rayjob(name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_ray_cluster_uses_token_auth(where: str, spec: dict) -> None:
    assert spec.get("authOptions", {}).get("mode") == "token", where


@pytest.mark.parametrize(("where", "spec"), _by_where(_ray_cluster_specs()))
def test_head_has_no_gpus(where: str, spec: dict) -> None:
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0", where


def test_raycluster_autoscales_a_gpu_worker_group() -> None:
    (spec,) = [s for where, s in _ray_cluster_specs() if where.endswith("raycluster.yaml")]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize(("where", "pod"), _by_where(_pod_specs()))
def test_pod_mounts_the_shared_claim_at_mnt_shared(where: str, pod: dict) -> None:
    claim = yaml.safe_load((KUBERAY / "shared-pvc.yaml").read_text())["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/mnt/shared"]
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim, where


@pytest.mark.parametrize(("where", "pod"), _by_where(_pod_specs()))
def test_pod_mounts_memory_backed_dev_shm(where: str, pod: dict) -> None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", where


def test_shared_claim_is_read_write_many() -> None:
    assert yaml.safe_load((KUBERAY / "shared-pvc.yaml").read_text())["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_launcher_has_a_head_and_gpu_workers_in_docker_with_file_mounts() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["docker"]["image"]
    assert config["file_mounts"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert config["head_node_type"] in config["available_node_types"]
    assert any(w["max_workers"] > 0 for w in workers.values())


def test_mlflow_server_uses_postgres_and_serves_artifacts() -> None:
    command = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"]
    options = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in command if arg.startswith("--"))
    assert options["--backend-store-uri"].startswith("postgresql://")
    assert options["--artifacts-destination"]
    assert "--serve-artifacts" in options
    assert (options["--host"], options["--port"]) == ("0.0.0.0", "5000")
