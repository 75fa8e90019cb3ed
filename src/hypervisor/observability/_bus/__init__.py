"""The asynchronous bus: ``RedisEventBus`` (``bus``), its writing side (``writer``: buffer,
flusher, retries), its reading side (``reader``: the tailing reader feeding the local index) and
the queries it answers from that index (``queries``) and its emit paths (``emitting``).

It works on any ``StreamLog`` of ``_backends``; only the backends import redis-py.
"""
