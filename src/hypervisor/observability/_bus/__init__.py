"""The asynchronous bus: ``RedisEventBus`` (``bus``), its writing side (``writer``: buffer,
flusher, retries) and its reading side (``reader``: the tailing reader feeding the local index).

It works on any ``StreamLog`` of ``_backends``; only the backends import redis-py.
"""
