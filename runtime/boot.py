"""The boot sequence of the enclave, as explicit stages.

::

    bind the port ─ serve probes (503 "booting") while:
      config  parse the manifest, check plaintext model files, parse the vLLM arguments
      tls     generate the in-enclave TLS key (its public key goes into every attestation)
      attest  find the TEE and the GPUs (the sample TEE only with an explicit insecure flag)
      key     attest to the key broker, receive the model key, authenticate the manifest with it
      load    start vLLM; its workers fetch the key over the private handoff socket and decrypt
              the model straight into device memory, then report back
      serve   vLLM's OpenAI API + the probes and /.well-known routes on the same port

Any :class:`attest.errors.Error` stops the boot: the stage and the reason go to one log line,
to ``/readyz`` (503 with a JSON reason) and to ``/.well-known/enclave-serve/boot``, and nothing
else is served. The model key lives in this process only between the ``key`` and the end of
``load``; it is then wiped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import signal
import socket
from argparse import Namespace
from collections.abc import Callable
from typing import Any, TypeVar

from attest.errors import ConfigError, Error, ModelError
from attest.providers import detect_devices, nvidia_gpus_present, select_attester
from attest.providers.base import Attester, DeviceAttester
from attest.secret import SecretBytes
from loader import LOAD_FORMAT
from runtime.config import RunConfig
from server.attestation import AttestationService
from server.boot_server import BootServer
from server.routes import boot_app, enclave_router
from server.status import BootStatus, Stage
from server.tls import EnclaveTls, generate_enclave_tls

__all__ = ["EXIT_BOOT_FAILED", "Runtime", "run_blocking"]

logger = logging.getLogger(__name__)

EXIT_BOOT_FAILED = 3

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


def _runtime_version() -> str:
    try:
        return importlib.metadata.version("enclave-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Runtime:
    """Boot the enclave and serve until told to stop."""

    def __init__(self, config: RunConfig, *, status: BootStatus | None = None) -> None:
        self.config = config
        self.status = status or BootStatus()
        self.status.insecure_modes = config.insecure_modes
        self._attestation: AttestationService | None = None
        self._tls: EnclaveTls | None = None
        self._key: SecretBytes | None = None

    # -- helpers ---------------------------------------------------------------------------

    async def _stage(self, stage: Stage, fn: Callable[[], T], detail: Callable[[T], str] | None = None) -> T:
        """Run one blocking stage in a thread, recording its timing."""
        self.status.begin(stage)
        result = await asyncio.to_thread(fn)
        self.status.end(stage, detail(result) if detail else "")
        return result

    # -- stages ----------------------------------------------------------------------------

    def _config_stage(self) -> tuple[Any, Namespace]:
        from loader.manifest import Manifest

        manifest = Manifest.load(self.config.model_dir)
        manifest.verify_plain_files(self.config.model_dir)
        args = self._vllm_args(manifest.digest)
        return manifest, args

    def _vllm_args(self, manifest_digest: str) -> Namespace:
        """Parse vLLM's own arguments (the user's pass-through plus what the runtime sets)."""
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        cli_env_setup()  # type: ignore[no-untyped-call]
        parser = make_arg_parser(FlexibleArgumentParser(prog="enclave-serve run --"))  # type: ignore[no-untyped-call]
        # The key socket path is filled in at the load stage; neither carries a secret.
        extra = {"key_socket": "", "manifest_digest": manifest_digest}
        argv = [
            "--model", str(self.config.model_dir),
            "--load-format", LOAD_FORMAT,
            "--model-loader-extra-config", json.dumps(extra),
            "--host", self.config.host,
            "--port", str(self.config.port),
            *self.config.vllm_args,
        ]  # fmt: skip
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            raise ConfigError(f"invalid vLLM arguments: {' '.join(self.config.vllm_args)}") from exc
        if self._tls is not None:
            args.ssl_keyfile = self._tls.keyfile
            args.ssl_certfile = self._tls.certfile
        validate_parsed_serve_args(args)
        parsed: Namespace = args
        return parsed

    def _attest_stage(self) -> tuple[Attester, list[DeviceAttester]]:
        attester = select_attester(self.config.tee, allow_insecure=self.config.allow_insecure_sample_tee)
        devices = detect_devices(
            gpus=self.config.gpus,
            allow_insecure=self.config.allow_insecure_sample_tee,
            allow_gpu_cc_off=self.config.allow_insecure_gpu_cc_off,
        )
        if self.config.gpus == "none" and nvidia_gpus_present():
            self.status.insecure_modes.append("NVIDIA GPUs present but not attested (--gpus none)")
        return attester, devices

    def _key_stage(self, manifest: Any, attester: Attester, devices: list[DeviceAttester]) -> Any:
        from attest.keysource import CdhKeySource, KbsKeySource, ResourceUri, UnsafeFileKeySource

        resource = ResourceUri.parse(self.config.key_id or manifest.key_id)
        cfg = self.config
        source: Any
        if cfg.key_source == "kbs":
            assert cfg.kbs_url is not None
            source = KbsKeySource(
                url=cfg.kbs_url,
                attester=attester,
                devices=devices,
                cacert=cfg.kbs_cacert,
                tee_key="rsa" if cfg.tee_key == "rsa" else "ec",
                deadline_s=cfg.kbs_deadline_s,
            )
        elif cfg.key_source == "cdh":
            source = CdhKeySource(url=cfg.cdh_url)
        else:
            assert cfg.key_file is not None
            source = UnsafeFileKeySource(path=cfg.key_file, allow_insecure=cfg.allow_insecure_key_file)
        try:
            release = source.fetch(resource)
        finally:
            source.close()
        try:
            manifest.authenticate(release.secret)
        except ModelError:
            release.secret.wipe()
            raise
        return release

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
            router = enclave_router(status=self.status, attestation=lambda: None)
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
            if self._key is not None:
                self._key.wipe()
                self._key = None
            if self._tls is not None:
                self._tls.close()
            sock.close()

    async def _boot_and_serve(self, sock: socket.socket, boot_server: BootServer) -> int:
        stage = Stage.CONFIG
        try:
            manifest, args = await self._stage(stage, self._config_stage, lambda r: f"model {r[0].digest}")

            stage = Stage.ATTEST
            attester, devices = await self._stage(
                stage,
                self._attest_stage,
                lambda r: f"tee {r[0].tee.value}, {len(r[1])} device attester(s)",
            )

            stage = Stage.KEY
            release = await self._stage(
                stage,
                lambda: self._key_stage(manifest, attester, devices),
                lambda r: f"key released by {r.source} for {r.resource}",
            )
            self._key = release.secret

            stage = Stage.LOAD
            self.status.begin(stage)
            return await self._load_and_serve(sock, boot_server, args, manifest, attester, devices, release)
        except Exception as exc:
            if isinstance(exc, Error):
                reason = str(exc)
                logger.error("boot failed at stage %s: %s", stage.value, reason)
            else:  # a bug, not a verdict: keep the traceback in the log, only the type in the reason
                reason = f"internal error ({type(exc).__name__}); see the log"
                logger.exception("boot failed at stage %s: %s", stage.value, reason)
            self.status.fail(stage, reason)
            if self._key is not None:
                self._key.wipe()
                self._key = None
            return EXIT_BOOT_FAILED

    async def _load_and_serve(
        self,
        sock: socket.socket,
        boot_server: BootServer,
        args: Namespace,
        manifest: Any,
        attester: Attester,
        devices: list[DeviceAttester],
        release: Any,
    ) -> int:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.launcher import serve_http
        from vllm.entrypoints.serve.utils.api_utils import log_non_default_args

        from loader.keyhandoff import KeyHandoffServer

        assert self._key is not None
        ranks = args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size
        handoff = KeyHandoffServer(self._key, manifest_digest=manifest.digest, max_releases=ranks)
        with handoff:
            args.model_loader_extra_config = {
                "key_socket": str(handoff.path),
                "manifest_digest": manifest.digest,
            }
            log_non_default_args(args)
            try:
                engine_cm = build_async_engine_client(args)
                engine_client = await engine_cm.__aenter__()
            except Exception as exc:
                failure = handoff.first_failure()
                if failure is not None:
                    raise ModelError(
                        f"rank {failure.rank} failed to load the model: {failure.error}"
                    ) from None
                raise ModelError(
                    f"the inference engine failed to start ({type(exc).__name__}: {exc}); "
                    "see the engine log above"
                ) from None
            try:
                reports = await asyncio.to_thread(handoff.wait_for_reports, ranks, 30.0)
                failure = handoff.first_failure()
                if failure is not None or len(reports) < ranks:
                    raise ModelError(
                        failure.error if failure else f"only {len(reports)} of {ranks} ranks reported a load"
                    )
            except BaseException:
                await engine_cm.__aexit__(None, None, None)
                raise
        # The workers hold the weights; this process no longer needs the key.
        self._key.wipe()
        self._key = None
        per_rank = ", ".join(
            f"rank {r.rank}: {int(r.stats.get('ciphertext_bytes', 0)) / 1e6:.3f} MB "
            f"at {float(r.stats.get('gbps', 0.0)):.2f} GB/s"
            for r in sorted(reports, key=lambda r: r.rank)
        )
        total_mb = manifest.plaintext_bytes / 1e6
        self.status.end(
            Stage.LOAD, f"{len(reports)} rank(s) decrypted parts of a {total_mb:.3f} MB model: {per_rank}"
        )

        try:
            supported_tasks = await engine_client.get_supported_tasks()
            app = build_app(args, supported_tasks, engine_client.model_config)
            await init_app_state(engine_client, app.state, args, supported_tasks)
            self._attestation = AttestationService(
                attester=attester,
                devices=devices,
                model_digest=manifest.digest,
                tls_spki_sha256=self._tls.spki_sha256 if self._tls else None,
                key_release=release.receipt.to_json() if release.receipt is not None else None,
                runtime={"name": "enclave-serve", "version": _runtime_version()},
                insecure_modes=self.status.insecure_modes,
            )

            async def engine_healthy() -> bool:
                return not engine_client.errored

            app.include_router(
                enclave_router(
                    status=self.status, attestation=lambda: self._attestation, engine_healthy=engine_healthy
                )
            )
            # Hand the port over from the boot server to vLLM's server.
            await boot_server.stop()
            self.status.begin(Stage.SERVE)
            self.status.set_ready()
            self.status.end(Stage.SERVE, "serving")
            scheme = "https" if self._tls else "http"
            logger.info("enclave-serve ready: %s://%s:%d/v1", scheme, self.config.host, self.config.port)
            shutdown = await serve_http(
                app,
                sock=sock,
                host=args.host,
                port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile,
            )
            await shutdown
        finally:
            await engine_cm.__aexit__(None, None, None)
        return 0


def run_blocking(config: RunConfig) -> int:
    """Validate ``config`` and run the runtime on uvloop until it stops."""
    config.validate()
    import uvloop

    return uvloop.run(Runtime(config).run())
