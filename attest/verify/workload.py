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
from attest.tee import (
    BACKENDS,
    SNP_POLICY_DEBUG,
    SNP_POLICY_MIGRATE_MA,
    SNP_POLICY_SMT,
    TDX_ATTR_DEBUG,
    TDX_ATTR_MIGRATABLE,
    TDX_ATTR_SEPT_VE_DISABLE,
    GpuRules,
    PolicySection,
    SnpRules,
    TdxRules,
    TeeBackend,
)
from attest.tee.policyparts import (
    REQUIRED,
    PolicyFileError,
    check_bool,
    check_strings,
    known,
    listed,
    set_field,
    toml_list,
    toml_list_text,
)
from attest.tee.result import VerificationResult
from foundation.errors import PolicyViolation

__all__ = [
    "POLICY_VERSION",
    "SNP_POLICY_DEBUG",
    "SNP_POLICY_MIGRATE_MA",
    "SNP_POLICY_SMT",
    "TDX_ATTR_DEBUG",
    "TDX_ATTR_MIGRATABLE",
    "TDX_ATTR_SEPT_VE_DISABLE",
    "GpuRules",
    "PolicyFileError",
    "RuleOutcome",
    "SnpRules",
    "TdxRules",
    "WorkloadFacts",
    "WorkloadPolicy",
    "WorkloadRules",
    "init_data_register_of",
    "policy_sections",
]

#: The policy file format this build reads and writes.
POLICY_VERSION = 1

# The sections of the registry's TEEs that a WorkloadPolicy also takes as keyword arguments
# (``WorkloadPolicy(tdx=TdxRules(...))``) and fields; any other section is in ``sections``.
# ``TdxRules``, ``SnpRules``, ``GpuRules`` and the attribute bits above are re-exported from their
# folders (``attest/tee/<tee>/policy.py``) for the code that imports them from here.
_NAMED_SECTIONS = ("tdx", "snp", "gpu")


def policy_sections() -> list[tuple[TeeBackend, PolicySection]]:
    """Return every backend with a workload-policy section, and its section, in registry order."""
    return [(b, b.policy) for b in BACKENDS.values() if b.policy is not None]


def _primary_names() -> list[str]:
    return [b.name for b in BACKENDS.values() if not b.device]


def _insecure_names() -> set[str]:
    return {b.name for b in BACKENDS.values() if b.insecure}


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
# Every rule lives in a constructor (``__post_init__`` of the classes below and of each TEE's
# section in its folder, and :func:`_check_policy` for the rules across sections). The TOML
# parsers only turn TOML values into Python values (hex into bytes, ``"alg:hex"`` into
# ``(alg, digest)``) and refuse what has no Python value; so ``WorkloadPolicy.from_toml(text)``
# and ``WorkloadPolicy(...)`` refuse the same policies, with the same :class:`PolicyFileError`
# and message.

#: Digest sizes of the init-data algorithms (``trustee:kbs/docs/initdata.md``).
_INIT_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}


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
    allowed = check_strings(tees, "tee", "allowed", required=True)
    assert allowed is not None
    names = _primary_names()
    bad = sorted(set(allowed) - set(names))
    if bad:
        raise PolicyFileError(f"[tee] allowed: unknown TEE(s) {', '.join(bad)} ({', '.join(names)})")
    insecure = check_bool(insecure_development, "(top level)", "insecure_development")
    if set(allowed) & _insecure_names() and not insecure:
        raise PolicyFileError(
            "[tee] allows the sample TEE, which proves nothing: add insecure_development = true "
            "(development only)"
        )
    return allowed


def _check_policy(
    tees: object,
    insecure_development: object,
    init_data: object,
    given: Iterable[str],
) -> tuple[str, ...]:
    """Check the rules across sections; ``given`` names the section tables the policy gives."""
    allowed = _check_tees(tees, insecure_development)
    if set(allowed) - _insecure_names() and init_data is None:
        # A hardware TEE without an init-data pin runs whatever container the host chose.
        raise PolicyFileError(f"[workload] init_data {REQUIRED}")
    given = set(given)
    for b, section in policy_sections():
        if b.device:
            continue
        name, table = b.name, section.table
        if name in allowed and table not in given:
            raise PolicyFileError(f"[tee] allows {name} but the policy has no [{table}] rules")
        if table in given and name not in allowed:
            raise PolicyFileError(f"[{table}] is given but [tee] allowed does not include {name}")
    return allowed


# -- TOML values to Python values (no rules here) ----------------------------------------------


def _toml_init_data(obj: Mapping[str, Any]) -> Any:
    value = toml_list(obj, "init_data")
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


def _table(obj: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PolicyFileError(f"{key} must be a table ([{key}])")
    return value


def _digest(value: str, where: str, key: str) -> str:
    prefix, _, hexpart = value.partition(":")
    if prefix != "sha256" or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
        raise PolicyFileError(f"[{where}] {key}: {value!r} must be sha256:<64 lowercase hex>")
    return value


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
        model = check_strings(self.model, "workload", "model", required=True)
        config = check_strings(self.config, "workload", "config", required=True)
        assert model is not None and config is not None
        set_field(self, "model", tuple(_digest(m, "workload", "model") for m in model))
        set_field(
            self,
            "config",
            tuple(_digest(c if ":" in c else "sha256:" + c, "workload", "config") for c in config),
        )
        if self.init_data is not None:
            pins = listed(self.init_data, "workload", "init_data", "digests")
            set_field(self, "init_data", tuple(_check_init_digest(p) for p in pins))
        set_field(
            self,
            "runtime_version",
            check_strings(self.runtime_version, "workload", "runtime_version", required=False),
        )

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> WorkloadRules:
        """Parse ``[workload]``. Raises PolicyFileError."""
        known(obj, "workload", cls.KEYS)
        return cls(
            model=toml_list(obj, "model"),
            config=toml_list(obj, "config"),
            init_data=_toml_init_data(obj),
            runtime_version=toml_list(obj, "runtime_version"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPolicy:
    """A workload policy: parsed with :meth:`from_toml` or :meth:`load`, or built in Python.

    Built either way it passes the same checks (an unknown TEE, a missing section, a missing
    ``init_data`` for TDX/SNP, an empty list, a value of the wrong size, a zero init-data pin all
    raise :class:`PolicyFileError` with the same message).

    Each TEE section is its TEE's (:attr:`attest.tee.base.TeeBackend.policy`): parsed, applied,
    explained and written by it; :meth:`rules` returns one by its table. ``tdx``, ``snp`` and
    ``gpu`` hold those sections; ``sections`` holds any other by its table (given there, a
    ``tdx``/``snp``/``gpu`` entry moves to its field).
    """

    tees: tuple[str, ...]
    workload: WorkloadRules
    tdx: TdxRules | None = None
    snp: SnpRules | None = None
    gpu: GpuRules | None = None
    insecure_development: bool = False
    source: str = field(default="", compare=False)
    sections: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the rules across sections (each section checked itself). Raises PolicyFileError."""
        if not isinstance(self.workload, WorkloadRules):
            raise PolicyFileError(f"[workload] must be WorkloadRules, not {type(self.workload).__name__}")
        if not isinstance(self.sections, Mapping):
            raise PolicyFileError(f"sections must be a mapping, not {type(self.sections).__name__}")
        extra = dict(self.sections)
        for name in _NAMED_SECTIONS:
            if name in extra:
                value = extra.pop(name)
                if getattr(self, name) not in (None, value):
                    raise PolicyFileError(f"[{name}] is given twice (as {name}= and in sections)")
                set_field(self, name, value)
        given = {n: v for n in _NAMED_SECTIONS if (v := getattr(self, n)) is not None} | extra
        known_sections = {section.table: section for _b, section in policy_sections()}
        unknown = sorted(set(given) - set(known_sections))
        if unknown:
            raise PolicyFileError(
                f"unknown section(s) {', '.join(f'[{u}]' for u in unknown)} "
                f"(known: {', '.join(f'[{t}]' for t in known_sections)})"
            )
        for table, value in given.items():
            kind = known_sections[table].rules_type
            if not isinstance(value, kind):
                raise PolicyFileError(f"[{table}] must be {kind.__name__}, not {type(value).__name__}")
        set_field(self, "sections", {t: extra[t] for t in known_sections if t in extra})
        ordered = [t for t in known_sections if t in given]
        tees = _check_policy(self.tees, self.insecure_development, self.workload.init_data, ordered)
        set_field(self, "tees", tees)

    def rules(self, table: str) -> object | None:
        """Return the rules of the section ``table`` (``"tdx"``), or None when not given."""
        if table in _NAMED_SECTIONS:
            value: object | None = getattr(self, table)
            return value
        return self.sections.get(table)

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
        sections = policy_sections()
        known(
            obj,
            "(top level)",
            ("version", "insecure_development", "tee", "workload", *(s.table for _b, s in sections)),
        )
        if obj.get("version") != POLICY_VERSION:
            raise PolicyFileError(f"version must be {POLICY_VERSION} (got {obj.get('version')!r})")
        tee = _table(obj, "tee")
        if tee is None:
            raise PolicyFileError("[tee] allowed is required: which TEEs may run the workload")
        known(tee, "tee", ("allowed",))
        tees = toml_list(tee, "allowed")
        insecure = obj.get("insecure_development", False)
        _check_tees(tees, insecure)  # first: which TEEs decides what else is required
        workload = _table(obj, "workload")
        if workload is None:
            raise PolicyFileError("[workload] is required: model and config pin the software")
        workload_rules = WorkloadRules.parse(workload)
        tables = {s.table: _table(obj, s.table) for _b, s in sections}
        # Before parsing the sections: a section for a TEE not allowed is a mistake, whatever it says.
        _check_policy(
            tees, insecure, workload_rules.init_data, [t for t, v in tables.items() if v is not None]
        )
        parsed = {s.table: s.parse(v) for _b, s in sections if (v := tables[s.table]) is not None}
        return cls(
            tees=tees,
            workload=workload_rules,
            sections=parsed,
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
        """Apply every rule to ``facts`` and return each outcome, in order.

        The order: ``tee``; the primary TEE's section (its backend's, on its verified claims);
        ``workload.init_data``; every device section (on every device's claims, given or not);
        ``workload.model``, ``workload.config`` and ``workload.runtime_version``.
        """
        out: list[RuleOutcome] = []

        def rule(name: str, check: Callable[[], str]) -> None:
            try:
                out.append(RuleOutcome(rule=name, ok=True, detail=check()))
            except PolicyViolation as exc:
                out.append(RuleOutcome(rule=name, ok=False, detail=str(exc)))

        allow_insecure = self.insecure_development and facts.allow_insecure
        rule("tee", lambda: self._check_tee(facts))
        primary = BACKENDS[facts.primary.tee].policy
        if primary is not None and (rules := self.rules(primary.table)) is not None:
            primary.evaluate(rule, rules, (facts.primary,), allow_insecure=allow_insecure)
        rule("workload.init_data", lambda: self._check_init_data(facts))
        for b, section in policy_sections():
            if b.device:
                section.evaluate(
                    rule, self.rules(section.table), facts.devices, allow_insecure=allow_insecure
                )
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
        for _b, section in policy_sections():
            lines += section.explain(self.rules(section.table))
        return lines

    def to_toml(self) -> str:
        """Return the policy as TOML (what ``policy record`` writes)."""
        out = [f"version = {POLICY_VERSION}"]
        if self.insecure_development:
            out.append("insecure_development = true  # DEVELOPMENT ONLY: the sample TEE proves nothing")
        out += ["", "[tee]", f"allowed = {toml_list_text(self.tees)}", "", "[workload]"]
        w = self.workload
        out.append(f"model = {toml_list_text(w.model)}")
        out.append(f"config = {toml_list_text(w.config)}")
        if w.init_data is not None:
            out.append(f"init_data = {toml_list_text(f'{a}:{d.hex()}' for a, d in w.init_data)}")
        if w.runtime_version is not None:
            out.append(f"runtime_version = {toml_list_text(w.runtime_version)}")
        for _b, section in policy_sections():
            rules = self.rules(section.table)
            if rules is not None:
                out += ["", *section.to_toml(rules)]
        return "\n".join(out) + "\n"


def init_data_register_of(result: VerificationResult) -> bytes | None:
    """Return the init-data register of verified primary evidence (MRCONFIGID, HOST_DATA)."""
    register = BACKENDS[result.tee].init_data
    return None if register is None else register.of_claims(result.claims)


def _config(value: str | None) -> str | None:
    return None if value is None else (value if value.startswith("sha256:") else "sha256:" + value)


def _one_of(what: str, value: str | None, allowed: Sequence[str]) -> str:
    if value is None:
        raise PolicyViolation(f"the {what} is not known on this side (nothing attests or pins it)")
    if value not in allowed:
        raise PolicyViolation(f"the {what} is {value}, not one the policy allows")
    return value


def _register_name(tee: TeeKind) -> str:
    register = BACKENDS[tee].init_data
    return "init_data" if register is None else register.name
