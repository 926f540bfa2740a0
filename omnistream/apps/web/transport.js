// omnistream browser client: the two ways to the server (loaded before app.js, no build step).
//
// OmniSocket, the WebSocket (v1/realtime): every event both ways as JSON text; the microphone goes
// out as input_audio_buffer.append, camera frames as input_image items, the reply as base64 pcm16
// deltas (app.js does all three). Browsers cannot set headers on a WebSocket, so a key rides in the
// `openai-insecure-api-key.<KEY>` subprotocol.
//
// OmniCall, WebRTC (POST v1/realtime/calls, OpenAI's flow): the same events on the `oai-events`
// data channel; the microphone and the camera are media tracks, which the server turns into the
// same appends and image items (the page sends neither); the reply is the remote audio track, played
// by an <audio> element, so the browser's echo canceller knows what it hears. Why: Opus both ways,
// a jitter buffer, no head-of-line blocking behind a lost packet, and a third of the bytes. The key
// goes in the POST's Authorization header. The offer is POSTed once ICE gathering is complete (the
// server takes no trickled candidates). The server adds output_audio_buffer.started / stopped /
// cleared and takes output_audio_buffer.clear (drop the reply audio not yet played).
//
// Both: hooks {open(), event(ev), failed(status, keyRefused, logged), closed(code, reason)}, each called
// only while the connection is the current one; send(obj) -> false when it cannot go out.
"use strict";

window.OmniSocket = class OmniSocket {
  constructor(url, key, hooks) {
    this.kind = "websocket";
    this.hooks = hooks;
    this.ended = false;
    const ws = (this.ws = key ? new WebSocket(url, ["realtime", "openai-insecure-api-key." + key]) : new WebSocket(url));
    ws.onopen = () => hooks.open();
    ws.onmessage = (e) => this.received(e.data);
    // the browser hides the HTTP status of a refused handshake: with a key, it may be the key
    ws.onerror = () => this.end(() => hooks.failed(key ? "connection failed (wrong API key, or the server is busy)"
      : "connection failed", !!key, "WebSocket error"));
    ws.onclose = (e) => this.end(() => hooks.closed(e.code, e.reason));
  }

  received(text) {
    if (this.ended) return;
    let ev;
    try {
      ev = JSON.parse(text);
    } catch (err) {
      return this.hooks.event(null); // (not JSON: counted as a client-side error)
    }
    this.hooks.event(ev);
  }

  end(report) {
    if (this.ended) return;
    this.ended = true;
    report();
  }

  isOpen() {
    return !this.ended && this.ws.readyState === WebSocket.OPEN;
  }

  send(obj) {
    if (!this.isOpen()) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  buffered() { // bytes queued, not yet on the wire (camera frames skip a slow link)
    return this.ws.bufferedAmount;
  }

  close() {
    this.ended = true;
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000, "bye");
  }
};

window.OmniCall = class OmniCall {
  // hooks as OmniSocket's, plus remote(stream): the reply track arrived.
  constructor(url, key, hooks) {
    this.kind = "webrtc";
    this.url = url;
    this.key = key;
    this.hooks = hooks;
    this.ended = false;
    this.flowing = false;
    this.pc = new RTCPeerConnection(); // no STUN/TURN: the server answers with its host candidates
    this.audio = this.pc.addTransceiver("audio", { direction: "sendrecv" }); // mic out, reply in: one track
    this.video = this.pc.addTransceiver("video", { direction: "sendonly" }); // the camera, when on
    this.dc = this.pc.createDataChannel("oai-events");
    this.dc.onopen = () => !this.ended && hooks.open();
    this.dc.onmessage = (e) => this.received(e.data);
    this.dc.onclose = () => this.end(() => hooks.closed(1000, "the data channel closed"));
    this.pc.ontrack = (e) => {
      if (e.track.kind === "audio" && !this.ended) hooks.remote(e.streams[0] || new MediaStream([e.track]));
    };
    this.pc.onconnectionstatechange = () => {
      const s = this.pc.connectionState;
      if (s === "connected") this.flowing = true; // media flow: the server's audio clock starts at the first packet
      if (s === "failed") this.end(() => hooks.failed("the WebRTC connection failed (no route to the server?)", false));
    };
  }

  received(text) {
    window.OmniSocket.prototype.received.call(this, text);
  }

  end(report) {
    if (this.ended) return;
    this.ended = true;
    this.pc.close();
    report();
  }

  // The tracks to send (null: none, nothing goes out). Before open(), they are in the offer.
  async setTracks(audio, video) {
    for (const [tx, track] of [[this.audio, audio], [this.video, video]]) {
      if (tx.sender.track !== track && !this.ended) await tx.sender.replaceTrack(track).catch(() => {});
    }
  }

  sendsAudio() {
    const t = this.audio.sender.track;
    return this.flowing && !this.ended && !!t && t.readyState === "live";
  }

  // Offer -> POST -> answer. Failures reach hooks.failed (a 401: keyRefused).
  async open() {
    const pc = this.pc;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await this.gathered(3000);
    } catch (e) {
      return this.end(() => this.hooks.failed(`WebRTC offer failed (${e.name || e})`, false));
    }
    let r;
    try {
      const headers = { "Content-Type": "application/sdp" };
      if (this.key) headers.Authorization = `Bearer ${this.key}`;
      r = await fetch(this.url, { method: "POST", cache: "no-store", body: pc.localDescription.sdp, headers });
    } catch (e) {
      return this.end(() => this.hooks.failed("the server cannot be reached", false));
    }
    const text = await r.text().catch(() => "");
    if (r.status !== 201) {
      const why = text.split("\n")[0].slice(0, 200);
      return this.end(() => this.hooks.failed(`call refused (${r.status}${why ? ": " + why : ""})`, r.status === 401));
    }
    if (this.ended) return;
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: text });
    } catch (e) {
      this.end(() => this.hooks.failed(`the server's SDP answer was refused (${e.name || e})`, false));
    }
  }

  gathered(maxMs) {
    const pc = this.pc;
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, maxMs); // what was gathered by then (host candidates come first)
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  isOpen() {
    return !this.ended && this.dc.readyState === "open";
  }

  send(obj) {
    if (!this.isOpen()) return false;
    this.dc.send(JSON.stringify(obj));
    return true;
  }

  buffered() {
    return this.dc.bufferedAmount;
  }

  close() {
    if (this.ended) return;
    this.ended = true;
    this.dc.close();
    this.pc.close();
  }
};

window.OmniTransport = {
  // WebRTC or not: `forced` ("ws" | "webrtc", the ?transport= parameter, for tests), else WebRTC
  // where the server's config.json offers it and the browser has it.
  rtc(config, forced) {
    if (forced === "ws" || forced === "webrtc") return forced === "webrtc";
    return !!config && config.webrtc === true && typeof RTCPeerConnection === "function";
  },

  // A connection to this page's own server (a link cannot send the mic and camera elsewhere: the
  // paths come from its config.json, resolved against the page's own address).
  open(rtc, config, key, hooks) {
    const own = (path, ws) => {
      const u = new URL(path.replace(/^\/+/, ""), location.href);
      if (ws) u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      u.search = "";
      return u.toString();
    };
    return rtc ? new window.OmniCall(own(config.calls_path || "v1/realtime/calls"), key, hooks)
      : new window.OmniSocket(own(config.realtime_path || "v1/realtime", true), key, hooks);
  },
};
