"""The pure core: events, codecs, trace ids, the indexed store and the derivations.

Nothing in this package does I/O or imports a backend client.
"""
