"""hivemesh: a gRPC service mesh of provider sidecars for LLM agents.

Generated contracts live in ``hivemesh.<api>.v1`` (for example
``from hivemesh.artifact.v1 import SaveArtifactRequest``), the typed async
client in ``hivemesh.client``.
"""

__version__ = "0.1.0"
