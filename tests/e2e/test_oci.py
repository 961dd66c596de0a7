"""Encrypted OCI images from the standard tools, end to end: ``enclave-serve pack --oci`` →
``skopeo copy --encryption-key jwe:…`` (an EC recipient into a layout, an RSA recipient pushed to
Debian's docker-registry on loopback) → the recipient private key in kbs-dev → ``enclave-serve
run oci:…@sha256:`` / ``docker://…@sha256:`` with real vLLM, compared token for token with stock
vLLM serving the plaintext model. Refusals each name their reason and serve nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import oci_support as oci
from tests.e2e.conftest import (
    DEV_PRIVATE_DIR,
    ES,
    VLLM_ARGS,
    Launcher,
    Workspace,
    assert_nothing_served,
    child_env,
    wait_ready,
)
from tests.e2e.test_enclave import PROMPTS, _greedy_token_ids

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(oci.SKOPEO is None or oci.REGISTRY is None, reason="needs skopeo and docker-registry"),
]

EC_KEY_ID = "kbs:///enclave-serve/image-key/ec"
RSA_KEY_ID = "kbs:///enclave-serve/image-key/rsa"


@dataclass
class Images:
    plain: Path
    ec_layout: Path
    ec_digest: str
    rsa_reference: str
    ec: oci.Recipient
    rsa: oci.Recipient
    registry: oci.Registry


@pytest.fixture(scope="module")
def images(workspace: Workspace) -> Iterator[Images]:
    root = workspace.root / "oci"
    root.mkdir()
    plain = root / "plain"
    subprocess.run([ES, "pack", "--oci", str(workspace.plain), str(plain)], check=True, env=child_env(),
                   capture_output=True)  # fmt: skip
    ec, rsa = oci.make_recipient(root, "ec"), oci.make_recipient(root, "rsa")
    ec_layout = root / "encrypted-ec"
    ec_digest = oci.encrypt(plain, ec_layout, ec, compression="none")
    oci.encrypt(plain, root / "encrypted-rsa", rsa, compression="gzip")
    registry = oci.Registry(root)
    try:
        reference = registry.push(root / "encrypted-rsa", "models/tiny")
        yield Images(plain, ec_layout, ec_digest, reference, ec, rsa, registry)
    finally:
        registry.stop()


def _kbs(launcher: Launcher, workspace: Workspace, images: Images) -> str:
    return launcher.kbs(
        "kbs-oci", workspace.key_file,
        "--resource", f"enclave-serve/image-key/ec={images.ec.private}",
        "--resource", f"enclave-serve/image-key/rsa={images.rsa.private}",
    )  # fmt: skip


def _same_tokens_as_plaintext(url: str, plaintext_url: str) -> None:
    for prompt in PROMPTS:
        assert _greedy_token_ids(url, prompt, verify=False) == _greedy_token_ids(plaintext_url, prompt), (
            prompt
        )


def test_an_encrypted_layout_serves_the_model_and_attests_the_manifest_digest(
    workspace: Workspace, images: Images, launcher: Launcher, plaintext_url: str
) -> None:
    kbs_url = _kbs(launcher, workspace, images)
    reference = f"oci:{images.ec_layout}@{images.ec_digest}"
    url, proc = launcher.runtime("runtime-oci-layout", reference, kbs_url, "--key-id", EC_KEY_ID)
    wait_ready(url, proc)
    _same_tokens_as_plaintext(url, plaintext_url)
    verified = subprocess.run(
        [ES, "verify", url, "--allow-unpinned-software", "--allow-insecure-sample-tee",
         "--expect-model", images.ec_digest],
        capture_output=True, text=True, env=child_env(), timeout=120,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    boot = httpx.get(url + "/.well-known/enclave-serve/boot", verify=False, timeout=10).json()
    load = next(stage for stage in boot["stages"] if stage["stage"] == "load")
    assert "image (2 layers)" in load["detail"], load
    key_line = images.ec.private.read_bytes().decode().split("\n")[1]
    assert key_line not in proc.text()  # no key material in any log line


def test_an_image_pushed_to_a_registry_serves_the_model(
    workspace: Workspace, images: Images, launcher: Launcher, plaintext_url: str
) -> None:
    kbs_url = _kbs(launcher, workspace, images)
    url, proc = launcher.runtime(
        "runtime-oci-registry", images.rsa_reference, kbs_url, "--key-id", RSA_KEY_ID,
        "--allow-insecure-http-registry",
    )  # fmt: skip
    wait_ready(url, proc)
    _same_tokens_as_plaintext(url, plaintext_url)


def test_the_wrong_recipient_key_fails_at_the_key_stage(
    workspace: Workspace, images: Images, launcher: Launcher
) -> None:
    kbs_url = _kbs(launcher, workspace, images)
    reference = f"oci:{images.ec_layout}@{images.ec_digest}"
    url, proc = launcher.runtime("runtime-oci-wrong-key", reference, kbs_url, "--key-id", RSA_KEY_ID)
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "key" and "unwraps none of its recipients" in body["reason"], body
    assert_nothing_served(url)


def test_a_layer_failing_its_hmac_fails_the_load_and_nothing_is_served(
    workspace: Workspace, images: Images, launcher: Launcher, tmp_path: Path
) -> None:
    layout = tmp_path / "tampered"
    shutil.copytree(images.ec_layout, layout)
    size = int(str(oci.layer(layout, images.ec_digest, 1)["size"]))
    digest = oci.flip_layer_byte(layout, images.ec_digest, 1, offset=size - 40, redigest=True)
    kbs_url = _kbs(launcher, workspace, images)
    url, proc = launcher.runtime("runtime-oci-hmac", f"oci:{layout}@{digest}", kbs_url, "--key-id", EC_KEY_ID)
    body = wait_ready(url, proc, want_failure=True)
    assert body["stage"] == "load" and "failed its HMAC" in body["reason"], body
    assert_nothing_served(url)


def _config_stage(model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ES, "run", model, "--tee", "sample", "--gpus", "none", "--allow-insecure-sample-tee", *DEV_PRIVATE_DIR,
         "--kbs-url", "http://127.0.0.1:9", "--key-id", EC_KEY_ID, *extra, "--print-config", "--", *VLLM_ARGS],
        capture_output=True, text=True, env=child_env(), timeout=300,
    )  # fmt: skip


def test_the_config_stage_refuses_unpinned_unencrypted_and_substituted_images(
    images: Images, tmp_path: Path
) -> None:
    tag_only = _config_stage(f"oci:{images.ec_layout}:latest")
    assert tag_only.returncode != 0 and "tag only" in tag_only.stderr
    plain = _config_stage(f"oci:{images.plain}@{oci.index_digest(images.plain)}")
    assert plain.returncode != 0 and "not encrypted" in plain.stderr
    layout = tmp_path / "substituted"
    shutil.copytree(images.ec_layout, layout)
    pinned = oci.blob(layout, images.ec_digest)
    pinned.chmod(0o644)
    pinned.write_bytes(oci.blob(images.plain, oci.index_digest(images.plain)).read_bytes())
    substituted = _config_stage(f"oci:{layout}@{images.ec_digest}")
    assert substituted.returncode != 0 and "does not match its digest" in substituted.stderr
    ok = _config_stage(f"oci:{images.ec_layout}@{images.ec_digest}")
    assert ok.returncode == 0, ok.stderr
    assert images.ec_digest in ok.stdout  # the image's manifest digest is the attested model
