"""The control plane: FastAPI + SQLModel, the single source of truth for apps, calls, workers and events."""
