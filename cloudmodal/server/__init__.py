"""The control plane, the single source of truth for apps, calls, workers and events.

HTTP: a route table (:mod:`.api`) served by a lean ASGI router (:mod:`.router`) under uvicorn, with pydantic
request models; FastAPI builds the OpenAPI document and ``/docs`` from the same table when asked. Storage:
SQLAlchemy Core tables (:mod:`.models`) on SQLite (WAL) or PostgreSQL.
"""
