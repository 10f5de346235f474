"""Typed async Python clients of the hivemesh services.

    from hivemesh.client import ArtifactClient

    async with ArtifactClient("127.0.0.1:7001") as artifacts:
        saved = await artifacts.save(workflow_id="wf-1", agent_id="coder",
                                     artifact_type="code", content="print('hi')")

Over TLS: ``ArtifactClient(target, tls=ChannelTls(ca_file="ca.pem"))``, plus
``cert_file``/``key_file`` for a service that requires client certificates
(the files taken again when they are renewed, without reopening).
"""

from hivemesh.client.artifact import ArtifactClient
from hivemesh.client.base import DEFAULT
from hivemesh.client.channel import ChannelTls, insecure_channel, secure_channel
from hivemesh.client.information import InformationClient
from hivemesh.client.memory import MemoryClient
from hivemesh.client.errors import (
    AlreadyExistsError, DeadlineExceededError, FailedPreconditionError, HivemeshError,
    InternalError, InvalidArgumentError, NotFoundError, ResourceExhaustedError,
    UnavailableError, from_rpc_error)

__all__ = [
    "DEFAULT", "AlreadyExistsError", "ArtifactClient", "ChannelTls", "DeadlineExceededError",
    "FailedPreconditionError", "HivemeshError", "InformationClient", "InternalError",
    "InvalidArgumentError", "MemoryClient",
    "NotFoundError", "ResourceExhaustedError", "UnavailableError", "from_rpc_error",
    "insecure_channel", "secure_channel",
]
