"""The policy hook of :func:`attest.verify.verify_evidence`, and the one check that stays there.

Measurements, TCB floors, attributes, GPUs and the software are pinned by one vocabulary, the
workload policy (:mod:`attest.verify.workload`, ``docs/policy.md``), applied after verification.
What remains here is the sigstore-style hook the verifiers run as their last step: a
:class:`Policy` is a tiny object with one method, ``verify(result)``, that returns None or raises
:class:`~foundation.errors.PolicyViolation`; and :class:`RefuseInsecure`, which refuses evidence
that proves nothing or comes from a debuggable TEE before any workload rule is read (the
user's pipeline and kbs-dev's appraisal use it).
"""

from __future__ import annotations

from attest.tee import backend
from attest.tee.result import VerificationResult
from attest.tee.verifier import Policy
from foundation.errors import PolicyViolation

__all__ = ["Policy", "RefuseInsecure"]


class RefuseInsecure:
    """Refuse evidence that proves nothing or whose TEE is debuggable.

    Refuses sample/sampledevice results (``insecure``), TDX quotes with TDATTRIBUTES.DEBUG set,
    and SNP reports whose guest policy allows debugging. It pins no measurement (the workload
    policy does).
    """

    def verify(self, result: VerificationResult) -> None:
        """Check the insecure flag and the debug attributes.

        Raises:
            PolicyViolation: the evidence is insecure or from a debuggable TEE.
        """
        if result.insecure:
            raise PolicyViolation(
                f"policy RefuseInsecure: {result.tee.value} evidence is insecure (not signed by "
                "hardware); use a real TEE"
            )
        debuggable = backend(result.tee).debuggable(result.claims)
        if debuggable is not None:
            raise PolicyViolation(f"policy RefuseInsecure: {debuggable}")
