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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from attest.evidence import TeeKind
from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData, register_for_digest
from attest.verify.workload import (
    TDX_ATTR_MIGRATABLE,
    GpuRules,
    SnpRules,
    TdxRules,
    WorkloadPolicy,
)
from foundation.errors import ConfigError, MalformedEvidence

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

# TDX ATTRIBUTES.MIGRATABLE (bit 29) lives in byte 3 of the little-endian hex claim
# quote.body.td_attributes, as bit 1 of that byte's high nibble (hex character 6): the nibbles
# with that bit clear. Trustee's td_attributes object has no migratable flag.
_MIGRATABLE_CHAR = 6
_NOT_MIGRATABLE_NIBBLES = ("0", "1", "4", "5", "8", "9", "c", "d")
assert TDX_ATTR_MIGRATABLE == 1 << (8 * 3 + 4 + 1)


class ExportRefused(ConfigError, ValueError):
    """A rule the export cannot enforce in Trustee, or an allowed init-data the policy refuses.

    ``rule`` names the workload-policy rule (as :meth:`WorkloadPolicy.evaluate` does).
    """

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(f"{rule}: {reason}")
        self.rule = rule


@dataclass(frozen=True, slots=True)
class RulePlacement:
    """Where in Trustee one rule of the workload policy is enforced."""

    rule: str
    where: str


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


def _set(values: Iterable[object]) -> str:
    return "{" + ", ".join(json.dumps(v) for v in values) + "}"


@dataclass
class _Rules:
    """Rego conditions per trust claim, over a claims object ``c``, and where each comes from."""

    conditions: dict[str, list[str]]
    placements: list[RulePlacement]

    def add(self, rule: str, claim: str, *conditions: str, where: str) -> None:
        self.conditions.setdefault(claim, []).extend(conditions)
        self.placements.append(RulePlacement(rule, where))


def _tdx_rules(t: TdxRules) -> _Rules:
    out = _Rules({}, [])
    both = "attestation policy default_cpu (ear.status) and resource policy"
    out.add("tdx.mrtd", "hardware", f"c.quote.body.mr_td in {_set(v.hex() for v in t.mrtd)}",
            where=f"{both}: tdx.quote.body.mr_td")  # fmt: skip
    for i, values in enumerate(t.rtmr):
        if values is not None:
            allowed = _set(v.hex() for v in values)
            out.add(f"tdx.rtmr{i}", "executables", f"c.quote.body.rtmr_{i} in {allowed}",
                    where=f"{both}: tdx.quote.body.rtmr_{i}")  # fmt: skip
    out.add("tdx.tcb_status", "hardware", f"c.tcb_status in {_set(t.tcb_status)}",
            where=f"{both}: tdx.tcb_status (DCAP)")  # fmt: skip
    if t.require_collateral:
        out.add("tdx.collateral", "hardware", 'c.collateral_expiration_status == "0"',
                where=f"{both}: tdx.collateral_expiration_status")  # fmt: skip
    else:
        out.placements.append(
            RulePlacement("tdx.collateral", "not required (Trustee always uses collateral)")
        )
    out.add("tdx.debug", "configuration", "c.td_attributes.debug == false",
            where=f"{both}: tdx.td_attributes.debug")  # fmt: skip
    if not t.allow_migratable:
        nibble = f"substring(c.quote.body.td_attributes, {_MIGRATABLE_CHAR}, 1)"
        out.add("tdx.migratable", "configuration", f"{nibble} in {_set(_NOT_MIGRATABLE_NIBBLES)}",
                where=f"{both}: bit 29 of tdx.quote.body.td_attributes")  # fmt: skip
    else:
        out.placements.append(RulePlacement("tdx.migratable", "allowed: nothing to enforce"))
    if t.require_sept_ve_disable:
        out.add("tdx.sept_ve_disable", "configuration", "c.td_attributes.septve_disable == true",
                where=f"{both}: tdx.td_attributes.septve_disable")  # fmt: skip
    else:
        out.placements.append(RulePlacement("tdx.sept_ve_disable", "not required: nothing to enforce"))
    if t.ppid is not None:
        out.add("tdx.ppid", "hardware", f"c.platform_provider_id in {_set(v.hex() for v in t.ppid)}",
                where=f"{both}: tdx.platform_provider_id (the PCK PPID)")  # fmt: skip
    return out


def _snp_rules(s: SnpRules) -> _Rules:
    out = _Rules({}, [])
    both = "attestation policy default_cpu (ear.status) and resource policy"
    if "fmc" in s.min_tcb:
        raise ExportRefused(
            "snp.min_tcb",
            "Trustee's SNP claims carry no FMC SPL (reported_tcb_bootloader, _tee, _snp and _microcode "
            "only; deps/verifier/src/snp/mod.rs parse_tee_evidence), so the fmc floor cannot be "
            "enforced: remove fmc from min_tcb, or release with kbs-dev",
        )
    if s.vmpl != 0:
        raise ExportRefused(
            "snp.vmpl",
            f"Trustee's SNP verifier refuses every report not from VMPL 0, so vmpl = {s.vmpl} would "
            "never be released to",
        )
    out.add("snp.measurement", "executables", f"c.measurement in {_set(v.hex() for v in s.measurement)}",
            where=f"{both}: snp.measurement")  # fmt: skip
    out.add("snp.min_tcb", "hardware",
            *(f"c.reported_tcb_{k} >= {v}" for k, v in s.min_tcb.items()),
            where=f"{both}: snp.reported_tcb_*")  # fmt: skip
    out.add("snp.debug", "configuration", "c.policy_debug_allowed == false",
            where=f"{both}: snp.policy_debug_allowed")  # fmt: skip
    if not s.allow_migration:
        out.add("snp.migration", "configuration", "c.policy_migrate_ma == false",
                where=f"{both}: snp.policy_migrate_ma")  # fmt: skip
    else:
        out.placements.append(RulePlacement("snp.migration", "allowed: nothing to enforce"))
    if not s.allow_smt:
        out.add("snp.smt", "configuration", "c.policy_smt_allowed == false",
                where=f"{both}: snp.policy_smt_allowed")  # fmt: skip
    else:
        out.placements.append(RulePlacement("snp.smt", "allowed: nothing to enforce"))
    out.placements.append(RulePlacement("snp.vmpl", "Trustee's SNP verifier (refuses VMPL != 0)"))
    if s.chip_id is not None:
        out.add("snp.chip_id", "hardware", f"c.chip_id in {_set(v.hex() for v in s.chip_id)}",
                where=f"{both}: snp.chip_id")  # fmt: skip
    return out


def _gpu_rules(g: GpuRules) -> _Rules:
    out = _Rules({}, [])
    both = "attestation policy default_gpu (ear.status) and resource policy, every gpuN"
    # The local verifier only verifies Hopper; its claims: arch, uuid, measurements, config.
    if g.arch is not None:
        out.add("gpu.arch", "hardware", f"upper(c.arch) in {_set(g.arch)}", where=f"{both}: nvidia.arch")
    if g.driver is not None:
        out.add("gpu.driver", "configuration", f"c.config.driver_version in {_set(g.driver)}",
                where=f"{both}: nvidia.config.driver_version")  # fmt: skip
    if g.vbios is not None:
        out.add("gpu.vbios", "configuration", f"lower(c.config.vbios_version) in {_set(g.vbios)}",
                where=f"{both}: nvidia.config.vbios_version")  # fmt: skip
    out.add("gpu.affirming", "hardware", "c.arch", where=f"{both}: ear.status == affirming")
    return out


def _functions(prefix: str, rules: _Rules) -> list[str]:
    lines: list[str] = []
    for claim in ("executables", "hardware", "configuration"):
        body = rules.conditions.get(claim) or ["true"]
        lines += [f"{prefix}_{claim}(c) if {{", *(f"\t{b}" for b in body), "}", ""]
    return lines


def _attestation_policy(tee: str, prefix: str, rules: _Rules) -> list[str]:
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
    if policy.insecure_development or "sample" in policy.tees:
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
        f'\tdata["resource-path"] in {_set(paths)}',
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
    sections: list[tuple[str, TeeKind, _Rules]] = []
    if policy.tdx is not None:
        sections.append(("tdx", TeeKind.TDX, _tdx_rules(policy.tdx)))
    if policy.snp is not None:
        sections.append(("snp", TeeKind.SNP, _snp_rules(policy.snp)))
    for tee, kind, rules in sections:
        placements += rules.placements
        functions += _functions(tee, rules)
        cpu_as += _attestation_policy(tee, tee, rules)
        resource += [
            "cpu_ok if {",
            f"\tc := ae.{tee}",
            *(f"\t{tee}_{claim}(c)" for claim in ("executables", "hardware", "configuration")),
            "}",
            "",
        ]
        registers = [register_for_digest(kind, digest).hex() for _alg, digest in allowed_init]
        resource += [
            "init_data_ok if {",
            f"\tae.{tee}",
            f"\tae.init_data in {_set(registers)}",
            f'\tae.init_data_claims["{ENCLAVE_SERVE_ENTRY}"] in allowed_declarations',
            "}",
            "",
        ]
    resource += ["allowed_declarations := {", *(f"\t{json.dumps(d)}," for d in declarations), "}", ""]
    attestation["default_cpu"] = _as_head("default_cpu") + "\n".join(cpu_as + functions)
    gpu = policy.gpu
    if gpu is None or gpu.count == 0:
        placements.append(RulePlacement("gpu", "resource policy: no submodule but cpu0"))
        resource += ["gpus_ok if {", "\tcount(input.submods) == 1", "}", ""]
    else:
        rules = _gpu_rules(gpu)
        placements.append(
            RulePlacement("gpu.count", "resource policy: exactly count gpuN submodules, nothing else")
        )
        placements += rules.placements
        gpu_functions = _functions("gpu", rules)
        attestation["default_gpu"] = _as_head("default_gpu") + "\n".join(
            _attestation_policy("nvidia", "gpu", rules) + gpu_functions
        )
        resource += [
            "gpus_ok if {",
            f"\tcount(gpu_submods) == {gpu.count}",
            f"\tcount(input.submods) == {gpu.count + 1}",
            "\tevery k in gpu_submods {",
            '\t\tinput.submods[k]["ear.status"] == "affirming"',
            '\t\tgpu_ok(input.submods[k]["ear.veraison.annotated-evidence"].nvidia)',
            "\t}",
            "}",
            "",
            "gpu_ok(c) if {",
            *(f"\tgpu_{claim}(c)" for claim in ("executables", "hardware", "configuration")),
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
