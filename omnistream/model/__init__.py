"""The models' streaming steps, solo and batched across sessions: the Thinker (thinker.py), the
Talker (talker.py) and Token2Wav (token2wav.py)."""
