"""``enclave-serve pack``: encrypt a Hugging Face model directory for enclave-serve.

The key file holds the raw 32-byte model key: the provider's own copy, to upload to the KBS as
the resource named by ``--key-id``. It is never printed.

``pack --oci SRC DST`` instead writes a *plain* OCI image layout of the model (one layer for the
side files, one per shard) for standard tools to encrypt and push::

    enclave-serve pack --oci model/ layout/
    skopeo copy --dest-oci-accept-uncompressed-layers --encryption-key jwe:pub.pem \
        oci:layout:latest oci:encrypted:latest
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from foundation.errors import ConfigError
from foundation.secret import SecretBytes
from loader.canary import CANARY_DEVICES, CANARY_DTYPES, CANARY_ENGINES, CanaryReference
from loader.format import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, MODEL_KEY_SIZE
from loader.manifest import parse_key_resource
from loader.packer import SourceModel, check_destination, check_source, generate_model_key, pack_model

__all__ = [
    "add_parser",
    "canary_plan",
    "parse_size",
    "run",
]

_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """Parse ``65536``, ``64KiB``, ``4M`` or ``4MiB`` (binary units). Raises ConfigError."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"bad size {text!r}: use e.g. 4MiB, 512KiB or a number of bytes")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def add_parser(subparsers: Any) -> None:
    """Register the ``pack`` subcommand."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "pack",
        help="encrypt a Hugging Face model directory",
        description="Encrypt SRC (config, tokenizer, *.safetensors) into the encrypted model directory DST.",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="Hugging Face model directory")
    p.add_argument("dst", type=Path, metavar="DST", help="encrypted model directory to create")
    p.add_argument(
        "--oci",
        action="store_true",
        help="write a plain OCI image layout for skopeo to encrypt (no key: the image's recipient "
        "key is what the KBS holds)",
    )
    p.add_argument("--key-id", metavar="URI", help="KBS resource of the key, e.g. kbs:///repo/type/tag")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--key-file", type=Path, metavar="FILE", help="existing raw 32-byte model key")
    key.add_argument("--generate-key", type=Path, metavar="FILE", help="create a new key in FILE (mode 0600)")
    p.add_argument("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), metavar="SIZE", help="default 4MiB")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="default: all CPUs")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-canary",
        action="store_true",
        help="record no canary reference (the runtime then claims canary not-recorded); by default "
        "the canary generation runs on the plaintext model with transformers",
    )
    p.add_argument(
        "--canary-engine",
        choices=("auto", *CANARY_ENGINES),
        default="auto",
        help="the implementation computing the canary reference; auto: vLLM where it is installed "
        "(the served engine: the boot reproduces its tokens exactly), else transformers",
    )
    p.add_argument(
        "--canary-device",
        choices=("auto", *CANARY_DEVICES),
        default="auto",
        help="transformers only (vLLM runs where it was built for): where to compute the canary "
        "reference, the device family the model will be served on; auto: cuda when this machine has "
        "a GPU, else cpu",
    )
    p.add_argument(
        "--canary-dtype",
        choices=("auto", *CANARY_DTYPES),
        default="auto",
        help="the dtype the canary loads the model in: the one it will be served in; auto: the "
        "model's own as its config.json names it (what vLLM serves by default; bfloat16 for most "
        "models, half the memory of float32), float32 where it names none",
    )
    p.set_defaults(func=run)


def _read_key(path: Path) -> SecretBytes:
    try:
        with path.open("rb") as f:
            data = f.read(MODEL_KEY_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) != MODEL_KEY_SIZE:
        raise ConfigError(
            f"key file {path} must hold exactly {MODEL_KEY_SIZE} raw bytes (it holds "
            f"{'more' if len(data) > MODEL_KEY_SIZE else len(data)}): give the raw key pack "
            "--generate-key wrote, not a hex or base64 text of it"
        )
    return SecretBytes(data)


def _check_new_key_path(path: Path) -> None:
    """Refuse a --generate-key path that cannot be created, before anything is computed."""
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} already exists; use --key-file to reuse a key")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create key file {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create key file {path}: no permission to write in {parent}")


def _write_new_key(path: Path) -> SecretBytes:
    key = generate_model_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; use --key-file to reuse a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.write(fd, key.reveal())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _run_oci(args: argparse.Namespace) -> int:
    from loader.oci.packer import check_flat_model, pack_oci_layout

    if args.key_id or args.key_file or args.generate_key:
        raise ConfigError(
            "pack --oci takes no key: skopeo encrypts the layout for the recipient's public key"
        )
    check_destination(args.src, args.dst, overwrite=args.force)
    source = check_source(args.src)
    check_flat_model(args.src)  # before the canary, like every cheap check
    result = pack_oci_layout(args.src, args.dst, overwrite=args.force, canary=_canary(args, source))
    print(f"wrote the plain OCI image layout {result.layout} ({result.layers} layers, tag latest)")
    print(f"plain manifest: {result.digest} (encrypting gives a new digest: pin that one)")
    print(
        f"next: skopeo copy --dest-oci-accept-uncompressed-layers --encryption-key jwe:PUBLIC.pem "
        f"oci:{result.layout}:latest oci:ENCRYPTED_LAYOUT:latest"
    )
    return 0


def _bytes(n: int) -> str:
    """``1.3 GB``, ``855 kB``: decimal units, three significant digits."""
    value = float(n)
    for prefix in ("", "k", "M", "G"):
        if value < 1000:
            return f"{value:.3g} {prefix}B"
        value /= 1000
    return f"{value:.3g} TB"


def _parameters(n: int) -> str:
    """``0.427M``, ``8.03B``."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def canary_plan(source: SourceModel, *, engine: str, device: str, dtype: str) -> str:
    """Return the line ``pack`` prints before the canary: what it loads, where, and its memory."""
    where = "" if engine == "vllm" else f" on {device}"  # vLLM runs where it was built for
    return (
        f"canary: loading {_parameters(source.parameters)} parameters with {engine}{where} in "
        f"{dtype}: about {_bytes(source.weight_bytes(dtype))} of memory for the weights (plus the "
        "engine's own); --canary-dtype chooses the dtype, --no-canary skips the canary"
    )


def _canary(
    args: argparse.Namespace,
    source: SourceModel,
    *,
    clock: Callable[[], float] = time.monotonic,
    out: TextIO | None = None,
) -> CanaryReference | None:
    if args.no_canary:
        return None
    from loader.canary import canary_dtype, compute_reference, default_canary_device, vllm_available

    out = out or sys.stderr
    engine = (
        ("vllm" if vllm_available() else "transformers")
        if args.canary_engine == "auto"
        else args.canary_engine
    )
    device = default_canary_device() if args.canary_device == "auto" else args.canary_device
    dtype = canary_dtype(source.directory, None if args.canary_dtype == "auto" else args.canary_dtype)
    print(canary_plan(source, engine=engine, device=device, dtype=dtype), file=out, flush=True)
    start = clock()
    reference = compute_reference(source.directory, device=device, dtype=dtype, engine=engine)
    print(
        f"canary: {len(reference.token_ids)} reference tokens ({reference.reference}) in "
        f"{clock() - start:.1f} s",
        file=out,
        flush=True,
    )
    return reference


def run(args: argparse.Namespace) -> int:
    """Pack; print the model identity and key id (never the key).

    Checks everything cheap first, in well under a second (arguments, the key id as ``run``
    parses it, the key file, the destination, the source's config and safetensors headers), then
    computes the canary (its memory printed first), then encrypts.
    """
    if args.oci:
        return _run_oci(args)
    if not args.key_id or (args.key_file is None and args.generate_key is None):
        raise ConfigError("pack needs --key-id and one of --key-file / --generate-key (or --oci)")
    parse_key_resource(args.key_id)  # what run will accept
    chunk_size = parse_size(args.chunk_size)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"--chunk-size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    generated = args.generate_key is not None
    if generated:
        _check_new_key_path(args.generate_key)
    else:
        _read_key(args.key_file).wipe()  # its size now; read again when needed
    check_destination(args.src, args.dst, overwrite=args.force)
    source = check_source(args.src)
    canary = _canary(args, source)  # before a key exists: a model that will not load leaves nothing behind
    key = _write_new_key(args.generate_key) if generated else _read_key(args.key_file)
    try:
        manifest = pack_model(
            source,
            args.dst,
            key=key,
            key_id=args.key_id,
            chunk_size=chunk_size,
            threads=args.threads,
            overwrite=args.force,
            progress=not args.no_progress and sys.stderr.isatty(),
            canary=canary,
        )
    except BaseException:
        if generated:
            args.generate_key.unlink(missing_ok=True)  # a key for a model that was never written
        raise
    finally:
        key.wipe()
    print(f"packed {args.dst}")
    print(f"model identity: {manifest.digest}")
    print(f"key id: {manifest.key_id}")
    if generated:
        print(f"new model key written to {args.generate_key}: upload it to the KBS as {manifest.key_id}")
    return 0
