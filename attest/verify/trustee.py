"""Export a workload policy for a real Trustee KBS (``enclave-serve policy trustee``).

Trustee splits what :class:`~attest.verify.workload.WorkloadPolicy` says in one file over
three places (``docs/kbs.md`` shows the ``kbs-client`` commands):

* **reference values** in its RVPS (``kbs-client config set-sample-reference-value NAME VALUE``),
  named as Trustee's default CPU attestation policy (``default_cpu``) reads them
  (``mr_td``, ``rtmr_1``, ``rtmr_2``, ``snp_launch_measurement``, ``snp_bootloader``, …): with
  them ``cpu0`` appraises as ``affirming``;
* that **attestation policy**, unchanged (Trustee's default);
* a **resource policy** (rego, :func:`resource_policy_rego`) for the model key that requires
  ``cpu0`` (and every ``gpuN``) to be affirming and checks the rules directly on the annotated
  evidence: the init-data register (which pins the container, its arguments and environment,
  and enclave-serve's model and configuration pins), the measurements, the TCB and attribute
  rules, the GPU count and versions.

Claim paths follow Trustee's EAR token (``input.submods.cpu0["ear.veraison.annotated-evidence"]``,
``…/init_data`` as the register in hex; ``attestation-service/src/ear_token/broker.rs``) and its
verifiers' claims (``deps/verifier/src/tdx/claims.rs``: ``quote.body.mr_td``, ``rtmr_N``,
``td_attributes.debug``/``septve_disable``, ``tcb_status``; ``deps/verifier/src/snp/mod.rs``:
``measurement``, ``reported_tcb_*``, ``policy_debug_allowed``, ``policy_migrate_ma``), at trustee
``78962cd4``. Not run against a Trustee here (none on this machine): review before deploying.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from attest.evidence import TeeKind
from attest.initdata import register_for_digest
from attest.verify.workload import WorkloadPolicy

__all__ = ["reference_value_commands", "reference_values", "resource_policy_rego"]


def _set(values: Iterable[str]) -> str:
    return "{" + ", ".join(json.dumps(v) for v in values) + "}"


def reference_values(policy: WorkloadPolicy) -> dict[str, list[str | int]]:
    """Return Trustee RVPS reference values (name -> allowed values) for ``default_cpu``."""
    out: dict[str, list[str | int]] = {}
    if policy.tdx is not None:
        out["mr_td"] = [v.hex() for v in policy.tdx.mrtd]
        for i in (1, 2):
            rtmr = policy.tdx.rtmr[i]
            if rtmr is not None:
                out[f"rtmr_{i}"] = [v.hex() for v in rtmr]
    if policy.snp is not None:
        out["snp_launch_measurement"] = [v.hex() for v in policy.snp.measurement]
        names = {"bootloader": "snp_bootloader", "microcode": "snp_microcode", "snp": "snp_snp_svn",
                 "tee": "snp_tee_svn"}  # fmt: skip
        for key, name in names.items():
            if key in policy.snp.min_tcb:
                out[name] = [policy.snp.min_tcb[key]]
    return out


def reference_value_commands(policy: WorkloadPolicy, *, kbs_url: str = "https://kbs:8080") -> list[str]:
    """Return the ``kbs-client`` commands that register :func:`reference_values`."""
    commands = []
    for name, values in reference_values(policy).items():
        for value in values:
            integer = " --as-integer" if isinstance(value, int) else ""
            commands.append(
                f"kbs-client --url {kbs_url} config --admin-token-file admin.jwt "
                f"set-sample-reference-value {name} {value}{integer}"
            )
    return commands


def resource_policy_rego(policy: WorkloadPolicy) -> str:
    """Return a Trustee resource policy (``package policy``) enforcing ``policy``'s rules."""
    lines = [
        "# enclave-serve workload policy, exported for Trustee (enclave-serve policy trustee).",
        "package policy",
        "",
        "import rego.v1",
        "",
        "default allow := false",
        "",
        "cpu := input.submods.cpu0",
        'ae := cpu["ear.veraison.annotated-evidence"]',
        "",
        "allow if {",
        '\tcpu["ear.status"] == "affirming"',
        "\tinit_data_ok",
        "\ttee_ok",
        "\tgpus_ok",
        "}",
        "",
    ]
    allowed = policy.workload.init_data or ()
    for tee, name in ((TeeKind.TDX, "tdx"), (TeeKind.SNP, "snp")):
        if name in policy.tees:
            registers = [register_for_digest(tee, digest).hex() for _alg, digest in allowed]
            lines += ["init_data_ok if {", f"\tae.{name}", f"\tae.init_data in {_set(registers)}", "}", ""]
    if policy.tdx is not None:
        t = policy.tdx
        body = [f"\tae.tdx.quote.body.mr_td in {_set(v.hex() for v in t.mrtd)}"]
        for i, values in enumerate(t.rtmr):
            if values is not None:
                body.append(f"\tae.tdx.quote.body.rtmr_{i} in {_set(v.hex() for v in values)}")
        body.append("\tae.tdx.td_attributes.debug == false")
        if not t.allow_migratable:
            # Trustee's TDX claims name no MIGRATABLE flag (deps/verifier/src/tdx/claims.rs), so
            # this rule is enforced by `enclave-serve verify` and kbs-dev only.
            body.append("\t# MIGRATABLE: not in Trustee's TDX claims; checked by enclave-serve verify")
        if t.require_sept_ve_disable:
            body.append("\tae.tdx.td_attributes.septve_disable == true")
        body.append(f"\tae.tdx.tcb_status in {_set(t.tcb_status)}")
        lines += ["tee_ok if {", *body, "}", ""]
    if policy.snp is not None:
        s = policy.snp
        body = [f"\tae.snp.measurement in {_set(v.hex() for v in s.measurement)}"]
        for key, floor in s.min_tcb.items():
            if key != "fmc":  # Trustee's SNP claims carry bootloader, tee, snp and microcode only
                body.append(f"\tae.snp.reported_tcb_{key} >= {floor}")
        body.append("\tae.snp.policy_debug_allowed == false")
        if not s.allow_migration:
            body.append("\tae.snp.policy_migrate_ma == false")
        # VMPL: Trustee's SNP verifier itself refuses reports from VMPL != 0.
        lines += ["tee_ok if {", *body, "}", ""]
    gpu = policy.gpu
    count = 0 if gpu is None else gpu.count
    lines += [
        'gpu_submods := [k | some k, _ in input.submods; startswith(k, "gpu")]',
        "",
        "gpus_ok if {",
        f"\tcount(gpu_submods) == {count}",
        '\tevery k in gpu_submods { input.submods[k]["ear.status"] == "affirming" }',
        "}",
        "",
    ]
    return "\n".join(lines)
