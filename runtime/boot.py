"""The boot sequence of the enclave, as explicit stages.

::

    bind the port ─ serve probes (503 "booting") while:
      tls     generate the in-enclave TLS key (its public key goes into every attestation)
      config  create the guest-private directory; sort the environment by its allowlist; read
              the manifest and side files once into the private model view; parse and check
              vLLM's arguments; build the attested run configuration (runtime.prepare)
      attest  find the TEE and the GPUs (the sample TEE only with an explicit insecure flag)
      key     attest to the key broker, receive the model key, authenticate the manifest with it
      load    start vLLM; its workers fetch the key over the private handoff socket with their
              rank's capability and decrypt the model straight into device memory, then report
      canary  generate the packer's reference tokens through the engine and compare (loader.canary)
      serve   fill the attestation cache; vLLM's OpenAI API + the probes and /.well-known routes
              on the same port; then, while serving, the watchdog re-attests on an interval

Each stage returns a typed, frozen result (:mod:`runtime.record`); later stages read the results
they depend on, and ``serve`` gathers them into one :class:`runtime.record.BootRecord` that the
attestation documents and the watchdog are made from. The attesters and the key source come from
injected factories (:class:`runtime.seams.BootSeams`, production by default).

Any :class:`foundation.errors.Error` stops the boot: the stage and the reason go to one log line,
to ``/readyz`` (503 with a JSON reason) and to ``/.well-known/enclave-serve/boot``, and nothing
else is served. The model key lives in this process only between the ``key`` and the end of
``load``; it is then wiped. A request for the key by anything but vLLM's workers fails the boot
(:class:`foundation.errors.KeyHandoffCompromised`).

After ready, a failed watchdog round (:mod:`runtime.watchdog`) or the engine's death flips
readiness to 503 with the reason, refuses every other request, and exits non-zero
(:data:`EXIT_WATCHDOG`, :data:`EXIT_ENGINE_DIED`) so the orchestrator replaces the pod. SIGTERM
drains: readiness 503 ``draining``, no new connections, in-flight requests and streams get up to
``--drain-timeout`` seconds, then the engine stops and the process exits 0.

SIGTERM or SIGINT *during* the boot (any stage before ready) stops at once (:class:`BootStopper`):
one log line ``boot stopped at stage <stage> on <signal>``, vLLM's processes killed, the key
wiped, the private directory removed, exit 0. A stage's thread cannot be interrupted (an import,
a read from the key broker), so the process ends with :func:`os._exit` rather than waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from attest.evidence import TeeKind
from attest.initdata import InitData, WorkloadPins
from attest.keysource.registry import KeySourceSpec
from attest.runconfig import RunConfiguration
from attest.tee.attester import Attester
from attest.verify import collateral_from_json
from foundation.errors import (
    AttestationError,
    ConfigError,
    Error,
    KeyHandoffCompromised,
    MalformedEvidence,
    ModelError,
)
from foundation.logs import set_stage_provider
from foundation.secret import SecretBytes
from loader.keyhandoff import KeyHandoffServer, LoadReport
from runtime.collateral import collateral_json
from runtime.config import RunConfig
from runtime.environment import apply_environment, decide_environment
from runtime.kv_cache import cpu_kv_cache_default
from runtime.mounts import parse_mountinfo, read_mountinfo
from runtime.prepare import Prepared, prepare, runtime_versions
from runtime.private import PrivateDirectory
from runtime.record import (
    BootRecord,
    CanaryResult,
    CollateralResult,
    ConfigResult,
    EvidenceResult,
    KeyResult,
    LoadResult,
)
from runtime.seams import BootSeams
from runtime.settings import read_bounded, resolve
from runtime.watchdog import Watchdog
from server.attestation import AttestationService, CanaryClaim
from server.boot_server import BootServer
from server.engine import EngineStartFailed, VllmEngine
from server.freshness import AttestationFrontend
from server.http import HttpServer
from server.metrics import Metrics
from server.routes import AttestationEndpoints, EnclaveFront, boot_app, enclave_router
from server.status import BootStatus, Stage
from server.tls import EnclaveTls, generate_enclave_tls

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "EXIT_BOOT_FAILED",
    "EXIT_ENGINE_DIED",
    "EXIT_STOPPED",
    "EXIT_WATCHDOG",
    "Loaded",
    "RunRequest",
    "Runtime",
    "SignalWatcher",
    "key_source_spec",
    "load_request",
    "print_configuration",
    "run_blocking",
]

logger = logging.getLogger(__name__)

EXIT_BOOT_FAILED = 3
#: SIGTERM or SIGINT during the boot: a requested stop, not a failure.
EXIT_STOPPED = 0
#: The inference engine died after ready.
EXIT_ENGINE_DIED = 4
#: A watchdog round found a change after ready.
EXIT_WATCHDOG = 5
#: How long the runtime waits for every worker's load report once the engine is up.
REPORT_TIMEOUT_S = 30.0
#: SIGTERM: how much longer than the drain deadline the server and engine may take to stop.
DRAIN_MARGIN_S = 10.0
#: How long the canary generation may take.
CANARY_TIMEOUT_S = 120.0
#: After a failure once ready: how long readiness shows the reason before the process exits.
FAILURE_GRACE_S = 2.0
#: The ACI keyset's lifetime (its ``not_after``); the watchdog stops the process at expiry.
KEYSET_LIFETIME_S = 7 * 86400
#: How often the engine's health is polled once ready.
ENGINE_POLL_S = 1.0
#: A stop during the boot: how long vLLM's processes may take to die after SIGKILL.
STOP_KILL_TIMEOUT_S = 1.0

T = TypeVar("T")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)
    return sock


#: The largest init-data file read (the parser's own limit is the same).
_MAX_INITDATA_FILE = 1 << 20


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What the command line gave ``run``: setting name → value, only those given."""

    given: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """A request resolved into the configuration to run (:func:`load_request`)."""

    config: RunConfig
    #: The host's init-data file (``--init-data``) and the declaration it carries.
    init_data: InitData | None = None
    pins: WorkloadPins | None = None
    #: The sample TEE's register (``--sample-init-data``): what the hardware would hold.
    sample_init_data: InitData | None = None


def _read_init_data(path: Path, what: str) -> InitData:
    data = read_bounded(path, f"the {what} file", _MAX_INITDATA_FILE)
    try:
        return InitData.load(data)
    except MalformedEvidence as exc:
        raise ConfigError(f"the {what} file: {exc}") from exc


def load_request(request: RunRequest) -> Loaded:
    """Read the init-data (if given) and resolve the configuration to run (runtime.settings).

    Raises:
        ConfigError: an unreadable or malformed init-data, a setting other than the pinned one,
            or an inconsistent configuration.
    """
    path = request.given.get("init_data")
    init = None if path is None else _read_init_data(path, "init-data")
    sample_path = request.given.get("sample_init_data")
    sample = None if sample_path is None else _read_init_data(sample_path, "sample init-data")
    config, pins = resolve(request.given, init)
    config.validate()
    return Loaded(config=config, init_data=init, pins=pins, sample_init_data=sample)


def _apply_environment(private: PrivateDirectory, declared: Mapping[str, str] | None) -> dict[str, str]:
    """Sort this process's environment by the allowlist, apply it, return the attested view."""
    decision = decide_environment(os.environ, private_root=str(private.root), declared=declared)
    apply_environment(decision)
    if decision.removed:
        logger.info(
            "environment: removed %d variable(s) enclave-serve does not use: %s",
            len(decision.removed),
            ", ".join(decision.removed),
        )
    return decision.attested


def _kill_engine_processes() -> None:
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()


def _keep_killing_engine_processes(until: threading.Event) -> None:
    """Kill vLLM's processes, and any it is still spawning, until ``until`` is set.

    Called from the key handoff's thread on a compromise: vLLM's start-up blocks the event loop
    for long stretches, so the boot cannot wait for the loop to notice.
    """

    def reap() -> None:
        while not until.is_set():
            _kill_engine_processes()
            until.wait(0.2)

    threading.Thread(target=reap, name="kill-engine", daemon=True).start()


def _descendants(root: int, *, proc: Path = Path("/proc")) -> list[int]:
    """Return the live (not zombie) descendants of process ``root``, read from ``proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            stat = (proc / entry.name / "stat").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _kill_descendants(*, spare: frozenset[int], timeout_s: float) -> bool:
    """SIGKILL every descendant of this process but ``spare`` until none is alive.

    The whole tree, not only the direct children: vLLM's engine core spawns the workers, which
    would write to the private directory after it is removed. Returns whether all died in
    ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        # Snapshot the whole tree before killing: a killed parent's children move to init.
        alive = [pid for pid in _descendants(os.getpid()) if pid not in spare]
        if not alive:
            return True
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _resource_tracker_pid() -> frozenset[int]:
    """multiprocessing's resource tracker, spared by a stop: it unlinks the shared memory vLLM's
    killed processes leave behind once this process is gone, then exits itself."""
    from multiprocessing import resource_tracker

    pid = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    return frozenset({pid}) if isinstance(pid, int) else frozenset()


class SignalWatcher:
    """Hand SIGTERM and SIGINT to ``on_signal(name)`` in a thread of its own.

    The handler only writes the signal's number to a pipe: it runs in the main thread between
    two bytecodes, possibly while that thread holds a lock the reaction needs, and the boot's
    event loop can be blocked for seconds (vLLM's start-up), so neither the handler nor the loop
    can be the one to react. ``on_signal`` runs in the watcher thread, one signal at a time.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[str], None]) -> None:
        self._on_signal = on_signal
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)

    def install(self) -> None:
        """Start the watcher thread and take over the signals (from the main thread)."""
        self._thread.start()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers and stop the watcher thread."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _handler(self, signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # a full pipe: a signal is already waiting
            os.write(self._write_fd, bytes([signum]))

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 1)
            except OSError:
                return
            if not data or data == b"\0":
                return
            self._on_signal(signal.Signals(data[0]).name)


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class Runtime:
    """Boot the enclave and serve until told to stop.

    ``seams`` are the factories of the attesters and the key source (production by default; a
    test passes doubles).
    """

    #: Loader options the test suite's runtime double adds (``test_corrupt_weight``); always
    #: empty in production: nothing on the command line or in the environment sets it.
    loader_test_hooks: dict[str, str] = {}

    def __init__(
        self,
        config: RunConfig,
        *,
        loaded: Loaded | None = None,
        failure: Error | None = None,
        status: BootStatus | None = None,
        metrics: Metrics | None = None,
        seams: BootSeams | None = None,
    ) -> None:
        self.config = config
        self.seams = seams if seams is not None else BootSeams()
        self.loaded = loaded if loaded is not None else Loaded(config=config)
        #: A configuration refused before the boot could start: reported at stage ``config``.
        self._config_failure = failure
        self.metrics = metrics or Metrics.default()
        self.status = status or BootStatus(metrics=self.metrics)
        self.status.insecure_modes = config.insecure_modes
        if self.loader_test_hooks:
            self.status.insecure_modes.append(
                f"TEST HOOKS in the loader: {', '.join(sorted(self.loader_test_hooks))}"
            )
        set_stage_provider(lambda: None if self.status.current is None else self.status.current.value)
        self._frontend: AttestationFrontend | None = None
        self._app: FastAPI | None = None
        self._http: HttpServer | None = None
        self._exit_code = 0
        self._configuration: RunConfiguration | None = None
        self._tls: EnclaveTls | None = None
        self._key: SecretBytes | None = None
        self._private: PrivateDirectory | None = None
        #: Held while the private directory is created, and by a stop that removes it.
        self._private_lock = threading.Lock()
        self._stopping = False
        #: Every stage's result, once the boot reached ``serve`` (None before).
        self.record: BootRecord | None = None
        #: The port actually bound (``--port 0`` picks one).
        self.port = config.port

    # -- helpers ---------------------------------------------------------------------------

    async def _stage(self, stage: Stage, fn: Callable[[], T], detail: Callable[[T], str] | None = None) -> T:
        """Run one blocking stage in a thread, recording its timing."""
        self.status.begin(stage)
        result = await asyncio.to_thread(fn)
        self.status.end(stage, detail(result) if detail else "")
        return result

    def _wipe_key(self) -> None:
        if self._key is not None:
            self._key.wipe()
            self._key = None

    # -- stages ----------------------------------------------------------------------------

    def _config_stage(self) -> ConfigResult:
        mountinfo = read_mountinfo()  # read once: the private directory's and the mount checks
        with self._private_lock:  # a stop either sees the directory or keeps it from being made
            if self._stopping:
                raise ConfigError("the boot was stopped before the private directory was created")
            self._private = PrivateDirectory.create(
                self.config.private_dir,
                allow_insecure_shared=self.config.allow_insecure_shared_private_dir,
                mountinfo=mountinfo,
            )
        pins = self.loaded.pins
        # Before anything imports vLLM; with init-data, exactly the declared variables.
        environment = _apply_environment(self._private, None if pins is None else pins.environment)
        tls_files = (self._tls.keyfile, self._tls.certfile) if self._tls is not None else None
        prepared = prepare(
            self.config,
            self._private,
            environment=environment,
            tls_files=tls_files,
            mount_table=parse_mountinfo(mountinfo),
            init_data=self.loaded.init_data,
            pins=pins,
        )
        self._configuration = prepared.configuration
        self.status.mounts = [m.to_json() for m in prepared.mounts]
        if prepared.init_data is not None and prepared.init_data.insecure_agent_policy:
            mode = "init-data agent policy pins nothing about the container (--allow-insecure-agent-policy)"
            logger.warning("INSECURE MODE: %s", mode)
            self.status.insecure_modes.append(mode)
        return ConfigResult(
            prepared=prepared, tls_spki_sha256=None if self._tls is None else self._tls.spki_sha256
        )

    def _attest_stage(self, configured: ConfigResult) -> EvidenceResult:
        sample = self.loaded.sample_init_data
        attester = self.seams.attesters(
            self.config.tee,
            allow_insecure=self.config.allow_insecure_sample_tee,
            sample_init_data=None if sample is None else sample.register(TeeKind.SAMPLE),
        )
        self._check_init_data_register(attester, configured.prepared.init_data)
        devices = self.seams.devices(
            gpus=self.config.gpus,
            allow_insecure=self.config.allow_insecure_sample_tee,
            allow_gpu_cc_off=self.config.allow_insecure_gpu_cc_off,
        )
        if self.config.gpus == "none" and self.seams.gpus_present():
            self.status.insecure_modes.append("NVIDIA GPUs present but not attested (--gpus none)")
        elif self.config.allow_insecure_gpu_cc_off and not devices and self.seams.gpus_present():
            self.status.insecure_modes.append(
                "NVIDIA GPUs not attested: confidential computing is off (--allow-insecure-gpu-cc-off)"
            )
        # Before any key is requested: every GPU genuine, in CC mode, counted, verified locally.
        gates = tuple(
            self.seams.device_gate(device, expected_count=self.config.expected_gpus) for device in devices
        )
        return EvidenceResult(attester=attester, devices=tuple(devices), gates=gates)

    def _check_init_data_register(self, attester: Attester, init: InitData | None) -> None:
        """Fail closed on the init-data register (read from what the host cannot forge).

        Register set and no init-data given: refuse. Register not the file's digest: refuse.
        Register zero (launched without init-data): refuse in a real TEE unless
        ``--allow-insecure-no-initdata`` (claimed); the sample TEE boots from flags.

        Raises:
            AttestationError: one of the refusals above, or a register that cannot be trusted.
        """
        register = self.seams.init_data_register(attester)  # TDX: the TDREPORT, or a quote verified locally
        tee = attester.tee.value
        if init is not None:
            if not init.matches(attester.tee, register):
                shown = "zeros (launched without init-data)" if not any(register) else register.hex()
                expected = init.register(attester.tee).hex()
                raise AttestationError(
                    f"the init-data given is not the one this {tee} guest was launched with: the register "
                    f"holds {shown}, the file's {init.algorithm} digest gives {expected}"
                )
            return
        if any(register):
            raise AttestationError(
                f"this {tee} guest was launched with init-data (register {register.hex()}), but no "
                "--init-data was given: pass the pod's init-data file; it decides the configuration"
            )
        if attester.insecure:
            return  # the sample TEE without --sample-init-data: configured from flags (claimed)
        if not self.config.allow_insecure_no_initdata:
            raise AttestationError(
                f"this {tee} guest was launched without init-data: nothing pins what it runs. Launch it "
                "with the init-data 'enclave-serve initdata' writes, or add --allow-insecure-no-initdata "
                "(development only)"
            )

    def _key_stage(self, configured: ConfigResult, evidence: EvidenceResult) -> KeyResult:
        """Fetch the model key, authenticate the manifest with it, and hold it until ``load``."""
        prepared = configured.prepared
        spec = key_source_spec(
            self.config,
            cacert=prepared.kbs_cacert,
            init_data=None if prepared.init_data is None else prepared.init_data.raw,
        )
        source = self.seams.key_sources(spec, attester=evidence.attester, devices=evidence.devices)
        try:
            release = source.fetch(prepared.resource)
        finally:
            source.close()
        try:
            prepared.model.unlock(release.secret, resource=str(prepared.resource))
        except BaseException:
            release.secret.wipe()
            raise
        self._key = release.secret
        return KeyResult.from_release(release)

    async def _load_stage(self, prepared: Prepared) -> tuple[VllmEngine, list[LoadReport]]:
        """Start vLLM with the key handoff open; return the running engine and the load reports.

        Raises:
            KeyHandoffCompromised: something other than a worker asked for the key.
            ModelError: the engine failed to start or a rank failed to load (named).
        """
        assert self._key is not None and self._private is not None
        args = prepared.vllm.namespace
        ranks = prepared.ranks
        digest = prepared.model.digest
        if VllmEngine.device_family() == "cpu":
            kv_cache = cpu_kv_cache_default(
                args, given=prepared.vllm.given, model_view=Path(args.model), environ=os.environ
            )
            if kv_cache is not None:
                logger.info("KV cache (CPU): %s", kv_cache.describe())
        engine = VllmEngine(args)
        engine.log_arguments()  # before the capabilities go in
        await asyncio.to_thread(engine.warm_model_info_cache)
        from loader.source import default_threads
        from loader.staging import StagingOptions
        from loader.vllm_plugin import EncryptedLoaderConfig

        # An image's weight layers are authenticated and indexed here, once, for every rank.
        handoff_secret = await asyncio.to_thread(
            prepared.model.handoff_secret, self._key, threads=default_threads(), ranks=ranks
        )
        image, allow_http = prepared.model.loader_source()
        closed = threading.Event()
        try:
            with KeyHandoffServer(
                handoff_secret,
                manifest_digest=digest,
                ranks=ranks,
                socket_dir=self._private.key_dir,
                on_compromise=lambda _reason: _keep_killing_engine_processes(closed),
            ) as handoff:
                loader_config = EncryptedLoaderConfig(
                    key_socket=str(handoff.path),
                    manifest_digest=digest,
                    capabilities=handoff.capabilities,
                    staging=StagingOptions(
                        mode=self.config.staging,  # type: ignore[arg-type]  # checked by StagingOptions
                        slots=self.config.staging_slots or None,
                    ),
                    image=image,
                    allow_http=allow_http,
                    test_corrupt_weight=self.loader_test_hooks.get("test_corrupt_weight"),
                )
                args.model_loader_extra_config = loader_config.to_extra()
                try:
                    reports = await self._start_engine(engine, handoff, ranks)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await engine.stop()
                    _kill_engine_processes()
                    raise
                finally:
                    closed.set()
                    args.model_loader_extra_config = {"key_socket": "", "manifest_digest": digest}
        finally:
            if handoff_secret is not self._key:
                handoff_secret.wipe()
        return engine, reports

    async def _start_engine(
        self, engine: VllmEngine, handoff: KeyHandoffServer, ranks: int
    ) -> list[LoadReport]:
        if handoff.compromise is not None:  # asked for before the engine even started
            raise KeyHandoffCompromised(f"key handoff: {handoff.compromise}")
        start = asyncio.create_task(engine.start())
        while not start.done() and handoff.compromise is None:
            await asyncio.wait({start}, timeout=0.2)
        if handoff.compromise is not None:
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
            raise KeyHandoffCompromised(f"key handoff: {handoff.compromise}")
        try:
            start.result()
        except Exception as exc:
            if handoff.compromise is not None:
                raise KeyHandoffCompromised(f"key handoff: {handoff.compromise}") from None
            failure = handoff.first_failure()
            if failure is not None:
                raise ModelError(f"rank {failure.rank} failed to load the model: {failure.error}") from None
            if isinstance(exc, EngineStartFailed):  # the engine's own root cause, one line
                raise ModelError(f"the inference engine failed to start: {exc.root_cause}") from None
            raise ModelError(
                f"the inference engine failed to start ({type(exc).__name__}: {exc}); "
                "see the engine log above"
            ) from None
        reports = await asyncio.to_thread(handoff.wait_for_reports, ranks, REPORT_TIMEOUT_S)
        if handoff.compromise is not None:
            raise KeyHandoffCompromised(f"key handoff: {handoff.compromise}")
        failure = handoff.first_failure()
        if failure is not None or len(reports) < ranks:
            raise ModelError(
                failure.error if failure else f"only {len(reports)} of {ranks} ranks reported a load"
            )
        return reports

    # -- the whole boot --------------------------------------------------------------------

    def _booting(self) -> bool:
        """Whether the boot is still under way (not serving, not failed)."""
        return self._http is None and not self.status.failed

    def _stop_boot(self, signal_name: str) -> NoReturn:
        """Stop a boot in progress at once: kill vLLM, wipe the key, remove the private directory.

        Runs in the signal watcher's thread while the boot's own threads go on (an import, a
        read from the key broker: they cannot be interrupted), hence :func:`os._exit`. Exits
        :data:`EXIT_STOPPED`, or 1 when vLLM's processes or the private directory outlived it
        (logged, with what to do).
        """
        stage = self.status.current
        logger.warning("boot stopped at stage %s on %s", stage.value if stage else "start", signal_name)
        # What vLLM and the interrupted stage say about their end is noise after that line.
        logging.disable(logging.CRITICAL)
        problems: list[str] = []
        if not _kill_descendants(spare=_resource_tracker_pid(), timeout_s=STOP_KILL_TIMEOUT_S):
            problems.append(
                f"some of vLLM's processes were still alive {STOP_KILL_TIMEOUT_S:.0f} s after SIGKILL: "
                "check for leftover 'enclave-serve' or 'VLLM' processes"
            )
        self._wipe_key()
        with self._private_lock:
            self._stopping = True
            private = self._private
        if private is not None:
            try:
                private.remove()
            except OSError as exc:
                problems.append(
                    f"cannot remove the private directory {private.root}: {exc.strerror}; remove it by hand"
                )
        if problems:
            logging.disable(logging.NOTSET)
            for problem in problems:
                logger.error("stop: %s", problem)
        _flush_output()
        os._exit(1 if problems else EXIT_STOPPED)

    async def run(self) -> int:
        """Boot and serve until SIGTERM/SIGINT; return the process exit code.

        A signal during the boot ends the process at once (:meth:`_stop_boot`); once serving,
        it drains (:meth:`_drain`).
        """
        cfg = self.config
        for mode in cfg.insecure_modes:
            logger.warning("INSECURE MODE: %s", mode)
        sock = _bind(cfg.host, cfg.port)
        self.port = int(sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(name: str) -> None:
            if self._booting():
                self._stop_boot(name)
            loop.call_soon_threadsafe(stop.set)

        signals = SignalWatcher(on_signal)
        signals.install()
        boot_server: BootServer | None = None
        try:
            if cfg.tls:
                self.status.begin(Stage.TLS)
                self._tls = generate_enclave_tls(hostnames=cfg.tls_hostnames)
                self.status.end(Stage.TLS, f"spki sha256 {self._tls.spki_sha256}")
            router = enclave_router(
                status=self.status, attestation=lambda: None, config=lambda: self._configuration
            )
            boot_server = BootServer(boot_app(self.status, router, self.metrics), sock, tls=self._tls)
            await boot_server.start()
            scheme = "https" if self._tls else "http"
            logger.info("enclave-serve listening on %s://%s:%d (booting)", scheme, cfg.host, self.port)

            boot = asyncio.create_task(self._boot_and_serve(sock, boot_server))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({boot, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if boot in done:
                stopped.cancel()
                code = boot.result()
                if code == EXIT_BOOT_FAILED and not cfg.exit_on_failure and boot_server.running:
                    # Stay up so probes and operators can read the reason; stop on a signal.
                    await stop.wait()
                return code
            if self._http is not None:
                return await self._drain(boot)
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await boot
            return 0
        except Error as exc:
            self.status.fail(self.status.current or Stage.CONFIG, str(exc))
            logger.error("boot failed: %s", exc)
            return EXIT_BOOT_FAILED
        finally:
            signals.uninstall()
            if boot_server is not None and boot_server.running:
                await boot_server.stop()
            self._wipe_key()
            if self._tls is not None:
                self._tls.close()
            if self._private is not None:
                self._private.remove()
            sock.close()

    async def _drain(self, serving: asyncio.Task[int]) -> int:
        """SIGTERM once ready: readiness 503, no new connections, in-flight requests finish."""
        assert self._http is not None
        deadline = self.config.drain_timeout_s
        logger.info(
            "SIGTERM: draining %d open connection(s) for up to %.0f s", self._http.in_flight, deadline
        )
        self.status.drain()
        self._http.drain()
        try:
            code = await asyncio.wait_for(asyncio.shield(serving), timeout=deadline + DRAIN_MARGIN_S)
        except TimeoutError:
            logger.error("drain: the server did not stop within %.0f s; stopping the engine", deadline + 10)
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
            return self._exit_code
        logger.info("drained; exiting")
        return code  # 0, or the code of a failure after ready that the signal interrupted

    async def _boot_and_serve(self, sock: socket.socket, boot_server: BootServer) -> int:
        stage = Stage.CONFIG
        engine: VllmEngine | None = None
        try:
            if self._config_failure is not None:
                self.status.begin(stage)
                raise self._config_failure
            configured = await self._stage(stage, self._config_stage, ConfigResult.detail)
            prepared = configured.prepared
            stage = Stage.ATTEST
            evidence = await self._stage(stage, lambda: self._attest_stage(configured), EvidenceResult.detail)
            stage = Stage.KEY
            key = await self._stage(stage, lambda: self._key_stage(configured, evidence), KeyResult.detail)

            stage = Stage.LOAD
            self.status.begin(stage)
            engine, reports = await self._load_stage(prepared)
            # The workers hold the weights; this process no longer needs the key.
            self._wipe_key()
            load = LoadResult.from_reports(reports)
            self.status.end(stage, load.detail(prepared.model.describe_size()))
            self._record_load(load)

            stage = Stage.CANARY
            self.status.begin(stage)
            canary = await self._canary_stage(engine, prepared)
            self.status.end(stage, canary.detail)
        except Exception as exc:
            self._fail(stage, exc)
            if engine is not None:
                await engine.stop()
            return EXIT_BOOT_FAILED
        try:
            self.status.begin(Stage.SERVE)
            self.record = BootRecord(
                config=configured,
                evidence=evidence,
                key=key,
                load=load,
                canary=canary,
                collateral=self._collateral(),  # refused here, before ready
            )
            return await self._serve(sock, boot_server, engine, self.record)
        except Exception as exc:
            self._fail(Stage.SERVE, exc)
            return EXIT_BOOT_FAILED
        finally:
            if self._frontend is not None:
                await self._frontend.stop()
            await engine.stop()

    def _record_load(self, load: LoadResult) -> None:
        if load.ranks:
            self.metrics.loaded({"ciphertext_bytes": float(load.ciphertext_bytes), "gbps": load.gbps})

    async def _canary_stage(self, engine: VllmEngine, prepared: Prepared) -> CanaryResult:
        """Run the packer's canary generation; return the claim and the stage detail.

        Raises:
            ModelError: the tokens differ, the generation failed or timed out, or the model
                records no reference and ``--require-canary`` is set.
        """
        reference = prepared.model.canary
        if reference is None:
            if self.config.require_canary:
                self.metrics.canary_outcome("failed")
                raise ModelError("the model records no canary reference and --require-canary is set")
            logger.warning(
                "canary: the model records no reference (packed before canaries, or with --no-canary); "
                "serving it unchecked, and the attestation claims canary not-recorded"
            )
            self.metrics.canary_outcome("not-recorded")
            return CanaryResult(
                claim=CanaryClaim(status="not-recorded"),
                detail="not run: the model records no canary reference",
            )
        started = time.monotonic()
        try:
            if reference.render == "chat":  # the way requests go: the app's chat route and template
                self._app = await engine.build_app()
                run = engine.chat_ids(
                    self._app, reference.messages, reference.sampling, request_id="enclave-serve-canary"
                )
            else:  # a plain-prompt canary (models packed before chat canaries): the engine itself
                run = engine.generate_ids(
                    reference.prompt, reference.sampling, request_id="enclave-serve-canary"
                )
            prompt_ids, token_ids = await asyncio.wait_for(run, CANARY_TIMEOUT_S)
        except TimeoutError:
            self.metrics.canary_outcome("failed")
            raise ModelError(
                f"canary: the engine did not finish the generation in {CANARY_TIMEOUT_S:.0f} s"
            ) from None
        except Exception as exc:
            self.metrics.canary_outcome("failed")
            raise ModelError(f"canary: the generation failed ({type(exc).__name__})") from None
        seconds = time.monotonic() - started
        served_on = engine.device_family()
        why = reference.mismatch(prompt_ids, token_ids, served_on=served_on)
        if why is not None:
            self.metrics.canary_outcome("failed", seconds)
            raise ModelError(f"canary: {why}; refusing to serve")
        self.metrics.canary_outcome("passed", seconds)
        detail = (
            f"{len(token_ids)} tokens equal to the reference ({reference.reference}) on {served_on} "
            f"in {seconds:.2f} s"
        )
        claim = CanaryClaim(
            status="passed",
            tokens=len(token_ids),
            reference_sha256=reference.sha256,
            render=reference.render or "prompt",
            reference_computed_on=reference.computed_in,
            served_on=served_on,
        )
        return CanaryResult(claim=claim, detail=detail)

    def _fail(self, stage: Stage, exc: Exception) -> None:
        if isinstance(exc, Error):
            reason = str(exc)  # public: names no host path (foundation/errors.py)
            detail = f" ({exc.log_detail})" if exc.log_detail else ""
            logger.error("boot failed at stage %s: %s%s", stage.value, reason, detail)
        else:  # a bug, not a verdict: keep the traceback in the log, only the type in the reason
            reason = f"internal error ({type(exc).__name__}); see the log"
            logger.exception("boot failed at stage %s: %s", stage.value, reason)
        self.status.fail(stage, reason)
        self._wipe_key()

    def _fail_serving(self, stage: Stage, reason: str, code: int) -> None:
        """A failure once ready: readiness 503 with the reason now, exit ``code`` shortly after."""
        if self.status.failed:
            return
        logger.error("stopped serving at stage %s: %s", stage.value, reason)
        self.status.fail(stage, reason)
        self._exit_code = code
        if self._http is not None:
            asyncio.get_running_loop().call_later(FAILURE_GRACE_S, self._http.stop_now)

    async def _watch_engine(self, engine: VllmEngine) -> None:
        while await engine.healthy():
            await asyncio.sleep(ENGINE_POLL_S)
        self._fail_serving(Stage.SERVE, "the inference engine died", EXIT_ENGINE_DIED)

    def _collateral(self) -> CollateralResult:
        """The collateral files given, read once (authenticated later by their own signatures).

        Raises:
            Error: a file is unreadable or not its TEE's collateral.
        """
        documents = collateral_json(self.config.collateral_files())
        return CollateralResult(documents=documents, typed=collateral_from_json(documents))

    async def _serve(
        self, sock: socket.socket, boot_server: BootServer, engine: VllmEngine, record: BootRecord
    ) -> int:
        cfg = self.config
        evidence = record.evidence
        not_after = int(time.time() + KEYSET_LIFETIME_S)
        workload = record.workload(
            runtime_version=str(runtime_versions()["version"]),
            insecure_modes=self.status.insecure_modes,
            keyset_not_after=not_after,
        )
        service = AttestationService(workload, attester=evidence.attester, devices=evidence.devices)
        self._frontend = AttestationFrontend.create(
            service,
            max_age_s=cfg.attestation_max_age_s,
            rate=cfg.attestation_rate,
            burst=cfg.attestation_burst,
            max_pending=cfg.attestation_queue,
            metrics=self.metrics,
        )
        endpoints = AttestationEndpoints(self.status, lambda: self._frontend, self.metrics)
        router = enclave_router(
            status=self.status,
            attestation=lambda: self._frontend,
            config=lambda: self._configuration,
            engine_healthy=engine.healthy,
            metrics=self.metrics,
            endpoints=endpoints,
        )
        app = self._app if self._app is not None else await engine.build_app()  # the canary's, if any
        app.include_router(router)
        await self._frontend.start()  # the cached document exists before ready
        # Hand the port over from the boot server to the serving one: the boot server stops
        # taking connections at once (they wait in the backlog for the serving server) and lets
        # those already open finish in the background, so a probe is never held up by them.
        boot_server.stop_accepting()
        handover = asyncio.create_task(boot_server.stop(), name="boot-server-stop")
        self._http = engine.http_server(
            app,
            sock,
            drain_timeout_s=cfg.drain_timeout_s,
            guard=lambda asgi: EnclaveFront(asgi, self.status, endpoints),
        )
        self.status.set_ready()
        self.status.end(Stage.SERVE, "serving")
        scheme = "https" if self._tls else "http"
        logger.info("enclave-serve ready: %s://%s:%d/v1", scheme, cfg.host, self.port)
        monitors = [asyncio.create_task(self._watch_engine(engine), name="engine-monitor")]
        if cfg.watchdog_interval_s > 0:
            watchdog = Watchdog(
                attester=evidence.attester,
                devices=evidence.devices,
                expected_gpus=cfg.expected_gpus,
                interval_s=cfg.watchdog_interval_s,
                collateral=record.collateral.for_tee(evidence.attester.tee),
                expires_at=not_after,
                baseline=evidence.gates,
                lock=service.lock,
                metrics=self.metrics,
                documents=self._frontend.scheduler.watchdog_document,
                gate=self.seams.device_gate,
            )
            monitors.append(
                asyncio.create_task(
                    watchdog.run(lambda reason: self._fail_serving(Stage.WATCHDOG, reason, EXIT_WATCHDOG)),
                    name="watchdog",
                )
            )
        try:
            await self._http.serve()
        finally:
            for task in monitors:
                task.cancel()
            await asyncio.gather(*monitors, handover, return_exceptions=True)
        if self._exit_code == 0 and not await engine.healthy():
            # vLLM's own error handler stops the server when a request meets a dead engine,
            # possibly before the monitor's next poll: the death is still the reason for exiting.
            self._fail_serving(Stage.SERVE, "the inference engine died", EXIT_ENGINE_DIED)
        return self._exit_code


def key_source_spec(config: RunConfig, *, cacert: Path | None, init_data: bytes | None) -> KeySourceSpec:
    """The key source ``config`` names, as :func:`attest.keysource.key_source_for` builds it.

    ``cacert`` is the KBS CA bundle to use (the boot passes its private copy), ``init_data`` the
    raw init-data the KBS receives with the evidence. ``enclave-serve kbs fetch`` builds its spec
    from its flags the same way, so the same settings give the same source.
    """
    if config.key_source == "kbs":
        assert config.kbs_url is not None  # RunConfig.validate
        return KeySourceSpec.kbs(
            config.kbs_url,
            cacert=cacert,
            init_data=init_data,
            tee_key="rsa" if config.tee_key == "rsa" else "ec",
            deadline_s=config.kbs_deadline_s,
        )
    if config.key_source == "cdh":
        return KeySourceSpec.cdh(config.cdh_url)
    if config.key_source == "file":
        assert config.key_file is not None  # RunConfig.validate
        return KeySourceSpec.file(config.key_file, allow_insecure=config.allow_insecure_key_file)
    return KeySourceSpec(uri=f"{config.key_source}://")  # refused by key_source_for, by name


def print_configuration(request: RunRequest) -> RunConfiguration:
    """Run only the ``config`` stage and return the run configuration it attests.

    What a boot with the same inputs (init-data, or model, options and environment) will claim,
    computed without attesting, fetching a key or starting vLLM's engine.

    Raises:
        Error: the configuration would be refused at boot.
    """
    loaded = load_request(request)
    config = loaded.config
    mountinfo = read_mountinfo()
    private = PrivateDirectory.create(
        config.private_dir,
        allow_insecure_shared=config.allow_insecure_shared_private_dir,
        mountinfo=mountinfo,
    )
    try:
        environment = _apply_environment(private, None if loaded.pins is None else loaded.pins.environment)
        tls_files = ("<tls key>", "<tls certificate>") if config.tls else None
        return prepare(
            config,
            private,
            environment=environment,
            tls_files=tls_files,
            mount_table=parse_mountinfo(mountinfo),
            init_data=loaded.init_data,
            pins=loaded.pins,
        ).configuration
    finally:
        private.remove()


def run_blocking(request: RunRequest, *, seams: BootSeams | None = None) -> int:
    """Resolve ``request`` and run the runtime on uvloop until it stops.

    A configuration refused while resolving (a setting other than the init-data's, an
    inconsistent combination) fails the boot at stage ``config``, reported like any other stage.
    ``seams``: the attester and key-source factories (None: production's).
    """
    from foundation.secret import protect_process_memory

    protect_process_memory()  # before the process holds anything worth reading
    # After a stop kills vLLM's processes, multiprocessing's resource tracker (spared: it ends
    # with this process) unlinks the shared memory they leave and warns about it: expected then,
    # and nothing for the operator to do. It takes its warning options from this process.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    import uvloop

    try:
        loaded = load_request(request)
        runtime = Runtime(loaded.config, loaded=loaded, seams=seams)
    except Error as exc:
        # Serve the reason: the listen address, TLS and exit behaviour as the command line gave them.
        runtime = Runtime(RunConfig(**request.given), failure=exc, seams=seams)
    return uvloop.run(runtime.run())
