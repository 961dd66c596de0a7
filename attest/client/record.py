"""Write a workload policy from a deployment the user trusts (``enclave-serve policy record``).

:func:`record_policy` turns a :class:`~attest.client.verdict.Verdict` of a server verified
*without* a policy (hardware genuine, binding intact) into the policy that pins exactly what it
runs: its TEE, launch measurements, init-data, GPUs, model, configuration and runtime version,
with the secure defaults for everything the evidence cannot set (TCB ``UpToDate`` with
collateral, no debug, no migration, SEPT_VE_DISABLE, VMPL 0, the observed SNP TCB as floor).
A server launched without init-data is refused (:class:`NoInitData`): its register is zero, and
a zero pin would accept any VM the host launches without init-data.

.. warning::
   A recorded policy is only as good as the deployment it was recorded from: review it
   (``enclave-serve policy show``) before giving it to users or to the key broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from attest.client.verdict import Verdict
from attest.verify.workload import WorkloadPolicy, WorkloadRules, init_data_register_of, policy_sections
from foundation.errors import ConfigError

__all__ = ["NoInitData", "RecordedPolicy", "record_policy"]


class NoInitData(ConfigError, ValueError):
    """The server runs without init-data, so no policy recorded from it could pin its software."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedPolicy:
    """A recorded policy and what the recording could not pin well (to show the user)."""

    policy: WorkloadPolicy
    notes: tuple[str, ...] = ()


#: The init-data digest algorithm by digest size (``trustee:kbs/docs/initdata.md``).
_ALGORITHMS = {32: "sha256", 48: "sha384", 64: "sha512"}


def _init_digest(register: bytes) -> tuple[str, bytes]:
    # The register holds the digest zero-padded to its size (TDX MRCONFIGID: 48 bytes) or
    # truncated to it (SNP HOST_DATA: 32 bytes): sha256 when nothing follows the first 32 bytes.
    if len(register) <= 32 or not any(register[32:]):
        return "sha256", register[:32]
    return _ALGORITHMS.get(len(register), "sha384"), register


def record_policy(verdict: Verdict) -> RecordedPolicy:
    """Return the policy pinning what the verified server runs.

    Raises:
        ValueError: the verdict is not of a verified server.
        NoInitData: the server's init-data register is zero (or, sample TEE, absent): a policy
            pinning it would accept any VM launched without init-data.
    """
    if not verdict.ok or verdict.document is None or verdict.config is None or verdict.primary is None:
        raise ValueError("record a policy only from a server that verified (hardware and binding)")
    claims = verdict.document.claims
    primary = verdict.primary
    notes: list[str] = []
    register = init_data_register_of(primary)
    if claims.init_data is not None:
        alg, _, hexpart = claims.init_data.partition(":")
        init_data = ((alg, bytes.fromhex(hexpart)),)
    elif register is not None and any(register):
        init_data = (_init_digest(register),)
    else:
        raise NoInitData(
            f"the server was launched WITHOUT init-data (its {primary.tee.value} init-data register is "
            "zero or absent): nothing pins its container, arguments or environment, and the policy "
            "would pin a zero register, which every VM the host launches without init-data has, "
            "running anything. Launch it with init-data ('enclave-serve initdata', docs/policy.md; "
            "the sample TEE: run --sample-init-data FILE) and record again"
        )
    # Each TEE's section pins what its verified claims show (attest/tee/<tee>/policy.py).
    sections: dict[str, object] = {}
    for backend, section in policy_sections():
        results = verdict.devices if backend.device else (primary,)
        rules = section.record(results, notes)
        if rules is not None:
            sections[section.table] = rules
    runtime = verdict.config.to_json()["runtime"]
    policy = WorkloadPolicy(
        tees=(primary.tee.value,),
        workload=WorkloadRules(
            model=(claims.model_digest,),
            config=("sha256:" + claims.config_sha256,),
            init_data=init_data,
            runtime_version=(str(runtime["version"]),),
        ),
        sections=sections,
        insecure_development=primary.insecure,
    )
    if primary.insecure:
        notes.append("INSECURE: recorded from the sample TEE; the policy says insecure_development = true")
    # The policy must parse back to itself (what `policy show` and verifiers will read).
    again = WorkloadPolicy.from_toml(policy.to_toml())
    return RecordedPolicy(policy=again, notes=tuple(notes))
