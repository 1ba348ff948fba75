"""DiLoCo training across the swarm, as any member sees it.

- ``trainer``: a member's loop and the round logic (inner phase, matchmaking,
  all-reduce, outer step, publishing); ``trainer_config``: its settings.
- ``replica``: the model, inner and outer optimisers and data position a member changes;
  ``diloco``: the optimisation math; ``training_model``: init, loss, export;
  ``data``: the corpus and each member's window order.
- ``membership``: the run's records in the DHT; ``matchmaking``: each round's group;
  ``progress``: the record a member publishes.
- ``allreduce``: the fault-tolerant, verified butterfly all-reduce behind its
  ``GroupLinks`` seam (``group_links``: the group's types); ``verification``: backups
  that check reducers, arbiters that settle disputes; ``reduction``: one part's
  bookkeeping; ``robust``: validation, clipping and the robust rules (CenteredClip,
  trimmed mean); ``parts``: how the vector is cut; ``averaging``: the all-reduce on the wire.
- ``state``: state for members that join or fall behind; ``run_checkpoint``: checkpoints.
- ``streaming``: Streaming DiLoCo's loop (fragment syncs overlapped with inner steps,
  mixing, eager updates); ``fragments``: which parameters sync together, and when.

Nothing here exits or kills its process: the process layer (``peers/train.py``) wires
a trainer to its DHT and endpoint and injects faults through ``before_send`` (and, for
tests of the defences, a poisoned contribution through ``before_contribute``).
"""
