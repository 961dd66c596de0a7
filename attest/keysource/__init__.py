"""Key sources behind one interface: Trustee KBS, CoCo CDH, and (development only) a file.

::

    KeySource.fetch(ResourceUri) -> KeyRelease(secret, resource, source, receipt)

* :class:`KbsKeySource`: the enclave attests itself to a Trustee KBS (RCAR 0.4.0).
* :class:`CdhKeySource`: inside a CoCo pod, the Confidential Data Hub attests for us.
* :class:`UnsafeFileKeySource`: a local file; needs an explicit insecure flag, warns always.

:func:`key_source_for` builds the one a :class:`KeySourceSpec`'s URI scheme names
(``kbs+https://``, ``cdh+http://``, ``file://``; :mod:`attest.keysource.registry`).
"""

from __future__ import annotations

from attest.keysource.base import KeyRelease, KeyReleaseReceipt, KeySource, KeySourceName
from attest.keysource.cdh import CdhKeySource
from attest.keysource.file import UnsafeFileKeySource
from attest.keysource.kbs import KbsKeySource
from attest.keysource.registry import (
    KEY_SOURCE_FOR_URI_SCHEME,
    KeySourceFactory,
    KeySourceSpec,
    key_source_for,
)
from foundation.resource import ResourceUri

__all__ = [
    "KEY_SOURCE_FOR_URI_SCHEME",
    "CdhKeySource",
    "KbsKeySource",
    "KeyRelease",
    "KeyReleaseReceipt",
    "KeySource",
    "KeySourceFactory",
    "KeySourceName",
    "KeySourceSpec",
    "ResourceUri",
    "UnsafeFileKeySource",
    "key_source_for",
]
