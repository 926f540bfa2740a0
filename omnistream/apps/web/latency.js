// omnistream browser client: the latency readout's clock (loaded before app.js, no build step).
//
// What the user experiences runs from the end of their speech to the first reply sample they
// hear. Event arrival times miss both ends: speech_stopped arrives after the VAD's silence wait
// (silence_duration_ms, 500 ms by default), and audio arrives before it plays. So both ends are
// read on the AudioContext clock instead:
// - the end of speech: the server's audio_end_ms (ms of this session's sent audio, where the VAD
//   confirmed the silence, so less silence_duration_ms as in the OpenAI API), mapped to the time
//   the capture worklet saw that sample through the capture times of the chunks sent;
// - the first sample played: the player worklet reports when a marked sample starts playing.
// The device latencies the browser reports (mic track, output) are added on top.
"use strict";

window.OmniLatency = class OmniLatency {
  constructor(rate, chunk, kept = 1500) {
    this.rate = rate; // the protocol's sample rate (audio_*_ms clock)
    this.chunk = chunk; // samples per sent chunk
    this.kept = kept; // chunk times kept: 30-60 s at 40 ms chunks
    this.silenceMs = 500; // the session's server VAD silence_duration_ms
    this.token = 0;
    this.marks = {}; // player mark token -> {speechEndT, inputLatency}
    this.reset();
  }

  // A new WebSocket session: its audio clock starts at 0.
  reset() {
    this.samples = 0; // samples sent in this session
    this.sent = []; // [samples sent up to the chunk's end, AudioContext time just after its last sample]
    this.speechEndT = null; // AudioContext time the user stopped speaking, until the reply's first audio
  }

  // session.created / session.updated (GA or beta shape): the VAD's silence wait.
  configure(session) {
    const td = session && ((session.audio && session.audio.input && session.audio.input.turn_detection)
      || session.turn_detection);
    if (td && typeof td.silence_duration_ms === "number") this.silenceMs = td.silence_duration_ms;
  }

  // A chunk of `n` samples went out; the capture worklet saw its last sample just before time t.
  chunkSent(n, t) {
    this.samples += n;
    this.sent.push([this.samples, t]);
    if (this.sent.length > this.kept) this.sent = this.sent.slice(-this.kept / 2);
  }

  // speech_stopped: returns the end of speech in ms of session audio (null if not given).
  speechStopped(audioEndMs) {
    if (typeof audioEndMs !== "number") {
      this.speechEndT = null;
      return null;
    }
    const endMs = Math.max(0, audioEndMs - this.silenceMs);
    this.speechEndT = this.captureTime(Math.round(endMs * this.rate / 1000));
    return endMs;
  }

  // The user spoke again, or the reply cannot play: no readout for the last end of speech.
  forgetSpeechEnd() {
    this.speechEndT = null;
  }

  // The reply's first audio is about to be queued: a mark token for the player, or null when this
  // audio does not answer a timed end of speech (a typed question, a later delta).
  markReply(inputLatency) {
    const speechEndT = this.speechEndT;
    this.speechEndT = null;
    if (speechEndT === null) return null;
    this.marks[++this.token] = { speechEndT, inputLatency };
    return this.token;
  }

  // The player's {type: "reached", token, t | flushed}: the latency details, or null if it never played.
  reached(msg, outputLatency) {
    const m = this.marks[msg.token];
    delete this.marks[msg.token];
    if (!m || msg.flushed) return null; // flushed before it played: the user talked over it
    const ms = Math.round((msg.t - m.speechEndT + m.inputLatency + outputLatency) * 1000);
    return { ms, speechEndT: m.speechEndT, playT: msg.t, inputLatency: m.inputLatency, outputLatency };
  }

  // The AudioContext time at which the capture worklet saw sample `pos` of this session's audio,
  // from the chunk that holds it; null if not (or no longer) known.
  captureTime(pos) {
    const sent = this.sent;
    for (let i = sent.length - 1; i >= 0; i--) {
      const [end, t] = sent[i];
      const start = i > 0 ? sent[i - 1][0] : end - this.chunk;
      if (pos >= start && pos <= end) return t - (end - pos) / this.rate;
      if (pos > end) return null;
    }
    return null;
  }
};
