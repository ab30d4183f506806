"""The control plane, the single source of truth for apps, calls, workers and events.

HTTP: a route table (:mod:`.api`) served on Starlette (:mod:`.router`, :mod:`.http_body`, :mod:`.http_errors`)
under uvicorn, with pydantic request models; FastAPI builds the OpenAPI document and ``/docs`` from the same
table when asked (:mod:`.http_docs`). Logic: the hand-off between callers and workers (:mod:`.service`) and
per-domain services (``svc_*``); the reconciler (:mod:`.reconciler`) launches, checks and retires workers.
Storage: SQLModel tables (:mod:`.models`) on SQLite (WAL) or PostgreSQL, migrated with Alembic
(:mod:`.migrations`).
"""
