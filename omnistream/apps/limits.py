"""What one Realtime session may send and how fast, and how long the server waits on it.

Why these exist: the server is one asyncio process shared by every session, so one client must
not be able to stall the event loop, fill the server's memory, or feed the model more than its
context holds. Each limit is answered with an ``error`` event and the session goes on (only a
client that stops reading its replies is disconnected: there is nobody to answer).

- **Input rate, in audio time.** Audio appends are charged in *seconds of audio* against a
  token bucket (``audio_rate`` seconds per second, ``audio_burst_s`` of burst), not in events:
  a client that catches up after a network stall sends many small appends at once and must not
  lose them, while a client that streams faster than it talks is refused. Other events are
  charged one token each in the event bucket of :class:`~omnistream.apps.server.ServerConfig`
  (``rate_limit`` / ``rate_burst``).
- **Item sizes.** Decoded image pixels and encoded bytes, images per item, text characters per
  item (one item per message, so also per message) and instruction characters are bounded
  before anything is decoded or tokenized (code ``input_too_large``). The text bounds are sized
  against the Thinker's context: Qwen2.5-Omni has 32768 positions, and 64k characters of text is
  about 16k tokens, half of it.
- **Turn length.** A user turn stops growing at ``max_turn_s``: the audio so far is committed
  as the turn (no reply is started for it), the client gets ``turn_too_long``, and what follows
  is a new turn. Committing rather than dropping keeps what the user said.
- **Replies.** A reply whose pipeline sends nothing for ``reply_idle_s`` (or, once cancelled,
  does not confirm its end within ``cancel_grace_s``) is ended by the server with a
  ``response.done`` (``failed`` / ``cancelled``), so the session is never stuck behind it.
- **Slow readers.** A send that cannot complete in ``send_timeout_s`` means the client stopped
  reading: its output is dropped and the connection closed (1008) with that reason. The kernel
  send buffer of each connection is set to ``send_buffer_bytes``, so what a stalled client pins
  in the server is bounded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MiB = 1 << 20


@dataclass
class SessionLimits:
    """Per-session limits (``ServerConfig.limits``); the defaults suit a Qwen2.5-Omni-7B server."""

    audio_rate: float = 2.0  # seconds of input audio accepted per second, on average (twice real time)
    audio_burst_s: float = 20.0  # audio a client may send at once (catching up after a stall)
    min_append_s: float = 0.02  # an append costs at least this much audio (floods of tiny appends)
    max_turn_s: float = 120.0  # a user turn (audio, or camera time) is committed when it gets this long
    max_image_pixels: int = 1920 * 1920  # decoded pixels of one input_image (checked before decoding)
    max_image_bytes: int = 8 * MiB  # encoded bytes of one input_image
    max_item_images: int = 4  # input_image parts per item (4 x 1920x1920 RGB: 44 MB decoded at most)
    max_text_chars: int = 64_000  # characters of text in one item (~16k tokens: half the 32k context)
    max_instructions_chars: int = 32_000  # characters of session.instructions
    reply_idle_s: float = 60.0  # a reply with no pipeline event for this long ends as failed
    cancel_grace_s: float = 5.0  # a cancelled reply whose end the pipeline does not confirm ends anyway
    send_timeout_s: float = 10.0  # a send blocked this long: the client stopped reading, it is closed
    send_buffer_bytes: int | None = 256 * 1024  # SO_SNDBUF per connection (None: the kernel's autotuning)
    offload_bytes: int = 32 * 1024  # messages larger than this are parsed off the event loop
    offload_vad_s: float = 0.2  # appends longer than this run the VAD off the event loop

    def __post_init__(self):
        for k, v in self.__dict__.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
                raise ValueError(f"SessionLimits.{k} must be a non-negative number, got {v!r}")
        if self.audio_burst_s <= 0 or self.max_turn_s <= 0:
            raise ValueError("SessionLimits.audio_burst_s and max_turn_s must be positive")


class TokenBucket:
    """``rate`` tokens per second on average, bursts of up to ``burst`` (rate <= 0: no limit)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if the bucket holds them (then True); else spend nothing."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def refund(self, n: float = 1.0) -> None:
        """Give back tokens taken for something charged elsewhere (an append: in audio time)."""
        self.tokens = min(self.burst, self.tokens + n)
