"""The engine core: one conversation core (conversation.py) and the per-stage batching scheduler (scheduler.py)."""
