"""Stage layout: which pipeline workers share a process, on which device, at which address.

The chat pipeline has four workers -- ``encoders`` (audio + vision towers), ``thinker``,
``talker`` and ``token2wav`` -- always chained in that order. A layout groups them into stage
processes. Built-ins:

* ``all-in-one``: one process hosting all four (a CPU box, the tests);
* ``split``: one process per worker (one per GPU on a big box: give each its ``device``).

A layout is also read from YAML::

    stages:
      - name: front
        workers: [encoders, thinker]
        device: cuda:0
        dtype: bf16                      # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
        address: tcp://10.0.0.1:5604
      - name: speech
        workers: [talker, token2wav]
        device: cuda:1
        address: tcp://10.0.0.2:5601     # where peers connect: the address of its host
        bind: tcp://0.0.0.0:5601         # where it listens (default: address)
        remote: true                     # started there by hand: python -m omnistream.runtime.stage
    control: tcp://10.0.0.1:5600        # the supervisor's sockets (default ipc://; tcp:// with remote stages)
    events: tcp://10.0.0.1:5602
    epochs: tcp://10.0.0.1:5603
    bind: {control: tcp://0.0.0.0:5600, events: tcp://0.0.0.0:5602, epochs: tcp://0.0.0.0:5603}

or from a one-line CLI spec: ``"encoders+thinker@cuda:0:bf16,talker+token2wav@cuda:1"`` (each stage
``worker[+worker...][@device[:dtype]][=address]``). Addresses default to ``ipc://`` sockets in a private
run directory; ``tcp://host:port`` puts a stage's input (or the supervisor's sockets) on a network
interface. A ``remote`` stage is not spawned by the supervisor: it is started on its own host with
``python -m omnistream.runtime.stage --layout FILE --stage NAME --model DIR [--respawn]`` and connects back
(then every address must be tcp://). A fifth worker, ``echo``, answers audio with the same audio:
it loads no model and serves the supervisor tests and the hop benchmark.

Address and bind: every socket has one ``address`` that its peers *connect* to -- it is advertised
to them by this file, which all hosts share -- and may have a ``bind``, the local endpoint it
*listens* on, when the two differ: a wildcard (``tcp://0.0.0.0:5601``, ``tcp://*:5601``), an
interface (``tcp://eth1:5601``), or another port behind a NAT or a container port mapping, while
``address`` names the host as the others reach it (an IP or a DNS name, which ZeroMQ cannot bind).
So ``address`` may not be a wildcard, and ``bind`` is tcp:// only (an ipc:// path is the same for
both sides). A stage's host may also override its bind on the command line (``--bind``).

Bad layouts raise :class:`LayoutError` naming the file and the offending entry; :func:`check_devices`
also refuses a stage whose device this machine does not have (a CUDA device on a CPU-only build),
before any process is started.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

PIPELINE = ("encoders", "thinker", "talker", "token2wav")
WORKERS = PIPELINE + ("echo",)
BUILTIN = ("all-in-one", "split")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
DTYPES = ("auto", "fp32", "bf16", "fp16")
_TCP = re.compile(r"^tcp://(\*|[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class LayoutError(ValueError):
    """A stage layout that cannot run; the message names the source and the entry."""


@dataclass(frozen=True)
class StageSpec:
    """One stage process: its ``workers`` (in chain order), ``device`` and input ``address``."""

    name: str
    workers: tuple[str, ...]
    device: str = "cpu"
    address: str | None = None  # None: an ipc:// path under the run directory
    threads: int | None = None  # torch CPU threads; None: the host's cores shared by the CPU stages
    remote: bool = False  # started on its own host (``python -m omnistream.runtime.stage``), not spawned
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU (checkpoints.resolve_dtype)
    bind: str | None = None  # where the input listens when peers reach it elsewhere (None: address)

    @property
    def listen(self) -> str | None:
        """The endpoint this stage binds its input on (``bind``, else the advertised ``address``)."""
        return self.bind or self.address

    @property
    def needs_talker(self) -> bool:
        """Whether the process must load the Talker / Token2Wav weights."""
        return any(w in ("talker", "token2wav") for w in self.workers)

    @property
    def needs_model(self) -> bool:
        return any(w in PIPELINE for w in self.workers)


@dataclass(frozen=True)
class Layout:
    """Stage processes plus the supervisor's addresses (control ROUTER, events PULL, epochs PUB)."""

    stages: tuple[StageSpec, ...]
    control: str | None = None
    events: str | None = None
    epochs: str | None = None
    source: str = "<layout>"
    run_dir: str | None = field(default=None, compare=False)
    control_bind: str | None = None  # where the supervisor's sockets listen, when not at their address
    events_bind: str | None = None
    epochs_bind: str | None = None

    def bind_of(self, key: str) -> str | None:
        """The endpoint to bind the supervisor's ``control``, ``events`` or ``epochs`` socket on."""
        return getattr(self, f"{key}_bind") or getattr(self, key)

    def stage_of(self, worker: str) -> StageSpec:
        for s in self.stages:
            if worker in s.workers:
                return s
        raise LayoutError(f"{self.source}: no stage hosts worker {worker!r}")

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(w for s in self.stages for w in s.workers)

    def resolved(self, run_dir: str | os.PathLike | None = None) -> Layout:
        """A copy with every unset address filled in with an ipc:// path under ``run_dir``
        (a fresh private temp directory when None)."""
        d = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="omnistream-"))
        ipc = lambda n: f"ipc://{d / n}"
        stages = tuple(s if s.address else replace(s, address=ipc(f"stage-{s.name}")) for s in self.stages)
        return replace(self, stages=stages, control=self.control or ipc("control"), events=self.events or ipc("events"),
                       epochs=self.epochs or ipc("epochs"), run_dir=str(d))


def builtin(name: str, device: str = "cpu", dtype: str = "auto") -> Layout:
    """``all-in-one`` or ``split`` on ``device`` in ``dtype``."""
    if name == "all-in-one":
        return validate(Layout((StageSpec("pipeline", PIPELINE, device, dtype=dtype),), source=name))
    if name == "split":
        return validate(Layout(tuple(StageSpec(w, (w,), device, dtype=dtype) for w in PIPELINE), source=name))
    raise LayoutError(f"unknown built-in layout {name!r}; built-ins: {', '.join(BUILTIN)}")


def load(spec, device: str = "cpu", dtype: str = "auto") -> Layout:
    """A :class:`Layout` from a Layout, a built-in name, a YAML file path, or a one-line CLI spec.

    ``device`` and ``dtype`` are the defaults of stages that name none (built-ins and CLI specs; a
    YAML file says it all itself)."""
    if isinstance(spec, Layout):
        return validate(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise LayoutError(f"layout must be a name, a YAML path or a Layout, got {type(spec).__name__}")
    s = os.fspath(spec)
    if s in BUILTIN:
        return builtin(s, device, dtype)
    if s.endswith((".yaml", ".yml")) or Path(s).is_file():
        return from_yaml(s)
    if re.split(r"[+@=,]", s, maxsplit=1)[0].strip() in WORKERS:
        return from_cli(s, device, dtype)
    if os.path.sep in s:
        return from_yaml(s)  # says the file cannot be read
    raise LayoutError(f"unknown layout {s!r}: give a built-in ({', '.join(BUILTIN)}), a YAML file, or a spec like "
                      "'encoders+thinker@cuda:0,talker+token2wav@cuda:1'")


def from_cli(spec: str, device: str = "cpu", dtype: str = "auto") -> Layout:
    """``"encoders+thinker@cuda:0,talker+token2wav@cuda:1=tcp://127.0.0.1:5601"``."""
    stages = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            raise LayoutError(f"layout {spec!r}: empty stage #{i + 1}")
        addr = None
        if "=" in part:
            part, addr = part.split("=", 1)
        dev, dt = device, dtype
        if "@" in part:
            part, dev = part.split("@", 1)
            head, _, tail = dev.strip().rpartition(":")
            if head and tail in DTYPES:  # "cuda:0:bf16", "cpu:fp32"
                dev, dt = head, tail
        workers = tuple(w.strip() for w in part.split("+"))
        stages.append(StageSpec("-".join(workers), workers, dev.strip(), addr and addr.strip(), dtype=dt))
    return validate(Layout(tuple(stages), source=f"layout {spec!r}"))


def from_yaml(path: str | os.PathLike) -> Layout:
    """Read and validate a YAML layout file (format in the module docstring)."""
    import yaml

    src = os.fspath(path)
    try:
        text = Path(src).read_text()
    except OSError as e:
        raise LayoutError(f"cannot read layout {src}: {e.strerror or e}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LayoutError(f"{src}: not valid YAML: {e}") from e
    return from_dict(doc, src)


def from_dict(doc, source: str = "<layout>") -> Layout:
    if not isinstance(doc, dict):
        raise LayoutError(f"{source}: expected a mapping with a 'stages' list, got {type(doc).__name__}")
    unknown = set(doc) - {"stages", "control", "events", "epochs", "bind"}
    if unknown:
        raise LayoutError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: stages, control, events, epochs, bind")
    raw = doc.get("stages")
    if not isinstance(raw, list) or not raw:
        raise LayoutError(f"{source}: 'stages' must be a non-empty list")
    stages = []
    for i, st in enumerate(raw):
        where = f"{source}: stages[{i}]"
        if not isinstance(st, dict):
            raise LayoutError(f"{where}: expected a mapping, got {type(st).__name__}")
        bad = set(st) - {"name", "workers", "device", "dtype", "address", "bind", "threads", "remote"}
        if bad:
            raise LayoutError(f"{where}: unknown key(s) {sorted(bad)}; allowed: name, workers, device, dtype, "
                              "address, bind, threads, remote")
        if not isinstance(st.get("remote", False), bool):
            raise LayoutError(f"{where}: 'remote' must be true or false")
        workers = st.get("workers")
        if isinstance(workers, str):
            workers = [workers]
        if not isinstance(workers, list) or not workers or not all(isinstance(w, str) for w in workers):
            raise LayoutError(f"{where}: 'workers' must be a list of worker names from {list(WORKERS)}")
        name = st.get("name", "-".join(workers))
        dev, addr, dtype = st.get("device", "cpu"), st.get("address"), st.get("dtype", "auto")
        for key, v in (("name", name), ("device", dev), ("dtype", dtype)):
            if not isinstance(v, str):
                raise LayoutError(f"{where}: {key!r} must be a string, got {v!r}")
        for key in ("address", "bind"):
            if st.get(key) is not None and not isinstance(st[key], str):
                raise LayoutError(f"{where}: {key!r} must be a string like tcp://host:port, got {st[key]!r}")
        threads = st.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise LayoutError(f"{where}: 'threads' must be an int >= 1, got {threads!r}")
        stages.append(StageSpec(name, tuple(workers), dev, addr, threads, st.get("remote", False), dtype, st.get("bind")))
    addrs = {k: doc.get(k) for k in ("control", "events", "epochs")}
    binds = doc.get("bind") or {}
    if not isinstance(binds, dict) or set(binds) - set(addrs):
        raise LayoutError(f"{source}: 'bind' must map some of control, events, epochs to a tcp:// endpoint, got {binds!r}")
    for k, v in (*addrs.items(), *((f"bind.{k}", v) for k, v in binds.items())):
        if v is not None and not isinstance(v, str):
            raise LayoutError(f"{source}: {k!r} must be an address string, got {v!r}")
    return validate(Layout(tuple(stages), source=source, **addrs, **{f"{k}_bind": v for k, v in binds.items()}))


def validate(layout: Layout) -> Layout:
    """Check names, workers (each pipeline worker exactly once), devices, addresses."""
    src = layout.source
    if not layout.stages:
        raise LayoutError(f"{src}: no stages")
    names = [s.name for s in layout.stages]
    for s in layout.stages:
        where = f"{src}: stage {s.name!r}"
        if not _NAME.match(s.name):
            raise LayoutError(f"{where}: names are 1-64 letters, digits, '-' or '_'")
        if names.count(s.name) > 1:
            raise LayoutError(f"{where}: duplicate stage name")
        for w in s.workers:
            if w not in WORKERS:
                raise LayoutError(f"{where}: unknown worker {w!r}; known: {', '.join(WORKERS)}")
        if len(set(s.workers)) != len(s.workers):
            raise LayoutError(f"{where}: a worker is listed twice")
        if not _DEVICE.match(s.device):
            raise LayoutError(f"{where}: bad device {s.device!r}; use cpu, cuda or cuda:N")
        if s.dtype not in DTYPES:
            raise LayoutError(f"{where}: bad dtype {s.dtype!r}; use {', '.join(DTYPES)}")
        check_endpoints(s.address, s.bind, where)
    for k in ("control", "events", "epochs"):
        check_endpoints(getattr(layout, k), getattr(layout, f"{k}_bind"), f"{src}: {k}")
    if any(s.remote for s in layout.stages):  # another host can reach nothing over ipc://
        ipc = [s.name for s in layout.stages if not (s.address or "").startswith("tcp://")]
        ipc += [k for k in ("control", "events", "epochs") if not (getattr(layout, k) or "").startswith("tcp://")]
        if ipc:
            raise LayoutError(f"{src}: a layout with a remote stage needs tcp:// addresses everywhere; missing for "
                              f"{', '.join(ipc)}")
    ws = layout.workers
    pipe = [w for w in ws if w in PIPELINE]
    if pipe:
        missing = [w for w in PIPELINE if w not in pipe]
        if missing:
            raise LayoutError(f"{src}: no stage hosts {', '.join(missing)}; the chat pipeline needs all of "
                              f"{', '.join(PIPELINE)}")
        twice = sorted({w for w in pipe if pipe.count(w) > 1})
        if twice:
            raise LayoutError(f"{src}: {', '.join(twice)} hosted by more than one stage")
    if ws.count("echo") > 1:
        raise LayoutError(f"{src}: at most one echo worker")
    return layout


def check_devices(layout: Layout) -> Layout:
    """Refuse a layout whose model stages name a device this machine lacks (``cuda:1`` on a one-GPU
    box, any CUDA device on a CPU-only torch build): one line naming the stage and the device, raised
    before any stage process is started. Remote stages are checked on their own host."""
    from omnistream.checkpoints import CheckpointError, check_device

    for s in layout.stages:
        if s.needs_model and not s.remote:
            try:
                check_device(s.device)
            except CheckpointError as e:
                raise LayoutError(f"{layout.source}: stage {s.name!r}: {e}") from None
    return layout


def check_endpoints(address: str | None, bind: str | None, where: str) -> None:
    """An advertised ``address`` peers can connect to, and an optional tcp:// ``bind`` to listen on."""
    if address is not None:
        _check_address(address, where)
        host = _TCP.match(address).group(1) if address.startswith("tcp://") else None
        if host in ("*", "0.0.0.0", "[::]"):
            raise LayoutError(f"{where}: address {address!r} is a wildcard its peers cannot connect to; put this "
                              f"host's address there and {address!r} in 'bind'")
    if bind is None:
        return
    if address is None:
        raise LayoutError(f"{where}: 'bind' needs an 'address' (what the peers connect to)")
    _check_address(bind, f"{where} bind")
    if not (address.startswith("tcp://") and bind.startswith("tcp://")):
        raise LayoutError(f"{where}: 'bind' is for tcp:// addresses (an ipc:// path is the same on both sides), "
                          f"got address {address!r}, bind {bind!r}")


def _check_address(a: str, where: str) -> None:
    if a.startswith("ipc://"):
        if len(a) <= len("ipc://"):
            raise LayoutError(f"{where}: empty ipc:// path")
        return
    m = _TCP.match(a)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise LayoutError(f"{where}: bad address {a!r}; use ipc:///path or tcp://host:port")
