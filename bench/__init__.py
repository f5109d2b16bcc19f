"""`make bench`: the pipeline against this machine's limits and against Celery."""
