"""The cluster configs (cluster/*.yaml) and the image (infra/Dockerfile) against what they name.

- cluster/ray-cluster.yaml validates against Ray's own launcher schema (ray/autoscaler/ray-schema.json)
  and goes through Ray's prepare_config / validate_config (offline: no AWS call, no boto3).
- The KubeRay manifests validate against kuberay_v1_fields.json, KubeRay's v1 CRDs trimmed to the
  fields we use (source, commit and version inside it); a misspelled field is rejected.
- Every command, image, job file and file the configs name exists: `raycompress ...` command lines
  parse with the real CLI parser, `ray ...` subcommands and `ray start` options exist in Ray's CLI,
  job files load, every image is the Makefile's IMAGE, and the Dockerfile builds on the Ray image
  of the installed Ray version from files that exist.

Nothing here needs network, docker or kubectl: a few seconds on a laptop.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = [CLUSTER / "kuberay-raycluster.yaml", CLUSTER / "kuberay-rayjob.yaml"]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
CONFIGS = [LAUNCHER, *KUBERAY, DOCKERFILE]
CRD_FIELDS = Path(__file__).with_name("kuberay_v1_fields.json")
APP = "/app"  # the repository's root inside the image (the Dockerfile's WORKDIR; checked below)

# `raycompress SUB ...` / `python -m raycompress SUB ...`; not raycompress-cache, .../raycompress:tag
RAYCOMPRESS_CMD = re.compile(r"(?<![\w/.:-])(?:python3? -m )?raycompress[ \t]+(?=[a-z])")
RAY_CMD = re.compile(r"(?<![\w/.:-])ray[ \t]+([a-z][\w-]*)")
JOB_FILE = re.compile(r"(?<![\w./-])(?:/app/)?jobs/[\w./-]+?\.yaml\b")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


@lru_cache(maxsize=None)
def _image() -> str:
    """The one image name: the Makefile's `IMAGE ?=`."""
    m = re.search(r"^IMAGE\s*\?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile defines no `IMAGE ?= ...`"
    return m.group(1)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip() if " " in ln.strip() else "")
            for ln in text.splitlines() if ln.strip()]


def _command_mentions(text: str, pattern: re.Pattern) -> list[tuple[str, bool]]:
    """(command text from the program name on, whether it is a full command line) for each match.

    A mention inside backticks (`raycompress submit`) is a name only; elsewhere (YAML values,
    commands in comments) the rest of the line up to a shell operator or a trailing comment is
    the full command."""
    out = []
    for m in pattern.finditer(text):
        start = m.start()
        if start > 0 and text[start - 1] == "`":
            out.append((text[start:text.index("`", start)], False))
            continue
        line = text[start:].split("\n", 1)[0]
        line = re.split(r"\s+#|;|&&|\|\||\||>|<|`", line)[0]
        out.append((line.strip(), True))
    return out


def _repo_path(path: str) -> Path:
    """A path as a config names it (relative to the repository, or under /app in the image)."""
    return ROOT / (path[len(APP) + 1:] if path.startswith(APP + "/") else path)


# --- Ray cluster launcher -------------------------------------------------------------------------

def test_launcher_config_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(LAUNCHER), schema)


def test_launcher_config_goes_through_rays_prepare_and_validate():
    """What `ray up` does before it calls AWS: fill defaults, merge commands, check docker and
    node types (the AWS bootstrap that follows needs credentials and is not run)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_load(LAUNCHER)))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "nothing may be scheduled on the head"
    assert head["max_workers"] == 0
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    gpu = types["gpu-h100x8"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["resources"] == {"CPU": 192, "GPU": 8}
    assert sum(w["max_workers"] for w in workers) >= 1 and cfg["max_workers"] >= max(w["max_workers"] for w in workers)
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["provider"]["type"] == "aws"
    # defaults.yaml's setup commands (a nightly wheel, pip install boto3) must not survive the merge
    assert not any("pip install" in c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"])


def test_launcher_file_mounts_exist():
    for remote, local in (_load(LAUNCHER).get("file_mounts") or {}).items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist"


def _ray_invocations(commands: list[str]) -> list[list[str]]:
    """Each `ray ...` invocation in a list of shell command strings, as argv (without `ray`)."""
    out = []
    for cmd in commands:
        for part in re.split(r";|&&|\|\|", cmd):
            argv = shlex.split(part)
            if argv[:1] == ["ray"]:
                out.append(argv[1:])
    return out


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_stops_then_starts_ray_with_real_options(key):
    from ray.scripts.scripts import cli

    calls = _ray_invocations(_load(LAUNCHER)[key])
    assert [c[0] for c in calls] == ["stop", "start"], f"{key}: expected `ray stop` then `ray start`, got {calls}"
    params = cli.commands["start"].make_context("start", calls[1][1:]).params  # raises on an unknown option
    assert params["metrics_export_port"] == 8080
    if key.startswith("head"):
        assert params["head"] and params["port"] == 6379
        assert params["dashboard_host"] == "127.0.0.1", "the dashboard is reached through `ray dashboard` only"
        assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    else:
        assert params["address"] == "$RAY_HEAD_IP:6379"


# --- KubeRay --------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    """A validator for one kind (RayJob, RayCluster): its own definition, for precise messages."""
    schema = json.loads(CRD_FIELDS.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert kind in schema["$defs"], f"kind {kind!r} is not in {CRD_FIELDS.name}"
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"})


def _kuberay_errors(doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
            for e in _crd_validator(doc.get("kind")).iter_errors(doc)]


def _cluster_spec(doc) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_crd_fields_name_their_source():
    meta = json.loads(CRD_FIELDS.read_text())["kuberay"]
    assert meta["repository"] == "ray-project/kuberay" and re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
    assert meta["tag"].startswith("v1.") and all(f.endswith(".yaml") for f in meta["files"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd_fields(path):
    doc = _load(path)
    assert _kuberay_errors(doc) == []
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "rayVersion must be the image's (and the tests') Ray"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "nothing may be scheduled on the head"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        (worker,) = group["template"]["spec"]["containers"]
        res = worker["resources"]
        assert str(res["limits"]["nvidia.com/gpu"]) == "8"
        assert all(res["requests"][k] == res["limits"][k] for k in ("cpu", "memory")), "requests must equal limits"
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
        cache = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}.get("/tmp/raycompress")
        volumes = {v["name"]: v for v in pod["template"]["spec"]["volumes"]}
        assert cache and "emptyDir" in volumes[cache], "the node cache must be a node-local emptyDir"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_ray_start_params_are_ray_start_options(path):
    from ray.scripts.scripts import cli

    options = {o for p in cli.commands["start"].params for o in p.opts}
    spec = _cluster_spec(_load(path))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        unknown = [k for k in group["rayStartParams"] if f"--{k}" not in options]
        assert not unknown, f"{path.name}: not `ray start` options: {unknown}"


def test_rayjob_runs_once_and_cleans_up():
    spec = _load(CLUSTER / "kuberay-rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["submissionMode"] == "K8sJobMode"
    output = shlex.split(spec["entrypoint"])[shlex.split(spec["entrypoint"]).index("--output") + 1]
    assert "://" in output or output.startswith("/"), "a job's output must be a URI or an absolute path"


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


# name: (index in KUBERAY, change to a valid manifest, text the error must contain)
MUTATIONS = {
    "RayJob spec.shutdownAfterJobFinish": (
        1, lambda d: _rename(d["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "'shutdownAfterJobFinish' was unexpected"),
    "RayJob ttlSecondsAfterFinished as text": (
        1, lambda d: d["spec"].update(ttlSecondsAfterFinished="300"), "not of type 'integer'"),
    "RayJob submissionMode typo": (1, lambda d: d["spec"].update(submissionMode="K8sJob"), "K8sJob"),
    "headGroupSpec.rayStartParam": (
        0, lambda d: _rename(d["spec"]["headGroupSpec"], "rayStartParams", "rayStartParam"), "rayStartParam"),
    "workerGroupSpecs minReplica": (
        0, lambda d: _rename(d["spec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"), "minReplicas"),
    "rayStartParams value not a string": (
        0, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "not of type 'string'"),
    "container without image": (
        0, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), "'image'"),
    "authOptions.mode typo": (0, lambda d: d["spec"]["authOptions"].update(mode="tokens"), "tokens"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_kuberay_validation_rejects_mistakes(name):
    """The trimmed CRD schema has teeth: each of these mistakes, made to a valid manifest, fails."""
    index, mutate, expected = MUTATIONS[name]
    doc = copy.deepcopy(_load(KUBERAY[index]))
    assert _kuberay_errors(doc) == []
    mutate(doc)
    errors = _kuberay_errors(doc)
    assert any(expected in e for e in errors), f"{name}: errors {errors} do not mention {expected!r}"


# --- what the configs name -----------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_raycompress_commands_parse(path):
    """Every `raycompress ...` / `python -m raycompress ...` the file names is a real subcommand,
    and every full command line parses with the CLI's own parser."""
    from raycompress.cli import _parser

    parser = _parser()
    subcommands = set(next(a for a in parser._actions if a.dest == "command").choices)
    for text, full in _command_mentions(path.read_text(), RAYCOMPRESS_CMD):
        argv = shlex.split(text)
        argv = argv[3:] if argv[0].startswith("python") else argv[1:]
        assert argv[0] in subcommands, f"{path.name}: `{text}`: no subcommand {argv[0]!r} in {sorted(subcommands)}"
        if full:
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{path.name}: `{text}` does not parse (exit {exc.code})")


def test_configs_name_the_smoke_job_and_the_operator_commands():
    """The first thing an operator runs is the smoke job; each config says how."""
    for path in [LAUNCHER, *KUBERAY]:
        assert "jobs/smoke.yaml" in path.read_text(), f"{path.name} does not name jobs/smoke.yaml"
    launcher = " ".join(t for t, _ in _command_mentions(LAUNCHER.read_text(), RAY_CMD))
    for needed in ("ray up", "ray dashboard", "ray down"):
        assert needed in launcher, f"ray-cluster.yaml does not tell the user `{needed}`"
    assert "raycompress submit jobs/smoke.yaml --address http://127.0.0.1:8265" in LAUNCHER.read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_subcommands_exist(path):
    from ray.scripts.scripts import cli

    for text, _ in _command_mentions(path.read_text(), RAY_CMD):
        sub = RAY_CMD.match(text).group(1)
        assert sub in cli.commands, f"{path.name}: `{text}`: Ray's CLI has no `ray {sub}`"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_files_named_exist_and_load(path):
    from raycompress.config import load_config

    named = sorted(set(JOB_FILE.findall(path.read_text())))
    for job in named:
        load_config(_repo_path(job))  # raises ConfigError naming the file and field


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_absolute_paths_under_app_exist(path):
    """Paths in the image (/app/...) are files of this repository, copied there by the Dockerfile."""
    copied = [src for ins, args in _dockerfile() if ins == "COPY"
              for src in [a for a in args.split() if not a.startswith("--")][:-1]]
    for p in sorted(set(re.findall(r"(?<![\w.-])/app/[\w./-]*\w", path.read_text()))):
        rel = p[len(APP) + 1:]
        assert _repo_path(p).exists(), f"{path.name}: {p} is not in the repository"
        assert any(rel == c or rel.startswith(c.rstrip("/") + "/") for c in copied), f"{p} is not copied into the image"


def test_every_image_is_the_makefile_image():
    image = _image()
    launcher = _load(LAUNCHER)["docker"]
    named = [launcher[k] for k in ("image", "head_image", "worker_image") if k in launcher]
    for path in KUBERAY:
        spec = _cluster_spec(_load(path))
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            named += [c["image"] for c in group["template"]["spec"]["containers"]]
    assert named and set(named) == {image}, f"images named: {sorted(set(named))}, Makefile IMAGE: {image}"
    for path in [LAUNCHER, *KUBERAY]:
        others = set(re.findall(r"(?:ghcr\.io|docker\.io|REGISTRY)/[\w./-]+(?::[\w.-]+)?", path.read_text()))
        assert others <= {image}, f"{path.name} names other images: {sorted(others - {image})}"


def test_makefile_builds_the_image_from_the_dockerfile():
    assert re.search(r"^image:\n\tdocker build -f infra/Dockerfile -t \$\(IMAGE\) \.$",
                     (ROOT / "Makefile").read_text(), re.M)


def test_dockerfile_builds_on_the_installed_ray():
    froms = [args for ins, args in _dockerfile() if ins == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", froms[0])
    assert m, f"FROM {froms[0]}: expected rayproject/ray:VERSION-pyXY-cuXYZ"
    version, major, minor, cuda = m.groups()
    assert version == ray.__version__, f"image Ray {version} != installed Ray {ray.__version__}"
    assert (int(major), int(minor)) == sys.version_info[:2]
    # the image name says what it is built on, and which project version it holds
    project = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert _image().rsplit(":", 1)[1] == f"{project}-ray{version}-py{major}{minor}-{cuda}"


def test_dockerfile_installs_the_project_and_runs_as_ray():
    instructions = _dockerfile()
    runs = " ".join(args for ins, args in instructions if ins == "RUN")
    constraints = re.findall(r"pip install [^&]*?-c (\S+)", runs)
    assert constraints[:1] == ["infra/constraints.txt"], f"install with -c infra/constraints.txt, found {constraints}"
    assert (ROOT / constraints[0]).is_file()
    for ins, args in instructions:
        if ins == "COPY":
            for src in [a for a in args.split() if not a.startswith("--")][:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert [args for ins, args in instructions if ins == "WORKDIR"][-1] == APP
    assert [args for ins, args in instructions if ins == "USER"][-1] == "ray"
    env = " ".join(args for ins, args in instructions if ins == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    copied = {a for ins, args in instructions if ins == "COPY" for a in args.split()}
    assert {"jobs", "data", "system"} <= copied, "the image must hold the package, the job files and data/"


def test_dockerignore_keeps_environments_and_outputs_out():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".venv*", "runs/", ".git"} <= patterns and any("__pycache__" in p for p in patterns)
    assert not patterns & {"jobs", "jobs/", "data", "data/", "system", "system/", "infra", "infra/"}
