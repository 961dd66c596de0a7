"""The runtime's environment: an allowlist, applied before vLLM is imported.

The host writes the pod spec, so every environment variable is hostile input. vLLM, PyTorch,
Triton, NCCL, Hugging Face libraries, OpenSSL and the C library all change behaviour through
variables (``VLLM_SERVER_DEV_MODE`` opens development routes that can dump the weights;
``VLLM_PLUGINS`` picks the code that loads; ``LD_PRELOAD`` and ``PYTHONPATH`` run host code).
:func:`decide_environment` sorts every variable into one of four classes:

* **allowed**: sizes, thread counts, device selection, locale, timeouts (:data:`ALLOWED`, some
  with a value check: paths compared by whole components, locale and time zone by name, never
  a path). They are kept. Their values go into the attested configuration, and under an
  init-data must be the declared ones, except the :data:`OPERATIONAL` few (log looks, the
  system CA store, timeouts), each with the reason it cannot change what a verifier accepts.
* **forced**: set by the runtime whatever the host says (:data:`FORCED`): offline Hugging Face,
  no usage statistics, only enclave-serve's vLLM plugin, spawned (not forked) workers, a fixed
  ``PATH``, and ``HOME``/``TMPDIR``/every cache directory inside the guest-private directory.
  Attested, with private paths written as ``<private>/…``.
* **refused**: anything security-relevant, by name (:data:`REFUSED`, with the reason) or by
  prefix (:data:`REFUSED_PREFIXES`: vLLM, Python, the dynamic linker, PyTorch, Triton, NCCL,
  CUDA, Hugging Face, OpenSSL… not on the allowlist). The boot stops at stage ``config``,
  naming every refused variable.
* **removed**: everything else (``HOSTNAME``, Kubernetes service variables…) is deleted from the
  environment, so it has no effect on anything the runtime starts; the names are logged.

.. warning::
   Variables that act when a process *starts* (``LD_PRELOAD``, ``PYTHONPATH``,
   ``PYTHONSTARTUP``, ``GLIBC_TUNABLES``…) have already acted on the runtime's own interpreter
   by the time this runs: refusing them makes the misconfiguration loud, but only the agent
   policy (which pins the container's environment) can prevent them. The container image runs
   the interpreter isolated (``python -I``), which ignores every ``PYTHON*`` variable.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

from foundation.errors import ConfigError

__all__ = [
    "ALLOWED",
    "FORCED",
    "OPERATIONAL",
    "PRIVATE_PLACEHOLDER",
    "REDACTED",
    "REFUSED",
    "REFUSED_PREFIXES",
    "SECRET_VALUES",
    "EnvironmentDecision",
    "apply_environment",
    "check_declared_environment",
    "decide_environment",
]

#: How private (per-boot) paths appear in the attested configuration.
PRIVATE_PLACEHOLDER = "<private>"
#: How secret values (an API key) appear in the attested configuration.
REDACTED = "<redacted>"

Check = Callable[[str], str | None]  # returns why a value is refused, or None


def _one_of(*values: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in values else f"must be one of {', '.join(values)}"

    return check


def _number(value: str) -> str | None:
    try:
        float(value)
    except ValueError:
        return "must be a number"
    return None


#: The image's system library directories, as CUDA base images put them on LD_LIBRARY_PATH.
_SYSTEM_LIBRARY_ROOTS = (("usr",), ("lib",), ("lib32",), ("lib64",), ("opt", "nvidia"))
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", re.ASCII)


def _system_dirs(value: str) -> str | None:
    """Every entry an absolute path under one of :data:`_SYSTEM_LIBRARY_ROOTS`, by whole components.

    The dynamic linker splits on ``:`` and ``;``, reads an empty entry as the working directory
    and expands ``$ORIGIN``; ``..`` is resolved by the kernel, through symbolic links. So each
    entry must be absolute, made of plain components (no ``.``, ``..``, ``$``), and start with
    a root's components (``/usr/lib`` yes, ``/usr/../models/lib`` and ``/libhost`` no).
    """
    if value == "":
        return None  # the linker ignores an empty LD_LIBRARY_PATH
    for entry in re.split(r"[:;]", value):
        if not entry.startswith("/"):
            return (
                "every entry must be an absolute path (an empty or relative entry is the working directory)"
            )
        parts = [p for p in entry.split("/") if p]
        if not all(_PATH_COMPONENT.fullmatch(p) for p in parts):
            return "entries must be plain paths (no '.', '..', '$' or unusual characters)"
        if not any(tuple(parts[: len(root)]) == root for root in _SYSTEM_LIBRARY_ROOTS):
            return (
                "an entry is outside the image's system library directories "
                "(/usr, /lib, /lib32, /lib64, /opt/nvidia)"
            )
    return None


def _cuda_home(value: str) -> str | None:
    matched = re.fullmatch(r"/usr/local/cuda(-[0-9]+(\.[0-9]+)*)?/?", value, re.ASCII)
    return None if matched else "must be /usr/local/cuda or /usr/local/cuda-<version>"


# A time zone by name, looked up under /usr/share/zoneinfo (TZDIR is not allowed): glibc reads
# a value that starts with ':' or '/', or that climbs with '..', as a file anywhere.
_TZ_NAME = re.compile(r"[A-Za-z0-9_+-]{1,32}(/[A-Za-z0-9_+-]{1,32}){0,2}", re.ASCII)
# language[_territory][.codeset][@modifier], or C / POSIX: glibc reads a name with '/' as a path.
_LOCALE_NAME = re.compile(
    r"[A-Za-z]{1,8}(_[A-Za-z0-9]{1,8})?(\.[A-Za-z0-9-]{1,16})?(@[A-Za-z0-9]{1,16})?", re.ASCII
)


def _time_zone(value: str) -> str | None:
    if value == "" or _TZ_NAME.fullmatch(value):  # empty: UTC
        return None
    return "must be a time zone name such as UTC or Europe/Paris (no path, no ':' form, no '..')"


def _locale(value: str) -> str | None:
    if value == "" or _LOCALE_NAME.fullmatch(value):  # empty: as if unset
        return None
    return "must be a locale name such as C.UTF-8 or en_US.UTF-8 (no path)"


def _languages(value: str) -> str | None:
    """``LANGUAGE``: gettext's ``:``-separated list of locale names."""
    if value == "" or all(_LOCALE_NAME.fullmatch(item) for item in value.split(":")):
        return None
    return "must be locale names separated by ':' such as en_US:en (no path, no empty entry)"


_SYSTEM_CA_STORES = frozenset(
    {
        "/etc/ssl/certs",
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs",
        "/etc/pki/tls/certs/ca-bundle.crt",
    }
)


def _system_ca_store(value: str) -> str | None:
    if value in _SYSTEM_CA_STORES:
        return None
    return "must name the system CA store (/etc/ssl/certs…): another value changes what TLS trusts"


def _any(value: str) -> str | None:
    return None


#: Variables kept as they are (value attested), with the check their value must pass.
ALLOWED: Mapping[str, Check] = {
    # vLLM sizing, timeouts and log verbosity (DEBUG is refused: it can log request contents).
    "VLLM_CPU_KVCACHE_SPACE": _number,
    "VLLM_CPU_OMP_THREADS_BIND": _any,
    "VLLM_CPU_NUM_OF_RESERVED_CPU": _number,
    "VLLM_ENGINE_READY_TIMEOUT_S": _number,
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": _number,
    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": _number,
    "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": _number,
    "VLLM_LOG_STATS_INTERVAL": _number,
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": _one_of("0", "1"),
    "VLLM_LOGGING_LEVEL": _one_of("INFO", "WARNING", "ERROR", "CRITICAL"),
    "VLLM_LOGGING_COLOR": _one_of("0", "1"),
    "VLLM_DISABLE_LOG_LOGO": _one_of("0", "1"),
    "VLLM_API_KEY": _any,  # the API's bearer token: attested as <redacted>
    # Threads.
    "OMP_NUM_THREADS": _number,
    "MKL_NUM_THREADS": _number,
    "OPENBLAS_NUM_THREADS": _number,
    "TOKENIZERS_PARALLELISM": _one_of("true", "false"),
    # Devices (which GPUs; the attestation covers every GPU it collects evidence for).
    "CUDA_VISIBLE_DEVICES": _any,
    "CUDA_DEVICE_ORDER": _one_of("FASTEST_FIRST", "PCI_BUS_ID"),
    "CUDA_MODULE_LOADING": _one_of("LAZY", "EAGER"),
    "CUDA_VERSION": _any,
    "CUDA_HOME": _cuda_home,
    "NVIDIA_VISIBLE_DEVICES": _any,
    "NVIDIA_DRIVER_CAPABILITIES": _any,
    "NVIDIA_REQUIRE_CUDA": _any,
    "NVIDIA_PRODUCT_NAME": _any,
    "TORCH_CUDA_ARCH_LIST": _any,
    "LD_LIBRARY_PATH": _system_dirs,
    "NCCL_DEBUG": _one_of("VERSION", "WARN", "INFO"),
    "NCCL_P2P_DISABLE": _one_of("0", "1"),
    "NCCL_SHM_DISABLE": _one_of("0", "1"),
    "NCCL_IB_DISABLE": _one_of("0", "1"),
    "NCCL_CUMEM_ENABLE": _one_of("0", "1"),
    # The interpreter's output and hardening switches (they can only reduce what Python does).
    "PYTHONUNBUFFERED": _any,
    "PYTHONDONTWRITEBYTECODE": _any,
    "PYTHONIOENCODING": _any,
    "PYTHONUTF8": _one_of("0", "1"),
    "PYTHONNOUSERSITE": _any,
    "PYTHONSAFEPATH": _any,
    "PYTHONHASHSEED": _any,
    "PYTHONFAULTHANDLER": _any,
    # The system CA store, as base images set it (any other value changes what TLS trusts).
    "SSL_CERT_FILE": _system_ca_store,
    "SSL_CERT_DIR": _system_ca_store,
    "REQUESTS_CA_BUNDLE": _system_ca_store,
    "CURL_CA_BUNDLE": _system_ca_store,
    # Locale and time: names only (a path would make the C library read a host file).
    "LANG": _locale,
    "LANGUAGE": _languages,
    "LC_ALL": _locale,
    "LC_CTYPE": _locale,
    "TZ": _time_zone,
    "NO_COLOR": _any,
}

#: Allowed variables left out of the attestation, each with why that is safe: their checks
#: already hold them to values that change only how output looks, what the process's own
#: interpreter skips, how long it waits, or hints the container toolkit reads outside the guest.
#: They are kept whatever the init-data says and never declared in it. Every other allowed
#: variable is attested: it must be declared (``initdata --env``), with the same value.
OPERATIONAL: Mapping[str, str] = {
    **dict.fromkeys(
        ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONNOUSERSITE",
         "PYTHONSAFEPATH", "PYTHONFAULTHANDLER", "PYTHONUTF8"),
        "output buffering and encoding, or switches that only make the interpreter do less",
    ),
    **dict.fromkeys(
        ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"),
        "only the image's system CA store is allowed, so every allowed value means the same store",
    ),
    **dict.fromkeys(
        ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ"),
        "locale and time-zone names (never a path): how logs look",
    ),
    **dict.fromkeys(
        ("NO_COLOR", "VLLM_LOGGING_COLOR", "VLLM_DISABLE_LOG_LOGO", "VLLM_LOG_STATS_INTERVAL"),
        "log colours, banner and statistics interval: how logs look",
    ),
    **dict.fromkeys(
        ("VLLM_ENGINE_READY_TIMEOUT_S", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE",
         "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"),
        "how long the server waits: availability only",
    ),
    **dict.fromkeys(
        ("NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA",
         "NVIDIA_PRODUCT_NAME", "CUDA_VERSION"),
        "read by the container toolkit outside the guest, or informational (CUDA base images set them); "
        "the GPU gate attests every GPU whatever they say",
    ),
}  # fmt: skip

#: Allowed variables whose value is a secret: attested as :data:`REDACTED`.
SECRET_VALUES = frozenset({"VLLM_API_KEY"})

#: Variables the runtime sets itself. ``{private}`` is the guest-private directory.
FORCED: Mapping[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    # Only enclave-serve's plugin loads (vLLM's own LoRA resolvers and any other installed
    # plugin stay off), in every vLLM process.
    "VLLM_PLUGINS": "enclave_serve_loader",
    # Workers are spawned, never forked: a fork would copy the runtime's memory (the model key,
    # the TLS key) into them; the engine runs in its own process, the key handoff's peer.
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "VLLM_CONFIGURE_LOGGING": "1",
    "PATH": "{python}:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "{private}/home",
    "TMPDIR": "{private}/tmp",
    "TEMP": "{private}/tmp",
    "TMP": "{private}/tmp",
    "XDG_CACHE_HOME": "{private}/cache",
    "XDG_CONFIG_HOME": "{private}/config",
    "XDG_DATA_HOME": "{private}/home/.local/share",
    "XDG_RUNTIME_DIR": "{private}/tmp",
    "HF_HOME": "{private}/cache/huggingface",
    "TORCH_HOME": "{private}/cache/torch",
    "TORCHINDUCTOR_CACHE_DIR": "{private}/cache/torchinductor",
    "TRITON_CACHE_DIR": "{private}/cache/triton",
    "CUDA_CACHE_PATH": "{private}/cache/nv",
    "VLLM_CACHE_ROOT": "{private}/cache/vllm",
    "VLLM_CONFIG_ROOT": "{private}/config/vllm",
    "VLLM_ASSETS_CACHE": "{private}/cache/vllm/assets",
}

# Forced directories created before anything looks for them.
_CREATED_DIRS = (
    "HF_HOME", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH",
    "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "XDG_DATA_HOME",
)  # fmt: skip

#: Refused whatever their value, with the reason (the issue that found them names most).
REFUSED: Mapping[str, str] = {
    "VLLM_SERVER_DEV_MODE": "opens vLLM's development routes (/collective_rpc can dump the weights)",
    "VLLM_PLUGINS": "chooses which code vLLM loads (enclave-serve allows only its own loader)",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "lets any client load LoRA adapters from paths or the hub",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "lets vLLM's processes unpickle arbitrary objects",
    "VLLM_DEBUG_LOG_API_SERVER_RESPONSE": "logs every response",
    "VLLM_LOGGING_CONFIG_PATH": "loads a logging configuration whose handlers can write prompts anywhere",
    "VLLM_TRACE_FUNCTION": "traces every call to a file",
    "VLLM_DEBUG_DUMP_PATH": "dumps tensors to a path",
    "VLLM_TEST_FORCE_LOAD_FORMAT": "changes how the weights are loaded",
    "VLLM_MODEL_REDIRECT_PATH": "redirects the model to another path",
    "VLLM_USE_MODELSCOPE": "downloads models from ModelScope",
    "VLLM_RPC_BASE_PATH": "moves vLLM's IPC sockets",
    "VLLM_CUDART_SO_PATH": "loads a library",
    "VLLM_NCCL_SO_PATH": "loads a library",
    "VLLM_RUST_FRONTEND_PATH": "runs a binary",
    "VLLM_TUNED_CONFIG_FOLDER": "loads kernel configurations from a folder",
    "VLLM_ENABLE_RESPONSES_API_STORE": "keeps responses in the server for later retrieval",
    "VLLM_USAGE_STATS_SERVER": "sends usage data over the network",
    "VLLM_HOST_IP": "opens network paths between vLLM processes",
    "VLLM_PORT": "opens network paths between vLLM processes",
    "PYTHONPATH": "puts host paths on the interpreter's import path",
    "PYTHONHOME": "replaces the interpreter's standard library",
    "PYTHONSTARTUP": "runs a file at interpreter start",
    "PYTHONINSPECT": "drops into an interactive interpreter",
    "PYTHONBREAKPOINT": "runs arbitrary code on breakpoint()",
    "PYTHONWARNINGS": "imports modules named in warning filters",
    "PYTHONUSERBASE": "adds a user site directory",
    "LD_PRELOAD": "loads a library into every process",
    "LD_AUDIT": "loads a library into every process",
    "GLIBC_TUNABLES": "changes the C library's behaviour",
    "CUDA_INJECTION64_PATH": "loads a library into every CUDA process",
    "OPENSSL_CONF": "loads an OpenSSL configuration (engines, providers)",
    "OPENSSL_MODULES": "loads OpenSSL provider modules",
    "OPENSSL_ENGINES": "loads OpenSSL engines",
    "HF_TOKEN": "a Hugging Face credential: the enclave never talks to the hub",
    "HF_ENDPOINT": "points Hugging Face downloads at a server",
    "NCCL_NET_PLUGIN": "loads a library",
    "NCCL_TUNER_PLUGIN": "loads a library",
    "NCCL_DEBUG_FILE": "writes NCCL's debug output to a file",
    "TORCH_COMPILE_DEBUG": "dumps compiled graphs to files",
    "TORCH_LOGS": "logs compiler internals",
}

#: Prefixes whose variables are refused unless allowed or forced by name.
REFUSED_PREFIXES = (
    "VLLM_",
    "ENCLAVE_SERVE_",
    "PYTHON",
    "LD_",
    "GLIBC_",
    "MALLOC_",
    "HF_",
    "HUGGING_FACE",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "SAFETENSORS_",
    "TOKENIZERS_",
    "TORCH",
    "TRITON_",
    "NCCL_",
    "CUDA_",
    "CUBLAS",
    "CUDNN",
    "OPENSSL_",
    "SSL_",
    "RAY_",
    "OTEL_",
    "XGRAMMAR",
    "OUTLINES",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvironmentDecision:
    """What the environment will be, what of it is attested, and what was removed.

    ``attested`` is the declared environment: the allowed variables with their values (secret
    ones as :data:`REDACTED`). The forced variables are not in it: the runtime's version decides
    them, and the run configuration declares that version.
    """

    environ: dict[str, str] = field(repr=False)
    attested: dict[str, str]
    removed: tuple[str, ...] = ()


def _refusal(name: str, value: str) -> str | None:
    if name in REFUSED:
        return REFUSED[name]
    if name in ALLOWED:
        problem = ALLOWED[name](value)
        return problem
    if name in FORCED:
        return None
    if name.startswith(REFUSED_PREFIXES):
        return "not on enclave-serve's environment allowlist (docs/configuration.md)"
    return None


def check_declared_environment(declared: Mapping[str, str]) -> None:
    """Check an environment an init-data declares: allowed names, valid values, secrets redacted.

    Raises:
        ConfigError: naming each variable that cannot be declared, and why.
    """
    problems = []
    for name, value in sorted(declared.items()):
        if name in OPERATIONAL:
            problems.append(f"{name} (operational, never attested: {OPERATIONAL[name]})")
        elif name not in ALLOWED:
            reason = _refusal(name, value) or "not on enclave-serve's environment allowlist"
            problems.append(f"{name} ({reason})")
        elif name in SECRET_VALUES:
            if value != REDACTED:
                problems.append(f"{name} (a secret: declare it as {REDACTED}, set its value in the pod)")
        elif (problem := ALLOWED[name](value)) is not None:
            problems.append(f"{name} ({problem})")
    if problems:
        raise ConfigError("cannot declare environment variable(s): " + "; ".join(problems))


def _against_declared(allowed: Mapping[str, str], declared: Mapping[str, str]) -> dict[str, str]:
    """The allowed variables to run with, given the init-data's ``declared`` ones.

    Each variable set must be declared with the same value (a secret: declared as
    :data:`REDACTED`, any value); a declared one that is not set is set from the declaration.

    Raises:
        ConfigError: naming each variable whose value differs from the declaration (both values;
            never a secret's), one set but not declared, or a declared secret that is not set.
    """
    check_declared_environment(declared)
    differ = []
    for name in sorted(set(allowed) | set(declared)):
        pinned, given = declared.get(name), allowed.get(name)
        if name in SECRET_VALUES:
            if (pinned is None) != (given is None):
                differ.append(
                    f"{name}: the init-data {'requires it' if pinned else 'does not declare it'}, the "
                    f"environment {'does not set it' if given is None else 'sets it'}"
                )
        elif given is not None and pinned != given:
            differ.append(
                f"{name}: the init-data pins {'(not set)' if pinned is None else repr(pinned)}, the "
                f"environment gives {given!r}"
            )
    if differ:
        raise ConfigError(
            "the environment differs from the one the init-data declares: "
            + "; ".join(differ)
            + ". Set exactly the declared variables (or make a new init-data)"
        )
    final = {name: value for name, value in declared.items() if name not in SECRET_VALUES}
    final.update({name: value for name, value in allowed.items() if name in SECRET_VALUES})
    return final


def decide_environment(
    environ: Mapping[str, str],
    *,
    private_root: str,
    python_dir: str | None = None,
    declared: Mapping[str, str] | None = None,
) -> EnvironmentDecision:
    """Sort ``environ`` by the allowlist and return the environment the runtime will run with.

    Pure: reads nothing but its arguments. ``private_root`` is the guest-private directory;
    ``python_dir`` the directory of the interpreter (first on ``PATH``); ``declared`` the
    environment the init-data declares (None: none, development), which the allowed variables
    must then match exactly (:func:`_against_declared`).

    Raises:
        ConfigError: naming every refused variable and why; values never in the message
            (host paths, credentials), those of allowed, non-secret names in ``log_detail``;
            or an allowed variable that differs from the declaration.
    """
    python_dir = python_dir if python_dir is not None else os.path.dirname(sys.executable)
    refused, values = [], []
    for name in sorted(environ):
        reason = _refusal(name, environ[name])
        if reason is not None:
            refused.append(f"{name} ({reason})")
            if name in ALLOWED and name not in SECRET_VALUES:
                values.append(f"{name}={environ[name]!r}")
    if refused:
        raise ConfigError(
            "refused environment variable(s): " + "; ".join(refused) + ". Remove them from the pod spec.",
            log_detail=("values: " + ", ".join(values)) if values else None,  # the log only: host paths
        )
    allowed = {name: value for name, value in environ.items() if name in ALLOWED and name not in OPERATIONAL}
    removed = sorted(name for name in environ if name not in ALLOWED and name not in FORCED)
    kept = allowed if declared is None else _against_declared(allowed, declared)
    final = {name: value for name, value in environ.items() if name in OPERATIONAL} | kept
    for name, template in FORCED.items():
        final[name] = template.format(private=private_root, python=python_dir)
    attested = {name: REDACTED if name in SECRET_VALUES else value for name, value in kept.items()}
    return EnvironmentDecision(environ=final, attested=dict(sorted(attested.items())), removed=tuple(removed))


def apply_environment(decision: EnvironmentDecision, target: MutableMapping[str, str] | None = None) -> None:
    """Make ``target`` (default: ``os.environ``) exactly ``decision.environ``.

    Also creates the forced cache directories and points :mod:`tempfile` at the new ``TMPDIR``.
    """
    import tempfile

    env = os.environ if target is None else target
    for name in [n for n in env if n not in decision.environ]:
        del env[name]
    for name, value in decision.environ.items():
        env[name] = value
    if target is None:
        tempfile.tempdir = decision.environ["TMPDIR"]
        for name in _CREATED_DIRS:
            os.makedirs(decision.environ[name], mode=0o700, exist_ok=True)
