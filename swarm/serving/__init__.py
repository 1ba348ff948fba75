"""Inference over the swarm: wire protocol, the client, sessions with failover.

Public surface::

    RemoteModel.connect(checkpoint_dir, initial_peers=[...]) -> RemoteModel
        .generate(...) / .stream(...) / .inference_session(max_length)
    InferenceSession                      server caches kept between calls
    ClientConfig                          deadlines and failover policy
"""

from swarm.serving.client import RemoteModel
from swarm.serving.config import ClientConfig
from swarm.serving.session import InferenceSession

__all__ = ["ClientConfig", "InferenceSession", "RemoteModel"]
