"""Past one machine: Celery workers on a Redis broker run queued runs (``prowzi worker``).

- :mod:`prowzi.workers.app`: the Celery application, its settings (each explained where it is
  set), and :func:`~prowzi.workers.app.submit`, which enqueues a run;
- :mod:`prowzi.workers.runtime`: what a worker process does with a delivered run (the session
  lease makes exactly one worker run a session; a dead worker's run is continued from its last
  checkpoint), its metrics, SIGTERM and cancellation;
- :mod:`prowzi.workers.streams`: the runs' events in Redis streams, for followers anywhere.

Everything here imports Celery and redis-py lazily: ``pip install 'prowzi[workers]'``.
"""
