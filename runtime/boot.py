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
      serve   vLLM's OpenAI API + the probes and /.well-known routes on the same port

Any :class:`attest.errors.Error` stops the boot: the stage and the reason go to one log line,
to ``/readyz`` (503 with a JSON reason) and to ``/.well-known/enclave-serve/boot``, and nothing
else is served. The model key lives in this process only between the ``key`` and the end of
``load``; it is then wiped. A request for the key by anything but vLLM's workers fails the boot
(:class:`attest.errors.KeyHandoffCompromised`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from attest.errors import AttestationError, ConfigError, Error, KeyHandoffCompromised, ModelError
from attest.evidence import TeeKind
from attest.keysource.base import KeyRelease, KeySource
from attest.providers import detect_devices, init_data_register, nvidia_gpus_present, select_attester
from attest.providers.base import Attester, DeviceAttester, DeviceGate
from attest.runconfig import RunConfiguration
from attest.secret import SecretBytes
from loader.keyhandoff import KeyHandoffServer, LoadReport
from runtime.config import RunConfig
from runtime.environment import apply_environment, decide_environment
from runtime.prepare import Prepared, prepare, runtime_versions
from runtime.private import PrivateDirectory
from server.attestation import AttestationService
from server.boot_server import BootServer
from server.engine import VllmEngine
from server.routes import boot_app, enclave_router
from server.status import BootStatus, Stage
from server.tls import EnclaveTls, generate_enclave_tls

__all__ = ["EXIT_BOOT_FAILED", "Runtime", "print_configuration", "run_blocking"]

logger = logging.getLogger(__name__)

EXIT_BOOT_FAILED = 3
#: How long the runtime waits for every worker's load report once the engine is up.
REPORT_TIMEOUT_S = 30.0

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


def _apply_environment(private: PrivateDirectory) -> dict[str, str]:
    """Sort this process's environment by the allowlist, apply it, return the attested view."""
    decision = decide_environment(os.environ, private_root=str(private.root))
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


class Runtime:
    """Boot the enclave and serve until told to stop."""

    def __init__(self, config: RunConfig, *, status: BootStatus | None = None) -> None:
        self.config = config
        self.status = status or BootStatus()
        self.status.insecure_modes = config.insecure_modes
        self._attestation: AttestationService | None = None
        self._configuration: RunConfiguration | None = None
        self._tls: EnclaveTls | None = None
        self._key: SecretBytes | None = None
        self._private: PrivateDirectory | None = None
        self._gates: list[DeviceGate] = []

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

    def _config_stage(self) -> Prepared:
        self._private = PrivateDirectory.create(self.config.private_dir)
        environment = _apply_environment(self._private)  # before anything imports vLLM
        tls_files = (self._tls.keyfile, self._tls.certfile) if self._tls is not None else None
        prepared = prepare(self.config, self._private, environment=environment, tls_files=tls_files)
        self._configuration = prepared.configuration
        return prepared

    def _attest_stage(self, prepared: Prepared) -> tuple[Attester, list[DeviceAttester]]:
        init = prepared.init_data
        sample_register = (
            init.register(TeeKind.SAMPLE) if init is not None and self.config.tee == "sample" else None
        )
        attester = select_attester(
            self.config.tee,
            allow_insecure=self.config.allow_insecure_sample_tee,
            sample_init_data=sample_register,
        )
        if init is not None and not attester.insecure:
            # The host supplies the init-data file: only the hardware register makes it the one
            # this TEE was launched with (and so the pins the runtime enforced the real ones).
            register = init_data_register(attester)
            if register is None or not init.matches(attester.tee, register):
                shown = "nothing" if register is None else register.hex()
                raise AttestationError(
                    f"the init-data given is not the one this {attester.tee.value} guest was launched "
                    f"with: the register holds {shown}, the file's {init.algorithm} digest gives "
                    f"{init.register(attester.tee).hex()}"
                )
        elif init is None and not attester.insecure:
            logger.warning(
                "no init-data given (--init-data): the runtime enforces no pins, and verifiers that pin "
                "an init-data digest will refuse this enclave"
            )
        devices = detect_devices(
            gpus=self.config.gpus,
            allow_insecure=self.config.allow_insecure_sample_tee,
            allow_gpu_cc_off=self.config.allow_insecure_gpu_cc_off,
        )
        if self.config.gpus == "none" and nvidia_gpus_present():
            self.status.insecure_modes.append("NVIDIA GPUs present but not attested (--gpus none)")
        # Before any key is requested: every GPU genuine, in CC mode, counted, verified locally.
        self._gates = [device.gate(expected_count=self.config.expected_gpus) for device in devices]
        return attester, devices

    def _key_source(self, prepared: Prepared, attester: Attester, devices: list[DeviceAttester]) -> KeySource:
        from attest.keysource import CdhKeySource, KbsKeySource, UnsafeFileKeySource

        cfg = self.config
        if cfg.key_source == "kbs":
            assert cfg.kbs_url is not None
            return KbsKeySource(
                url=cfg.kbs_url,
                attester=attester,
                devices=devices,
                cacert=prepared.kbs_cacert,
                init_data=None if prepared.init_data is None else prepared.init_data.raw,
                tee_key="rsa" if cfg.tee_key == "rsa" else "ec",
                deadline_s=cfg.kbs_deadline_s,
            )
        if cfg.key_source == "cdh":
            return CdhKeySource(url=cfg.cdh_url)
        assert cfg.key_file is not None
        return UnsafeFileKeySource(path=cfg.key_file, allow_insecure=cfg.allow_insecure_key_file)

    def _key_stage(self, prepared: Prepared, attester: Attester, devices: list[DeviceAttester]) -> KeyRelease:
        source = self._key_source(prepared, attester, devices)
        try:
            release = source.fetch(prepared.resource)
        finally:
            source.close()
        try:
            prepared.model.unlock(release.secret)
        except BaseException:
            release.secret.wipe()
            raise
        return release

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
        engine = VllmEngine(args)
        engine.log_arguments()  # before the capabilities go in
        closed = threading.Event()
        with KeyHandoffServer(
            self._key,
            manifest_digest=digest,
            ranks=ranks,
            socket_dir=self._private.key_dir,
            on_compromise=lambda _reason: _keep_killing_engine_processes(closed),
        ) as handoff:
            args.model_loader_extra_config = {
                "key_socket": str(handoff.path),
                "manifest_digest": digest,
                "capabilities": list(handoff.capabilities),
                "staging": self.config.staging,
                **({"staging_slots": self.config.staging_slots} if self.config.staging_slots else {}),
            }
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

    async def run(self) -> int:
        """Boot and serve until SIGTERM/SIGINT; return the process exit code."""
        cfg = self.config
        for mode in cfg.insecure_modes:
            logger.warning("INSECURE MODE: %s", mode)
        sock = _bind(cfg.host, cfg.port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        boot_server: BootServer | None = None
        try:
            if cfg.tls:
                self.status.begin(Stage.TLS)
                self._tls = generate_enclave_tls(hostnames=cfg.tls_hostnames)
                self.status.end(Stage.TLS, f"spki sha256 {self._tls.spki_sha256}")
            router = enclave_router(
                status=self.status, attestation=lambda: None, config=lambda: self._configuration
            )
            boot_server = BootServer(boot_app(self.status, router), sock, tls=self._tls)
            await boot_server.start()
            scheme = "https" if self._tls else "http"
            logger.info("enclave-serve listening on %s://%s:%d (booting)", scheme, cfg.host, cfg.port)

            boot = asyncio.create_task(self._boot_and_serve(sock, boot_server))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({boot, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if boot in done:
                stopped.cancel()
                code = boot.result()
                if code == EXIT_BOOT_FAILED and not cfg.exit_on_failure:
                    # Stay up so probes and operators can read the reason; stop on a signal.
                    await stop.wait()
                return code
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await boot
            return 0
        except Error as exc:
            self.status.fail(self.status.current or Stage.CONFIG, str(exc))
            logger.error("boot failed: %s", exc)
            return EXIT_BOOT_FAILED
        finally:
            if boot_server is not None and boot_server.running:
                await boot_server.stop()
            self._wipe_key()
            if self._tls is not None:
                self._tls.close()
            if self._private is not None:
                self._private.remove()
            sock.close()

    async def _boot_and_serve(self, sock: socket.socket, boot_server: BootServer) -> int:
        stage = Stage.CONFIG
        try:
            prepared = await self._stage(
                stage,
                self._config_stage,
                lambda p: f"model {p.model.digest}, config sha256:{p.configuration.sha256}",
            )
            stage = Stage.ATTEST
            attester, devices = await self._stage(
                stage,
                lambda: self._attest_stage(prepared),
                lambda r: "; ".join([f"tee {r[0].tee.value}", *(g.summary() for g in self._gates)]),
            )
            stage = Stage.KEY
            release = await self._stage(
                stage,
                lambda: self._key_stage(prepared, attester, devices),
                lambda r: f"key released by {r.source} for {r.resource}",
            )
            self._key = release.secret

            stage = Stage.LOAD
            self.status.begin(stage)
            engine, reports = await self._load_stage(prepared)
            # The workers hold the weights; this process no longer needs the key.
            self._wipe_key()
            self.status.end(stage, _load_detail(reports, prepared))
        except Exception as exc:
            self._fail(stage, exc)
            return EXIT_BOOT_FAILED
        try:
            return await self._serve(sock, boot_server, engine, prepared, attester, devices, release)
        except Exception as exc:
            self._fail(Stage.SERVE, exc)
            return EXIT_BOOT_FAILED
        finally:
            await engine.stop()

    def _fail(self, stage: Stage, exc: Exception) -> None:
        if isinstance(exc, Error):
            reason = str(exc)
            logger.error("boot failed at stage %s: %s", stage.value, reason)
        else:  # a bug, not a verdict: keep the traceback in the log, only the type in the reason
            reason = f"internal error ({type(exc).__name__}); see the log"
            logger.exception("boot failed at stage %s: %s", stage.value, reason)
        self.status.fail(stage, reason)
        self._wipe_key()

    async def _serve(
        self,
        sock: socket.socket,
        boot_server: BootServer,
        engine: VllmEngine,
        prepared: Prepared,
        attester: Attester,
        devices: list[DeviceAttester],
        release: KeyRelease,
    ) -> int:
        self._attestation = AttestationService(
            attester=attester,
            devices=devices,
            model_digest=prepared.model.digest,
            config=prepared.configuration,
            init_data=None if prepared.init_data is None else prepared.init_data.digest_text,
            tls_spki_sha256=self._tls.spki_sha256 if self._tls else None,
            key_release=release.receipt.to_json() if release.receipt is not None else None,
            runtime={"name": "enclave-serve", "version": str(runtime_versions()["version"])},
            insecure_modes=self.status.insecure_modes,
        )
        router = enclave_router(
            status=self.status,
            attestation=lambda: self._attestation,
            config=lambda: self._configuration,
            engine_healthy=engine.healthy,
        )
        app = await engine.build_app([router])
        # Hand the port over from the boot server to vLLM's server.
        await boot_server.stop()
        self.status.begin(Stage.SERVE)
        self.status.set_ready()
        self.status.end(Stage.SERVE, "serving")
        scheme = "https" if self._tls else "http"
        logger.info("enclave-serve ready: %s://%s:%d/v1", scheme, self.config.host, self.config.port)
        await engine.serve(app, sock)
        return 0


def _load_detail(reports: list[LoadReport], prepared: Prepared) -> str:
    per_rank = ", ".join(
        f"rank {r.rank}: {int(r.stats.get('ciphertext_bytes', 0)) / 1e6:.3f} MB "
        f"at {float(r.stats.get('gbps', 0.0)):.2f} GB/s"
        for r in sorted(reports, key=lambda r: r.rank)
    )
    return f"{len(reports)} rank(s) decrypted parts of {prepared.model.describe_size()}: {per_rank}"


def print_configuration(config: RunConfig) -> RunConfiguration:
    """Run only the ``config`` stage and return the run configuration it attests.

    What a boot with the same inputs (model, options, environment, image) will claim, computed
    without attesting, fetching a key or starting vLLM's engine.

    Raises:
        Error: the configuration would be refused at boot.
    """
    config.validate()
    private = PrivateDirectory.create(config.private_dir)
    try:
        environment = _apply_environment(private)
        tls_files = ("<tls key>", "<tls certificate>") if config.tls else None
        return prepare(config, private, environment=environment, tls_files=tls_files).configuration
    finally:
        private.remove()


def run_blocking(config: RunConfig) -> int:
    """Validate ``config`` and run the runtime on uvloop until it stops."""
    from attest.secret import protect_process_memory

    config.validate()
    protect_process_memory()  # before the process holds anything worth reading
    import uvloop

    return uvloop.run(Runtime(config).run())
