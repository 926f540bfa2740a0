"""``deploy/`` checked offline (issue 15): the Kubernetes manifests validate against the API schemas
(``kubernetes-validate``, strict: no unknown fields) and agree with each other and with ``serve``;
``haproxy -c`` accepts the shipped config, its TLS example and the copy the tests render; the
Dockerfiles parse, start ``serve`` with options the real CLI takes and install the right torch
build; the Grafana dashboard and the autoscaler only name metrics the server exports.

No process is started here but ``haproxy -c``; ``tests/test_haproxy.py`` runs the config for real.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(ROOT))

from benchmarks.scale import haproxy_exe, render_haproxy_cfg
from omnistream.cli import build_parser

needs_haproxy = pytest.mark.skipif(haproxy_exe() is None, reason="haproxy is not installed (apt-get install "
                                   "haproxy; tools/system-deps.sh does it)")
# Dockerfile instructions (https://docs.docker.com/reference/dockerfile/)
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def manifests() -> dict[str, dict]:
    """Every object in deploy/k8s/*.yaml, by ``Kind/name``."""
    out = {}
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in out, f"{key} defined twice"
                out[key] = doc
    return out


def serve_args(argv: list[str]):
    """``argv`` parsed by the real ``omnistream serve`` parser (SystemExit on an unknown option).
    ``--device`` is taken out first: the parser checks that the device exists here, and this
    machine has no GPU."""
    argv = list(argv)
    device = "cpu"
    if "--device" in argv:
        device = option(argv, "--device")
        assert re.fullmatch(r"cpu|cuda(:\d+)?", device), device
        del argv[argv.index("--device"):argv.index("--device") + 2]
    args = build_parser().parse_args(["serve", *argv])
    args.device = device
    return args


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, ``\\`` continuations joined; an unknown
    instruction, or an exec form that is not a JSON list of strings, fails here."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.strip().partition(" ")
        assert word.upper() == word and word in INSTRUCTIONS, f"{path.name}: unknown instruction {word!r}"
        if word in ("CMD", "ENTRYPOINT") or (word == "HEALTHCHECK" and "CMD [" in rest):
            form = rest[rest.index("["):] if word == "HEALTHCHECK" else rest
            argv = json.loads(form)
            assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{path.name}: {line}"
        out.append((word, rest.strip()))
    assert not pending, f"{path.name} ends in a line continuation"
    return out


def exec_form(instrs, word: str) -> list[str]:
    found = [json.loads(rest) for w, rest in instrs if w == word]
    assert len(found) == 1, f"one {word} expected"
    return found[0]


# ---------------------------------------------------------------------------------- Kubernetes
def test_manifests_validate_strictly():
    """Every object validates against the Kubernetes API schema with unknown fields rejected."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed "
                                              "(pip install -e .[dev])")
    from kubernetes_validate.utils import latest_version

    objs = manifests()
    assert {k.split("/")[0] for k in objs} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for key, doc in objs.items():
        kubernetes_validate.validate(doc, latest_version(), strict=True)  # raises ValidationError naming the field
    bad = json.loads(json.dumps(objs["Deployment/omnistream"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, latest_version(), strict=True)


def test_deployment_probes_grace_and_selectors_agree():
    """Readiness reads /health and liveness /livez on the serving port; the pod outlives its drain
    (terminationGracePeriodSeconds > --drain-grace-s, by at most 30 s); the container's arguments are
    ones ``serve`` takes; the Services, the PodDisruptionBudget and the autoscaler select these pods."""
    from omnistream.apps.metrics import METRIC_NAMES

    objs = manifests()
    dep = objs["Deployment/omnistream"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    args = serve_args(c["args"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert args.drain_grace_s < grace <= args.drain_grace_s + 30
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for key in ("Service/omnistream", "Service/omnistream-replicas"):
        assert objs[key]["spec"]["selector"].items() <= labels.items(), key
        assert [p["targetPort"] for p in objs[key]["spec"]["ports"]] == ["http"]
    assert objs["Service/omnistream-replicas"]["spec"]["clusterIP"] == "None"  # headless: HAProxy's DNS discovery
    assert objs["PodDisruptionBudget/omnistream"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objs["HorizontalPodAutoscaler/omnistream"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "omnistream"}
    (m,) = hpa["metrics"]
    assert m["pods"]["metric"]["name"] in METRIC_NAMES
    assert float(m["pods"]["target"]["averageValue"]) < args.max_sessions  # scale before replicas are full


# ---------------------------------------------------------------------------------- HAProxy
def haproxy_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / "check.cfg"
    f.write_text(text)
    return subprocess.run([haproxy_exe(), "-c", "-f", str(f)], capture_output=True, text=True, timeout=30)


@needs_haproxy
def test_haproxy_config_checks(tmp_path):
    """``haproxy -c`` passes the shipped file and the copy the tests run; a broken line fails it
    (the check is not a no-op)."""
    shipped = (DEPLOY / "haproxy.cfg").read_text()
    r = haproxy_check(shipped, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rendered = render_haproxy_cfg(shipped, bind="127.0.0.1:18080", replicas=["127.0.0.1:18001"],
                                  stats_socket=str(tmp_path / "s.sock"), stats_bind="127.0.0.1:18404", inter_ms=200)
    r = haproxy_check(rendered, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = haproxy_check(shipped.replace("balance leastconn", "balance leastconns"), tmp_path)
    assert r.returncode != 0 and "Fatal errors" in r.stdout + r.stderr


@needs_haproxy
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed (for a test certificate)")
def test_haproxy_tls_example_checks(tmp_path):
    """The commented TLS termination example, enabled with a real (self-signed) certificate, passes
    ``haproxy -c`` (HAProxy loads the certificate while checking)."""
    shipped = (DEPLOY / "haproxy.cfg").read_text()
    pem = tmp_path / "omnistream.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "crt.pem")], check=True,
                   capture_output=True, timeout=60)
    pem.write_text((tmp_path / "crt.pem").read_text() + (tmp_path / "key.pem").read_text())
    tls_lines = re.findall(r"^\s*#((?:bind :8443 ssl|http-request redirect scheme https|http-response set-header "
                           r"Strict).*)$", shipped, flags=re.M)
    assert len(tls_lines) == 3, tls_lines
    tls = shipped
    for line in tls_lines:
        tls = tls.replace("#" + line, line.replace("/etc/haproxy/certs/omnistream.pem", str(pem)))
    r = haproxy_check(tls, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    pem.write_text("not a certificate\n")
    r = haproxy_check(tls, tmp_path)
    assert r.returncode != 0


def test_render_keeps_everything_but_addresses_ports_and_intervals():
    """The tests' copy differs from the shipped file only in the lines the renderer owns; a config
    without a line it must replace is refused with one line."""
    shipped = (DEPLOY / "haproxy.cfg").read_text()
    out = render_haproxy_cfg(shipped, bind="127.0.0.1:1", replicas=["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"],
                             stats_socket="/tmp/x.sock", stats_bind="127.0.0.1:5", inter_ms=200)
    owned = re.compile(r"^\s*(bind |stats socket |default-server |server replica\d)")
    keep = [ln for ln in shipped.splitlines() if not owned.match(ln)]
    assert [ln for ln in out.splitlines() if not owned.match(ln)] == keep
    assert re.findall(r"^\s*server (\S+) (\S+)$", out, flags=re.M) == [
        ("replica1", "127.0.0.1:2"), ("replica2", "127.0.0.1:3"), ("replica3", "127.0.0.1:4")]
    assert "inter 200ms fastinter 50ms downinter 200ms fall 2 rise 2" in out
    with pytest.raises(ValueError, match="expected one line matching"):
        render_haproxy_cfg(shipped.replace("bind :8080", "bind :9090"), bind="x", replicas=["y"], stats_socket="z",
                           stats_bind="w")
    with pytest.raises(ValueError, match="at least one replica"):
        render_haproxy_cfg(shipped, bind="x", replicas=[], stats_socket="z", stats_bind="w")


# ---------------------------------------------------------------------------------- Docker
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name):
    """Each parses; it starts ``serve`` on the port the Deployment probes, with options the CLI
    takes and the same drain grace; its health check is /livez; torch is the Makefile's version from
    PyTorch's CPU index (Dockerfile) or a CUDA one with Triton (Dockerfile.cuda)."""
    instrs = dockerfile(DEPLOY / name)
    words = [w for w, _ in instrs]
    assert words[0] in ("FROM", "ARG") and words.count("FROM") == 1
    base = next(rest for w, rest in instrs if w == "FROM")
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*", base), base
    argv = exec_form(instrs, "ENTRYPOINT") + exec_form(instrs, "CMD")
    assert argv[:2] == ["omnistream", "serve"]
    args = serve_args(argv[2:])
    (c,) = manifests()["Deployment/omnistream"]["spec"]["template"]["spec"]["containers"]
    assert [rest for w, rest in instrs if w == "EXPOSE"] == [str(args.port)] == [str(c["ports"][0]["containerPort"])]
    assert args.host == "0.0.0.0" and args.drain_grace_s == serve_args(c["args"]).drain_grace_s
    health = next(rest for w, rest in instrs if w == "HEALTHCHECK")
    assert f"http://127.0.0.1:{args.port}/livez" in health
    env = {m.group(1): m.group(2) for w, rest in instrs if w == "ARG" for m in [re.match(r"(\w+)=(\S+)", rest)] if m}
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert env["TORCH_VERSION"] == torch_spec
    runs = [shlex.split(rest) for w, rest in instrs if w == "RUN"]
    torch_run = next(r for r in runs if '"torch==${TORCH_VERSION}"' in " ".join(r) or "torch==${TORCH_VERSION}" in r)
    index = torch_run[torch_run.index("--index-url") + 1].replace("${TORCH_INDEX}", env.get("TORCH_INDEX", ""))
    if name == "Dockerfile":
        assert index == "https://download.pytorch.org/whl/cpu"
        assert any(r[:3] == ["pip", "install", "."] for r in runs)
    else:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", index), index
        assert any(r[:3] == ["pip", "install", ".[gpu]"] for r in runs)
        assert "NVIDIA_VISIBLE_DEVICES=all" in next(rest for w, rest in instrs if w == "ENV")
        assert args.device == "cuda"
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    assert "*" in ignore and "!omnistream" in ignore  # the context sent is the package, not .venv or .cache


def test_dockerfile_parser_rejects_a_broken_file(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("FROM python:3.11-slim\nRUNN pip install .\n")
    with pytest.raises(AssertionError, match="unknown instruction 'RUNN'"):
        dockerfile(f)
    f.write_text('FROM python:3.11-slim\nCMD ["--model", /models]\n')
    with pytest.raises(json.JSONDecodeError):
        dockerfile(f)


# ---------------------------------------------------------------------------------- Grafana
def test_grafana_dashboard_names_exported_metrics():
    """The dashboard loads as Grafana JSON (unique panel ids, a Prometheus query per target) and
    every ``omnistream_*`` series it queries is one the server exports (``haproxy_*`` ones are
    checked against a live HAProxy in test_haproxy.py)."""
    from omnistream.apps.metrics import METRIC_NAMES

    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            used |= set(re.findall(r"\bomnistream_[a-z_]+", t["expr"]))
    base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert base <= set(METRIC_NAMES), base - set(METRIC_NAMES)
    assert {"omnistream_sessions_active", "omnistream_turn_first_audio_seconds", "omnistream_stage_up"} <= base
