// AudioWorklet processors of the omnistream browser client (no build step, loaded with addModule).
//
// omni-capture: microphone -> mono -> 24 kHz pcm16 chunks of `chunkSamples` (40 ms), posted to the page
//   with `t`, the AudioContext time just after the chunk's last sample (the page maps the server's
//   audio_end_ms to the audio clock with it).
//   The Realtime protocol wants 24 kHz pcm16 whatever rate the AudioContext runs at (44.1/48 kHz
//   usually), so resampling happens here, on the audio thread, sample by sample: a box prefilter of
//   round(step) taps (a zero at the output Nyquist for 48 -> 24 kHz) and linear interpolation.
// omni-player: 24 kHz float chunks from the page -> a ring buffer -> the context rate (linear
//   interpolation). `flush` drops everything queued at once (barge-in); the read position, in
//   24 kHz samples, is reported so the page knows how much of each reply was really heard.
//   `mark` {pos, token}: report {type: "reached", token, t} when sample `pos` starts playing, t its
//   AudioContext time (the latency readout ends there), or {flushed: true} if it never plays.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.outRate = o.outRate || 24000;
    this.chunkSamples = o.chunkSamples || 960;
    this.step = sampleRate / this.outRate; // input samples per output sample
    this.taps = Math.max(1, Math.round(this.step));
    this.hist = new Float32Array(this.taps); // last `taps` raw samples (box prefilter)
    this.histPos = 0;
    this.histSum = 0;
    this.prev = 0; // previous filtered sample; interpolation runs between prev (t=0) and the new one (t=1)
    this.t = 1;
    this.chunk = new Int16Array(this.chunkSamples);
    this.n = 0;
    this.captured = 0; // input samples seen (at the context rate)
    this.sumSq = 0;
    this.port.onmessage = () => {}; // reserved
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const frames = input[0].length;
    const channels = input.length;
    for (let i = 0; i < frames; i++) {
      let x = 0;
      for (let c = 0; c < channels; c++) x += input[c][i];
      x /= channels; // downmix: mean of channels
      this.sumSq += x * x;
      this.histSum += x - this.hist[this.histPos];
      this.hist[this.histPos] = x;
      this.histPos = (this.histPos + 1) % this.taps;
      const y = this.histSum / this.taps;
      while (this.t <= 1) {
        const s = this.prev + (y - this.prev) * this.t;
        const v = Math.max(-1, Math.min(1, s));
        this.chunk[this.n++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
        if (this.n === this.chunkSamples) {
          const rms = Math.sqrt(this.sumSq / Math.max(1, this.chunkSamples * this.step));
          const t = currentTime + (i + 1) / sampleRate; // the chunk ends with input frame i
          this.port.postMessage({ pcm: this.chunk.buffer, rms, t }, [this.chunk.buffer]);
          this.chunk = new Int16Array(this.chunkSamples);
          this.n = 0;
          this.sumSq = 0;
        }
        this.t += this.step;
      }
      this.t -= 1;
      this.prev = y;
    }
    this.captured += frames;
    return true;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.inRate = o.inRate || 24000;
    this.step = this.inRate / sampleRate; // input samples per output frame
    this.size = 1 << 21; // ~87 s at 24 kHz; the server paces audio, so far more than ever queued
    this.mask = this.size - 1;
    this.ring = new Float32Array(this.size);
    this.w = 0; // absolute write position (24 kHz samples)
    this.r = 0; // absolute fractional read position
    this.dropped = 0;
    this.played = 0; // 24 kHz samples actually sent to the speakers (flushed ones never count)
    this.blocks = 0;
    this.wasPlaying = false;
    this.marks = []; // [{pos, token}] in pos order: samples whose playback start the page wants timed
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "push") {
      const pcm = msg.pcm;
      const room = this.size - 1 - (this.w - Math.floor(this.r));
      const n = Math.min(pcm.length, Math.max(0, room));
      for (let i = 0; i < n; i++) this.ring[(this.w + i) & this.mask] = pcm[i];
      this.w += n;
      this.dropped += pcm.length - n;
    } else if (msg.type === "mark") {
      this.marks.push({ pos: msg.pos, token: msg.token });
    } else if (msg.type === "flush") {
      const readPos = Math.floor(this.r);
      for (const m of this.marks) this.port.postMessage({ type: "reached", token: m.token, flushed: true });
      this.marks = [];
      this.r = this.w; // drop everything queued: the user is talking over the reply
      this.port.postMessage({
        type: "flushed", played: Math.floor(this.played), readPos, writePos: this.w, token: msg.token,
      });
      this.report();
    }
  }

  report() {
    this.port.postMessage({
      type: "played", played: Math.floor(this.played), readPos: Math.floor(this.r), writePos: this.w,
      dropped: this.dropped,
    });
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const frames = out[0].length;
    const ch0 = out[0];
    let playing = false;
    for (let i = 0; i < frames; i++) {
      const ir = Math.floor(this.r);
      if (ir + 1 < this.w) {
        while (this.marks.length && this.marks[0].pos <= ir) { // sample pos is in this frame's output
          const m = this.marks.shift();
          this.port.postMessage({ type: "reached", token: m.token, t: currentTime + i / sampleRate });
        }
        const f = this.r - ir;
        const a = this.ring[ir & this.mask];
        ch0[i] = a + (this.ring[(ir + 1) & this.mask] - a) * f;
        this.r += this.step;
        this.played += this.step;
        playing = true;
      } else {
        ch0[i] = 0; // underrun (or between replies): the last sample waits for its successor
      }
    }
    for (let c = 1; c < out.length; c++) out[c].set(ch0);
    this.blocks++;
    // ~every 43 ms at 48 kHz, and at once when the queue runs dry
    if (playing && this.blocks % 16 === 0) this.report();
    if (this.wasPlaying && !playing) this.report();
    this.wasPlaying = playing;
    return true;
  }
}

registerProcessor("omni-capture", CaptureProcessor);
registerProcessor("omni-player", PlayerProcessor);
