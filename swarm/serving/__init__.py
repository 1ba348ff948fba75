"""Inference over the swarm: both halves of the protocol side by side.

Client::

    async with RemoteModel.connect(checkpoint_dir, initial_peers=[...]) as model:
        await model.generate(prompt, sampling=Sampling(...))   # or .stream(...)
        await model.chat([{"role": "user", "content": "Hi"}])  # or .stream_chat(...)
        async with model.inference_session(max_length) as session: ...   # multi-turn

    RemoteModel        the model: local embeddings/head, ``servers`` (a ServerPool)
    InferenceSession   one generation's caches on a chain of servers, with failover
    ServerPool         listing servers, bans and connections, shared by the sessions
    Sampling           how the next token is picked
    connect_sync       the same client, blocking (scripts, notebooks): a SyncRemoteModel
    ClientConfig       deadlines, failover policy, ``verify_fraction`` (spot checks)
    ServerMisbehaved   a spot check caught a server of an explicit session lying

Server (``swarm join`` runs it)::

    InferenceServer    a span of blocks served to clients; ``serve(server, stop)``
    ServerConfig       what it serves and how (the join flags)

Modules: ``protocol`` (the wire messages), ``remote_model``, ``server_pool``,
``session``, ``generation``, ``spot_checks``, ``output_tolerance``,
``verified_generation`` (client; spot checks of untrusted servers); ``server``,
``span_loader``, ``hosted_sessions`` (each client's state on a server), ``batching`` (server); ``settings`` (both configs).
"""

from swarm.serving.generation import Sampling
from swarm.serving.remote_model import RemoteModel
from swarm.serving.server import InferenceServer, serve
from swarm.serving.server_pool import ServerPool
from swarm.serving.session import InferenceSession
from swarm.serving.settings import ClientConfig, ServerConfig
from swarm.serving.spot_checks import ServerMisbehaved
from swarm.serving.sync import SyncRemoteModel, connect_sync

__all__ = [
    "ClientConfig",
    "InferenceServer",
    "InferenceSession",
    "RemoteModel",
    "Sampling",
    "ServerConfig",
    "ServerMisbehaved",
    "ServerPool",
    "SyncRemoteModel",
    "connect_sync",
    "serve",
]
