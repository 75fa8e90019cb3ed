"""The backend seam: ``StreamLog`` (in ``_log.base``) and its implementations.

``_log.memory`` holds the in-process one; ``_log.redis`` (the only module that imports redis-py)
the Redis Streams one.
"""
