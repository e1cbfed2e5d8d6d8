"""packaging/container and packaging/kubernetes (issue 17, item 5): the image, the compose file
and the Kubernetes manifests, checked as far as this machine allows.

- Every Kubernetes manifest is validated against the Kubernetes API's own types, from the models
  of the `kubernetes` Python client: Debian's python3-kubernetes (22.6, Kubernetes 1.22), whose
  models a JSON schema is made from here (every field with its JSON name and type, the
  required ones, no unknown field allowed), or a newer release from PyPI, whose pydantic
  models give their schema themselves; jsonschema checks each document against its kind's
  schema. No schema is downloaded. Then what a schema cannot see: probes on /healthz and /readyz at the
  monitor port of the ConfigMap's elemta.toml, the Service's 25/587/465 reaching the
  listeners of the right roles, terminationGracePeriodSeconds above server.grace_period,
  requests and limits, the PodDisruptionBudget leaving a pod to run, selectors that match.
- The compose file: its services, ports, volumes and the files it mounts (which must exist),
  matched against elemta.toml, prometheus.yml and dovecot.conf; `docker-compose config -q`
  (Debian's docker-compose validates against the compose specification's schema), `promtool
  check config` and `doveconf -n` when they are installed.
- Both elemta.toml files go through elemta's own config loader.
- The image is built with podman (as root, where podman runs containers): from
  debian:bookworm-slim if podman has it, else from a bookworm root made with debootstrap
  --variant=minbase (what bookworm-slim is made of), imported into podman and cached as a
  tarball in $ELEMTA_TEST_CACHE (default /var/cache/elemta-tests, shared with
  packaging/test-deb.sh). The image then runs twice with no network but its own loopback, a
  read-only root, no capability: as the image comes (its HEALTHCHECK, /healthz, SMTP), and as
  the StatefulSet runs it (the ConfigMap's file, a certificate readable by group fsGroup only,
  a spool volume owned by root and group-writable): /readyz, SMTP, TLS on 2465, a SIGTERM stop.
  Each container is removed by its ID. Skipped, saying why, where any of that is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from elemta import config as elemta_config

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = ROOT / "packaging" / "container"
KUBE = ROOT / "packaging" / "kubernetes"
DOCKERFILE = CONTAINER / "Dockerfile"
COMPOSE = CONTAINER / "docker-compose.yml"
IMAGE_CONFIG = CONTAINER / "elemta.toml"

SMTP_PORTS = {25: "mx", 587: "submission", 465: "submissions"}
IMAGE_UID = 999

# (apiVersion, kind) of each manifest -> the kubernetes client's model.
MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}


# ------------------------------------------------------------------------------------------
# Reading the files


@cache
def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def only(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@cache
def configmap_toml() -> str:
    return only("ConfigMap", "elemta-config")["data"]["elemta.toml"]


@cache
def kube_config() -> elemta_config.Config:
    return elemta_config.parse(tomllib.loads(configmap_toml()), source="configmap.yaml")


@cache
def image_config() -> elemta_config.Config:
    return elemta_config.parse(tomllib.loads(IMAGE_CONFIG.read_text()), source=str(IMAGE_CONFIG))


def statefulset() -> dict:
    return only("StatefulSet", "elemta")


def pod_spec() -> dict:
    return statefulset()["spec"]["template"]["spec"]


def container() -> dict:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["elemta"]
    return containers[0]


def monitor_port(cfg: elemta_config.Config) -> int:
    (address,) = cfg.monitor.listen
    host, port = elemta_config.split_host_port(address)
    assert host == "0.0.0.0", f"monitor.listen {address}: probes and Prometheus come from outside"
    return port


@cache
def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return lines


def instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile_lines() if line.split(None, 1)[0].upper() == name]


def runtime_stage() -> list[str]:
    """The last stage's instructions."""
    lines = dockerfile_lines()
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[start:]


# ------------------------------------------------------------------------------------------
# Kubernetes: the schema from the client's models


def _type_schema(client, typ: str, defs: dict) -> dict:
    scalars = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
               "float": {"type": "number"}, "datetime": {"type": "string"}, "date": {"type": "string"},
               # IntOrString (ports, maxUnavailable) in the models of these kinds
               "object": {"type": ["integer", "string"]}}
    if typ in scalars:
        return scalars[typ]
    if typ.startswith("list[") and typ.endswith("]"):
        return {"type": "array", "items": _type_schema(client, typ[5:-1], defs)}
    match = re.fullmatch(r"dict\(str, (.+)\)", typ)
    if match:
        return {"type": "object", "additionalProperties": _type_schema(client, match.group(1), defs)}
    _model_schema(client, typ, defs)
    return {"$ref": f"#/definitions/{typ}"}


def _model_schema(client, name: str, defs: dict) -> None:
    if name in defs:
        return
    cls = getattr(client, name)
    defs[name] = {}  # a placeholder while its fields are made (models refer to themselves)
    probe = cls.__new__(cls)
    probe.local_vars_configuration = client.Configuration()
    properties, required = {}, []
    for attr, typ in cls.openapi_types.items():
        key = cls.attribute_map[attr]
        properties[key] = _type_schema(client, typ, defs)
        # A required field's setter refuses None (client-side validation).
        try:
            setattr(probe, attr, None)
        except ValueError as exc:
            if "must not be `None`" in str(exc):
                required.append(key)
    defs[name] = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": False}


@cache
def kube_schema(model: str) -> dict:
    client = pytest.importorskip(
        "kubernetes.client", reason="the kubernetes client's models (python3-kubernetes) are not installed")
    cls = getattr(client, model)
    if hasattr(cls, "model_json_schema"):
        # Newer clients' models are pydantic models (extra fields forbidden): their own schema.
        return cls.model_json_schema(by_alias=True)
    defs: dict = {}
    _model_schema(client, model, defs)
    return {"definitions": defs, "$ref": f"#/definitions/{model}"}


def kube_validator(model: str):
    jsonschema = pytest.importorskip("jsonschema", reason="python3-jsonschema is not installed")
    return jsonschema.Draft202012Validator(kube_schema(model))


def test_kubernetes_manifests_have_the_expected_kinds():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in manifests())
    assert kinds == [("ConfigMap", "elemta-config"), ("PodDisruptionBudget", "elemta"),
                     ("Service", "elemta"), ("Service", "elemta-headless"), ("StatefulSet", "elemta")]
    for source, doc in manifests():
        assert (doc["apiVersion"], doc["kind"]) in MODELS, f"{source}: {doc['apiVersion']} {doc['kind']}"
        assert "namespace" not in doc["metadata"], f"{source}: manifests are namespace-less"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("index", range(5))
def test_kubernetes_manifest_matches_the_api_schema(index):
    source, doc = manifests()[index]
    validator = kube_validator(MODELS[(doc["apiVersion"], doc["kind"])])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    assert not errors, f"{source} {doc['kind']}:\n" + "\n".join(
        f"  {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes():
    """The generated schema refuses what the API server would: an unknown or misspelt field, a
    wrong type, a missing required field, deep inside the pod template."""
    validator = kube_validator("V1StatefulSet")
    assert not list(validator.iter_errors(statefulset()))

    def broken(change):
        doc = json.loads(json.dumps(statefulset()))
        change(doc)
        return list(validator.iter_errors(doc))

    def c(doc):
        return doc["spec"]["template"]["spec"]["containers"][0]

    assert broken(lambda d: c(d)["livenessProbe"].__setitem__("httpget", {"path": "/healthz", "port": 9525}))
    assert broken(lambda d: c(d)["readinessProbe"]["httpGet"].pop("port"))
    assert broken(lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", "90"))
    assert broken(lambda d: c(d)["ports"][0].__setitem__("containerPort", "2525"))
    assert broken(lambda d: d["spec"].pop("selector"))
    assert broken(lambda d: d["spec"]["template"]["metadata"]["annotations"].__setitem__("x", True))


def test_statefulset_spool_on_a_volume_claim():
    cfg = kube_config()
    (claim,) = statefulset()["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    spool = mounts[claim["metadata"]["name"]]["mountPath"]
    # elemta makes both directories itself, on a volume whose root it may write (fsGroup).
    for path in (cfg.server.spool_dir, cfg.maildrop_path):
        assert os.path.dirname(path) == spool, f"{path} is not a directory on the volume {spool}"
    assert pod_spec()["securityContext"]["fsGroup"] == IMAGE_UID


def test_statefulset_probes_on_the_monitor_port():
    port = monitor_port(kube_config())
    c = container()
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    paths = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in paths.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, f"{probe} is not on the monitor port {port}"
    assert c["readinessProbe"]["periodSeconds"] <= 10
    # The monitor answers within its own timeout; the probes allow a slow answer.
    assert c["livenessProbe"]["timeoutSeconds"] >= 2


def test_service_reaches_the_listeners_of_each_role():
    cfg = kube_config()
    by_port = {listener.port: listener.role for listener in cfg.listeners}
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    service = only("Service", "elemta")
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert set(ports) == set(SMTP_PORTS)
    for port, role in SMTP_PORTS.items():
        target = ports[port]["targetPort"]
        target = named.get(target, target)
        assert by_port.get(target) == role, f"service port {port} goes to {target}, not the {role} listener"
        assert target > 1024, "the pod has no capability: its listeners are above 1024"
    pod_labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    for svc in (service, only("Service", "elemta-headless")):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    headless = only("Service", "elemta-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert statefulset()["spec"]["serviceName"] == "elemta-headless"
    (monitor,) = headless["spec"]["ports"]
    assert named.get(monitor["targetPort"], monitor["targetPort"]) == monitor_port(kube_config())


def test_termination_grace_longer_than_grace_period():
    grace = kube_config().server.grace_period
    assert pod_spec()["terminationGracePeriodSeconds"] > grace
    # ... with room for the deliveries in flight after the sessions' grace (as the unit's 90 s).
    assert pod_spec()["terminationGracePeriodSeconds"] >= grace + 30


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def test_resources_requests_and_limits():
    res = container()["resources"]
    for what in ("cpu", "memory"):
        assert _quantity(res["requests"][what]) <= _quantity(res["limits"][what]), what
    assert _quantity(res["requests"]["memory"]) >= 128 * 2**20


def test_pod_runs_unprivileged():
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_UID and pod["runAsGroup"] == IMAGE_UID
    sec = container()["securityContext"]
    assert sec["allowPrivilegeEscalation"] is False
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["capabilities"] == {"drop": ["ALL"]}
    assert instructions("USER")[-1].split(":")[0] == str(IMAGE_UID)


def test_config_and_secrets_are_mounted_where_the_config_names_them():
    cfg = kube_config()
    c = container()
    assert c["args"] == ["--config", "/etc/elemta/elemta.toml"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    config_mount = mounts["/etc/elemta/elemta.toml"]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "elemta-config"
    assert config_mount["subPath"] == "elemta.toml"

    def volume_of(path: str) -> dict:
        parent = os.path.dirname(path)
        assert parent in mounts, f"{path}: nothing is mounted at {parent}"
        return volumes[mounts[parent]["name"]]

    for cert in cfg.tls.certificates:
        for path in (cert.cert_file, cert.key_file):
            secret = volume_of(path)["secret"]
            # Not for others: elemta refuses a key file others can read.
            assert secret["defaultMode"] & 0o007 == 0
    assert volume_of(cfg.smtp.auth_file)["secret"]["defaultMode"] & 0o007 == 0
    assert cfg.monitor.metrics_dir.startswith("/dev/shm/")


def test_pod_disruption_budget_leaves_pods_running_and_lets_drains_go_on():
    pdb = only("PodDisruptionBudget", "elemta")
    replicas = statefulset()["spec"]["replicas"]
    spec = pdb["spec"]
    assert ("maxUnavailable" in spec) != ("minAvailable" in spec)
    may_go = spec.get("maxUnavailable", replicas - spec.get("minAvailable", 0))
    assert 1 <= may_go < replicas, "a drain must be able to evict a pod, and not all of them"
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset()["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_configmap_and_image_configs_agree():
    kube, image = kube_config(), image_config()
    assert [(x.address, x.role) for x in kube.listeners] == [(x.address, x.role) for x in image.listeners]
    assert kube.monitor.listen == image.monitor.listen
    assert kube.monitor.metrics_dir == image.monitor.metrics_dir
    assert (kube.server.spool_dir, kube.maildrop_path) == (image.server.spool_dir, image.maildrop_path)
    assert kube.server.grace_period == image.server.grace_period


# ------------------------------------------------------------------------------------------
# The image's files


def test_image_config_parses_and_suits_a_container():
    cfg = image_config()
    assert {listener.role for listener in cfg.listeners} == set(SMTP_PORTS.values())
    assert all(listener.port > 1024 for listener in cfg.listeners)
    monitor_port(cfg)
    assert cfg.monitor.metrics_dir.startswith("/dev/shm/")
    assert cfg.log.target == "stderr"
    volumes = [json.loads(v)[0] if v.startswith("[") else v.split()[0] for v in instructions("VOLUME")]
    assert volumes == ["/var/spool/elemta"]
    assert os.path.dirname(cfg.server.spool_dir) == volumes[0]
    assert os.path.dirname(cfg.maildrop_path) == volumes[0]


def test_dockerfile():
    assert instructions("ARG")[0] == "BASE=debian:bookworm-slim"
    assert all(f.split()[0] == "${BASE}" for f in instructions("FROM"))
    stage = runtime_stage()
    cfg = image_config()
    exposed = {int(p) for line in instructions("EXPOSE") for p in line.split()}
    assert exposed == {listener.port for listener in cfg.listeners} | {monitor_port(cfg)}
    (healthcheck,) = instructions("HEALTHCHECK")
    assert f"http://127.0.0.1:{monitor_port(cfg)}/healthz" in healthcheck
    assert "python3" in healthcheck and "curl" not in healthcheck
    assert json.loads(instructions("CMD")[-1]) == ["--config", "/etc/elemta/elemta.toml"]
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["/usr/sbin/elemta"]
    assert any(line.startswith("COPY packaging/container/elemta.toml /etc/elemta/elemta.toml") for line in stage)
    # Every file the build copies exists in the checkout.
    for line in instructions("COPY"):
        if line.startswith("--from"):
            continue
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the checkout"
    # The first stage builds the package as test-deb.sh does.
    assert "dpkg-buildpackage -us -uc -b" in "\n".join(dockerfile_lines())


def test_dockerfile_installs_every_dependency_of_the_package():
    """The runtime stage installs debian/control's Depends in a layer of its own before
    `dpkg -i` of the package (which would fail on a missing one)."""
    control = (ROOT / "debian" / "control").read_text()
    package = control.split("\nPackage: elemta\n", 1)[1]
    depends = re.search(r"^Depends:(.*?)(?=^\S)", package, re.S | re.M).group(1)
    wanted = {d.strip().split()[0] for d in depends.split(",") if d.strip() and not d.strip().startswith("$")}
    installs = [line for line in runtime_stage() if "apt-get install" in line]
    assert installs, "no apt-get install in the runtime stage"
    listed = set(re.findall(r"(?<![\w/.-])([a-z0-9][a-z0-9.+-]+)(?![\w/.])", installs[0].split("apt-get install", 1)[1]))
    assert wanted <= listed, f"missing from the Dockerfile: {sorted(wanted - listed)}"
    assert "python3" in listed


# ------------------------------------------------------------------------------------------
# The compose file


@cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _port_map(spec: str) -> tuple[str, int, int]:
    host_ip, host_port, container_port = spec.split(":")
    return host_ip, int(host_port), int(container_port)


def test_compose_services_and_files():
    services = compose()["services"]
    assert set(services) == {"elemta", "dovecot", "prometheus"}
    elemta = services["elemta"]
    build = elemta["build"]
    assert (CONTAINER / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    named_volumes = set(compose().get("volumes") or {})
    mounted = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                assert not source.startswith("/"), f"{name}: {source}: no absolute host paths"
                assert (CONTAINER / source).is_file(), f"{name} mounts {source}, which does not exist"
                mounted[(name, target)] = (CONTAINER / source).resolve()
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
            mounted.setdefault((name, target), source)
        for spec in service.get("ports", []):
            host_ip, _, _ = _port_map(spec)
            assert host_ip == "127.0.0.1", f"{name}: {spec}: published on loopback only"
    assert mounted[("elemta", "/etc/elemta/elemta.toml")] == IMAGE_CONFIG
    assert mounted[("elemta", "/var/spool/elemta")] in named_volumes
    assert mounted[("prometheus", "/etc/prometheus/prometheus.yml")] == CONTAINER / "prometheus.yml"
    assert mounted[("dovecot", "/etc/dovecot/dovecot.conf")] == CONTAINER / "dovecot.conf"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_compose_elemta_matches_its_config():
    cfg = image_config()
    elemta = compose()["services"]["elemta"]
    published = {_port_map(p)[2]: _port_map(p)[1] for p in elemta["ports"]}
    for listener in cfg.listeners:
        assert SMTP_PORTS[published[listener.port]] == listener.role, listener
    assert monitor_port(cfg) in published
    assert str(elemta["user"]) == str(IMAGE_UID)
    assert elemta["read_only"] is True and elemta["cap_drop"] == ["ALL"]
    grace = elemta["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > cfg.server.grace_period


def test_compose_dovecot_takes_lmtp_where_elemta_sends_it():
    transport = image_config().local.transport
    match = re.fullmatch(r"lmtp:([a-z][\w.-]*):(\d+)", transport)
    assert match, transport
    host, port = match.group(1), int(match.group(2))
    assert host in compose()["services"], f"local.transport {transport}: no service {host}"
    conf = (CONTAINER / "dovecot.conf").read_text()
    assert re.search(r"^protocols\s*=.*\blmtp\b", conf, re.M)
    lmtp = re.search(r"service lmtp \{.*?inet_listener[^{]*\{\s*port = (\d+)", conf, re.S)
    assert lmtp and int(lmtp.group(1)) == port


def test_prometheus_scrapes_the_monitor():
    prom = yaml.safe_load((CONTAINER / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "elemta"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"elemta:{monitor_port(image_config())}"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed")
    return path


def test_docker_compose_config_validates():
    tool = _tool("docker-compose")
    out = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         timeout=60, cwd=CONTAINER)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_config():
    tool = _tool("promtool")
    out = subprocess.run([tool, "check", "config", str(CONTAINER / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_doveconf_reads_dovecot_conf():
    tool = _tool("doveconf")
    out = subprocess.run([tool, "-n", "-c", str(CONTAINER / "dovecot.conf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "port = 24" in out.stdout


# ------------------------------------------------------------------------------------------
# The image, built and run with podman

CACHE = Path(os.environ.get("ELEMTA_TEST_CACHE", "/var/cache/elemta-tests"))
SUITE = "bookworm"
BASE_FORMAT = 2  # bump to make every cached base root stale
IMAGE = "localhost/elemta-test:latest"


def _run(args, timeout, check=True, **kwargs):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args[:4]))} ... exit {out.returncode}:\n"
                             f"{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return out


def _apt_sources() -> list[tuple[str, str]]:
    """(URI, suite) of this machine's Debian bookworm apt entries (one-line and deb822)."""
    entries = []
    etc = Path("/etc/apt")
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            for line in f.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], words[2]))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                entries += [(u, s) for u in fields.get("uris", []) for s in fields.get("suites", [])]
    return sorted({(u, s) for u, s in entries if re.fullmatch(rf"{SUITE}(-updates|-security)?", s)})


_NPROC: list[int] = []  # the nproc limit the probe found to work


def _podman_args() -> list[str]:
    """Options every run needs here: runc where crun cannot run (a cgroup v1/v2 hybrid), and
    rlimits that runc may set (podman's defaults exceed this process's own, and without
    CAP_SYS_RESOURCE setting them fails; some hosts refuse even the hard nproc limit)."""
    args = []
    if shutil.which("runc"):
        args += ["--runtime", "runc"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        args += ["--ulimit", f"nofile={hard}:{hard}"]
    if _NPROC:
        args += ["--ulimit", f"nproc={_NPROC[0]}:{_NPROC[0]}"]
    return args


@cache
def podman() -> str:
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root (podman's storage, debootstrap)")
    path = shutil.which("podman")
    if not path:
        pytest.skip("podman is not installed")
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    error = ""
    for nproc in dict.fromkeys(n for n in (hard, 32768, 4096) if n != resource.RLIM_INFINITY and n <= hard):
        _NPROC[:] = [nproc]
        probe = subprocess.run([path, "run", "--rm", *_podman_args(), "--network=none", "--entrypoint", "true",
                                base_image()], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            break
        error = probe.stderr.strip()[-300:]
    else:
        pytest.skip(f"podman cannot run a container here: {error}")
    return path


@cache
def base_image() -> str:
    """debian:bookworm-slim when podman has it; else a debootstrap --variant=minbase root of
    this machine's mirror, imported once (and kept as a tarball in CACHE)."""
    path = shutil.which("podman")
    for name in ("docker.io/library/debian:bookworm-slim",):
        if subprocess.run([path, "image", "exists", name], timeout=60).returncode == 0:
            return name
    sources = _apt_sources()
    mirror = next((u for u, s in sources if s == SUITE), None)
    if mirror is None:
        pytest.skip(f"no Debian {SUITE} entry in /etc/apt/sources.list*: cannot make a base root")
    key = hashlib.sha256(json.dumps([BASE_FORMAT, SUITE, "minbase", sources]).encode()).hexdigest()[:16]
    name = f"localhost/elemta-test-base:{SUITE}-{key}"
    if subprocess.run([path, "image", "exists", name], timeout=60).returncode == 0:
        return name
    tarball = CACHE / f"container-base-{SUITE}-{key}.tar"
    if not tarball.is_file():
        if not shutil.which("debootstrap"):
            pytest.skip("debian:bookworm-slim cannot be pulled here and debootstrap is not installed")
        with tempfile.TemporaryDirectory(prefix="elemta-base-") as tmp:
            root = Path(tmp) / "root"
            archives = root / "var/cache/apt/archives"
            archives.mkdir(parents=True)
            for d in (root, *archives.relative_to(root).parents, archives.relative_to(root)):
                os.chmod(root / d, 0o755)  # not this process's umask: they are the image's /var...
            shared = CACHE / "archives"  # the .debs packaging/test-deb.sh keeps too
            for deb in shared.glob("*.deb") if shared.is_dir() else ():
                os.link(deb, archives / deb.name)
            _run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror], timeout=1200)
            shared.mkdir(parents=True, exist_ok=True)
            for deb in archives.glob("*.deb"):
                if not (shared / deb.name).exists():
                    shutil.copy2(deb, shared / deb.name)
                deb.unlink()
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True)
            (root / "etc/apt/sources.list").write_text("".join(f"deb {u} {s} main\n" for u, s in sources))
            for old in CACHE.glob(f"container-base-{SUITE}-*.tar"):
                old.unlink()
            _run(["tar", "-C", str(root), "--numeric-owner", "-cf", f"{tarball}.new", "."], timeout=600)
            os.replace(f"{tarball}.new", tarball)
    _run([path, "import", str(tarball), name], timeout=600)
    return name


@pytest.fixture(scope="module")
def image():
    tool = podman()
    old = subprocess.run([tool, "image", "inspect", "-f", "{{.Id}}", IMAGE], capture_output=True, text=True)
    started = time.monotonic()
    # The build's apt-get reaches the Debian mirror as this machine's apt does.
    _run([tool, "build", *_podman_args(), "--network=host", "--format", "docker",
          "--build-arg", f"BASE={base_image()}", "-f", str(DOCKERFILE), "-t", IMAGE, str(ROOT)], timeout=1500)
    print(f"podman build: {time.monotonic() - started:.0f} s")
    new = _run([tool, "image", "inspect", "-f", "{{.Id}}", IMAGE], timeout=60).stdout.strip()
    if old.returncode == 0 and old.stdout.strip() not in ("", new):
        subprocess.run([tool, "rmi", old.stdout.strip()], capture_output=True, timeout=120)
    return IMAGE


class Container:
    """One container of the image, started with no network but its own loopback; checked
    from inside with podman exec; removed by its ID."""

    def __init__(self, tool: str, args: list[str]):
        self.tool = tool
        self.id = _run([tool, "run", "-d", *_podman_args(), "--network=none", "--read-only",
                        "--cap-drop=ALL", "--security-opt", "no-new-privileges", *args], timeout=120).stdout.strip()

    def exec(self, code: str) -> dict:
        out = _run([self.tool, "exec", self.id, "python3", "-c", code], timeout=60)
        return json.loads(out.stdout)

    def logs(self) -> str:
        out = subprocess.run([self.tool, "logs", self.id], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def wait_ready(self, path: str, seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            state = _run([self.tool, "inspect", "-f", "{{.State.Running}}", self.id], timeout=60).stdout.strip()
            assert state == "true", f"the container stopped:\n{self.logs()[-3000:]}"
            last = self.exec(PROBE.replace("PATH", path))
            if last["http"] == 200 and last.get("banner", "").startswith("220 "):
                return last
            time.sleep(1)
        raise AssertionError(f"{path} not 200 and greeting within {seconds} s: {last}\n{self.logs()[-3000:]}")

    def remove(self):
        subprocess.run([self.tool, "rm", "-f", "-t", "5", self.id], capture_output=True, timeout=120)


# Run inside the container: the monitor's answer, SMTP greetings, TLS on the submissions port,
# the processes' users and capabilities.
PROBE = r'''
import json, os, socket, ssl, urllib.error, urllib.request
out = {}
try:
    with urllib.request.urlopen("http://127.0.0.1:9525PATH", timeout=5) as r:
        out["http"], out["body"] = r.status, r.read().decode()
except urllib.error.HTTPError as exc:
    out["http"], out["body"] = exc.code, exc.read().decode()
except OSError as exc:
    out["http"], out["body"] = 0, str(exc)
try:
    with socket.create_connection(("127.0.0.1", 2525), timeout=5) as s:
        out["banner"] = s.recv(512).decode()
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", 2465), timeout=5)) as s:
        out["tls_banner"] = s.recv(512).decode()
except OSError as exc:
    out["banner"] = out.get("banner", "") or str(exc)
procs = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        status = dict(l.split(":\t", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in l)
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"/usr/sbin/elemta" in cmd:
        procs.append({"uid": status["Uid"].split()[0], "capeff": status["CapEff"].strip()})
out["procs"] = procs
print(json.dumps(out))
'''


def _check_running(c: Container, probe: dict) -> None:
    assert probe["http"] == 200, probe
    assert probe["banner"].startswith("220 "), probe
    assert probe.get("tls_banner", "").startswith("220 "), probe
    assert len(probe["procs"]) >= 3, probe  # supervisor, SMTP worker, delivery (and monitor)
    for proc in probe["procs"]:
        assert proc == {"uid": str(IMAGE_UID), "capeff": "0000000000000000"}, probe


def _stop(c: Container, grace: float) -> None:
    started = time.monotonic()
    _run([c.tool, "stop", "-t", str(int(grace) + 30), c.id], timeout=grace + 60)
    took = time.monotonic() - started
    code = _run([c.tool, "inspect", "-f", "{{.State.ExitCode}}", c.id], timeout=60).stdout.strip()
    logs = c.logs()
    assert code == "0", f"exit status {code} after SIGTERM:\n{logs[-2000:]}"
    assert took < grace, f"SIGTERM took {took:.1f} s with no session open"
    assert re.search(r"elemta\[1\]: \S+ stopped", logs), logs[-2000:]


def test_image_as_it_comes(image, tmp_path):
    """The image's own configuration on a volume it owns (a Docker or Podman volume): the
    HEALTHCHECK passes, /healthz, SMTP on 2525 and TLS on 2465 answer, every process is uid 999
    with no capability, and SIGTERM stops it cleanly."""
    tool = podman()
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, IMAGE_UID, IMAGE_UID)
    c = Container(tool, ["-v", f"{spool}:/var/spool/elemta", image])
    try:
        probe = c.wait_ready("/healthz")
        _check_running(c, probe)
        assert json.loads(probe["body"]) == {"status": "ok"}
        health = _run([tool, "healthcheck", "run", c.id], timeout=60, check=False)
        assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"
        assert (spool / "queue" / "queue.db").is_file()
        _stop(c, image_config().server.grace_period)
    finally:
        c.remove()


def test_image_as_the_statefulset_runs_it(image, tmp_path):
    """The ConfigMap's elemta.toml, the certificate as a Secret with defaultMode 0440 and
    fsGroup (root's files, group 999), a volume claim owned by root that group 999 may write
    (fsGroup), runAsUser and runAsGroup 999: /readyz answers 200 and SMTP greets."""
    tool = podman()
    cfg_file = tmp_path / "elemta.toml"
    cfg_file.write_text(configmap_toml())
    os.chmod(cfg_file, 0o644)
    tls = tmp_path / "tls"
    tls.mkdir()
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("mail.example.org")
    cert.private_key_pem.write_to_path(str(tls / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(tls / "tls.crt"))
    for f in tls.iterdir():
        os.chown(f, 0, IMAGE_UID)
        os.chmod(f, 0o440)
    os.chmod(tls, 0o755)
    users = tmp_path / "users"
    users.mkdir()  # the optional Secret, absent: no users
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, 0, IMAGE_UID)
    os.chmod(spool, 0o2775)
    args = ["--user", f"{IMAGE_UID}:{IMAGE_UID}", "--tmpfs", "/tmp",
            "-v", f"{spool}:/var/spool/elemta", "-v", f"{cfg_file}:/etc/elemta/elemta.toml:ro",
            "-v", f"{tls}:/etc/elemta/tls:ro", "-v", f"{users}:/etc/elemta/users:ro",
            image, *container()["args"]]
    c = Container(tool, args)
    try:
        probe = c.wait_ready("/readyz")
        _check_running(c, probe)
        assert (spool / "queue" / "queue.db").is_file()
        assert oct((spool / "maildrop").stat().st_mode & 0o7777) == "0o3733"
        _stop(c, kube_config().server.grace_period)
    finally:
        c.remove()
