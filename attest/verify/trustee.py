"""Export a workload policy for a real Trustee KBS (``enclave-serve policy trustee``).

Every rule of :class:`~attest.verify.workload.WorkloadPolicy` is enforced by the export, or
:func:`export_policy` raises :class:`ExportRefused` naming the rule: nothing is dropped silently.
Trustee evaluates a rule in one of three places, and the export writes all three:

1. **attestation-service policies** (``default_cpu``, ``default_gpu``; set with
   ``kbs-client config set-attestation-policy``): each submodule's ``ear.status`` is
   ``affirming`` only if its evidence is within the hardware rules (the values are written into
   the policy, so no RVPS reference value is needed). Trustee's own defaults never affirm a GPU
   verified by its local NVIDIA verifier (they read NRAS claims) and need RVPS values the
   workload policy does not have (``xfam``, the TDVF event digests); they are replaced.
2. **the resource policy** (``package policy``, ``data.policy.allow``): requires ``cpu0`` and
   *every* ``gpuN`` affirming, exactly ``[gpu] count`` GPU submodules and no other device,
   and checks every hardware rule again on the annotated evidence (so the release never depends
   on the attestation policy alone), the init-data register (allowed init-data digests) and the
   init-data's ``enclave-serve.toml`` declaration (one of the allowed declarations), and that
   the resource asked for is a key resource those declarations name.
3. **the init-data itself**: the model, configuration digest and runtime version cannot be read
   from Trustee's claims (the declaration is TOML text; the configuration digest is computed
   from it). At export time every allowed init-data must declare an allowed model,
   configuration (``pins.config_sha256``) and runtime version; the resource policy then pins
   those documents' digests and declarations.

Claim paths are those of trustee ``78962cd4`` (documented with their sources in
``docs/kbs.md``): the EAR token's submodules (``attestation-service/src/ear_token/broker.rs``:
``cpu0``, ``gpu0``, ``gpu1``, ... one per device, ``transform_claims`` moves ``init_data`` and
``init_data_claims`` to the top of the annotated evidence), the TDX verifier
(``deps/verifier/src/tdx/claims.rs``, DCAP claims ``deps/verifier/src/intel_dcap/claims.rs``),
the SNP verifier (``deps/verifier/src/snp/mod.rs`` ``parse_tee_evidence``) and the local NVIDIA
verifier (``deps/verifier/src/nvidia/mod.rs`` ``NvDeviceReportAndCertClaim``).

Verified here: that the policy's rules can be written for Trustee and that each allowed
init-data declares what the policy allows. Not verified here: that a Trustee deployment
installs all three files (``kbs-client.sh`` does), nor Trustee's own evidence verification.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData, register_for_digest
from attest.tee import insecure_names
from attest.tee.policyparts import ExportRefused, RulePlacement, TrusteeRules, rego_set
from attest.verify.workload import WorkloadPolicy, policy_sections
from foundation.errors import MalformedEvidence

__all__ = [
    "ATTESTATION_POLICY_IDS",
    "ExportRefused",
    "RulePlacement",
    "TrusteeExport",
    "check_init_data",
    "export_policy",
    "kbs_client_script",
]

#: The attestation-policy ids Trustee's built-in AS evaluates per TEE class (policy ``default``
#: + ``_<class>``; ``attestation-service/src/ear_token/broker.rs`` ``issue``).
ATTESTATION_POLICY_IDS = ("default_cpu", "default_gpu")

# AR4SI trust-claim values (draft-ietf-rats-ar4si; the comments of Trustee's
# ear_default_policy_cpu.rego): affirming values, then the defaults when a rule fails.
_AFFIRM = {"executables": 3, "hardware": 2, "configuration": 2}
_FAIL = {"executables": 33, "hardware": 97, "configuration": 36}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrusteeExport:
    """The files of one export: the resource policy and the attestation policies by id."""

    resource_policy: str
    attestation_policies: dict[str, str]
    placements: tuple[RulePlacement, ...]

    def files(self) -> dict[str, str]:
        """Return file name -> text, as ``policy trustee`` writes them."""
        out = {"resource-policy.rego": self.resource_policy}
        for policy_id, text in self.attestation_policies.items():
            out[f"attestation-policy-{policy_id}.rego"] = text
        return out


def _functions(prefix: str, rules: TrusteeRules) -> list[str]:
    lines: list[str] = []
    for claim in ("executables", "hardware", "configuration"):
        body = rules.conditions.get(claim) or ["true"]
        lines += [f"{prefix}_{claim}(c) if {{", *(f"\t{b}" for b in body), "}", ""]
    return lines


def _attestation_policy(tee: str, prefix: str, rules: TrusteeRules) -> list[str]:
    lines = []
    for claim in ("executables", "hardware", "configuration"):
        lines += [
            f"{claim} := {_AFFIRM[claim]} if {{",
            f"\tinput.{tee}",
            f"\t{prefix}_{claim}(input.{tee})",
            "}",
            "",
        ]
    return lines


_AS_HEAD = """# enclave-serve workload policy, exported for Trustee (enclave-serve policy trustee):
# the attestation-service policy {policy_id}. A submodule is "affirming" only if its evidence
# is within the workload policy's hardware rules; otherwise its trust claims keep the
# defaults of Trustee's ear_default_policy_*.rego (not affirming).
package policy

import rego.v1

default executables := {exe}

default hardware := {hw}

default configuration := {cfg}

trust_claims := {{
	"executables": executables,
	"hardware": hardware,
	"configuration": configuration,
	"file-system": 0,
	"instance-identity": 0,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}}

"""


def _as_head(policy_id: str) -> str:
    return _AS_HEAD.format(policy_id=policy_id, exe=_FAIL["executables"], hw=_FAIL["hardware"],
                           cfg=_FAIL["configuration"])  # fmt: skip


def _key_paths(documents: Sequence[InitData]) -> list[list[str]]:
    paths: list[list[str]] = []
    for doc in documents:
        pins = doc.pins
        assert pins is not None  # check_init_data refused documents without the entry
        uri = urlsplit(pins.key_resource)
        segments = uri.path.strip("/").split("/")
        if uri.scheme not in ("kbs", "") or len(segments) != 3 or not all(segments):
            raise ExportRefused(
                "workload.init_data",
                f"{doc.digest_text[:23]}…: key_resource {pins.key_resource!r} is not a kbs:///REPO/TYPE/TAG "
                "resource of a Trustee KBS",
            )
        if segments not in paths:
            paths.append(segments)
    return paths


def check_init_data(policy: WorkloadPolicy, documents: Sequence[InitData]) -> None:
    """Check that every allowed init-data is pinned and declares what ``policy`` allows.

    Each document must be one of ``[workload] init_data``, carry the ``enclave-serve.toml``
    declaration, and declare an allowed model, configuration digest (computed from the
    declaration, as the enclave claims it) and runtime version. At least one document is
    needed: Trustee cannot compute the configuration digest, so the resource policy pins the
    documents checked here.

    Raises:
        ExportRefused: naming the rule (``workload.init_data``, ``workload.model``,
            ``workload.config``, ``workload.runtime_version``) and the document.
    """
    w = policy.workload
    if not documents:
        raise ExportRefused(
            "workload.model",
            "Trustee cannot read the model, configuration and runtime version from its claims: give "
            "every allowed init-data (--init-data FILE, repeatable) so the export can check what each "
            "declares and pin exactly those",
        )
    pinned = {(alg, digest) for alg, digest in (w.init_data or ())}
    for doc in documents:
        name = doc.digest_text[:23] + "…"
        if (doc.algorithm, doc.digest) not in pinned:
            raise ExportRefused(
                "workload.init_data", f"{doc.digest_text} is not one of the policy's init_data pins"
            )
        try:
            pins = doc.pins
        except MalformedEvidence as exc:
            raise ExportRefused("workload.init_data", f"{name}: {exc}") from None
        if pins is None:
            raise ExportRefused(
                "workload.init_data",
                f"{name} has no {ENCLAVE_SERVE_ENTRY} declaration ('enclave-serve initdata')",
            )
        if pins.model not in w.model:
            raise ExportRefused(
                "workload.model", f"{name} declares model {pins.model}, not one the policy allows"
            )
        config = "sha256:" + pins.config_sha256
        if config not in w.config:
            raise ExportRefused(
                "workload.config", f"{name} declares configuration {config}, not one the policy allows"
            )
        version = pins.runtime.get("version")
        if w.runtime_version is not None and version not in w.runtime_version:
            raise ExportRefused(
                "workload.runtime_version",
                f"{name} declares runtime version {version}, not one of {', '.join(w.runtime_version)}",
            )
    missing = pinned - {(d.algorithm, d.digest) for d in documents}
    if missing:
        shown = ", ".join(f"{alg}:{digest.hex()[:16]}…" for alg, digest in sorted(missing))
        raise ExportRefused(
            "workload.init_data",
            f"no init-data given for pin(s) {shown}: the export cannot check what they declare "
            "(give each with --init-data, or remove the pin)",
        )


def export_policy(policy: WorkloadPolicy, documents: Sequence[InitData]) -> TrusteeExport:
    """Return the Trustee files enforcing every rule of ``policy`` for the allowed ``documents``.

    Raises:
        ExportRefused: a rule Trustee cannot enforce, or an init-data the policy does not allow
            (:func:`check_init_data`).
    """
    if policy.insecure_development or insecure_names() & set(policy.tees):
        raise ExportRefused(
            "tee", "an insecure_development policy (sample TEE) cannot be exported for Trustee"
        )
    check_init_data(policy, documents)
    paths = _key_paths(documents)
    placements = [
        RulePlacement("tee", "resource policy: cpu0 annotated evidence is " + " or ".join(policy.tees)),
        RulePlacement("workload.init_data", "resource policy: cpu0 init_data (the register, hex)"),
    ]
    for rule in ("workload.model", "workload.config", "workload.runtime_version"):
        if rule != "workload.runtime_version" or policy.workload.runtime_version is not None:
            placements.append(RulePlacement(
                rule, "export-time check of each init-data; resource policy: cpu0 "
                f"init_data_claims[\"{ENCLAVE_SERVE_ENTRY}\"] is one of those declarations"))  # fmt: skip
    resource = [
        "# enclave-serve workload policy, exported for Trustee (enclave-serve policy trustee).",
        "# The KBS resource policy: set with kbs-client config set-resource-policy (docs/kbs.md).",
        "package policy",
        "",
        "import rego.v1",
        "",
        "default allow := false",
        "",
        "cpu := input.submods.cpu0",
        'ae := cpu["ear.veraison.annotated-evidence"]',
        'gpu_submods := [k | some k, _ in input.submods; regex.match("^gpu[0-9]+$", k)]',
        "",
        "allow if {",
        '\tdata.plugin == "resource"',
        f'\tdata["resource-path"] in {rego_set(paths)}',
        '\tcpu["ear.status"] == "affirming"',
        "\tcpu_ok",
        "\tinit_data_ok",
        "\tgpus_ok",
        "}",
        "",
    ]
    declarations = sorted({doc.data[ENCLAVE_SERVE_ENTRY] for doc in documents})
    attestation: dict[str, str] = {}
    cpu_as: list[str] = []
    functions: list[str] = []
    allowed_init = policy.workload.init_data or ()
    primaries: list[tuple[TeeKind, TrusteeRules]] = []
    devices: list[TrusteeRules] = []
    for b, section in policy_sections():
        rules = policy.rules(section.table)
        if rules is None:
            continue
        if b.device:
            devices.append(section.trustee(rules))
        else:
            primaries.append((b.kind, section.trustee(rules)))
    for kind, rules in primaries:
        tee = rules.claims_key
        placements += rules.placements
        functions += _functions(rules.prefix, rules)
        cpu_as += _attestation_policy(tee, rules.prefix, rules)
        resource += [
            "cpu_ok if {",
            f"\tc := ae.{tee}",
            *(f"\t{rules.prefix}_{claim}(c)" for claim in ("executables", "hardware", "configuration")),
            "}",
            "",
        ]
        registers = [register_for_digest(kind, digest).hex() for _alg, digest in allowed_init]
        resource += [
            "init_data_ok if {",
            f"\tae.{tee}",
            f"\tae.init_data in {rego_set(registers)}",
            f'\tae.init_data_claims["{ENCLAVE_SERVE_ENTRY}"] in allowed_declarations',
            "}",
            "",
        ]
    resource += ["allowed_declarations := {", *(f"\t{json.dumps(d)}," for d in declarations), "}", ""]
    attestation["default_cpu"] = _as_head("default_cpu") + "\n".join(cpu_as + functions)
    if len(devices) > 1:
        raise ExportRefused(
            "gpu", "the policy gives more than one device section; Trustee's gpuN submodules hold one kind"
        )
    device = next((d for d in devices if d.count > 0), None)
    if device is None:
        placements.append(RulePlacement("gpu", "resource policy: no submodule but cpu0"))
        resource += ["gpus_ok if {", "\tcount(input.submods) == 1", "}", ""]
    else:
        placements.append(
            RulePlacement("gpu.count", "resource policy: exactly count gpuN submodules, nothing else")
        )
        placements += device.placements
        gpu_functions = _functions(device.prefix, device)
        attestation["default_gpu"] = _as_head("default_gpu") + "\n".join(
            _attestation_policy(device.claims_key, device.prefix, device) + gpu_functions
        )
        resource += [
            "gpus_ok if {",
            f"\tcount(gpu_submods) == {device.count}",
            f"\tcount(input.submods) == {device.count + 1}",
            "\tevery k in gpu_submods {",
            '\t\tinput.submods[k]["ear.status"] == "affirming"',
            f'\t\t{device.prefix}_ok(input.submods[k]["ear.veraison.annotated-evidence"].{device.claims_key})',
            "\t}",
            "}",
            "",
            f"{device.prefix}_ok(c) if {{",
            *(f"\t{device.prefix}_{claim}(c)" for claim in ("executables", "hardware", "configuration")),
            "}",
            "",
            *gpu_functions,
        ]
    resource += functions
    return TrusteeExport(
        resource_policy="\n".join(resource).rstrip("\n") + "\n",
        attestation_policies={k: v.rstrip("\n") + "\n" for k, v in attestation.items()},
        placements=tuple(placements),
    )


def kbs_client_script(
    export: TrusteeExport, *, kbs_url: str = "https://kbs:8080", cacert: str | None = None
) -> str:
    """Return the ``kbs-client`` commands that install ``export`` (run in its directory).

    ``cacert`` names the PEM file of the KBS's private CA, passed as ``--cert-file`` (None: the
    KBS's certificate is one the system trusts).
    """
    cert = "" if cacert is None else f" --cert-file {cacert}"
    admin = f"kbs-client --url {kbs_url}{cert} config --admin-token-file admin.jwt"
    lines = ["#!/bin/sh", "# Install the enclave-serve export into a Trustee KBS (docs/kbs.md).", "set -e"]
    for policy_id in export.attestation_policies:
        lines.append(
            f"{admin} set-attestation-policy --type rego --id {policy_id} "
            f"--policy-file attestation-policy-{policy_id}.rego"
        )
    lines.append(f"{admin} set-resource-policy --policy-file resource-policy.rego")
    return "\n".join(lines) + "\n"
