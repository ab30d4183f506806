"""The worker process: ``python -m cloudmodal.worker`` (started by a provider)."""
