// omnistream browser client: the audio graph and the devices (loaded before app.js, no build step).
//
// One AudioContext holds both worklets (audio-worklet.js): the player (24 kHz reply audio -> the
// speakers) and the capture (mic -> 24 kHz pcm16 chunks). Its clock is the one the latency
// breakdown reads. Playback starts first and does not depend on the microphone: without one
// (denied, absent) typed questions still get spoken replies. The camera is sampled into a canvas
// at the vision encoder's rate. Muting disables the mic track: the browser then delivers silence,
// as a muted WebRTC track does, so the server's VAD still sees the end of a turn.
"use strict";

window.OmniMedia = class OmniMedia {
  // hooks: {onChunk(pcm ArrayBuffer, rms, t), onPlayer(msg)}; devices: an OmniDevices.
  constructor(rate, chunk, devices, hooks) {
    this.rate = rate;
    this.chunk = chunk;
    this.devices = devices;
    this.hooks = hooks;
    this.ctx = null;
    this.player = null;
    this.capture = null;
    this.stream = null; // null: no microphone
    this.src = null;
    this.canvas = document.createElement("canvas");
    this.readPos = 0; // 24 kHz samples the player has consumed (played or flushed)
    this.writePos = 0; // 24 kHz samples handed to the player (mirrors its ring write position)
    this.inputLatency = 0; // s, mic -> audio graph, as the track reports it
    this.muted = false;
    this.closed = false;
  }

  now() {
    return this.ctx ? this.ctx.currentTime : null;
  }

  async startPlayback() {
    const ctx = (this.ctx = new AudioContext({ latencyHint: "interactive" }));
    await ctx.audioWorklet.addModule("web/audio-worklet.js");
    const player = new AudioWorkletNode(ctx, "omni-player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [2], processorOptions: { inRate: this.rate },
    });
    player.connect(ctx.destination);
    player.port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "played" || msg.type === "flushed") this.readPos = msg.readPos;
      this.hooks.onPlayer(msg);
    };
    this.player = player;
    if (ctx.state !== "running") await ctx.resume();
    return this.devices.applySink(ctx); // a one-line problem with the chosen speaker, or null
  }

  // 24 kHz float samples to play; `markToken`: report when the first of them starts playing.
  play(pcm, markToken) {
    if (markToken !== null && markToken !== undefined) {
      this.player.port.postMessage({ type: "mark", pos: this.writePos, token: markToken });
    }
    this.player.port.postMessage({ type: "push", pcm }, [pcm.buffer]);
    this.writePos += pcm.length;
  }

  // Drop everything queued at once; the player answers {type: "flushed", token, readPos, ...}.
  flush(token) {
    if (this.player) this.player.port.postMessage({ type: "flush", token });
  }

  queued() {
    return !!this.player && this.writePos > this.readPos + 1;
  }

  // The mic (and camera): `video` wanted, `proc` the browser's echo cancellation etc. Throws when
  // there is no microphone; a missing camera only gives a note (returned).
  async startCapture(video, proc) {
    let note = null;
    const stream = await this.open(video, proc).catch(async (e) => {
      if (!video) throw e;
      note = `camera unavailable (${e.name}); voice only`;
      return this.open(false, proc);
    });
    if (this.closed) { // Stop was pressed while the browser asked for the devices
      stream.getTracks().forEach((t) => t.stop());
      return note;
    }
    const capture = new AudioWorkletNode(this.ctx, "omni-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, processorOptions: { outRate: this.rate, chunkSamples: this.chunk },
    });
    const silent = this.ctx.createGain(); // keeps the capture node pulled by the graph without hearing ourselves
    silent.gain.value = 0;
    capture.connect(silent).connect(this.ctx.destination);
    capture.port.onmessage = (e) => this.hooks.onChunk(e.data.pcm, e.data.rms, e.data.t);
    this.capture = capture;
    this.attach(stream);
    return note;
  }

  open(video, proc) {
    // Echo cancellation keeps the assistant's own voice from triggering barge-in; proc false turns
    // the browser's processing off (a clean line-in, or tests comparing the sent PCM with the source).
    const audio = this.devices.audio({ channelCount: 1, echoCancellation: proc, noiseSuppression: proc,
      autoGainControl: proc });
    const v = video ? this.devices.video({ width: { ideal: 320 }, height: { ideal: 240 }, frameRate: { ideal: 15 } })
      : false;
    return navigator.mediaDevices.getUserMedia({ audio, video: v });
  }

  attach(stream) {
    if (this.src) this.src.disconnect();
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = stream;
    const track = stream.getAudioTracks()[0];
    const settings = track && track.getSettings ? track.getSettings() : {};
    this.inputLatency = typeof settings.latency === "number" ? settings.latency : 0;
    this.setMuted(this.muted);
    this.src = this.ctx.createMediaStreamSource(stream);
    this.src.connect(this.capture);
  }

  // Another microphone or camera was picked: the same capture node, a new stream.
  async reopen(video, proc) {
    if (!this.capture || this.closed) return;
    const stream = await this.open(video, proc);
    if (this.closed) stream.getTracks().forEach((t) => t.stop());
    else this.attach(stream);
  }

  // A WebRTC reply track (played by an <audio> element, not by this graph): its level every 10 ms,
  // onLevel(rms, t, samples) with t the AudioContext time just after the piece (callaudio.js).
  // The capture worklet does the work, into a silent sink, as for the microphone.
  listen(stream, onLevel) {
    if (this.meter) [this.meter.src, this.meter.node].forEach((n) => n.disconnect()); // the last call's
    const piece = this.rate / 100;
    const node = new AudioWorkletNode(this.ctx, "omni-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, processorOptions: { outRate: this.rate, chunkSamples: piece },
    });
    const silent = this.ctx.createGain();
    silent.gain.value = 0;
    node.connect(silent).connect(this.ctx.destination);
    node.port.onmessage = (e) => onLevel(e.data.rms, e.data.t, piece);
    const src = this.ctx.createMediaStreamSource(stream);
    src.connect(node);
    this.meter = { src, node };
  }

  hasVideo() {
    return !!this.stream && this.stream.getVideoTracks().length > 0;
  }

  setMuted(muted) {
    this.muted = muted;
    if (this.stream) this.stream.getAudioTracks().forEach((t) => (t.enabled = !muted));
  }

  setCamera(on) {
    if (this.stream) this.stream.getVideoTracks().forEach((t) => (t.enabled = on));
  }

  // The <video>'s current frame, at most `maxSide` px: {mean [r, g, b], url()} (url: a JPEG data
  // URL, made only when it is sent), or null before the camera delivers frames.
  frame(v, maxSide) {
    if (v.readyState < 2 || !v.videoWidth) return null;
    const scale = Math.min(1, maxSide / Math.max(v.videoWidth, v.videoHeight));
    const w = Math.max(2, Math.round(v.videoWidth * scale));
    const h = Math.max(2, Math.round(v.videoHeight * scale));
    const c = this.canvas;
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
    const g = c.getContext("2d", { willReadFrequently: true });
    g.drawImage(v, 0, 0, w, h);
    const px = g.getImageData(0, 0, w, h).data; // (h, w, 4) RGBA bytes
    const sum = [0, 0, 0];
    for (let i = 0; i < px.length; i += 4) {
      sum[0] += px[i];
      sum[1] += px[i + 1];
      sum[2] += px[i + 2];
    }
    return { mean: sum.map((s) => Math.round(s / (px.length / 4))), url: () => c.toDataURL("image/jpeg", 0.7) };
  }

  close() {
    this.closed = true;
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close();
  }

  // pcm16 <-> base64 <-> float, the protocol's audio encoding.
  static b64FromBytes(u8) {
    let s = "";
    for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
    return btoa(s);
  }

  static bytesFromB64(b64) {
    const s = atob(b64);
    const u8 = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u8[i] = s.charCodeAt(i);
    return u8;
  }

  static pcm16ToFloat(u8) {
    const n = u8.length >> 1;
    const dv = new DataView(u8.buffer, u8.byteOffset, n * 2);
    const out = new Float32Array(n); // (n,) in [-1, 1)
    for (let i = 0; i < n; i++) out[i] = dv.getInt16(2 * i, true) / 32768;
    return out;
  }
};
