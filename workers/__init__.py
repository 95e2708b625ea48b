"""Background jobs (Celery): retraining and re-embedding run here once the lifecycle lands."""
