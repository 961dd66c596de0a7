"""One workload policy for both sides of mutual attestation (``docs/policy.md``).

The model provider's key broker and the end user's ``verify`` pin the same things with the same
file: which TEE, which launch measurements (the firmware, kernel and agent the hardware
measured), which CoCo init-data (whose digest the hardware carries in MRCONFIGID / HOST_DATA and
which pins the container image, its arguments and environment through the agent policy), the
TCB floors and TD/guest attributes, optionally which machines, which GPUs, which model, which
run configuration and which runtime version.

A policy is parsed once (:meth:`WorkloadPolicy.from_toml`, strict: an unknown key, an empty
list, a missing required rule, an all-zero init-data pin or an empty file all refuse), or built
in Python, whose constructors enforce exactly the same rules with the same
:class:`PolicyFileError`; it is the only vocabulary that pins measurements (the user's
``verify``, kbs-dev's ``--resource-policy`` and the Trustee export all read it). It is applied to
:class:`WorkloadFacts`, what a verifier has already *established* cryptographically: the verified
evidence of the CPU TEE and of every device, and the workload identity (model, configuration,
init-data) either from the attested claims (the user's side) or from the init-data pins (the key
broker's side). :meth:`WorkloadPolicy.evaluate` applies every rule and returns each outcome, so
a refusal can show everything that failed, not only the first; :meth:`WorkloadPolicy.check`
raises on the first failure.

Verify and validate stay apart: nothing here checks a signature or fetches collateral
(:func:`attest.verify.verify_evidence` did); everything here compares verified claims with the
policy's values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attest.evidence import TeeKind
from attest.initdata import register_for_digest
from attest.tee import BACKENDS, TCB_STATUS_UNKNOWN, NvidiaClaims, SampleClaims, SnpClaims, TdxClaims
from attest.tee.result import VerificationResult
from foundation.errors import ConfigError, PolicyViolation

__all__ = [
    "POLICY_VERSION",
    "GpuRules",
    "PolicyFileError",
    "RuleOutcome",
    "SnpRules",
    "TdxRules",
    "WorkloadFacts",
    "WorkloadPolicy",
    "WorkloadRules",
    "init_data_register_of",
]

#: The policy file format this build reads and writes.
POLICY_VERSION = 1

# TDX module ABI, TDINFO.ATTRIBUTES (Intel TDX Module Base Spec, "TD Attributes").
TDX_ATTR_DEBUG = 1 << 0
TDX_ATTR_SEPT_VE_DISABLE = 1 << 28
TDX_ATTR_MIGRATABLE = 1 << 29
# SEV-SNP ABI spec, Table 9 "Guest Policy Structure".
SNP_POLICY_SMT = 1 << 16
SNP_POLICY_MIGRATE_MA = 1 << 18
SNP_POLICY_DEBUG = 1 << 19

_TEES = {b.name for b in BACKENDS.values() if not b.device}
_TCB_STATUSES = {
    "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
    "OutOfDate", "OutOfDateConfigurationNeeded", TCB_STATUS_UNKNOWN,
}  # fmt: skip


class PolicyFileError(ConfigError, ValueError):
    """Not a valid, complete policy (a file or a policy built in Python); ``str()`` says what to fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleOutcome:
    """One rule applied to the facts."""

    rule: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        """Return ``{"rule", "ok", "detail"}``."""
        return {"rule": self.rule, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadFacts:
    """What a verifier established about one enclave before the policy is applied.

    ``primary`` and ``devices`` are results of :mod:`attest.verify` (signatures, chains and
    binding already checked). ``model_digest``, ``config_sha256`` and ``runtime_version`` come
    from the attested claims (user side) or from the init-data's pins (key broker side); None
    means the side could not learn it, which any rule about it refuses. ``init_data_register`` is
    the value the hardware register holds (TDX MRCONFIGID, SNP HOST_DATA, the sample evidence's
    field). ``allow_insecure`` is the caller's explicit development flag.
    """

    primary: VerificationResult
    devices: tuple[VerificationResult, ...] = ()
    model_digest: str | None = None
    config_sha256: str | None = None
    runtime_version: str | None = None
    #: The key broker's side knows no runtime version, but a pinned configuration digest
    #: includes it: the runtime-version rule is then covered by the configuration rule.
    config_covers_runtime: bool = False
    init_data_register: bytes | None = None
    allow_insecure: bool = False


# -- one set of rules for a policy file and a policy built in Python ---------------------------
#
# Every rule lives in a constructor (``__post_init__`` of the classes below, and
# :func:`_check_policy` for the rules across sections). The TOML parsers only turn TOML values
# into Python values (hex into bytes, ``"alg:hex"`` into ``(alg, digest)``) and refuse what has no
# Python value; so ``WorkloadPolicy.from_toml(text)`` and ``WorkloadPolicy(...)`` refuse the same
# policies, with the same :class:`PolicyFileError` and message.

_REQUIRED = "is required (a partial policy refuses everything)"
#: Digest sizes of the init-data algorithms (``trustee:kbs/docs/initdata.md``).
_INIT_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}


def _set(obj: object, name: str, value: object) -> None:
    # Store the checked (normalised) value of a field of a frozen dataclass in __post_init__.
    object.__setattr__(obj, name, value)


def _listed(value: object, where: str, key: str, what: str) -> tuple[Any, ...]:
    if not isinstance(value, tuple | list) or not value:
        raise PolicyFileError(f"[{where}] {key} must be a non-empty list of {what}")
    return tuple(value)


def _check_strings(value: object, where: str, key: str, *, required: bool) -> tuple[str, ...] | None:
    if value is None:
        if required:
            raise PolicyFileError(f"[{where}] {key} {_REQUIRED}")
        return None
    values = _listed(value, where, key, "strings")
    if not all(isinstance(v, str) and v for v in values):
        raise PolicyFileError(f"[{where}] {key} must be a non-empty list of strings")
    return values


def _check_bytes(
    value: object, where: str, key: str, size: int, *, required: bool
) -> tuple[bytes, ...] | None:
    if value is None:
        if required:
            raise PolicyFileError(f"[{where}] {key} {_REQUIRED}")
        return None
    values = _listed(value, where, key, f"{size}-byte values")
    for v in values:
        if not isinstance(v, bytes):
            raise PolicyFileError(f"[{where}] {key}: {v!r} is not bytes (a policy file gives it in hex)")
        if len(v) != size:
            raise PolicyFileError(f"[{where}] {key}: {v.hex()!r} is {len(v)} bytes, expected {size}")
    return values


def _check_bool(value: object, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyFileError(f"[{where}] {key} must be true or false")
    return value


def _check_int(value: object, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyFileError(f"[{where}] {key} must be a non-negative integer")
    return value


def _check_init_digest(pin: object) -> tuple[str, bytes]:
    """Check one ``init_data`` pin: a known algorithm, its digest size, and not a placeholder."""
    if not (
        isinstance(pin, tuple | list)
        and len(pin) == 2
        and isinstance(pin[0], str)
        and isinstance(pin[1], bytes)
    ):
        raise PolicyFileError(
            f"[workload] init_data: {pin!r} must be an (algorithm, digest) pair (in a policy file "
            '"sha384:<hex>")'
        )
    alg, digest = pin
    if _INIT_DIGEST_SIZES.get(alg) != len(digest):
        raise PolicyFileError(
            f"[workload] init_data: {alg + ':' + digest.hex()!r} must be sha256:, sha384: or sha512: "
            "and the hex digest"
        )
    shown = f"{alg}:{digest.hex()[:16]}…"
    # SNP's HOST_DATA holds the first 32 bytes of the digest (attest.initdata.register_for_digest).
    if not any(digest[:32]):
        raise PolicyFileError(
            f"[workload] init_data: {shown} is zero bytes, what MRCONFIGID/HOST_DATA hold when a VM "
            "is launched with no init-data: the pin would accept any VM the host launches without "
            "init-data, running anything; pin the digest of the deployment's init-data "
            "('enclave-serve initdata' prints it; docs/policy.md)"
        )
    if len(set(digest)) == 1:
        raise PolicyFileError(
            f"[workload] init_data: {shown} is one byte (0x{digest[0]:02x}) repeated, a placeholder, "
            "not the digest of an init-data document; pin the digest 'enclave-serve initdata' prints "
            "(docs/policy.md)"
        )
    return alg, digest


def _check_tees(tees: object, insecure_development: object) -> tuple[str, ...]:
    allowed = _check_strings(tees, "tee", "allowed", required=True)
    assert allowed is not None
    bad = sorted(set(allowed) - _TEES)
    if bad:
        raise PolicyFileError(f"[tee] allowed: unknown TEE(s) {', '.join(bad)} (tdx, snp, sample)")
    insecure = _check_bool(insecure_development, "(top level)", "insecure_development")
    if "sample" in allowed and not insecure:
        raise PolicyFileError(
            "[tee] allows the sample TEE, which proves nothing: add insecure_development = true "
            "(development only)"
        )
    return allowed


def _check_policy(
    tees: object,
    insecure_development: object,
    init_data: object,
    sections: Mapping[str, bool],
) -> tuple[str, ...]:
    """Check the rules across sections; ``sections`` says whether ``[tdx]``/``[snp]`` are given."""
    allowed = _check_tees(tees, insecure_development)
    if set(allowed) - {"sample"} and init_data is None:
        # A hardware TEE without an init-data pin runs whatever container the host chose.
        raise PolicyFileError(f"[workload] init_data {_REQUIRED}")
    for name, given in sections.items():
        if name in allowed and not given:
            raise PolicyFileError(f"[tee] allows {name} but the policy has no [{name}] rules")
        if given and name not in allowed:
            raise PolicyFileError(f"[{name}] is given but [tee] allowed does not include {name}")
    return allowed


# -- TOML values to Python values (no rules here) ----------------------------------------------


def _toml_value(obj: Mapping[str, Any], key: str) -> Any:
    return obj.get(key)  # None when not given: the constructor says it is required


def _toml_list(obj: Mapping[str, Any], key: str) -> Any:
    value = obj.get(key)
    return [value] if isinstance(value, str) else value  # a single string is a list of one


def _toml_hexes(obj: Mapping[str, Any], key: str, where: str) -> Any:
    value = _toml_list(obj, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value  # None (not given), or not a list: the constructor says what is wrong
    out = []
    for v in value:
        try:
            out.append(bytes.fromhex(v))
        except ValueError:
            raise PolicyFileError(f"[{where}] {key}: {v!r} is not hex") from None
    return out


def _toml_init_data(obj: Mapping[str, Any]) -> Any:
    value = _toml_list(obj, "init_data")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value
    out = []
    for v in value:
        alg, sep, hexpart = v.partition(":")
        try:
            digest = bytes.fromhex(hexpart)
        except ValueError:
            sep = ""
        if not sep:
            raise PolicyFileError(
                f"[workload] init_data: {v!r} must be sha256:, sha384: or sha512: and the hex digest"
            )
        out.append((alg, digest))
    return out


def _toml_given(obj: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    # Keys with a default: passed only when the file gives them.
    return {k: _toml_list(obj, k) for k in keys if k in obj}


def _table(obj: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PolicyFileError(f"{key} must be a table ([{key}])")
    return value


def _known(obj: Mapping[str, Any], where: str, keys: Iterable[str]) -> None:
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise PolicyFileError(f"[{where}] has unknown key(s) {', '.join(unknown)} (typo?)")


def _digest(value: str, where: str, key: str) -> str:
    prefix, _, hexpart = value.partition(":")
    if prefix != "sha256" or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise PolicyFileError(f"[{where}] {key}: {value!r} must be sha256:<64 lowercase hex>")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxRules:
    """``[tdx]``: launch measurements, TCB and TD attributes (checked when constructed)."""

    mrtd: tuple[bytes, ...]
    rtmr: tuple[tuple[bytes, ...] | None, ...]  # rtmr0..rtmr3, None = not pinned
    tcb_status: tuple[str, ...] = ("UpToDate",)
    require_collateral: bool = True
    allow_migratable: bool = False
    require_sept_ve_disable: bool = True
    ppid: tuple[bytes, ...] | None = None

    KEYS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "tcb_status", "require_collateral",
            "allow_migratable", "require_sept_ve_disable", "ppid")  # fmt: skip

    def __post_init__(self) -> None:
        """Check every ``[tdx]`` rule. Raises PolicyFileError."""
        statuses = _check_strings(self.tcb_status, "tdx", "tcb_status", required=True)
        assert statuses is not None
        bad = sorted(set(statuses) - _TCB_STATUSES)
        if bad:
            raise PolicyFileError(f"[tdx] tcb_status: unknown status(es) {', '.join(bad)}")
        _set(self, "tcb_status", statuses)
        _set(self, "mrtd", _check_bytes(self.mrtd, "tdx", "mrtd", 48, required=True))
        if not isinstance(self.rtmr, tuple | list) or len(self.rtmr) != 4:
            raise PolicyFileError("[tdx] rtmr must hold rtmr0, rtmr1, rtmr2 and rtmr3 (None: not pinned)")
        rtmr = tuple(_check_bytes(v, "tdx", f"rtmr{i}", 48, required=i < 3) for i, v in enumerate(self.rtmr))
        _set(self, "rtmr", rtmr)
        for key in ("require_collateral", "allow_migratable", "require_sept_ve_disable"):
            _check_bool(getattr(self, key), "tdx", key)
        _set(self, "ppid", _check_bytes(self.ppid, "tdx", "ppid", 16, required=False))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> TdxRules:
        """Parse ``[tdx]``. Raises PolicyFileError."""
        _known(obj, "tdx", cls.KEYS)
        return cls(
            mrtd=_toml_hexes(obj, "mrtd", "tdx"),
            rtmr=tuple(_toml_hexes(obj, f"rtmr{i}", "tdx") for i in range(4)),
            ppid=_toml_hexes(obj, "ppid", "tdx"),
            **_toml_given(
                obj, ("tcb_status", "require_collateral", "allow_migratable", "require_sept_ve_disable")
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpRules:
    """``[snp]``: launch measurement, TCB floor, guest policy and VMPL (checked when constructed)."""

    measurement: tuple[bytes, ...]
    min_tcb: Mapping[str, int]
    vmpl: int = 0
    allow_migration: bool = False
    allow_smt: bool = True
    chip_id: tuple[bytes, ...] | None = None

    KEYS = ("measurement", "min_tcb", "vmpl", "allow_migration", "allow_smt", "chip_id")
    TCB_KEYS = ("bootloader", "tee", "snp", "microcode", "fmc")

    def __post_init__(self) -> None:
        """Check every ``[snp]`` rule. Raises PolicyFileError."""
        _set(self, "measurement", _check_bytes(self.measurement, "snp", "measurement", 48, required=True))
        tcb = self.min_tcb
        if not isinstance(tcb, Mapping):
            raise PolicyFileError(
                "[snp] min_tcb is required, e.g. {bootloader = 10, tee = 0, snp = 23, microcode = 213}"
            )
        _known(tcb, "snp.min_tcb", self.TCB_KEYS)
        if not {"bootloader", "tee", "snp", "microcode"} <= set(tcb):
            raise PolicyFileError("[snp] min_tcb needs bootloader, tee, snp and microcode")
        _set(self, "min_tcb", {k: _check_int(v, "snp.min_tcb", k) for k, v in tcb.items()})
        _check_int(self.vmpl, "snp", "vmpl")
        for key in ("allow_migration", "allow_smt"):
            _check_bool(getattr(self, key), "snp", key)
        _set(self, "chip_id", _check_bytes(self.chip_id, "snp", "chip_id", 64, required=False))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> SnpRules:
        """Parse ``[snp]``. Raises PolicyFileError."""
        _known(obj, "snp", cls.KEYS)
        return cls(
            measurement=_toml_hexes(obj, "measurement", "snp"),
            min_tcb=_toml_value(obj, "min_tcb"),
            chip_id=_toml_hexes(obj, "chip_id", "snp"),
            **_toml_given(obj, ("vmpl", "allow_migration", "allow_smt")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuRules:
    """``[gpu]``: how many GPUs, which architecture and firmware (checked when constructed)."""

    count: int
    arch: tuple[str, ...] | None = None
    driver: tuple[str, ...] | None = None
    vbios: tuple[str, ...] | None = None

    KEYS = ("count", "arch", "driver", "vbios")

    def __post_init__(self) -> None:
        """Check every ``[gpu]`` rule (architectures upper case, VBIOS versions lower case).

        Raises PolicyFileError.
        """
        if self.count is None:
            raise PolicyFileError("[gpu] count is required (the number of GPUs the enclave must attest)")
        count = _check_int(self.count, "gpu", "count")
        arch = _check_strings(self.arch, "gpu", "arch", required=False)
        driver = _check_strings(self.driver, "gpu", "driver", required=count > 0)
        vbios = _check_strings(self.vbios, "gpu", "vbios", required=count > 0)
        _set(self, "arch", None if arch is None else tuple(a.upper() for a in arch))
        _set(self, "driver", driver)
        _set(self, "vbios", None if vbios is None else tuple(v.lower() for v in vbios))

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> GpuRules:
        """Parse ``[gpu]``. Raises PolicyFileError."""
        _known(obj, "gpu", cls.KEYS)
        return cls(
            count=_toml_value(obj, "count"),
            arch=_toml_list(obj, "arch"),
            driver=_toml_list(obj, "driver"),
            vbios=_toml_list(obj, "vbios"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadRules:
    """``[workload]``: the software identity (checked when constructed).

    ``init_data`` is required by :class:`WorkloadPolicy` when a hardware TEE is allowed; a pin
    of zero bytes (or one byte repeated) is refused: a zero register means a VM launched with
    no init-data.
    """

    model: tuple[str, ...]
    config: tuple[str, ...]
    init_data: tuple[tuple[str, bytes], ...] | None = None
    runtime_version: tuple[str, ...] | None = None

    KEYS = ("model", "config", "init_data", "runtime_version")

    def __post_init__(self) -> None:
        """Check every ``[workload]`` rule (a bare hex ``config`` becomes ``sha256:<hex>``).

        Raises PolicyFileError.
        """
        model = _check_strings(self.model, "workload", "model", required=True)
        config = _check_strings(self.config, "workload", "config", required=True)
        assert model is not None and config is not None
        _set(self, "model", tuple(_digest(m, "workload", "model") for m in model))
        _set(
            self,
            "config",
            tuple(_digest(c if ":" in c else "sha256:" + c, "workload", "config") for c in config),
        )
        if self.init_data is not None:
            pins = _listed(self.init_data, "workload", "init_data", "digests")
            _set(self, "init_data", tuple(_check_init_digest(p) for p in pins))
        _set(
            self,
            "runtime_version",
            _check_strings(self.runtime_version, "workload", "runtime_version", required=False),
        )

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> WorkloadRules:
        """Parse ``[workload]``. Raises PolicyFileError."""
        _known(obj, "workload", cls.KEYS)
        return cls(
            model=_toml_list(obj, "model"),
            config=_toml_list(obj, "config"),
            init_data=_toml_init_data(obj),
            runtime_version=_toml_list(obj, "runtime_version"),
        )


def _hex_in(value: bytes, allowed: Sequence[bytes]) -> bool:
    return any(value == a for a in allowed)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPolicy:
    """A workload policy: parsed with :meth:`from_toml` or :meth:`load`, or built in Python.

    Built either way it passes the same checks (an unknown TEE, a missing section, a missing
    ``init_data`` for TDX/SNP, an empty list, a value of the wrong size, a zero init-data pin all
    raise :class:`PolicyFileError` with the same message).
    """

    tees: tuple[str, ...]
    workload: WorkloadRules
    tdx: TdxRules | None = None
    snp: SnpRules | None = None
    gpu: GpuRules | None = None
    insecure_development: bool = False
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        """Check the rules across sections (each section checked itself). Raises PolicyFileError."""
        for name, value, kind in (
            ("workload", self.workload, WorkloadRules),
            ("tdx", self.tdx, TdxRules),
            ("snp", self.snp, SnpRules),
            ("gpu", self.gpu, GpuRules),
        ):
            if not isinstance(value, kind) and (value is not None or name == "workload"):
                raise PolicyFileError(f"[{name}] must be {kind.__name__}, not {type(value).__name__}")
        tees = _check_policy(
            self.tees,
            self.insecure_development,
            self.workload.init_data,
            {"tdx": self.tdx is not None, "snp": self.snp is not None},
        )
        _set(self, "tees", tees)

    # -- parsing ---------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, text: str | bytes, *, source: str = "") -> WorkloadPolicy:
        """Parse a policy file.

        Raises:
            PolicyFileError: not TOML, another version, an unknown key, or a rule missing
                (an empty or partial policy never passes), or any rule the constructor checks.
        """
        try:
            obj = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PolicyFileError(f"the policy is not TOML: {exc}") from None
        if not obj:
            raise PolicyFileError("the policy is empty; an empty policy accepts nothing")
        _known(
            obj, "(top level)", ("version", "insecure_development", "tee", "workload", "tdx", "snp", "gpu")
        )
        if obj.get("version") != POLICY_VERSION:
            raise PolicyFileError(f"version must be {POLICY_VERSION} (got {obj.get('version')!r})")
        tee = _table(obj, "tee")
        if tee is None:
            raise PolicyFileError("[tee] allowed is required: which TEEs may run the workload")
        _known(tee, "tee", ("allowed",))
        tees = _toml_list(tee, "allowed")
        insecure = obj.get("insecure_development", False)
        _check_tees(tees, insecure)  # first: which TEEs decides what else is required
        workload = _table(obj, "workload")
        if workload is None:
            raise PolicyFileError("[workload] is required: model and config pin the software")
        workload_rules = WorkloadRules.parse(workload)
        tables = {name: _table(obj, name) for name in ("tdx", "snp", "gpu")}
        # Before parsing the sections: a section for a TEE not allowed is a mistake, whatever it says.
        _check_policy(
            tees,
            insecure,
            workload_rules.init_data,
            {name: tables[name] is not None for name in ("tdx", "snp")},
        )
        tdx, snp, gpu = tables["tdx"], tables["snp"], tables["gpu"]
        return cls(
            tees=tees,
            workload=workload_rules,
            tdx=None if tdx is None else TdxRules.parse(tdx),
            snp=None if snp is None else SnpRules.parse(snp),
            gpu=None if gpu is None else GpuRules.parse(gpu),
            insecure_development=insecure,
            source=source,
        )

    @classmethod
    def load(cls, path: Path) -> WorkloadPolicy:
        """Read and parse a policy file. Raises PolicyFileError (also for an unreadable file)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PolicyFileError(f"cannot read the policy {path}: {exc.strerror}") from None
        return cls.from_toml(data, source=str(path))

    # -- applying --------------------------------------------------------------------------

    def evaluate(self, facts: WorkloadFacts) -> list[RuleOutcome]:
        """Apply every rule to ``facts`` and return each outcome, in order."""
        out: list[RuleOutcome] = []

        def rule(name: str, check: Callable[[], str]) -> None:
            try:
                out.append(RuleOutcome(rule=name, ok=True, detail=check()))
            except PolicyViolation as exc:
                out.append(RuleOutcome(rule=name, ok=False, detail=str(exc)))

        rule("tee", lambda: self._check_tee(facts))
        claims = facts.primary.claims
        if isinstance(claims, TdxClaims) and self.tdx is not None:
            self._tdx_rules(rule, claims, self.tdx)
        elif isinstance(claims, SnpClaims) and self.snp is not None:
            self._snp_rules(rule, claims, self.snp)
        rule("workload.init_data", lambda: self._check_init_data(facts))
        rule("gpu", lambda: self._check_gpus(facts))
        w = self.workload
        rule("workload.model", lambda: _one_of("model", facts.model_digest, w.model))
        rule("workload.config", lambda: _one_of("configuration", _config(facts.config_sha256), w.config))
        if w.runtime_version is not None and facts.runtime_version is None and facts.config_covers_runtime:
            rule("workload.runtime_version", lambda: "covered by the pinned configuration digest")
        elif w.runtime_version is not None:
            versions = w.runtime_version
            rule(
                "workload.runtime_version",
                lambda: _one_of("runtime version", facts.runtime_version, versions),
            )
        return out

    def check(self, facts: WorkloadFacts) -> list[RuleOutcome]:
        """Apply every rule; return the outcomes if all passed.

        Raises:
            PolicyViolation: naming every failed rule; ``exc.outcomes`` holds all outcomes.
        """
        outcomes = self.evaluate(facts)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            exc = PolicyViolation("; ".join(f"{o.rule}: {o.detail}" for o in failed))
            exc.outcomes = outcomes  # type: ignore[attr-defined]
            raise exc
        return outcomes

    def _check_tee(self, facts: WorkloadFacts) -> str:
        tee = facts.primary.tee.value
        if tee not in self.tees:
            raise PolicyViolation(f"the enclave runs in {tee}, not one of {', '.join(self.tees)}")
        if facts.primary.insecure:
            if not (self.insecure_development and facts.allow_insecure):
                raise PolicyViolation(
                    "the sample TEE proves nothing: it passes only with insecure_development = true in "
                    "the policy AND the explicit --allow-insecure-sample-tee flag"
                )
            return f"{tee} (INSECURE: development only, allowed by the policy and the flag)"
        return f"{tee} is allowed"

    def _tdx_rules(self, rule: Callable[[str, Callable[[], str]], None], c: TdxClaims, r: TdxRules) -> None:
        attributes = int.from_bytes(c.td_attributes, "little")
        rule("tdx.mrtd", lambda: _register("MRTD", c.mrtd, r.mrtd))
        for i, allowed in enumerate(r.rtmr):
            if allowed is not None:
                rule(f"tdx.rtmr{i}", lambda i=i, allowed=allowed: _register(f"RTMR{i}", c.rtmrs[i], allowed))  # type: ignore[misc]

        def tcb() -> str:
            if c.tcb_status not in r.tcb_status:
                hint = (
                    " (no DCAP collateral was given, so the TCB was not checked)"
                    if c.tcb_status == TCB_STATUS_UNKNOWN
                    else ""
                )
                raise PolicyViolation(
                    f"TCB status {c.tcb_status} is not allowed (allowed: {', '.join(r.tcb_status)}){hint}"
                )
            advisories = f", advisories {', '.join(c.advisory_ids)}" if c.advisory_ids else ""
            return f"TCB status {c.tcb_status}{advisories}"

        def collateral() -> str:
            if r.require_collateral and c.tcb_status == TCB_STATUS_UNKNOWN:
                raise PolicyViolation(
                    "DCAP collateral is required (revocation and TCB level are unchecked without it); "
                    "pass --collateral tdx=FILE or set require_collateral = false"
                )
            return (
                "TCB verified with DCAP collateral" if c.tcb_status != TCB_STATUS_UNKNOWN else "not required"
            )

        rule("tdx.tcb_status", tcb)
        rule("tdx.collateral", collateral)
        rule(
            "tdx.debug",
            lambda: _flag_off("the TD is debuggable (ATTRIBUTES.DEBUG)", attributes & TDX_ATTR_DEBUG),
        )

        def migratable() -> str:
            if attributes & TDX_ATTR_MIGRATABLE and not r.allow_migratable:
                raise PolicyViolation(
                    "the TD is migratable (ATTRIBUTES.MIGRATABLE); set allow_migratable = true to accept"
                )
            return "not migratable" if not attributes & TDX_ATTR_MIGRATABLE else "migratable (allowed)"

        def sept() -> str:
            if r.require_sept_ve_disable and not attributes & TDX_ATTR_SEPT_VE_DISABLE:
                raise PolicyViolation(
                    "the TD does not set ATTRIBUTES.SEPT_VE_DISABLE (EPT-violation #VE can be injected)"
                )
            return "SEPT_VE_DISABLE set" if attributes & TDX_ATTR_SEPT_VE_DISABLE else "not required"

        rule("tdx.migratable", migratable)
        rule("tdx.sept_ve_disable", sept)
        if r.ppid is not None:
            ppid = r.ppid
            rule("tdx.ppid", lambda: _machine("PPID", c.ppid, ppid))

    def _snp_rules(self, rule: Callable[[str, Callable[[], str]], None], c: SnpClaims, r: SnpRules) -> None:
        rule("snp.measurement", lambda: _register("MEASUREMENT", c.measurement, r.measurement))

        def tcb() -> str:
            low = []
            for name, floor in r.min_tcb.items():
                value = getattr(c.reported_tcb, name)
                if value is None or value < floor:
                    low.append(f"{name} {value} < {floor}")
            if low:
                raise PolicyViolation(f"reported TCB below the floor: {', '.join(low)}")
            return "reported TCB " + ", ".join(f"{k} {getattr(c.reported_tcb, k)}" for k in r.min_tcb)

        rule("snp.min_tcb", tcb)
        rule("snp.debug", lambda: _flag_off("the guest policy allows debugging", c.policy & SNP_POLICY_DEBUG))

        def migration() -> str:
            if c.policy & SNP_POLICY_MIGRATE_MA and not r.allow_migration:
                raise PolicyViolation("the guest policy allows a migration agent (MIGRATE_MA)")
            return "no migration agent"

        def smt() -> str:
            if c.policy & SNP_POLICY_SMT and not r.allow_smt:
                raise PolicyViolation("the guest policy allows SMT")
            return "SMT " + ("allowed" if c.policy & SNP_POLICY_SMT else "off")

        def vmpl() -> str:
            if c.vmpl != r.vmpl:
                raise PolicyViolation(f"the report comes from VMPL {c.vmpl}, not {r.vmpl}")
            return f"VMPL {c.vmpl}"

        rule("snp.migration", migration)
        rule("snp.smt", smt)
        rule("snp.vmpl", vmpl)
        if r.chip_id is not None:
            chip = r.chip_id
            rule("snp.chip_id", lambda: _machine("CHIP_ID", c.chip_id, chip))

    def _check_init_data(self, facts: WorkloadFacts) -> str:
        allowed = self.workload.init_data
        if allowed is None:
            return "not pinned (sample TEE policy)"
        register = facts.init_data_register
        if register is None:
            raise PolicyViolation("the evidence carries no init-data digest")
        tee = facts.primary.tee
        for alg, digest in allowed:
            if register == register_for_digest(tee, digest):
                return f"{alg}:{digest.hex()} ({_register_name(tee)})"
        raise PolicyViolation(
            f"{_register_name(tee)} {register.hex()} is not the digest of an allowed init-data"
        )

    def _check_gpus(self, facts: WorkloadFacts) -> str:
        gpus = [g for d in facts.devices if isinstance(d.claims, NvidiaClaims) for g in d.claims.gpus]
        samples = [d for d in facts.devices if isinstance(d.claims, SampleClaims)]
        r = self.gpu
        if r is None:
            if gpus or samples:
                found = len(gpus) + len(samples)
                raise PolicyViolation(
                    f"the enclave attests {found} device(s) but the policy has no [gpu] rules"
                )
            return "no GPUs, none expected"
        if samples and not (self.insecure_development and facts.allow_insecure):
            raise PolicyViolation("sample device evidence proves nothing (insecure_development and the flag)")
        if len(gpus) + len(samples) != r.count:
            raise PolicyViolation(
                f"the enclave attests {len(gpus) + len(samples)} GPU(s), the policy expects {r.count}"
            )
        for gpu in gpus:
            if r.arch is not None and gpu.arch.upper() not in r.arch:
                raise PolicyViolation(f"GPU {gpu.uuid} is {gpu.arch}, not one of {', '.join(r.arch)}")
            if r.driver is not None and gpu.driver_version not in r.driver:
                raise PolicyViolation(
                    f"GPU {gpu.uuid} runs driver {gpu.driver_version}, not one of {', '.join(r.driver)}"
                )
            if r.vbios is not None and (gpu.vbios_version or "").lower() not in r.vbios:
                raise PolicyViolation(
                    f"GPU {gpu.uuid} has VBIOS {gpu.vbios_version}, not one of {', '.join(r.vbios)}"
                )
        versions = sorted({f"{g.arch} driver {g.driver_version} VBIOS {g.vbios_version}" for g in gpus})
        return f"{r.count} GPU(s)" + (f": {'; '.join(versions)}" if versions else " (sample devices)")

    # -- presenting ------------------------------------------------------------------------

    def explain(self) -> list[str]:
        """Return the policy as sentences, one per rule (``enclave-serve policy show``)."""
        lines = [f"TEE: {' or '.join(self.tees)}"]
        if self.insecure_development:
            lines.append(
                "INSECURE DEVELOPMENT POLICY: the sample TEE passes (with --allow-insecure-sample-tee)"
            )
        w = self.workload
        lines.append(f"model: one of {', '.join(w.model)}")
        lines.append(f"run configuration: one of {', '.join(w.config)}")
        if w.init_data is not None:
            lines.append("init-data: one of " + ", ".join(f"{a}:{d.hex()}" for a, d in w.init_data))
        if w.runtime_version is not None:
            lines.append(f"runtime version: one of {', '.join(w.runtime_version)}")
        if self.tdx is not None:
            t = self.tdx
            lines.append(f"TDX MRTD: one of {len(t.mrtd)} value(s); RTMRs pinned: "
                         + ", ".join(f"rtmr{i}" for i, v in enumerate(t.rtmr) if v is not None))  # fmt: skip
            lines.append(f"TDX TCB status: {', '.join(t.tcb_status)}; collateral "
                         + ("required" if t.require_collateral else "optional"))  # fmt: skip
            migration = "migratable allowed" if t.allow_migratable else "not migratable"
            sept = "required" if t.require_sept_ve_disable else "optional"
            lines.append(f"TDX attributes: not debuggable; {migration}; SEPT_VE_DISABLE {sept}")
            if t.ppid is not None:
                lines.append(f"TDX machines (PPID): {len(t.ppid)} allowed")
        if self.snp is not None:
            s = self.snp
            lines.append(f"SNP MEASUREMENT: one of {len(s.measurement)} value(s)")
            lines.append("SNP minimum reported TCB: " + ", ".join(f"{k} {v}" for k, v in s.min_tcb.items()))
            agent = "migration agent allowed" if s.allow_migration else "no migration agent"
            lines.append(f"SNP guest: not debuggable; VMPL {s.vmpl}; {agent}")
            if s.chip_id is not None:
                lines.append(f"SNP machines (CHIP_ID): {len(s.chip_id)} allowed")
        if self.gpu is None:
            lines.append("GPUs: none")
        else:
            g = self.gpu
            parts = [f"{g.count} GPU(s)"]
            if g.arch:
                parts.append(f"architecture {', '.join(g.arch)}")
            if g.driver:
                parts.append(f"driver {', '.join(g.driver)}")
            if g.vbios:
                parts.append(f"VBIOS {', '.join(g.vbios)}")
            lines.append("GPUs: " + "; ".join(parts))
        return lines

    def to_toml(self) -> str:
        """Return the policy as TOML (what ``policy record`` writes)."""
        out = [f"version = {POLICY_VERSION}"]
        if self.insecure_development:
            out.append("insecure_development = true  # DEVELOPMENT ONLY: the sample TEE proves nothing")
        out += ["", "[tee]", f"allowed = {_list(self.tees)}", "", "[workload]"]
        w = self.workload
        out.append(f"model = {_list(w.model)}")
        out.append(f"config = {_list(w.config)}")
        if w.init_data is not None:
            out.append(f"init_data = {_list(f'{a}:{d.hex()}' for a, d in w.init_data)}")
        if w.runtime_version is not None:
            out.append(f"runtime_version = {_list(w.runtime_version)}")
        if self.tdx is not None:
            t = self.tdx
            out += ["", "[tdx]", f"mrtd = {_list(v.hex() for v in t.mrtd)}"]
            out += [
                f"rtmr{i} = {_list(v.hex() for v in vals)}"
                for i, vals in enumerate(t.rtmr)
                if vals is not None
            ]
            out.append(f"tcb_status = {_list(t.tcb_status)}")
            out.append(f"require_collateral = {_bool_text(t.require_collateral)}")
            out.append(f"allow_migratable = {_bool_text(t.allow_migratable)}")
            out.append(f"require_sept_ve_disable = {_bool_text(t.require_sept_ve_disable)}")
            if t.ppid is not None:
                out.append(f"ppid = {_list(v.hex() for v in t.ppid)}")
        if self.snp is not None:
            s = self.snp
            out += ["", "[snp]", f"measurement = {_list(v.hex() for v in s.measurement)}"]
            out.append("min_tcb = { " + ", ".join(f"{k} = {v}" for k, v in s.min_tcb.items()) + " }")
            out.append(f"vmpl = {s.vmpl}")
            out.append(f"allow_migration = {_bool_text(s.allow_migration)}")
            out.append(f"allow_smt = {_bool_text(s.allow_smt)}")
            if s.chip_id is not None:
                out.append(f"chip_id = {_list(v.hex() for v in s.chip_id)}")
        if self.gpu is not None:
            g = self.gpu
            out += ["", "[gpu]", f"count = {g.count}"]
            for key in ("arch", "driver", "vbios"):
                value = getattr(g, key)
                if value is not None:
                    out.append(f"{key} = {_list(value)}")
        return "\n".join(out) + "\n"


def init_data_register_of(result: VerificationResult) -> bytes | None:
    """Return the init-data register of verified primary evidence (MRCONFIGID, HOST_DATA)."""
    register = BACKENDS[result.tee].init_data
    return None if register is None else register.of_claims(result.claims)


def _list(values: Iterable[str]) -> str:
    import json

    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def _config(value: str | None) -> str | None:
    return None if value is None else (value if value.startswith("sha256:") else "sha256:" + value)


def _one_of(what: str, value: str | None, allowed: Sequence[str]) -> str:
    if value is None:
        raise PolicyViolation(f"the {what} is not known on this side (nothing attests or pins it)")
    if value not in allowed:
        raise PolicyViolation(f"the {what} is {value}, not one the policy allows")
    return value


def _register(name: str, value: bytes, allowed: Sequence[bytes]) -> str:
    if not _hex_in(value, allowed):
        raise PolicyViolation(f"{name} {value.hex()} is not one of the {len(allowed)} allowed value(s)")
    return f"{name} {value.hex()[:16]}… matches"


def _machine(name: str, value: bytes | None, allowed: Sequence[bytes]) -> str:
    if value is None or not _hex_in(value, allowed):
        shown = "unknown" if value is None else value.hex()
        raise PolicyViolation(f"{name} {shown} is not an allowed machine")
    return f"{name} {value.hex()[:16]}… is allowed"


def _flag_off(problem: str, bit: int) -> str:
    if bit:
        raise PolicyViolation(problem)
    return "off"


def _register_name(tee: TeeKind) -> str:
    register = BACKENDS[tee].init_data
    return "init_data" if register is None else register.name
