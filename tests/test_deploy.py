"""The deployment files in `deploy/` agree with the code they start.

No container engine runs here, so each file is parsed and every claim it makes is
checked against the code it names: `LOCKSTEP_*` variables against `Settings`,
`lockstep` commands against the CLI's parser, health-check paths against the app's
routes, the port the API listens on against what is exposed, published and probed,
the broker URL against the Redis service, and the data volume against the data dir.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from pydantic import SecretStr

from indexer.settings import Settings
from service import cli
from service.admin_auth import check_exposure, is_loopback
from service.app import create_app
from training.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
PREFIX = Settings.model_config["env_prefix"]
STRONG_TOKEN = "k3Y9-Qp2_xW7vL0aZr5tN8mB"


# --- the code's side: settings, commands, routes ---------------------------------------


@pytest.fixture
def container_settings(monkeypatch):
    """A function that reads `Settings` from a container's environment alone, as the container would."""

    def read(env: dict[str, str]) -> Settings:
        with monkeypatch.context() as patch:
            for name in [name for name in os.environ if name.startswith(PREFIX)]:
                patch.delenv(name)
            for name, value in env.items():
                if name.startswith(PREFIX):
                    patch.setenv(name, value)
            return Settings()

    return read


def unknown_settings(env: dict[str, str]) -> list[str]:
    """`LOCKSTEP_*` names that are no field of `Settings` (which would ignore them silently)."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(name for name in env if name.startswith(PREFIX) and name.removeprefix(PREFIX) not in fields)


def cli_command(argv: list[str]) -> tuple[str, dict]:
    """The `lockstep` subcommand `argv` runs and its parsed options; raises if the CLI would refuse it.

    Options before the subcommand (`--data-dir`) are refused: the files set the data dir
    through LOCKSTEP_DATA_DIR, which is what the volume checks read.
    """
    assert argv[0] == "lockstep", f"{argv} does not run the lockstep command"
    command, ctx, names, rest = typer.main.get_command(cli.app), None, [], list(argv[1:])
    while hasattr(command, "resolve_command"):
        ctx = command.make_context(" ".join(["lockstep", *names]), list(rest), parent=ctx)
        name, command, rest = command.resolve_command(ctx, rest)
        names.append(name)
    return " ".join(names), command.make_context(names[-1], rest, parent=ctx).params


def served_settings(argv: list[str], settings: Settings) -> Settings:
    """The settings `lockstep serve` runs with: the environment's, overridden by --host/--port as `serve` does."""
    name, params = cli_command(argv)
    assert name == "serve", f"{argv} does not serve the API"
    return settings.model_copy(update={key: value for key, value in params.items() if value is not None})


@pytest.fixture(scope="module")
def get_routes(tmp_path_factory) -> set[str]:
    """Paths the app answers with GET, from the OpenAPI schema it derives from its routes (no lifespan runs)."""
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("unused-data")))
    return {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


@dataclass(frozen=True)
class ProbeUrl:
    host: str
    port: int
    path: str


def probe_url(command: list[str] | str) -> ProbeUrl:
    """The URL a health-check command requests."""
    text = command if isinstance(command, str) else " ".join(command)
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, f"expected one URL in the health check {text!r}, found {urls}"
    url = urlparse(urls[0])
    return ProbeUrl(url.hostname, url.port, url.path)


def check_probe(url: ProbeUrl, port: int, path: str, routes: set[str]) -> None:
    assert is_loopback(url.host), f"a container's own health check should ask loopback, not {url.host}"
    assert url.port == port, f"the health check asks port {url.port} but the API listens on {port}"
    assert url.path == path, f"the health check asks {url.path}, expected {path}"
    assert url.path in routes, f"{url.path} is no GET route of the app"


# --- Dockerfiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    """A Dockerfile's instructions, comments dropped and continued lines joined, as (KEYWORD, arguments)."""

    path: Path
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"{self.path.name} has no {keyword}"
        return found[-1]

    @property
    def froms(self) -> list[str]:
        return [args.split()[0] for args in self.all("FROM")]

    @property
    def env(self) -> dict[str, str]:
        """The ENV of the final stage: what a container of the image starts with."""
        start = max(i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM")
        items = [item for kw, args in self.instructions[start:] if kw == "ENV" for item in shlex.split(args)]
        return dict(item.split("=", 1) for item in items)

    @property
    def cmd(self) -> list[str]:
        return json.loads(self.last("CMD"))

    @property
    def healthcheck(self) -> list[str]:
        return json.loads(self.last("HEALTHCHECK").split(" CMD ", 1)[1])

    @property
    def runs(self) -> list[str]:
        """RUN commands with `${ARG}` replaced by the ARG's default, as a plain build runs them."""
        defaults = dict(arg.split("=", 1) for arg in self.all("ARG") if "=" in arg)
        return [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), run) for run in self.all("RUN")]

    @property
    def copied(self) -> set[str]:
        """Paths copied from the build context (not from another stage)."""
        return {source for args in self.all("COPY") if not args.startswith("--from") for source in args.split()[:-1]}

    @property
    def ignored(self) -> list[str]:
        """The patterns of its BuildKit ignore file (`<name>.dockerignore`)."""
        text = (self.path.parent / f"{self.path.name}.dockerignore").read_text()
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_dockerfile(name: str) -> Dockerfile:
    path = DEPLOY / name
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    return Dockerfile(path, [
        (keyword.upper(), args.strip())
        for keyword, _, args in (line.strip().partition(" ") for line in logical if line.strip())
    ])


@pytest.fixture(scope="module")
def project() -> dict:
    """pyproject.toml: the packages, data files and torch requirement the images must honour."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module", params=DOCKERFILES)
def dockerfile(request) -> Dockerfile:
    return read_dockerfile(request.param)


def test_dockerfile_settings_are_real_and_data_dir_is_the_volume(dockerfile, container_settings):
    assert unknown_settings(dockerfile.env) == []
    settings = container_settings(dockerfile.env)
    assert json.loads(dockerfile.last("VOLUME")) == [str(settings.data_dir)]


def test_dockerfile_serves_the_exposed_port_and_checks_a_real_route(dockerfile, container_settings, get_routes):
    settings = served_settings(dockerfile.cmd, container_settings(dockerfile.env))
    assert not is_loopback(settings.host), "the API must listen beyond loopback to be reachable from outside"
    assert dockerfile.last("EXPOSE").split() == [str(settings.port)]
    check_probe(probe_url(dockerfile.healthcheck), settings.port, "/healthz", get_routes)


def test_dockerfile_bakes_in_no_admin_token(dockerfile, container_settings):
    """The image binds beyond loopback, so without a token supplied at run time `serve` must refuse to start."""
    settings = served_settings(dockerfile.cmd, container_settings(dockerfile.env))
    assert settings.admin_token is None
    with pytest.raises(InvalidInput, match="without an admin token"):
        check_exposure(settings.host, settings.admin_token)


def test_dockerfile_runs_as_a_non_root_user(dockerfile):
    user = dockerfile.last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: use a numeric non-root uid (Kubernetes checks runAsNonRoot)"


def test_dockerfile_copies_every_package_and_installs_torch_before_the_project(dockerfile, project):
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"]} <= dockerfile.copied
    assert dockerfile.ignored[0] == "*" and {f"!{source}" for source in dockerfile.copied} <= set(dockerfile.ignored), (
        f"{dockerfile.path.name}.dockerignore must let everything the Dockerfile copies into the build context"
    )
    torch_at = next(i for i, run in enumerate(dockerfile.runs) if "--index-url" in run and "torch==" in run)
    project_at = next(i for i, run in enumerate(dockerfile.runs) if re.search(r"pip install \"?\.(\[\w+\])?\"?( |$)", run))
    assert torch_at < project_at, "install torch from its index first, or pip fetches the default build from PyPI"


def test_what_the_dockerfile_copies_builds_a_wheel_with_every_module_and_data_file(tmp_path, project):
    """`pip install .` in the image sees only the copied paths; a wheel built from them alone must be complete."""
    source = tmp_path / "context"
    source.mkdir()
    for path in read_dockerfile("Dockerfile").copied:
        if (ROOT / path).is_dir():
            shutil.copytree(ROOT / path, source / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / path, source / path)
    expected = {str(path.relative_to(source)) for path in source.rglob("*.py") if (path.parent / "__init__.py").is_file()}
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        expected |= {str(path.relative_to(source)) for pattern in patterns for path in (source / package).glob(pattern)}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, f"`pip install .` would fail on the copied files:\n{built.stderr[-2000:]}"
    (wheel,) = (tmp_path / "dist").glob("lockstep-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert expected and expected <= packaged, f"missing from the image: {sorted(expected - packaged)}"


@pytest.mark.parametrize(("name", "base", "torch_index", "extra"), [
    ("Dockerfile", "python:3.11-slim", "https://download.pytorch.org/whl/cpu", "openvino"),
    ("Dockerfile.gpu", "nvidia/cuda:", "https://download.pytorch.org/whl/cu1", "gpu"),
])
def test_dockerfile_base_torch_build_and_extras(name, base, torch_index, extra, project):
    dockerfile = read_dockerfile(name)
    assert dockerfile.froms and all(image.startswith(base) for image in dockerfile.froms)
    torch = next(Requirement(r) for r in project["project"]["dependencies"] if Requirement(r).name == "torch")
    pins = [re.search(r"torch==([\w.+]+)", run) for run in dockerfile.runs]
    installs = [(pin.group(1), run) for pin, run in zip(pins, dockerfile.runs) if pin]
    assert len(installs) == 1, "install torch once, from its own index"
    version, run = installs[0]
    assert torch.specifier.contains(version), f"torch {version} does not meet the project's {torch}"
    assert re.search(rf"--index-url \"?{re.escape(torch_index)}", run), f"torch comes from {run}"
    if extra:
        assert extra in project["project"]["optional-dependencies"]
        assert any(f'pip install ".[{extra}]"' in run for run in dockerfile.runs)


# --- docker compose ------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


class MissingVariable(Exception):
    """A `${NAME:?message}` variable compose would refuse to start without."""


def interpolate(node, env: dict[str, str]):
    """Compose's variable substitution (`${X}`, `${X:-default}`, `${X:?error}`, `$$`) over a whole document."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, kind, operand = match.groups()
        value = env.get(name)
        unset = value is None or (colon and value == "")
        if kind == "?" and unset:
            raise MissingVariable(f"{name}: {operand}")
        return operand if kind == "-" and unset else value or ""

    return _VARIABLE.sub(substitute, node)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(compose_raw) -> dict:
    return interpolate(compose_raw, {"LOCKSTEP_ADMIN_TOKEN": STRONG_TOKEN})


def compose_dockerfile(service: dict) -> Dockerfile:
    build = service["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.parent == DEPLOY and dockerfile.name in DOCKERFILES, f"unexpected Dockerfile {dockerfile}"
    return read_dockerfile(dockerfile.name)


def compose_env(service: dict) -> dict[str, str]:
    """A service container's environment: the image's ENV, then the service's `environment`."""
    return compose_dockerfile(service).env | {key: str(value) for key, value in service.get("environment", {}).items()}


def compose_command(service: dict) -> list[str]:
    return service.get("command") or compose_dockerfile(service).cmd


def compose_mounts(service: dict) -> dict[str, str]:
    """Container path -> named volume."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def redis_port(command: list[str]) -> int:
    return int(command[command.index("--port") + 1]) if "--port" in command else 6379


def test_compose_runs_redis_two_api_replicas_and_workers(compose):
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    assert cli_command(compose_command(services["api"]))[0] == "serve"
    assert cli_command(compose_command(services["worker"]))[0] == "worker"
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] >= 1
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert "ping" in services["redis"]["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_settings_are_real_and_shared(compose, container_settings):
    services = compose["services"]
    for name in ("api", "worker"):
        assert unknown_settings(compose_env(services[name])) == [], name
    api, worker = (container_settings(compose_env(services[name])) for name in ("api", "worker"))
    assert (api.broker(), api.queue, api.data_dir) == (worker.broker(), worker.queue, worker.data_dir)
    for key in ("model", "index_type", "precision", "batch_size", "ef_search", "nprobe", "ef_construction"):
        assert getattr(api, key) == getattr(worker, key), f"API and workers build releases with different {key}"


def test_compose_api_port_is_published_and_its_healthcheck_asks_readyz(compose, container_settings, get_routes):
    api = compose["services"]["api"]
    settings = served_settings(compose_command(api), container_settings(compose_env(api)))
    assert not is_loopback(settings.host)
    published = [str(mapping).rsplit(":", 1)[1] for mapping in api["ports"]]
    assert published == [str(settings.port)], f"ports {api['ports']} do not reach the API's port {settings.port}"
    assert api["healthcheck"]["test"][0] == "CMD"
    check_probe(probe_url(api["healthcheck"]["test"][1:]), settings.port, "/readyz", get_routes)


def test_compose_api_and_workers_share_one_volume_at_the_data_dir(compose, container_settings):
    services = compose["services"]
    data_dirs = {name: str(container_settings(compose_env(services[name])).data_dir) for name in ("api", "worker")}
    volumes = {name: compose_mounts(services[name]).get(data_dirs[name]) for name in ("api", "worker")}
    assert data_dirs["api"] == data_dirs["worker"]
    assert volumes["api"] is not None and volumes["api"] == volumes["worker"], f"data dir mounts: {volumes}"
    assert volumes["api"] in compose["volumes"], "the data volume must be a named volume of this project"
    assert [data_dirs["api"]] == json.loads(compose_dockerfile(services["api"]).last("VOLUME"))


def test_compose_broker_is_the_redis_service(compose, container_settings):
    services = compose["services"]
    broker = urlparse(container_settings(compose_env(services["worker"])).redis_url() or "")
    assert broker.hostname == "redis" and broker.hostname in services
    assert broker.port == redis_port(services["redis"]["command"])


def test_compose_requires_a_strong_admin_token_for_the_api(compose_raw, container_settings):
    with pytest.raises(MissingVariable, match="LOCKSTEP_ADMIN_TOKEN"):
        interpolate(compose_raw, {})
    api = interpolate(compose_raw, {"LOCKSTEP_ADMIN_TOKEN": STRONG_TOKEN})["services"]["api"]
    settings = served_settings(compose_command(api), container_settings(compose_env(api)))
    assert settings.admin_token.get_secret_value() == STRONG_TOKEN
    check_exposure(settings.host, settings.admin_token)


# --- Kubernetes ----------------------------------------------------------------------


@dataclass
class Cluster:
    """The manifests of deploy/k8s by kind and name, the admin token's Secret template included."""

    objects: dict[tuple[str, str], dict]

    def get(self, kind: str, name: str) -> dict:
        assert (kind, name) in self.objects, f"no {kind} {name} in deploy/k8s"
        return self.objects[kind, name]

    def selected_deployment(self, service: dict) -> str:
        """The name of the one Deployment whose pods a Service selects."""
        names = [name for (kind, name), doc in self.objects.items() if kind == "Deployment"
                 and selects(service["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"])]
        assert len(names) == 1, f"Service {service['metadata']['name']} selects the pods of {names}"
        return names[0]

    def deployment_container(self, name: str) -> tuple[dict, dict]:
        """The pod spec and the only container of a Deployment."""
        pod = self.get("Deployment", name)["spec"]["template"]["spec"]
        assert len(pod["containers"]) == 1
        return pod, pod["containers"][0]

    def env(self, container: dict) -> dict[str, str]:
        """A container's environment: the image's ENV, its ConfigMaps, then its own `env` (Secrets resolved)."""
        env = dict(read_dockerfile("Dockerfile").env)
        for source in container.get("envFrom", []):
            env |= self.get("ConfigMap", source["configMapRef"]["name"])["data"]
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.get("Secret", ref["name"])["stringData"][ref["key"]]
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.get("ConfigMap", ref["name"])["data"][ref["key"]]
        return env


def load_manifests(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def cluster(kustomization) -> Cluster:
    objects = {}
    for name in [*kustomization["resources"], "secret.yaml"]:
        for doc in load_manifests(K8S / name):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return Cluster(objects)


def port_number(container: dict, port: int | str) -> int:
    """A probe's or service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {item["name"]: item["containerPort"] for item in container.get("ports", []) if "name" in item}
    assert port in named, f"no container port named {port!r}"
    return named[port]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_kustomization_lists_every_manifest_but_the_secret_template(kustomization):
    listed = set(kustomization["resources"])
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {"secret.yaml"}, "list every manifest, and keep the Secret template out"


def test_k8s_settings_are_real_and_shared(cluster, container_settings):
    containers = {name: cluster.deployment_container(name)[1] for name in ("lockstep-api", "lockstep-worker")}
    for name, container in containers.items():
        assert unknown_settings(cluster.env(container)) == [], name
    api, worker = (container_settings(cluster.env(c)) for c in containers.values())
    assert (api.broker(), api.queue, api.data_dir) == (worker.broker(), worker.queue, worker.data_dir)
    assert cli_command(containers["lockstep-worker"]["command"])[0] == "worker"


def test_k8s_api_probes_ports_and_service_agree_with_the_app(cluster, container_settings, get_routes):
    deployment = cluster.get("Deployment", "lockstep-api")
    assert deployment["spec"]["replicas"] == 2
    pod, api = cluster.deployment_container("lockstep-api")
    settings = served_settings(api["command"], container_settings(cluster.env(api)))
    assert not is_loopback(settings.host)
    assert [item["containerPort"] for item in api["ports"]] == [settings.port]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        http = api[probe]["httpGet"]
        assert http["path"] == path and http["path"] in get_routes, f"{probe} asks {http['path']}"
        assert port_number(api, http["port"]) == settings.port, f"{probe} asks port {http['port']}"
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations["prometheus.io/path"] in get_routes
    assert int(annotations["prometheus.io/port"]) == settings.port
    service = cluster.get("Service", "lockstep-api")
    assert cluster.selected_deployment(service) == "lockstep-api"
    assert [port_number(api, item["targetPort"]) for item in service["spec"]["ports"]] == [settings.port]


def test_k8s_api_and_workers_share_one_claim_at_the_data_dir_on_one_node(cluster, container_settings):
    user = int(read_dockerfile("Dockerfile").last("USER").split(":")[0])
    mounts = {}
    for name in ("lockstep-api", "lockstep-worker"):
        pod, container = cluster.deployment_container(name)
        data_dir = str(container_settings(cluster.env(container)).data_dir)
        volume = next((m["name"] for m in container["volumeMounts"] if m["mountPath"] == data_dir), None)
        assert volume is not None, f"{name} mounts nothing at its data dir {data_dir}"
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts[name] = (data_dir, claims[volume])
        labels = cluster.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        terms = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], labels)
                   for t in terms), f"{name} must share a node with the other SQLite users of the data dir"
        assert pod["securityContext"]["runAsUser"] == user and pod["securityContext"]["fsGroup"] == user, (
            f"{name} must run as the image's user {user} and own the volume's files as its group"
        )
    assert mounts["lockstep-api"] == mounts["lockstep-worker"], mounts
    claim = cluster.get("PersistentVolumeClaim", mounts["lockstep-api"][1])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_broker_is_the_redis_service(cluster, container_settings):
    _, worker = cluster.deployment_container("lockstep-worker")
    broker = urlparse(container_settings(cluster.env(worker)).redis_url() or "")
    service = cluster.get("Service", broker.hostname)
    _, redis = cluster.deployment_container(cluster.selected_deployment(service))
    port = next((item for item in service["spec"]["ports"] if item["port"] == broker.port), None)
    assert port is not None, f"Service {broker.hostname} has no port {broker.port}"
    assert port_number(redis, port["targetPort"]) == redis_port(redis["args"])
    assert "ping" in redis["readinessProbe"]["exec"]["command"]


def test_k8s_admin_token_comes_from_the_secret_and_an_empty_template_is_refused(cluster, container_settings):
    _, api = cluster.deployment_container("lockstep-api")
    token = next(item for item in api["env"] if item["name"] == f"{PREFIX}ADMIN_TOKEN")
    assert "secretKeyRef" in token["valueFrom"], "the admin token belongs in a Secret, not in the manifest"
    settings = served_settings(api["command"], container_settings(cluster.env(api)))
    with pytest.raises(InvalidInput, match="without an admin token"):
        check_exposure(settings.host, settings.admin_token)
    check_exposure(settings.host, SecretStr(STRONG_TOKEN))


# --- the deployment guide ------------------------------------------------------------


def test_the_deployment_guide_names_real_settings_and_commands():
    """docs/deploy.md's settings table and `lockstep` commands are what the code reads and accepts."""
    guide = (ROOT / "docs" / "deploy.md").read_text()
    table = [line for line in guide.splitlines() if line.startswith("| `")]
    named = {name for row in table for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row.split("|")[1])}
    named |= set(re.findall(rf"{PREFIX}([A-Z0-9_]+)", guide))
    fields = {name.upper() for name in Settings.model_fields}
    assert named and named <= fields, f"not settings: {sorted(named - fields)}"
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", guide, flags=re.S)).replace("\\\n", " ")
    blocks = blocks.replace("-m service.cli ", "lockstep ")
    commands = [shlex.split(match) for match in re.findall(r"(?:^|\s)(lockstep [a-z][^\n]*)", blocks)]
    assert commands
    for argv in commands:
        cli_command(argv)
