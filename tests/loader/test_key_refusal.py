"""A key that does not open the manifest: the refusal names the resource asked for and the one recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundation.errors import ModelDecryptionError
from loader.manifest import Manifest
from tests.loader.conftest import KEY, KEY_ID, OTHER_KEY

ASKED = "kbs:///enclave-serve/model-key/wrong"


def test_a_key_released_for_another_resource_names_both(packed_pristine: Path) -> None:
    manifest = Manifest.load(packed_pristine)
    with pytest.raises(ModelDecryptionError) as info:
        manifest.authenticate(OTHER_KEY, resource=ASKED)
    message = str(info.value)
    assert f"the key released for '{ASKED}'" in message
    assert f"the manifest records the key resource '{KEY_ID}'" in message
    assert message.index(ASKED) < message.index(KEY_ID)  # the one asked for first


def test_a_key_released_for_the_recorded_resource_says_the_stored_key_is_not_this_models(
    packed_pristine: Path,
) -> None:
    with pytest.raises(ModelDecryptionError) as info:
        Manifest.load(packed_pristine).authenticate(OTHER_KEY, resource=KEY_ID)
    assert f"the key released for '{KEY_ID}', the resource the manifest records" in str(info.value)
    assert "upload the key pack wrote" in str(info.value)


def test_without_the_resource_it_claims_no_release(packed_pristine: Path) -> None:
    with pytest.raises(ModelDecryptionError) as info:
        Manifest.load(packed_pristine).authenticate(OTHER_KEY)
    assert "released" not in str(info.value) and f"records the key resource '{KEY_ID}'" in str(info.value)
    Manifest.load(packed_pristine).authenticate(KEY, resource=ASKED)  # the right key: any name opens it
