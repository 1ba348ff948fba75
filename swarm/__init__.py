"""The swarm as any member sees it: identity, DHT records, block selection, routing."""
