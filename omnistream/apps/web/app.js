// omnistream browser client: mic + camera in, streamed speech + transcript out, over the OpenAI
// Realtime protocol (WebSocket /v1/realtime, pcm16 24 kHz base64 both ways). Plain script, no build.
//
// Safety: the page connects only to the server that served it (a link cannot point it at another
// one), and captures nothing before the user presses Start (or "Use key" in the key prompt). When the
// server says it needs an API key (GET config.json), the page asks for it; the key stays in this
// tab (memory + sessionStorage), never in the URL, and rides in the `openai-insecure-api-key.<KEY>`
// subprotocol, since browsers cannot set headers on a WebSocket.
//
// URL parameters (none of them changes where the page connects): ?voice=, ?instructions=,
// ?max_tokens= (reply length), ?camera=0, ?aec=0 (no echo cancellation etc.),
// ?record=1 (keep the first 30 s of sent-format mic PCM in window.omni.recorded, base64 chunks).
//
// Latency readout (latency.js): from the end of the user's speech as the server's VAD saw it to
// the moment the playback worklet starts playing the reply's first sample.
//
// `window.omni` exposes counters read by tests/test_web.py (and handy in the console).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const RATE = 24000; // protocol sample rate, both ways
  const CHUNK = 960; // 40 ms of 24 kHz audio per input_audio_buffer.append
  const FRAME_MS = 500; // camera at 2 fps, the rate the vision encoder samples at
  const FRAME_MAX_SIDE = 320;
  const MAX_BUFFERED = 1 << 20; // skip camera frames while 1 MiB is still unsent (slow link)
  const KEY_STORE = "omnistream.apiKey"; // sessionStorage: survives a reload, not the tab

  const omni = (window.omni = {
    state: "idle",
    sessionId: null,
    capturedChunks: 0, // mic chunks out of the worklet (sent or not)
    capturedFrames: 0,
    sentAudioChunks: 0,
    sentAudioSamples: 0,
    sentFrames: 0,
    ackedFrames: 0, // image items the server decoded and answered with conversation.item.created
    droppedFrames: 0,
    receivedAudioDeltas: 0,
    receivedAudioSamples: 0,
    lateAudioDeltas: 0, // deltas that arrived after speech_started for the reply being interrupted
    playedSamples: 0, // 24 kHz samples that reached the speakers (flushed ones excluded)
    speechStarted: 0,
    speechStopped: 0,
    interruptions: 0,
    responsesCreated: 0,
    responsesDone: 0,
    lastLatencyMs: null, // end of speech (VAD) -> first reply sample played, device latencies included
    latencyDetails: [], // per reply: {speechEndT, playT, inputLatency, outputLatency} (AudioContext seconds)
    apiKeyRequired: null, // from the server's config.json (null: not known yet / not served)
    truncatedMs: null, // the server's conversation.item.truncated after a barge-in
    lastResponse: null, // the last response.done's response object
    responses: [], // per reply: {id, status, reason, deltas, samples (received), serverSamples}
    flushes: [], // per barge-in: the player's {played, readPos, writePos} as it dropped its queue
    latenciesMs: [],
    transcript: "", // everything the assistant said (text and audio transcript deltas)
    userTranscript: "",
    lastFrameMean: null, // mean [r, g, b] of the last camera frame
    frameMeans: [],
    micLevel: 0,
    events: {}, // server event type -> count
    errors: [], // server `error` events and client-side failures
  });

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), start: $("start"), stop: $("stop"), reconnect: $("reconnect"), camera: $("camera"),
    preview: $("preview"), level: $("level"), vad: $("vad"), latency: $("latency"), sentAudio: $("sent-audio"),
    sentFrames: $("sent-frames"), error: $("error"), transcript: $("transcript"), form: $("text-form"),
    text: $("text"), send: $("send"), keyForm: $("key-form"), key: $("api-key"), keyNote: $("key-note"),
  };
  if (params.get("camera") === "0") ui.camera.checked = false;

  const recording = params.get("record") === "1"; // keep the 24 kHz chunks the mic produced (tests)
  if (recording) omni.recorded = [];
  let ws = null;
  let userClosed = false;
  let media = null; // {ctx, player, readPos, stream, capture, frameTimer, canvas}; stream null: no mic
  let writePos = 0; // 24 kHz samples handed to the player (mirrors its ring write position)
  let apiKey = null;
  try {
    apiKey = sessionStorage.getItem(KEY_STORE);
  } catch (e) { /* storage disabled: keep the key in memory only */ }
  const latency = new window.OmniLatency(RATE, CHUNK);
  let speechStartMs = null; // server VAD times (ms of audio sent), for the user's transcript entry
  let spokenMs = null;
  let assistant = null; // {li, textNode, responseId}
  let userEntry = null;
  const nameOf = {}; // event family -> the first name the server used (GA or beta), to ignore duplicates

  // ---------------------------------------------------------------- helpers
  function b64FromBytes(u8) {
    let s = "";
    for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function bytesFromB64(b64) {
    const s = atob(b64);
    const u8 = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u8[i] = s.charCodeAt(i);
    return u8;
  }
  function pcm16ToFloat(u8) {
    const n = u8.length >> 1;
    const dv = new DataView(u8.buffer, u8.byteOffset, n * 2);
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = dv.getInt16(2 * i, true) / 32768;
    return out;
  }
  function wsUrl() {
    // always this page's own server: a ?ws= link must not send the mic and camera elsewhere
    const u = new URL("v1/realtime", location.href);
    u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    u.search = "";
    return u.toString();
  }
  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }
  function showError(msg) {
    ui.error.textContent = msg;
    ui.error.hidden = !msg;
  }
  function setState(state, detail) {
    omni.state = state;
    ui.status.dataset.state = state;
    ui.status.textContent = detail ? `${state}: ${detail}` : state;
    refreshButtons();
  }
  function refreshButtons() {
    const state = omni.state;
    const running = state === "connecting" || state === "connected";
    ui.start.disabled = running || !!media;
    ui.stop.disabled = !running && !media;
    ui.reconnect.hidden = !(state === "error" || state === "closed");
    ui.text.disabled = ui.send.disabled = state !== "connected";
  }
  function accept(family, name) {
    if (!nameOf[family]) nameOf[family] = name;
    return nameOf[family] === name;
  }
  function addEntry(role, text) {
    const li = document.createElement("li");
    li.dataset.role = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "";
    const body = document.createTextNode(text || "");
    li.append(who, body);
    ui.transcript.append(li);
    li.scrollIntoView({ block: "end" });
    return { li, textNode: body };
  }
  function updateCounters() {
    ui.sentAudio.textContent = omni.sentAudioChunks;
    ui.sentFrames.textContent = omni.sentFrames;
  }

  // ---------------------------------------------------------------- connection
  // What the server says about itself (config.json): whether it needs an API key. A server that
  // does not serve it (an older one, a plain file server) is taken to need none.
  const serverConfig = fetch("config.json", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : {}))
    .catch(() => ({}))
    .then((c) => {
      omni.apiKeyRequired = !!(c && c.api_key_required);
      return c || {};
    });

  function askForKey(note) {
    ui.keyNote.textContent = note;
    ui.keyForm.hidden = false;
    if (apiKey) ui.key.value = apiKey;
    ui.key.focus();
  }
  function setKey(key) {
    apiKey = key || null;
    try {
      if (apiKey) sessionStorage.setItem(KEY_STORE, apiKey);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage disabled: memory only */ }
  }

  function sessionConfig() {
    const session = {
      type: "realtime",
      output_modalities: ["audio"],
      audio: {
        input: {
          format: { type: "audio/pcm", rate: RATE },
          turn_detection: { type: "server_vad", create_response: true, interrupt_response: true },
        },
        output: { format: { type: "audio/pcm", rate: RATE } },
      },
    };
    if (params.get("voice")) session.audio.output.voice = params.get("voice");
    if (params.get("instructions")) session.instructions = params.get("instructions");
    const maxTokens = parseInt(params.get("max_tokens") || "", 10);
    if (maxTokens > 0) session.max_output_tokens = maxTokens;
    return session;
  }

  function connect() {
    if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) return;
    userClosed = false;
    showError("");
    setState("connecting");
    // a new connection is a new conversation: nothing of the old one may play or be appended to
    assistant = userEntry = null;
    speechStartMs = spokenMs = null;
    latency.reset();
    for (const k of Object.keys(nameOf)) delete nameOf[k];
    if (media && media.player) media.player.port.postMessage({ type: "flush", token: 0 });
    const key = omni.apiKeyRequired ? apiKey : null;
    try {
      ws = key ? new WebSocket(wsUrl(), ["realtime", "openai-insecure-api-key." + key]) : new WebSocket(wsUrl());
    } catch (e) {
      omni.errors.push({ type: "client", message: String(e) });
      setState("error", "bad server address");
      return;
    }
    const sock = ws;
    sock.onopen = () => {
      send({ type: "session.update", session: sessionConfig() });
    };
    sock.onmessage = (e) => {
      let ev;
      try {
        ev = JSON.parse(e.data);
      } catch (err) {
        omni.errors.push({ type: "client", message: "server sent invalid JSON" });
        return;
      }
      handle(ev);
    };
    sock.onerror = () => {
      if (sock !== ws) return;
      omni.errors.push({ type: "client", message: "WebSocket error" });
      // the browser hides the HTTP status of a refused handshake: with a key, it may be the key
      setState("error", key ? "connection failed (wrong API key, or the server is busy)" : "connection failed");
      if (key && omni.state === "error") askForKey("The server refused the connection: check the API key.");
    };
    sock.onclose = (e) => {
      if (sock !== ws) return;
      ws = null;
      if (userClosed) setState("closed");
      else if (omni.state !== "error") {
        setState(e.code === 1000 ? "closed" : "error", `closed by server (${e.code}${e.reason ? " " + e.reason : ""})`);
      }
    };
  }

  function disconnect() {
    userClosed = true;
    if (ws) {
      if (assistant) send({ type: "response.cancel" });
      ws.close(1000, "bye");
    }
  }

  // ---------------------------------------------------------------- server events
  function handle(ev) {
    const type = String(ev.type || "");
    omni.events[type] = (omni.events[type] || 0) + 1;
    switch (type) {
      case "session.created":
        omni.sessionId = (ev.session && ev.session.id) || null;
        latency.configure(ev.session);
        setState("connected");
        break;
      case "session.updated":
        latency.configure(ev.session);
        break;
      case "input_audio_buffer.speech_started":
        omni.speechStarted++;
        speechStartMs = ev.audio_start_ms;
        latency.forgetSpeechEnd();
        ui.vad.textContent = "speaking";
        ui.vad.dataset.speaking = "1";
        interrupt();
        break;
      case "input_audio_buffer.speech_stopped": {
        omni.speechStopped++;
        const endMs = latency.speechStopped(ev.audio_end_ms); // the VAD's silence wait taken off
        spokenMs = endMs !== null && typeof speechStartMs === "number" ? Math.max(0, endMs - speechStartMs) : null;
        ui.vad.textContent = "silent";
        ui.vad.dataset.speaking = "0";
        break;
      }
      case "input_audio_buffer.committed":
        userEntry = addEntry("user", spokenMs === null ? "(spoke)" : `(spoke, ${(spokenMs / 1000).toFixed(1)} s)`);
        spokenMs = null;
        break;
      case "conversation.item.input_audio_transcription.delta":
        omni.userTranscript += ev.delta || "";
        if (userEntry && ev.delta) {
          if (!userEntry.heard) userEntry.textNode.textContent = "";
          userEntry.heard = true;
          userEntry.textNode.textContent += ev.delta;
        }
        break;
      case "conversation.item.input_audio_transcription.completed":
        if (userEntry && ev.transcript) userEntry.textNode.textContent = ev.transcript;
        break;
      case "response.created":
        omni.responsesCreated++;
        assistant = addEntry("assistant", "");
        assistant.responseId = ev.response && ev.response.id;
        if (omni.responses.length < 100) omni.responses.push({ id: assistant.responseId, deltas: 0, samples: 0 });
        break;
      case "conversation.item.created": {
        const content = (ev.item && ev.item.content) || [];
        if (content.some((p) => p && p.type === "input_image")) omni.ackedFrames++;
        break;
      }
      case "conversation.item.truncated":
        omni.truncatedMs = ev.audio_end_ms;
        break;
      case "response.output_audio.delta":
      case "response.audio.delta":
        if (accept("audio", type)) onAudio(ev);
        break;
      case "response.output_audio_transcript.delta":
      case "response.audio_transcript.delta":
        if (accept("transcript", type)) onText(ev.delta);
        break;
      case "response.output_text.delta":
      case "response.text.delta":
        if (accept("text", type)) onText(ev.delta);
        break;
      case "response.done":
        omni.responsesDone++;
        omni.lastResponse = ev.response || null;
        if (ev.response) {
          const r = omni.responses.find((x) => x.id === ev.response.id);
          if (r) {
            r.status = ev.response.status;
            r.reason = (ev.response.status_details && ev.response.status_details.reason) || null;
            const md = ev.response.metadata || {};
            r.serverSamples = md.audio_samples === undefined ? null : Number(md.audio_samples);
          }
        }
        if (assistant && ev.response && ev.response.status === "cancelled") assistant.li.dataset.interrupted = "1";
        assistant = null;
        break;
      case "error": {
        const err = ev.error || {};
        omni.errors.push(err);
        showError(`server: ${err.code || err.type || "error"}: ${err.message || ""}`);
        break;
      }
      default:
        break;
    }
  }

  function onText(delta) {
    if (!delta) return;
    omni.transcript += delta;
    if (!assistant) assistant = addEntry("assistant", "");
    assistant.textNode.textContent += delta;
  }

  function onAudio(ev) {
    if (!ev.delta) return;
    const pcm = pcm16ToFloat(bytesFromB64(ev.delta));
    omni.receivedAudioDeltas++;
    omni.receivedAudioSamples += pcm.length;
    const r = omni.responses[omni.responses.length - 1];
    if (r && assistant && r.id === assistant.responseId) {
      r.deltas++;
      r.samples += pcm.length;
    }
    if (!assistant) assistant = addEntry("assistant", "");
    if (assistant.interrupted) {
      omni.lateAudioDeltas++; // audio of a reply the user already talked over: never played
      return;
    }
    if (media && media.player) {
      const token = latency.markReply(media.inputLatency); // the reply to a spoken turn: time its playback
      if (token !== null) media.player.port.postMessage({ type: "mark", pos: writePos, token });
      media.player.port.postMessage({ type: "push", pcm }, [pcm.buffer]);
      writePos += pcm.length;
    } else {
      latency.forgetSpeechEnd(); // nothing plays this reply: no readout for it
    }
  }

  // The player started playing a marked sample (the first of a reply to speech) at AudioContext time t.
  function onMarkReached(msg, m) {
    const r = latency.reached(msg, m.ctx.outputLatency || 0);
    if (!r) return;
    omni.lastLatencyMs = r.ms;
    omni.latenciesMs.push(r.ms);
    if (omni.latencyDetails.length < 100) omni.latencyDetails.push(r);
    ui.latency.textContent = r.ms;
  }

  // Barge-in: the user talks over the reply. Drop the queued audio at once. The server (server VAD
  // with interrupt_response) cancels the reply and truncates the item to what it paced out, then
  // says so with `conversation.item.truncated`; a second truncate from here would cut the new turn.
  function interrupt() {
    const queued = media && media.player && writePos > media.readPos + 1;
    if (!queued && !assistant) return;
    omni.interruptions++;
    if (assistant) {
      assistant.interrupted = true;
      assistant.li.dataset.interrupted = "1";
    }
    if (media && media.player) media.player.port.postMessage({ type: "flush", token: omni.interruptions });
  }

  // ---------------------------------------------------------------- media
  // Playback first, then capture: without a microphone (denied, absent) the user can still type
  // and hear the spoken replies, so the player must not depend on getUserMedia.
  async function startPlayback() {
    const ctx = new AudioContext({ latencyHint: "interactive" });
    const m = { ctx, player: null, stream: null, capture: null, frameTimer: null, readPos: 0, inputLatency: 0 };
    media = m;
    writePos = 0;
    await ctx.audioWorklet.addModule("web/audio-worklet.js");
    const player = new AudioWorkletNode(ctx, "omni-player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [2], processorOptions: { inRate: RATE },
    });
    player.connect(ctx.destination);
    player.port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "reached") return onMarkReached(msg, m);
      if (msg.type === "flushed" && msg.token && omni.flushes.length < 100) { // token 0: a reconnect
        omni.flushes.push({ played: msg.played, readPos: msg.readPos, writePos: msg.writePos });
      }
      if (msg.type === "played" || msg.type === "flushed") {
        omni.playedSamples = msg.played;
        m.readPos = msg.readPos;
      }
    };
    m.player = player;
    if (ctx.state !== "running") await ctx.resume();
    return m;
  }

  async function startCapture(m) {
    const ctx = m.ctx;
    const wantVideo = ui.camera.checked;
    // Echo cancellation keeps the assistant's own voice from triggering barge-in; ?aec=0 turns the
    // browser's processing off (a clean line-in, or tests comparing the sent PCM with the source).
    const proc = params.get("aec") !== "0";
    const audio = { channelCount: 1, echoCancellation: proc, noiseSuppression: proc, autoGainControl: proc };
    const video = { width: { ideal: 320 }, height: { ideal: 240 }, frameRate: { ideal: 15 } };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio, video: wantVideo ? video : false });
    } catch (e) {
      if (!wantVideo) throw e;
      stream = await navigator.mediaDevices.getUserMedia({ audio }); // no camera: voice only
      showError(`camera unavailable (${e.name}); voice only`);
    }
    if (media !== m) { // Stop was pressed while the browser asked for the devices
      stream.getTracks().forEach((t) => t.stop());
      return;
    }
    m.stream = stream;
    const track = stream.getAudioTracks()[0];
    const settings = track && track.getSettings ? track.getSettings() : {};
    m.inputLatency = typeof settings.latency === "number" ? settings.latency : 0; // mic -> audio graph, s

    const src = ctx.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(ctx, "omni-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, processorOptions: { outRate: RATE, chunkSamples: CHUNK },
    });
    const mute = ctx.createGain(); // keeps the capture node pulled by the graph without hearing ourselves
    mute.gain.value = 0;
    src.connect(capture).connect(mute).connect(ctx.destination);
    m.capture = capture;
    capture.port.onmessage = (e) => {
      const { pcm, rms, t } = e.data;
      omni.capturedChunks++;
      omni.micLevel = rms;
      if (recording && omni.recorded.length < 750) omni.recorded.push(b64FromBytes(new Uint8Array(pcm))); // <= 30 s
      ui.level.value = Math.min(1, rms * 4);
      if (ws && ws.readyState === WebSocket.OPEN && omni.state === "connected") {
        send({ type: "input_audio_buffer.append", audio: b64FromBytes(new Uint8Array(pcm)) });
        omni.sentAudioChunks++;
        omni.sentAudioSamples += pcm.byteLength / 2;
        latency.chunkSent(pcm.byteLength / 2, t);
        if (omni.sentAudioChunks % 10 === 0) updateCounters();
      }
    };

    if (stream.getVideoTracks().length) {
      ui.preview.srcObject = stream;
      ui.preview.parentElement.dataset.live = "1";
      m.canvas = document.createElement("canvas");
      m.frameTimer = setInterval(() => captureFrame(m), FRAME_MS);
    }
  }

  function captureFrame(m) {
    const v = ui.preview;
    if (!ui.camera.checked || v.readyState < 2 || !v.videoWidth) return;
    const scale = Math.min(1, FRAME_MAX_SIDE / Math.max(v.videoWidth, v.videoHeight));
    const w = Math.max(2, Math.round(v.videoWidth * scale));
    const h = Math.max(2, Math.round(v.videoHeight * scale));
    const c = m.canvas;
    if (c.width !== w || c.height !== h) {
      c.width = w;
      c.height = h;
    }
    const g = c.getContext("2d", { willReadFrequently: true });
    g.drawImage(v, 0, 0, w, h);
    const px = g.getImageData(0, 0, w, h).data;
    const mean = [0, 0, 0];
    for (let i = 0; i < px.length; i += 4) {
      mean[0] += px[i];
      mean[1] += px[i + 1];
      mean[2] += px[i + 2];
    }
    omni.lastFrameMean = mean.map((s) => Math.round(s / (px.length / 4)));
    if (omni.frameMeans.length < 64) omni.frameMeans.push(omni.lastFrameMean);
    omni.capturedFrames++;
    if (!ws || ws.readyState !== WebSocket.OPEN || omni.state !== "connected") return;
    if (ws.bufferedAmount > MAX_BUFFERED) {
      omni.droppedFrames++;
      return;
    }
    const url = c.toDataURL("image/jpeg", 0.7);
    send({
      type: "conversation.item.create",
      item: { type: "message", role: "user", content: [{ type: "input_image", image_url: url }] },
    });
    omni.sentFrames++;
    updateCounters();
  }

  function stopMedia() {
    const m = media;
    media = null;
    if (!m) return;
    clearInterval(m.frameTimer);
    if (m.stream) m.stream.getTracks().forEach((t) => t.stop());
    ui.preview.srcObject = null;
    ui.preview.parentElement.dataset.live = "0";
    m.ctx.close();
  }

  // ---------------------------------------------------------------- controls
  // Only ever called from a click or a form submit: capture needs the user's gesture.
  async function start() {
    ui.start.disabled = true;
    showError("");
    await serverConfig;
    if (omni.apiKeyRequired && !apiKey) {
      askForKey("This server needs an API key.");
      refreshButtons();
      return;
    }
    ui.keyForm.hidden = true;
    connect(); // in parallel with the media prompt: speech is sent from the moment both are up
    if (!media) {
      let m;
      try {
        m = await startPlayback();
      } catch (e) {
        stopMedia();
        omni.errors.push({ type: "client", message: `audio output: ${e.name || e}` });
        showError(`audio output unavailable (${e.name || e}); replies are text only`);
      }
      if (m) {
        try {
          await startCapture(m);
        } catch (e) { // no microphone: typed questions still get spoken replies
          omni.errors.push({ type: "client", message: `media: ${e.name || e}` });
          showError(`microphone unavailable (${e.name || e}); you can still type`);
        }
      }
    }
    refreshButtons();
  }

  function stop() {
    disconnect();
    stopMedia();
    setState("closed");
    updateCounters();
  }

  ui.camera.addEventListener("change", () => {
    if (media && media.stream) media.stream.getVideoTracks().forEach((t) => (t.enabled = ui.camera.checked));
  });
  ui.start.addEventListener("click", start);
  ui.stop.addEventListener("click", stop);
  ui.reconnect.addEventListener("click", () => (media ? connect() : start()));
  ui.keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = ui.key.value.trim();
    if (!key) return;
    setKey(key);
    ui.key.value = "";
    ui.keyForm.hidden = true;
    if (media) connect();
    else start();
  });
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
    if (send({ type: "conversation.item.create", item })) {
      send({ type: "response.create" });
      addEntry("user", text);
      ui.text.value = "";
    }
  });
  window.addEventListener("pagehide", stop);

  setState("idle"); // nothing starts by itself: no autostart, whatever the URL says
})();
