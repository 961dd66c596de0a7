"""Fixtures for the runtime tests: the demo model packed once, vLLM's own parser, and a private
directory."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from foundation.secret import SecretBytes
from loader.packer import pack_model
from runtime.demo_model import build_demo_model
from runtime.private import PrivateDirectory

KEY = SecretBytes(bytes(range(32)))
KEY_ID = "kbs:///enclave-serve/model-key/tiny"


@pytest.fixture(scope="session")
def packed_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo_model(root / "plain")
    pack_model(root / "plain", root / "encrypted", key=KEY, key_id=KEY_ID)
    return root / "encrypted"


@pytest.fixture(scope="session")
def parser() -> argparse.ArgumentParser:
    """vLLM's real ``serve`` parser (imports vLLM once per session, about 7 s)."""
    from runtime.vllm_args import vllm_parser

    return vllm_parser()


@pytest.fixture
def private() -> Iterator[PrivateDirectory]:
    """A private directory under /dev/shm (the pod-wide tmpfs, allowed as shared), removed after."""
    directory = PrivateDirectory.create(Path("/dev/shm"), allow_insecure_shared=True)
    try:
        yield directory
    finally:
        directory.remove()
