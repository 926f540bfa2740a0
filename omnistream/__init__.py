"""omnistream: a streaming multimodal agent runtime (Qwen2.5-Omni Thinker-Talker, JanusVLN).

See README.md for the commands and ../shared/ARCHITECTURE.md for the design.
"""

__version__ = "0.1.0"
