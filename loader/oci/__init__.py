"""Encrypted OCI model images (skopeo/ocicrypt), pulled and decrypted inside the guest.

``reference`` parses ``oci:DIR@sha256:…`` and ``docker://HOST/REPO@sha256:…``; ``blobs`` reads
digest-checked blobs from an OCI image layout or a registry; ``image`` parses the pinned
manifest and config; ``ocicrypt`` unwraps layer keys (JWE) and decrypts layer streams
(AES-256-CTR, HMAC-SHA256); ``layers`` walks decrypted, decompressed layers into tensors and
side files; ``packer`` writes the plain image layout that skopeo encrypts.
"""
