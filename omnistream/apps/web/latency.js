// omnistream browser client: the per-turn latency breakdown (loaded before app.js, no build step).
//
// What the user experiences runs from the end of their speech to the first reply sample they
// hear. Event arrival times miss both ends: speech_stopped arrives after the VAD's silence wait
// (silence_duration_ms, 500 ms by default), and audio arrives before it plays. So every point of
// a turn is read on one clock, the AudioContext's:
// - end of speech: the server's audio_end_ms (ms of this session's sent audio, where the VAD
//   confirmed the silence, so less silence_duration_ms as in the OpenAI API), mapped to the time
//   the capture worklet saw that sample through the capture times of the chunks sent; with
//   push-to-talk, the capture time of the last sample sent before the button was released;
// - first text: when the reply's first text (or audio transcript) delta arrived;
// - first audio received: when the reply's first audio delta arrived;
// - first audio played: when the player worklet started playing that delta's first sample.
// Every figure is "ms after the end of speech", with the mic track's input latency added (the
// speech reached the audio graph that much after it was spoken) and, for "played", the output
// latency (the sample reaches the speakers that much after the worklet renders it).
// Over WebRTC the server's audio clock starts with the first microphone packet, so app.js counts
// the chunks captured from the moment the connection is up (and, with push to talk, while the
// track sends); "first audio received" is the arrival of output_audio_buffer.started (the server
// began playing the reply on its track) and "first audio played" the first audible 10 ms of the
// remote track on the AudioContext (callaudio.js): network, jitter buffer and decoding included.
"use strict";

window.OmniLatency = class OmniLatency {
  constructor(rate, chunk, kept = 1500) {
    this.rate = rate; // the protocol's sample rate (audio_*_ms clock)
    this.chunk = chunk; // samples per sent chunk
    this.kept = kept; // chunk times kept: 30-60 s at 40 ms chunks
    this.silenceMs = 500; // the session's server VAD silence_duration_ms
    this.token = 0;
    this.marks = {}; // player mark token -> the turn whose first audio it is
    this.reset();
  }

  // A new WebSocket session: its audio clock starts at 0.
  reset() {
    this.samples = 0; // samples sent in this session
    this.sent = []; // [samples sent up to the chunk's end, AudioContext time just after its last sample]
    this.turn = null; // {speechEndT, inputLatency, responseId, textT, recvT}: the user turn whose reply is awaited
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
  speechStopped(audioEndMs, inputLatency) {
    if (typeof audioEndMs !== "number") {
      this.turn = null;
      return null;
    }
    const endMs = Math.max(0, audioEndMs - this.silenceMs);
    this.speechEnded(this.captureTime(Math.round(endMs * this.rate / 1000)), inputLatency);
    return endMs;
  }

  // The user's speech ended at AudioContext time t (null: unknown, no readout for this turn).
  speechEnded(t, inputLatency) {
    this.turn = t === null ? null : { speechEndT: t, inputLatency: inputLatency || 0, responseId: null, textT: null,
      recvT: null };
  }

  // response.created: the first reply after the end of speech is the one timed (deltas of an
  // earlier reply, still arriving, do not count).
  responseCreated(id) {
    if (this.turn && !this.turn.responseId) this.turn.responseId = id || null;
  }

  ours(responseId) {
    const turn = this.turn;
    return !!turn && (!turn.responseId || !responseId || turn.responseId === responseId);
  }

  // The user spoke again, or the reply cannot play: no readout for the last end of speech.
  forgetSpeechEnd() {
    this.turn = null;
  }

  // A text or transcript delta of reply `responseId` arrived at AudioContext time `now`.
  textReceived(now, responseId) {
    if (this.ours(responseId) && this.turn.textT === null) this.turn.textT = now;
  }

  // The reply's first audio arrived at `now` and is about to be queued: a mark token for the
  // player, or null when this audio does not answer a timed end of speech (a typed question, a
  // later delta).
  markReply(now, responseId) {
    const turn = this.turn;
    if (!this.ours(responseId) || turn.recvT !== null) return null;
    turn.recvT = now;
    this.marks[++this.token] = turn;
    return this.token;
  }

  // The player's {type: "reached", token, t | flushed}: the turn's breakdown, or null if it never
  // played. {ms: end of speech -> first sample heard, textMs, receivedMs, playedMs (= ms), ...}.
  reached(msg, outputLatency) {
    const turn = this.marks[msg.token];
    delete this.marks[msg.token];
    if (this.turn === turn) this.turn = null;
    if (!turn || msg.flushed) return null; // flushed before it played: the user talked over it
    const after = (t, extra) => (t === null ? null : Math.round((t - turn.speechEndT + turn.inputLatency + extra) * 1000));
    const ms = after(msg.t, outputLatency);
    return {
      ms, textMs: after(turn.textT, 0), receivedMs: after(turn.recvT, 0), playedMs: ms,
      speechEndT: turn.speechEndT, textT: turn.textT, recvT: turn.recvT, playT: msg.t,
      inputLatency: turn.inputLatency, outputLatency,
    };
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

  // The capture time of the last sample sent (push-to-talk: where the held speech ended).
  lastSentTime() {
    return this.sent.length ? this.sent[this.sent.length - 1][1] : null;
  }
};

// The history plot: one stacked bar per turn (last `n`), end of speech at the baseline; the
// segments end at the first text, the first audio received and the first audio played.
window.OmniLatencyPlot = class OmniLatencyPlot {
  constructor(canvas, n = 20) {
    this.canvas = canvas;
    this.n = n;
    this.turns = [];
    this.colours = { text: "#7aa7ff", received: "#f2a93b", played: "#137333" };
  }

  add(turn) {
    this.turns.push(turn);
    if (this.turns.length > this.n) this.turns.shift();
    this.draw();
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.round(c.clientWidth * dpr);
    const ch = Math.round(c.clientHeight * dpr);
    if (cw > 0 && ch > 0 && (c.width !== cw || c.height !== ch)) { // sharp at the size it is shown
      c.width = cw;
      c.height = ch;
    }
    const g = c.getContext("2d");
    const w = c.width;
    const h = c.height;
    const top = Math.round(12 * dpr); // px for the scale label
    g.clearRect(0, 0, w, h);
    // ms at the top: the slowest turn shown (at least 500)
    const max = Math.max(500, ...this.turns.map((t) => Math.max(t.playedMs || 0, t.receivedMs || 0, t.textMs || 0)));
    const y = (ms) => h - Math.max(0, ms) / max * (h - top);
    g.fillStyle = getComputedStyle(c).color || "#888";
    g.font = `${Math.round(10 * dpr)}px system-ui, sans-serif`;
    g.fillText(`${max} ms`, 2, top - 2);
    const slot = w / this.n;
    this.turns.forEach((t, i) => {
      const x = Math.round(i * slot + slot * 0.15);
      const bw = Math.max(2, Math.round(slot * 0.7));
      let base = 0; // each segment starts where the previous point was
      for (const [key, ms] of [["text", t.textMs], ["received", t.receivedMs], ["played", t.playedMs]]) {
        if (ms === null || ms === undefined) continue;
        const hi = Math.max(base, ms);
        g.fillStyle = this.colours[key];
        g.fillRect(x, y(hi), bw, y(base) - y(hi));
        base = hi;
      }
    });
  }
};
