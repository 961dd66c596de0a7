"""Key sources behind one interface: Trustee KBS, CoCo CDH, and (development only) a file.

::

    KeySource.fetch(ResourceUri) -> KeyRelease(secret, resource, source, receipt)

* :class:`KbsKeySource`: the enclave attests itself to a Trustee KBS (RCAR 0.4.0).
* :class:`CdhKeySource`: inside a CoCo pod, the Confidential Data Hub attests for us.
* :class:`UnsafeFileKeySource`: a local file; needs an explicit insecure flag, warns always.
"""

from __future__ import annotations

from attest.keysource.base import KeyRelease, KeyReleaseReceipt, KeySource, KeySourceName
from attest.keysource.cdh import CdhKeySource
from attest.keysource.file import UnsafeFileKeySource
from attest.keysource.kbs import KbsKeySource
from foundation.resource import ResourceUri

__all__ = [
    "CdhKeySource",
    "KbsKeySource",
    "KeyRelease",
    "KeyReleaseReceipt",
    "KeySource",
    "KeySourceName",
    "ResourceUri",
    "UnsafeFileKeySource",
]
