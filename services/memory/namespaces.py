"""Which namespace a request works in: the one it names, else one derived
from its tenant.

A namespace is 1 to 128 of ``a-z 0-9 . _ : -`` and starts with a letter or
digit; a tenant id is up to 128 of the same characters in either case, and
may start with any of them. The lower-cased tenant id is the namespace when
it can be one. A tenant id that starts with ``.``, ``_``, ``:`` or ``-``
cannot (and no mapping could give every tenant id a namespace of its own:
there are more tenant ids than namespaces), so it gets ``tenant-`` and the
first 32 hex digits of the SHA-256 of the lower-cased id, a name no tenant
uses by accident.
"""

from __future__ import annotations

import hashlib
import re

from hivemesh.common.v1 import RequestContext

DEFAULT_NAMESPACE = "default"
_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,127}$")


def tenant_namespace(tenant_id: str) -> str:
    """The namespace of a tenant (see the module docstring)."""
    tenant = tenant_id.lower()
    if not tenant:
        return DEFAULT_NAMESPACE
    if _NAMESPACE.match(tenant):
        return tenant
    return "tenant-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def resolve_namespace(namespace: str, context: RequestContext) -> str:
    """The request's namespace, or its tenant's, or "default" (as the v1
    contract says: tenant ids that differ only in case share one)."""
    return namespace or tenant_namespace(context.tenant_id)
