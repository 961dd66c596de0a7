"""vLLM integration: the ``enclave-encrypted`` model loader (thin; the work is in the pipeline).

Registered through the ``vllm.general_plugins`` entry point, which vLLM runs in every process
(API server, engine core, workers), so ``--load-format enclave-encrypted`` resolves wherever
weights are loaded. Each worker:

1. reads the manifest from the model directory and checks it is the model the runtime attested
   (``manifest_digest`` in ``--model-loader-extra-config``);
2. fetches the key from the runtime over the private handoff socket (``key_socket``) with its
   rank's capability (``capabilities``, which reach the worker only through vLLM's spawn
   pipes): the key never appears in env, argv, the extra config or a log line;
3. authenticates the manifest, then hands the engine's lazily decrypted tensors to
   ``model.load_weights``, staging GPU copies as the runtime configured (``staging``,
   ``staging_slots``);
4. checks every parameter was loaded, and reports success or the (secret-free) error back to
   the runtime on the handoff connection. On failure every parameter is zeroed.

For an encrypted OCI image (``image`` in the loader configuration) the handoff gives the
recipient key, a per-boot index key and the runtime's index of the authenticated weight layers
(:mod:`loader.oci.index`): the worker fetches the pinned manifest again (checking it against the
attested digest), unwraps the keys of the layers it reads, and hands the layers' tensors to
``load_weights`` through the same engine as native shards (:mod:`loader.oci.windows`), so each
rank reads and decrypts only its rows. Images with compressed weight layers cannot be indexed and
are streamed whole by each rank (:func:`loader.oci.layers.image_tensors`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from foundation.errors import ConfigError, Error, ModelFormatError
from loader import LOAD_FORMAT
from loader.keyhandoff import request_key
from loader.lazy import LazyCheckpoint
from loader.manifest import Manifest
from loader.source import default_threads
from loader.staging import STAGING_MODES, StagingOptions

__all__ = ["LOAD_FORMAT", "EncryptedLoaderConfig", "EncryptedModelLoader", "register", "scrub_engine_dumps"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedLoaderConfig:
    """The loader's extra config: a socket path, a digest and per-rank capabilities, never a key.

    The runtime sets it on vLLM's parsed arguments after vLLM has logged them; the capabilities
    are secret while the runtime's handoff socket is open (see :mod:`loader.keyhandoff`).
    """

    key_socket: str
    manifest_digest: str
    capabilities: tuple[str, ...] = field(repr=False)
    threads: int | None = None
    staging: StagingOptions = field(default_factory=StagingOptions)
    #: The pinned image reference (``oci:…@sha256:…``/``docker://…@sha256:…``) for an OCI model;
    #: None for a native model directory.
    image: str | None = None
    #: Plain HTTP to a loopback registry (the runtime's ``--allow-insecure-http-registry``).
    allow_http: bool = False
    #: Test hook (set only by the test suite's runtime double): after every weight loaded and
    #: authenticated, negate this parameter, so the canary must catch it.
    test_corrupt_weight: str | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> EncryptedLoaderConfig:
        """Parse and check the extra config; raises :class:`ConfigError`."""
        extra = dict(extra or {})
        unknown = set(extra) - {
            "key_socket", "manifest_digest", "capabilities", "threads", "staging", "staging_slots",
            "test_corrupt_weight", "image", "allow_http",
        }  # fmt: skip
        if unknown:
            raise ConfigError(f"unknown {LOAD_FORMAT} loader options: {', '.join(sorted(unknown))}")
        socket_path, digest = extra.get("key_socket"), extra.get("manifest_digest")
        if not isinstance(socket_path, str) or not socket_path:
            raise ConfigError(f"the {LOAD_FORMAT} loader needs 'key_socket' (set by enclave-serve run)")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise ConfigError(f"the {LOAD_FORMAT} loader needs 'manifest_digest' (set by enclave-serve run)")
        capabilities = extra.get("capabilities")
        if (
            not isinstance(capabilities, list | tuple)
            or not capabilities
            or not all(isinstance(c, str) for c in capabilities)
        ):
            raise ConfigError(f"the {LOAD_FORMAT} loader needs 'capabilities' (set by enclave-serve run)")
        threads = extra.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError("'threads' must be a positive integer")
        mode, slots = extra.get("staging", "pinned"), extra.get("staging_slots")
        if mode not in STAGING_MODES:
            raise ConfigError(f"'staging' must be one of {', '.join(STAGING_MODES)}")
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
            raise ConfigError("'staging_slots' must be a positive integer")
        corrupt = extra.get("test_corrupt_weight")
        if corrupt is not None and not isinstance(corrupt, str):
            raise ConfigError("'test_corrupt_weight' must be a parameter name")
        image, allow_http = extra.get("image"), extra.get("allow_http", False)
        if image is not None and (not isinstance(image, str) or "@sha256:" not in image):
            raise ConfigError("'image' must be an image reference pinned by digest")
        if not isinstance(allow_http, bool):
            raise ConfigError("'allow_http' must be a boolean")
        return cls(
            image=image,
            allow_http=allow_http,
            key_socket=socket_path,
            manifest_digest=digest,
            capabilities=tuple(capabilities),
            threads=threads,
            staging=StagingOptions(mode=mode, slots=slots),
            test_corrupt_weight=corrupt,
        )

    def to_extra(self) -> dict[str, Any]:
        """The JSON-able form vLLM carries (``--model-loader-extra-config``); :meth:`from_extra` reads it."""
        extra: dict[str, Any] = {
            "key_socket": self.key_socket,
            "manifest_digest": self.manifest_digest,
            "capabilities": list(self.capabilities),
            "staging": self.staging.mode,
        }
        if self.staging.slots is not None:
            extra["staging_slots"] = self.staging.slots
        if self.threads is not None:
            extra["threads"] = self.threads
        if self.image is not None:
            extra["image"] = self.image
            extra["allow_http"] = self.allow_http
        if self.test_corrupt_weight is not None:
            extra["test_corrupt_weight"] = self.test_corrupt_weight
        return extra

    def engine_options(self, ranks: int = 1) -> dict[str, Any]:
        """The decrypt engine's options for one of ``ranks`` workers loading at the same time.

        Without a configured thread count each rank takes its share of this process's CPUs
        (every rank of the VM decrypts at once; more threads than cores only contend). Host
        copies are overlapped: a parameter's last chunks may land after its ``copy_`` returns,
        which is safe because weight loaders only copy into parameters, and the engine settles
        every copy before ``load_weights`` returns (:meth:`LazyCheckpoint.synchronize`).
        """
        threads = self.threads or max(1, default_threads() // max(1, ranks))
        return {"threads": threads, "staging": self.staging, "overlap_host_copies": True}

    def capability(self, rank: int) -> str:
        """Return the capability of ``rank``. Raises ConfigError for a rank the runtime did not expect."""
        if not 0 <= rank < len(self.capabilities):
            raise ConfigError(
                f"worker rank {rank} is outside the {len(self.capabilities)} rank(s) the runtime expects"
            )
        return self.capabilities[rank]


def _engine_rank() -> int:
    """This worker's rank within its engine (tensor x pipeline parallel), 0 without distribution."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().rank_in_group)
    except (AssertionError, ImportError, RuntimeError, AttributeError):
        return 0


def _engine_ranks() -> int:
    """How many workers of this engine load at once (tensor x pipeline parallel), 1 without."""
    try:
        from vllm.distributed.parallel_state import get_world_group

        return max(1, int(get_world_group().world_size))
    except (AssertionError, ImportError, RuntimeError, AttributeError):
        return 1


def _tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError, RuntimeError):
        return 0, 1


class EncryptedModelLoader(BaseModelLoader):
    """Load an enclave-serve encrypted model, decrypting in this worker process."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = EncryptedLoaderConfig.from_extra(load_config.model_loader_extra_config)

    def download_model(self, model_config: ModelConfig) -> None:
        if self.options.image is None:
            Manifest.load(Path(model_config.model))  # nothing to download; check the directory

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        model_dir = Path(model_config.model)
        rank, world = _tp_rank_and_size()
        image = None if self.options.image is None else _ImageLoad(self.options)
        if image is None:
            manifest = Manifest.load(model_dir)
            if manifest.digest != self.options.manifest_digest:
                raise ModelFormatError(
                    f"the model directory holds {manifest.digest}, "
                    f"not the attested {self.options.manifest_digest}"
                )
        engine_rank = _engine_rank()
        key, channel = request_key(
            self.options.key_socket,
            manifest_digest=self.options.manifest_digest,
            rank=engine_rank,
            capability=self.options.capability(engine_rank),
        )
        try:
            if image is not None:
                checkpoint: LazyCheckpoint | _ImageLoad = image
                loaded = image.load(model, key, self.options.engine_options(_engine_ranks()))
            else:
                # Each parameter's weight_loader copies an EncryptedTensor into its slice: the
                # chunks holding exactly those rows are decrypted straight into the parameter.
                with LazyCheckpoint.open(
                    model_dir, manifest, key, **self.options.engine_options(_engine_ranks())
                ) as lazy:
                    checkpoint = lazy
                    loaded = model.load_weights(lazy.tensors())  # type: ignore[operator]
                    lazy.synchronize()  # overlapped host copies have all landed (or raise)
            if model_config.quantization is None and loaded is not None:
                missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
                if missing:
                    raise ModelFormatError(
                        f"the checkpoint lacks {len(missing)} weight(s), e.g. {', '.join(missing[:3])}"
                    )
        except BaseException as exc:
            with torch.no_grad():
                for param in model.parameters():
                    param.zero_()
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, Error) else f"{type(exc).__name__}"
            channel.report(ok=False, error=message)
            raise
        finally:
            key.wipe()
        if self.options.test_corrupt_weight:
            params = dict(model.named_parameters())
            with torch.no_grad():
                params[self.options.test_corrupt_weight].neg_()
            logger.warning(
                "TEST HOOK: negated %s after loading (the canary must fail)", self.options.test_corrupt_weight
            )
        stats = checkpoint.stats.snapshot()
        logger.info(
            "rank %d/%d decrypted %s into its parameters: %s; materialised by weight loaders: %s",
            rank, world, self.options.manifest_digest, stats.summary(),
            dict(checkpoint.materialized_by) or "none",
        )  # fmt: skip
        channel.report(
            ok=True,
            stats={
                "bytes": stats.bytes,
                "ciphertext_bytes": stats.ciphertext_bytes,
                "seconds": round(stats.seconds, 4),
                "gbps": round(stats.gbps, 3),
                "materialized": checkpoint.materialized,
            },
        )


class _ImageLoad:
    """One worker's load of an encrypted OCI image (see the module docstring)."""

    def __init__(self, options: EncryptedLoaderConfig) -> None:
        from loader.stats import StatsRecorder

        self.options = options
        self.stats = StatsRecorder()
        self.materialized_by: dict[str, int] = {}
        self.materialized = 0
        #: Ciphertext bytes this rank read (indexed images; streamed images read every layer).
        self.bytes_read = 0

    def load(self, model: nn.Module, bundle: Any, engine_options: dict[str, Any]) -> Any:
        from loader.oci.blobs import open_store
        from loader.oci.image import load_image
        from loader.oci.index import indexable, open_bundle
        from loader.oci.layers import LayerKeys, image_tensors
        from loader.oci.ocicrypt import private_key_from_pem, unwrap_layer_key
        from loader.oci.reference import ImageReference
        from loader.oci.stream import STREAM_PIECE_BYTES, StreamedLayer
        from loader.oci.windows import OciTensorSource, image_sources

        assert self.options.image is not None
        pem, index_key, index = open_bundle(bundle)
        reference = ImageReference.parse(self.options.image)
        store = open_store(reference, allow_http=self.options.allow_http)
        try:
            image = load_image(store, self.options.manifest_digest)  # the attested pin, fetched again
            recipient = private_key_from_pem(pem.reveal())
            sources: list[OciTensorSource] | list[StreamedLayer]
            if index.streamed and not indexable(image):  # compressed layers: streamed whole
                keys = LayerKeys(image, recipient)
                tensors = image_tensors(
                    store, image, keys, root=index.root, threads=engine_options["threads"], stats=self.stats
                )
                return model.load_weights(tensors)  # type: ignore[operator]
            if index.streamed:  # one rank: every weight layer read once, decrypted by the engine
                sources = [
                    StreamedLayer(store, layer, unwrap_layer_key(layer, recipient), root=index.root)
                    for layer in image.layers
                    if layer.role != "files"
                ]
                slot = STREAM_PIECE_BYTES
            else:  # tensor parallel: this rank's units of the runtime's index
                # Only the layers this worker reads are unwrapped.
                by_index = {layer.index: layer for layer in image.layers}
                layer_keys = {li.layer: unwrap_layer_key(by_index[li.layer], recipient) for li in index.layers
                              if li.layer in by_index}  # fmt: skip
                sources = list(image_sources(store, image, index, layer_keys, index_key))
                slot = index.unit_bytes
            with LazyCheckpoint(sources, min_slot_bytes=slot, stats=self.stats, **engine_options) as lazy:
                loaded = model.load_weights(lazy.tensors())  # type: ignore[operator]
                lazy.synchronize()
                self.materialized_by = dict(lazy.materialized_by)
                self.materialized = lazy.materialized
            self.bytes_read = sum(source.bytes_read for source in sources)
            return loaded
        finally:
            pem.wipe()
            index_key.wipe()
            store.close()


def _suppressed_dump(config: Any, scheduler_output: Any, scheduler_stats: Any) -> None:
    logger.error(
        "the engine failed during a model step; vLLM's input dump is suppressed (it would log request "
        "data: prompts' token ids, stop strings, output schemas, and the loader's configuration)"
    )


def scrub_engine_dumps() -> None:
    """Replace vLLM's engine-crash input dump, which logs the scheduler's requests and the config.

    The dump (``vllm.logging_utils.dump_input``) prints every scheduled request's sampling
    parameters (stop strings, structured-output schemas: user data) and the whole ``VllmConfig``
    (with the loader's per-rank key capabilities) to the host-visible log. The engine core imports
    it by name, so both bindings are replaced. Idempotent.
    """
    import sys

    from vllm.logging_utils import dump_input

    setattr(dump_input, "dump_engine_exception", _suppressed_dump)  # noqa: B010
    core = sys.modules.get("vllm.v1.engine.core")
    if core is not None and hasattr(core, "dump_engine_exception"):
        setattr(core, "dump_engine_exception", _suppressed_dump)  # noqa: B010


def register() -> None:
    """Register the loader with vLLM (entry point; idempotent, as vLLM requires)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    from foundation.logs import configure_logging
    from foundation.secret import protect_process_memory

    # In vLLM's engine and worker processes our loggers have no handler yet.
    configure_logging(only_if_unconfigured=True)
    # Every vLLM process (API server, engine core, workers) will hold the key or the weights.
    protect_process_memory()
    scrub_engine_dumps()

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not EncryptedModelLoader:
        register_model_loader(LOAD_FORMAT)(EncryptedModelLoader)
