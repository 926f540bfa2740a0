// omnistream browser client: the reply audio of a WebRTC call (loaded before app.js, no build step).
//
// Over WebRTC the reply is the remote audio track, not deltas: it plays in an <audio> element (the
// browser's echo canceller takes its reference from there, and the jitter buffer is the browser's).
// The page cannot see that element's samples, so the same stream also feeds a level meter on the
// AudioContext (media.listen: the capture worklet, 10 ms pieces, each with its AudioContext time).
// The server sends digital silence between replies, so a piece above AUDIBLE is reply audio heard:
// - latency: output_audio_buffer.started (the server began playing the reply) is "first audio
//   received"; the first audible piece after it is "first audio played", at the time of the
//   piece's first sample (10 ms resolution), plus the AudioContext's output latency (the element's
//   own is not exposed: the same device, taken as the same);
// - Interrupt: response.cancel (by app.js) and output_audio_buffer.clear (the server drops the
//   audio still queued on its track). No conversation.item.truncate: the page cannot tell how many
//   of the reply's samples it heard (the jitter buffer stretches and conceals; the meter counted 5 %
//   more than was sent in a test), and one too many is refused; the server's track knows what it
//   played. A server VAD barge-in needs none of this: the server cancels, clears and truncates.
"use strict";

window.OmniCallAudio = class OmniCallAudio {
  // latency: an OmniLatency; hooks: {now() AudioContext time or null, reached(msg) (a latency mark
  // was heard: app.js's readout), heard(samples) (audible ones), send(event)}.
  constructor(rate, element, latency, hooks) {
    this.rate = rate;
    this.element = element;
    this.latency = latency;
    this.hooks = hooks;
    this.audible = 1e-3; // rms, -60 dBFS
    this.mark = null; // latency token: the first audible piece ends the timed turn
    this.reset();
  }

  // A new call, or none: nothing of the old one is playing.
  reset() {
    this.dropMark();
    this.playing = null; // the response whose audio the server is playing
    if (this.element.srcObject) this.element.srcObject = null;
  }

  // The remote track arrived: play it; `listen(stream, onLevel)` (media.listen) meters it, if there
  // is an AudioContext. Returns a one-line problem or null.
  async remote(stream, listen) {
    this.element.srcObject = stream;
    if (listen) listen(stream, (rms, t, n) => this.level(rms, t, n));
    try {
      await this.element.play();
      return null;
    } catch (e) {
      return `reply audio cannot play (${e.name || e})`;
    }
  }

  // A 10 ms piece of the remote track reached the AudioContext at time t (just after its last sample).
  level(rms, t, n) {
    if (rms < this.audible) return;
    this.hooks.heard(n);
    if (this.mark !== null) {
      const token = this.mark;
      this.mark = null;
      this.hooks.reached({ type: "reached", token, t: t - n / this.rate });
    }
  }

  // The server's events about the track.
  event(ev) {
    switch (ev.type) {
      case "output_audio_buffer.started": {
        this.dropMark();
        this.playing = ev.response_id || "?";
        const now = this.hooks.now();
        if (now === null) this.latency.forgetSpeechEnd(); // no meter: no readout
        else this.mark = this.latency.markReply(now, ev.response_id);
        break;
      }
      case "output_audio_buffer.stopped": // (its tail may still be on the way: the mark stays until the next reply)
        this.playing = null;
        break;
      case "output_audio_buffer.cleared":
        this.playing = null;
        this.dropMark();
        break;
      default:
        break;
    }
  }

  // Stop the reply heard (`byPage`: Interrupt, Esc, push to talk; app.js sent response.cancel).
  stop(byPage) {
    this.dropMark();
    if (byPage && this.playing) this.hooks.send({ type: "output_audio_buffer.clear" });
    this.playing = null;
  }

  // The timed reply will not be heard (interrupted, or another one started first).
  dropMark() {
    if (this.mark !== null) this.latency.reached({ token: this.mark, flushed: true }, 0);
    this.mark = null;
  }
};
