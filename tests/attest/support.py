"""Shared helpers for the attestation tests: fixed times and declarations.

The facts asserted against the vectors (read with :mod:`tests.vector_files`) come from
tests/vectors/<tee>/PROVENANCE.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from attest.initdata import WorkloadPins
from tests.vector_files import vector as vector  # re-exported for tests/runtime/test_gpu_gate.py

#: dcap-qvl collateral window of tdx/tdx_quote_collateral.json (PROVENANCE.md, "Verification time").
WINDOW_START = 1750329147
WINDOW_END = 1752919235
WINDOW_MID = 1751624191
#: The time dcap-qvl's own Python example uses: before the TCBInfo issue date (a pitfall).
DCAP_EXAMPLE_TIME = 1750320802
#: The request nonce of nvidia/hopperAttestationReport.txt.
HOPPER_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


def at(seconds: int) -> datetime:
    """Return the UTC datetime of a Unix time."""
    return datetime.fromtimestamp(seconds, UTC)


#: A time when every certificate in the vectors is valid (and inside the TDX collateral window).
NOW = at(WINDOW_MID)


#: The software a test declaration says runs (any values: only the digest depends on them).
TEST_RUNTIME_FACTS: dict[str, str | bool] = {
    "name": "enclave-serve", "version": "0.1.0", "vllm": "0.32.0", "torch": "2.13.0", "python": "3.11.0",
    "python_isolated": False,
}  # fmt: skip


def workload_pins(model: str = "sha256:" + "ab" * 32, **overrides: Any) -> WorkloadPins:
    """A valid declaration (init-data ``enclave-serve.toml``) for tests; ``overrides`` replace members."""
    members: dict[str, Any] = {
        "model": model,
        "key_resource": "kbs:///enclave-serve/model-key/tiny",
        "runtime": TEST_RUNTIME_FACTS,
        "settings": {"tee": "sample", "allow_insecure_sample_tee": True, "gpus": "none"},
        "vllm_args": ("--max-model-len", "512"),
        "environment": {},
    }
    members.update(overrides)
    return WorkloadPins(**members)
