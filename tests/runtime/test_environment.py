"""The environment allowlist: both sides of it, on the real decision function."""

from __future__ import annotations

import pytest

from foundation.errors import ConfigError
from runtime.environment import (
    ALLOWED,
    FORCED,
    REDACTED,
    REFUSED,
    apply_environment,
    decide_environment,
)

PRIVATE = "/dev/shm/enclave-serve-test"
BASE = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def decide(**env: str):  # type: ignore[no-untyped-def]
    return decide_environment({**BASE, **env}, private_root=PRIVATE, python_dir="/opt/venv/bin")


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("VLLM_SERVER_DEV_MODE", "1", "development routes"),
        ("VLLM_PLUGINS", "evil_plugin", "chooses which code vLLM loads"),
        ("VLLM_PLUGINS", "enclave_serve_loader", "chooses which code vLLM loads"),
        ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true", "LoRA adapters"),
        ("VLLM_ALLOW_INSECURE_SERIALIZATION", "1", "unpickle"),
        ("VLLM_LOGGING_CONFIG_PATH", "/models/log.json", "logging configuration"),
        ("VLLM_DEBUG_LOG_API_SERVER_RESPONSE", "1", "logs every response"),
        ("VLLM_SOMETHING_NEW", "1", "not on enclave-serve's environment allowlist"),
        ("VLLM_LOGGING_LEVEL", "DEBUG", "must be one of INFO, WARNING, ERROR, CRITICAL"),
        ("PYTHONPATH", "/models/site", "import path"),
        ("PYTHONSTARTUP", "/models/x.py", "runs a file"),
        ("PYTHONWARNINGS", "ignore::evil.Warning", "imports modules"),
        ("LD_PRELOAD", "/models/libevil.so", "loads a library"),
        ("LD_AUDIT", "/models/libevil.so", "loads a library"),
        ("LD_LIBRARY_PATH", "/models/lib", "outside the image's system library directories"),
        ("GLIBC_TUNABLES", "glibc.malloc.x=1", "C library"),
        ("CUDA_INJECTION64_PATH", "/models/x.so", "loads a library"),
        ("OPENSSL_CONF", "/models/openssl.cnf", "OpenSSL configuration"),
        ("SSL_CERT_FILE", "/models/host-ca.pem", "another value changes what TLS trusts"),
        ("HF_ENDPOINT", "https://hub.example", "downloads"),
        ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1", "allowlist"),
        ("TORCH_LOGS", "+dynamo", "compiler internals"),
        ("NCCL_NET_PLUGIN", "evil", "loads a library"),
        ("TRITON_HOME", "/models", "allowlist"),
        ("ENCLAVE_SERVE_KEY", "x", "allowlist"),
    ],
)
def test_security_relevant_variables_are_refused_by_name(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError, match="refused environment variable") as info:
        decide(**{name: value})
    message = str(info.value)
    assert name in message and why in message


def test_every_refused_variable_is_named_at_once_and_credentials_are_not_shown() -> None:
    with pytest.raises(ConfigError) as info:
        decide(HF_TOKEN="hf_secret_token_value", LD_PRELOAD="/x.so", VLLM_SERVER_DEV_MODE="1")
    message = str(info.value)
    assert all(n in message for n in ("HF_TOKEN", "LD_PRELOAD", "VLLM_SERVER_DEV_MODE"))
    assert "hf_secret_token_value" not in message and "/x.so" not in message


def test_allowed_variables_are_kept_and_attested() -> None:
    decision = decide(
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="4",
        CUDA_VISIBLE_DEVICES="0,1",
        VLLM_LOGGING_LEVEL="WARNING",
        LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/cuda/lib64",
        SSL_CERT_FILE="/etc/ssl/certs/ca-certificates.crt",
        PYTHONUNBUFFERED="1",
    )
    for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("OMP_NUM_THREADS", "4"),
                        ("CUDA_VISIBLE_DEVICES", "0,1")):  # fmt: skip
        assert decision.environ[name] == value and decision.attested[name] == value
    # Operational: kept, never attested (each with its reason in OPERATIONAL).
    for name in ("LANG", "SSL_CERT_FILE", "PYTHONUNBUFFERED"):
        assert name in decision.environ and name not in decision.attested


def test_forced_variables_override_the_host_and_private_paths_are_placeholders() -> None:
    decision = decide(
        HF_HUB_OFFLINE="0", HOME="/models", TMPDIR="/host/tmp", VLLM_WORKER_MULTIPROC_METHOD="fork"
    )
    env, attested = decision.environ, decision.attested
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_PLUGINS"] == "enclave_serve_loader"
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert env["HOME"] == f"{PRIVATE}/home" and env["TMPDIR"] == f"{PRIVATE}/tmp"
    assert not set(FORCED) & set(attested)  # the runtime's version decides them, and is declared
    assert env["PATH"].startswith("/opt/venv/bin:") and "/models" not in env["PATH"]
    assert set(FORCED) <= set(env)
    assert not any(PRIVATE in v for v in attested.values())


def test_everything_else_is_removed_and_has_no_effect() -> None:
    decision = decide(HOSTNAME="pod-1", KUBERNETES_SERVICE_HOST="10.0.0.1", MY_APP_SETTING="x")
    assert decision.removed == ("HOSTNAME", "KUBERNETES_SERVICE_HOST", "MY_APP_SETTING")
    assert not {"HOSTNAME", "KUBERNETES_SERVICE_HOST", "MY_APP_SETTING"} & set(decision.environ)
    assert not {"HOSTNAME", "KUBERNETES_SERVICE_HOST"} & set(decision.attested)


def test_the_api_key_is_kept_but_redacted() -> None:
    decision = decide(VLLM_API_KEY="sk-operator-secret")
    assert decision.environ["VLLM_API_KEY"] == "sk-operator-secret"
    assert decision.attested["VLLM_API_KEY"] == REDACTED


def test_same_input_same_attested_view_and_any_change_shows() -> None:
    a, b = decide(OMP_NUM_THREADS="4"), decide(OMP_NUM_THREADS="4")
    assert a.attested == b.attested
    assert decide(OMP_NUM_THREADS="8").attested != a.attested
    assert decide(OMP_NUM_THREADS="4", HOSTNAME="other").attested == a.attested  # removed: no effect


def test_apply_makes_the_target_exactly_the_decision() -> None:
    target = {**BASE, "HOSTNAME": "pod-1", "HF_HUB_OFFLINE": "0"}
    decision = decide_environment(target, private_root=PRIVATE, python_dir="/opt/venv/bin")
    apply_environment(decision, target)
    assert target == decision.environ
    assert "HOSTNAME" not in target and target["HF_HUB_OFFLINE"] == "1"


def test_named_vllm_variables_exist_in_this_vllm() -> None:
    """A renamed variable would silently escape its rule: every vLLM name we list must exist."""
    import vllm.envs

    known = set(vllm.envs.environment_variables)
    ours = {n for n in [*ALLOWED, *FORCED, *REFUSED] if n.startswith("VLLM_")}
    assert ours - known == set()


def test_the_documented_environment_rules_are_the_rules() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert [n for n in [*ALLOWED, *FORCED, *REFUSED] if f"`{n}" not in doc] == []


# -- Paths compared by whole components; locale and time zone by name (issue 17, item 3) ----


@pytest.mark.parametrize(
    "value",
    [
        "/usr/../models/lib",  # climbs out of /usr
        "/libhost",  # a prefix of /lib's name, not a directory under it
        "/usr/lib;/models/lib",  # the dynamic linker splits on ';' too
        ":/usr/lib",  # an empty entry is the working directory
        "/usr/lib::/usr/lib64",
        "lib",  # relative: the working directory again
        "/usr/lib/./../../models",
        "$ORIGIN/../models",
        "/opt/nvidiahost/lib",
        "/opt/../models",
    ],
)
def test_library_path_outside_the_system_directories_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="LD_LIBRARY_PATH"):
        decide(LD_LIBRARY_PATH=value)


def test_library_paths_that_base_images_set_are_kept() -> None:
    value = "/usr/local/nvidia/lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:/lib/x86_64-linux-gnu:/opt/nvidia/lib/"
    assert decide(LD_LIBRARY_PATH=value).attested["LD_LIBRARY_PATH"] == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TZ", "/host/zone"),
        ("TZ", ":/host/zone"),  # glibc reads ':'-prefixed values as a file
        ("TZ", ":Europe/Paris"),
        ("TZ", "../../../models/zone"),
        ("TZ", "Europe/../../models/zone"),
        ("LC_ALL", "../x"),
        ("LC_ALL", "/models/locale"),  # glibc reads a locale name with '/' as a path
        ("LC_CTYPE", "en_US.UTF-8/../../x"),
        ("LANG", "./x"),
        ("LANGUAGE", "en_US:/models/locale"),
        ("LANGUAGE", ":en"),
    ],
)
def test_a_path_in_the_locale_or_time_zone_is_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"refused environment variable.*{name}"):
        decide(**{name: value})


def test_plain_locale_and_time_zone_names_are_kept() -> None:
    for tz in ("UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5", ""):
        assert decide(TZ=tz).environ["TZ"] == tz
    for locale in ("C", "POSIX", "C.UTF-8", "en_US.UTF-8", "de_DE@euro", "sr_RS.UTF-8@latin", ""):
        assert decide(LANG=locale, LC_ALL=locale, LC_CTYPE=locale).environ["LC_ALL"] == locale
    assert decide(LANGUAGE="en_US:en").environ["LANGUAGE"] == "en_US:en"


def test_cuda_home_climbing_out_of_the_cuda_directory_is_refused() -> None:
    with pytest.raises(ConfigError, match="CUDA_HOME"):
        decide(CUDA_HOME="/usr/local/cuda-12/../../../models")
    assert decide(CUDA_HOME="/usr/local/cuda-12.4").environ["CUDA_HOME"] == "/usr/local/cuda-12.4"


def test_a_refused_value_goes_to_the_log_only() -> None:
    """Host paths in values stay out of the public reason; the log detail has them."""
    with pytest.raises(ConfigError) as info:
        decide_environment(
            {"TZ": "/host/secret/zone", "PATH": "/usr/bin"}, private_root="/p", python_dir="/v/bin"
        )
    assert "TZ" in str(info.value) and "/host/secret/zone" not in str(info.value)
    assert info.value.log_detail is not None and "/host/secret/zone" in info.value.log_detail
