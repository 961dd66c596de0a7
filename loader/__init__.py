"""Encrypted model format, packer, decrypt-to-device pipeline and the vLLM loader plugin."""

#: The vLLM ``--load-format`` name of the decrypting loader (see loader.vllm_plugin).
LOAD_FORMAT = "enclave-encrypted"

__all__ = ["LOAD_FORMAT"]
