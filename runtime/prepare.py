"""The ``config`` stage: turn hostile inputs into what will run, and attest it.

:func:`prepare` opens the model (:mod:`runtime.models`: the native format's manifest and side
files read once into the guest-private directory, or an OCI image's pinned manifest and
config), checks that every encrypted shard the manifest lists is there with its recorded size
(before any key request), reads the pinned KBS CA once, parses and checks vLLM's arguments
(:mod:`runtime.vllm_args`), and builds the :class:`attest.runconfig.RunConfiguration` that every
attestation document will claim. Everything a later stage uses comes from the returned
:class:`Prepared`, never from the host's paths again. The environment has been sorted and
applied before (:mod:`runtime.environment`): this function imports vLLM.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from attest.initdata import InitData, WorkloadPins
from attest.runconfig import RunConfiguration
from foundation.errors import ConfigError
from foundation.resource import ResourceUri
from loader.manifest import parse_key_resource
from runtime.config import RunConfig
from runtime.facts import runtime_versions
from runtime.models import ImageModel, NativeModel, prepare_model
from runtime.mounts import SYSTEM_CODE_PATHS, Mount, check_mounts, code_paths, read_mount_table
from runtime.private import PrivateDirectory
from runtime.settings import declared_settings, read_ca_bundle
from runtime.vllm_args import (
    VllmArguments,
    parse_vllm_arguments,
    redact_secret_options,
    runtime_argv,
)

__all__ = ["Prepared", "prepare", "runtime_versions"]


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
    #: The CoCo init-data the runtime was given, whose declaration it runs (the attest stage
    #: checks it against the hardware register).
    init_data: InitData | None = None
    #: The declaration the run configuration was made from (the init-data's, or in development
    #: the command line's).
    pins: WorkloadPins | None = None
    #: The mount table the config stage checked (:mod:`runtime.mounts`), for the boot report.
    mounts: tuple[Mount, ...] = ()

    @property
    def ranks(self) -> int:
        """How many vLLM workers will ask for the key (tensor x pipeline parallel)."""
        args = self.vllm.namespace
        return int(args.tensor_parallel_size) * int(args.pipeline_parallel_size)


def _write_ca_bundle(text: str, private: PrivateDirectory) -> Path:
    copy = private.root / "kbs-ca.pem"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode())
    return copy


def _model_location(model: str) -> str | None:
    """The local path of ``run``'s model argument: a directory or an ``oci:`` layout (None: a registry)."""
    if model.startswith("oci:"):
        return model[len("oci:") :].split("@", 1)[0]
    return None if "://" in model else model


def _check_mounts(config: RunConfig, mounts: tuple[Mount, ...]) -> tuple[Mount, ...]:
    allowed = [
        p for p in (_model_location(config.model), config.init_data, config.sample_init_data) if p is not None
    ]
    refused = check_mounts(
        mounts, code=[*SYSTEM_CODE_PATHS, *code_paths()], allowed=[str(p) for p in allowed]
    )
    if refused:
        raise ConfigError(
            f"refusing to run where the host could supply code: {'; '.join(refused[:3])}"
            + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")
        )
    return mounts


def _check_pinned(pins: WorkloadPins, *, model: str) -> None:
    """The model found and the software running must be the ones the init-data declares."""
    if pins.model != model:
        raise ConfigError(
            f"the init-data pins model {pins.model}, but the model location holds {model}: refusing it"
        )
    running = runtime_versions()
    differ = [
        f"{key}: declared {pins.runtime.get(key)!r}, running {running[key]!r}"
        for key in running
        if pins.runtime.get(key) != running[key]
    ]
    if differ:
        raise ConfigError(
            "the init-data declares other software than this image runs ("
            + "; ".join(differ)
            + "): make the init-data with this image's facts ('enclave-serve image-facts' in the image, "
            "then 'enclave-serve initdata --image-facts FILE')"
        )


def prepare(
    config: RunConfig,
    private: PrivateDirectory,
    *,
    environment: Mapping[str, str],
    tls_files: tuple[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    mount_table: tuple[Mount, ...] | None = None,
    init_data: InitData | None = None,
    pins: WorkloadPins | None = None,
) -> Prepared:
    """Run the ``config`` stage (see the module docstring).

    ``environment`` is the attested view of the environment already applied; ``tls_files`` the
    in-memory TLS key and certificate paths for vLLM's server (None without TLS);
    ``mount_table`` this process's mounts (read from ``/proc/self/mountinfo`` when None);
    ``pins`` the init-data's declaration the configuration was resolved from (None: development,
    the declaration is made here from ``config`` and the running software).

    Raises:
        ConfigError: a mount where code is loaded from (:mod:`runtime.mounts`), a refused
            option, a bad CA bundle, an unusable key resource.
        ModelFormatError: the manifest or a side file is missing, malformed or modified; an
            encrypted shard is missing or of another size than the manifest records.
    """
    mounts = _check_mounts(config, read_mount_table() if mount_table is None else mount_table)
    model, view = prepare_model(
        config.model, private.model_view, allow_http=config.allow_insecure_http_registry
    )
    if isinstance(model, NativeModel):
        # Every shard present with the size the manifest records, before any key request: an
        # interrupted copy is named here ("shard X is missing"), not found at the load stage
        # after the key release and the engine start as an authentication failure. A courtesy
        # for honest mistakes only: the manifest is authenticated after the key release (its
        # MAC), and the loader authenticates every chunk; those checks stay.
        model.manifest.check_files(model.directory)
    key_id = config.key_id or model.default_key_id
    if key_id is None:
        raise ConfigError(f"{model.source} names no key: give --key-id (the KBS resource of its private key)")
    resource = parse_key_resource(key_id)  # the very check pack makes of the key id it records
    if pins is not None:
        _check_pinned(pins, model=model.digest)
        pem = pins.settings.get("kbs_ca_pem")
        if pem is not None and not isinstance(pem, str):
            raise ConfigError("the init-data's kbs_ca_pem must be PEM text")
    else:
        pem = None if config.kbs_cacert is None else read_ca_bundle(config.kbs_cacert)
        pins = WorkloadPins(
            model=model.digest,
            key_resource=str(resource),
            runtime=runtime_versions(),
            settings=declared_settings(config, kbs_ca_pem=pem),
            vllm_args=redact_secret_options(config.vllm_args),
            environment=dict(environment),
        )
    cacert = None
    if config.key_source == "kbs" and pem is not None:
        cacert = _write_ca_bundle(pem, private)
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
        configuration = pins.configuration()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return Prepared(
        model=model,
        resource=resource,
        vllm=vllm,
        configuration=configuration,
        kbs_cacert=cacert,
        init_data=init_data,
        pins=pins,
        mounts=mounts,
    )
