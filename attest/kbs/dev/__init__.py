"""kbs-dev: a development Key Broker Service speaking Trustee's protocol (server side).

* :mod:`attest.kbs.dev.server`: the FastAPI app and its admin API.
* :mod:`attest.kbs.dev.appraisal`: evidence appraisal as Trustee's attestation service does it.
* :mod:`attest.kbs.dev.policy`: the JSON resource policy.
* :mod:`attest.kbs.dev.jwe`: JWE responses built exactly as Trustee builds them.

The production client (:mod:`attest.kbs.client`, :mod:`attest.keysource`) never imports this
package (an import-linter contract in ``pyproject.toml``). Nothing is imported here: the server
pulls in FastAPI and uvicorn.
"""

from __future__ import annotations

__all__: list[str] = []
