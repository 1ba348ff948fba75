"""Generation with spot checks on: output is shown once checked, and rerun when a liar is caught.

``RemoteModel`` runs a generation of its own session through :func:`generate_verified`
when ``ClientConfig.verify_fraction > 0``. Each piece (text delta or ids) is held until
every hop's output up to the position it came from has been checked and agreed with
(``SpotChecks.verified_position``); at the end the session's remaining outputs are
checked before the rest is released. When a check catches a server of the chain
(``ServerMisbehaved``: it is banned and reported by then), the generation is rerun from
the prompt in a new session, which routes around the liar, and the pieces already
released are skipped: what the caller sees equals an honest run. Sampling with a
temperature gets a fixed seed for the call, so the rerun draws the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable

from swarm.serving.generation import Sampling
from swarm.serving.session import InferenceSession
from swarm.serving.spot_checks import ServerMisbehaved

logger = logging.getLogger(__name__)


async def generate_verified(
    open_session: Callable[[], InferenceSession],
    rows: Callable[[InferenceSession, Sampling], AsyncIterator],
    sampling: Sampling,
    attempts: int,
) -> AsyncIterator:
    """Yields what ``rows(session, sampling)`` yields, each piece once checked (see the module).

    Args:
        open_session: a new (not yet entered) session with spot checks on.
        rows: the generation loop over an open session.
        sampling: how tokens are picked.
        attempts: generations tried at most (each caught liar costs one).
    Raises:
        ServerMisbehaved: liars were caught in every one of ``attempts`` generations.
    """
    if sampling.temperature > 0 and sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=random.randrange(2**63))
    released = 0
    for attempt in range(1, attempts + 1):
        session = open_session()
        if session.checks is None:
            raise ValueError("generate_verified needs a session with spot checks (verify_fraction > 0)")
        held: deque = deque()  # (position the piece depends on, piece)
        produced = 0
        try:
            async with session:
                async for piece in rows(session, sampling):
                    produced += 1
                    if produced > released:  # the first ones were shown by an earlier attempt
                        held.append((session.position, piece))
                    while held and held[0][0] <= session.checks.verified_position:
                        released += 1
                        yield held.popleft()[1]
                await session.checks.settle()
        except ServerMisbehaved as error:
            if attempt == attempts:
                raise
            logger.warning("rerunning the generation without %s (attempt %d of %d): %s",
                           error.peer_id, attempt + 1, attempts, error)  # fmt: skip
            continue
        while held:
            released += 1
            yield held.popleft()[1]
        return
