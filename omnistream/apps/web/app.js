// omnistream browser client: mic + camera in, streamed speech + transcript out, over the OpenAI
// Realtime protocol. Plain script, no build. Two transports (transport.js): WebRTC where the
// server's config.json offers it (mic and camera as tracks, the events on the `oai-events` data
// channel, the reply as the remote track: callaudio.js), else the WebSocket (pcm16 24 kHz base64
// both ways, camera frames as JPEG items). This file is the protocol and the controls; the audio
// graph is media.js, the pickers devices.js, push to talk ptt.js, the API key auth.js, the latency
// breakdown latency.js, the log eventlog.js, the counters counters.js.
//
// Safety: the page connects only to the server that served it (a link cannot point it at another
// one), and captures nothing before the user presses Start (or "Use key" in the key prompt).
//
// Turns: server VAD by default (barge-in: the server cancels and truncates the reply); with "Push to
// talk", turn_detection null and the page's own commits (over WebRTC the tracks carry nothing
// between held turns). Interrupt (or Esc) stops a reply: response.cancel, the queued audio dropped
// (WebSocket: the item truncated to what was heard; WebRTC: output_audio_buffer.clear).
//
// URL parameters (none changes where the page connects): ?transport=ws|webrtc (tests), ?voice=,
// ?instructions=, ?max_tokens=, ?camera=0, ?aec=0 (no echo cancellation etc.), ?record=1 (keep the
// first 30 s of mic PCM as captured in window.omni.recorded, base64 chunks).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const RATE = 24000; // protocol sample rate, both ways
  const CHUNK = 960; // 40 ms of 24 kHz audio per input_audio_buffer.append
  const FRAME_MS = 500; // camera at 2 fps, the rate the vision encoder samples at
  const FRAME_MAX_SIDE = 320;
  const MAX_BUFFERED = 1 << 20; // skip camera frames while 1 MiB is still unsent (slow link)
  const SETTLE_MS = 150; // WebRTC push to talk: the commit waits for the last audio still on its way

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"), start: $("start"), stop: $("stop"), reconnect: $("reconnect"), camera: $("camera"),
    mute: $("mute"), interrupt: $("interrupt"), ptt: $("ptt"), talk: $("talk"),
    preview: $("preview"), level: $("level"), vad: $("vad"), latency: $("latency"), sentAudio: $("sent-audio"),
    sentFrames: $("sent-frames"), error: $("error"), transcript: $("transcript"), form: $("text-form"),
    text: $("text"), send: $("send"), keyForm: $("key-form"), key: $("api-key"), keyNote: $("key-note"),
    reply: $("reply"), latText: $("lat-text"), latReceived: $("lat-received"), latPlayed: $("lat-played"), plot: $("lat-plot"),
  };
  const eventLog = new window.OmniEventLog($("event-log"));
  const devices = new window.OmniDevices({ audioinput: $("mic-select"), videoinput: $("cam-select"),
    audiooutput: $("spk-select") });
  const plot = new window.OmniLatencyPlot(ui.plot, 20);
  const transcript = new window.OmniTranscript(ui.transcript);

  const omni = (window.omni = window.OmniCounters(eventLog.entries)); // what the page did (counters.js)
  if (params.get("camera") === "0") ui.camera.checked = false;

  const recording = params.get("record") === "1"; // keep the 24 kHz chunks the mic produced (tests)
  if (recording) omni.recorded = [];
  let conn = null; // an OmniSocket or an OmniCall (transport.js)
  let rtc = false; // conn is WebRTC: media on tracks, the reply on the remote track
  let pageConfig = {}; // the server's config.json
  let media = null; // an OmniMedia while started; media.stream null: no mic
  let frameTimer = null;
  const auth = new window.OmniAuth({ form: ui.keyForm, input: ui.key, note: ui.keyNote },
    (config) => {
      pageConfig = config;
      omni.apiKeyRequired = !!config.api_key_required;
    });
  const latency = new window.OmniLatency(RATE, CHUNK);
  let speechStartMs = null; // server VAD times (ms of audio sent), for the user's transcript entry
  let spokenMs = null;
  let assistant = null; // the reply in progress: {li, textNode, responseId}
  let lastAudio = null; // the last reply with audio: {itemId, startPos} (it may still play after response.done)
  const truncateOn = {}; // flush token -> {itemId, startPos}: truncate that item once the player says where it was
  const nameOf = {}; // event family -> the first name the server used (GA or beta), to ignore duplicates

  const { b64FromBytes, bytesFromB64, pcm16ToFloat } = window.OmniMedia;
  function connected() {
    return !!conn && conn.isOpen() && omni.state === "connected";
  }
  function send(obj) {
    if (!conn || !conn.send(obj)) return false;
    eventLog.add("out", obj.type);
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
    const mic = !!(media && media.stream);
    ui.mute.disabled = !mic;
    ui.talk.hidden = !ui.ptt.checked;
    ui.talk.disabled = !mic || state !== "connected";
    ui.interrupt.disabled = !(assistant || (media && media.queued()) || callAudio.playing);
  }
  function accept(family, name) {
    if (!nameOf[family]) nameOf[family] = name;
    return nameOf[family] === name;
  }
  function updateCounters() {
    ui.sentAudio.textContent = omni.sentAudioChunks;
    ui.sentFrames.textContent = omni.sentFrames;
  }

  // ---------------------------------------------------------------- connection
  function turnDetection() { // push to talk: no server VAD, the page commits
    return ui.ptt.checked ? null : { type: "server_vad", create_response: true, interrupt_response: true };
  }

  function sessionConfig(config) {
    const input = { format: { type: "audio/pcm", rate: RATE }, turn_detection: turnDetection() };
    // the user's words as text, when the server offers input transcription (config.json names the model)
    const model = config && config.transcription_model;
    if (typeof model === "string") input.transcription = { model };
    const session = {
      type: "realtime",
      output_modalities: ["audio"],
      audio: { input, output: { format: { type: "audio/pcm", rate: RATE } } },
    };
    if (params.get("voice")) session.audio.output.voice = params.get("voice");
    if (params.get("instructions")) session.instructions = params.get("instructions");
    const maxTokens = parseInt(params.get("max_tokens") || "", 10);
    if (maxTokens > 0) session.max_output_tokens = maxTokens;
    return session;
  }

  function connect() {
    if (conn && !conn.ended) return;
    if (auth.missing()) { // (Reconnect after the ephemeral key expired)
      auth.ask();
      return setState("error", "API key needed");
    }
    showError("");
    setState("connecting");
    // a new connection is a new conversation: nothing of the old one may play or be appended to
    assistant = lastAudio = null;
    callAudio.reset();
    transcript.reset();
    ptt.reset();
    speechStartMs = spokenMs = null;
    latency.reset();
    for (const k of Object.keys(nameOf)) delete nameOf[k];
    if (media) media.flush(0);
    const key = auth.connectKey();
    rtc = window.OmniTransport.rtc(pageConfig, params.get("transport"));
    omni.transport = rtc ? "webrtc" : "websocket";
    let c = null; // this connection: its hooks do nothing once another one replaced it
    const mine = (f) => (...args) => (c === conn ? f(...args) : undefined);
    const hooks = {
      open: mine(() => send({ type: "session.update", session: sessionConfig(pageConfig) })),
      event: mine((ev) => (ev ? handle(ev) : omni.errors.push({ type: "client", message: "server sent invalid JSON" }))),
      failed: mine((status, keyRefused, logged) => {
        omni.errors.push({ type: "client", message: logged || status });
        setState("error", status);
        if (keyRefused) auth.ask("The server refused the connection: check the API key.");
      }),
      closed: mine((code, reason) => { // (Stop closes without a word from here: conn.close())
        const why = `closed by server (${code}${reason ? " " + reason : ""})`;
        if (omni.state !== "error") setState(code === 1000 ? "closed" : "error", why);
      }),
      remote: mine(onRemote),
    };
    try {
      c = conn = window.OmniTransport.open(rtc, pageConfig, key, hooks);
    } catch (e) {
      omni.errors.push({ type: "client", message: String(e) });
      return setState("error", "cannot connect");
    }
    if (rtc) {
      syncSenders();
      c.open();
    }
  }

  function disconnect() {
    if (!conn) return;
    if (assistant) send({ type: "response.cancel" });
    conn.close();
    callAudio.reset();
  }

  // ---------------------------------------------------------------- server events
  function handle(ev) {
    const type = String(ev.type || "");
    omni.events[type] = (omni.events[type] || 0) + 1;
    eventLog.add("in", type);
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
        stopReply(false); // barge-in
        break;
      case "input_audio_buffer.speech_stopped": {
        omni.speechStopped++;
        const endMs = latency.speechStopped(ev.audio_end_ms, media && media.inputLatency); // silence wait taken off
        spokenMs = endMs !== null && typeof speechStartMs === "number" ? Math.max(0, endMs - speechStartMs) : null;
        ui.vad.textContent = "silent";
        ui.vad.dataset.speaking = "0";
        break;
      }
      case "input_audio_buffer.committed":
        transcript.spoke(spokenMs);
        spokenMs = null;
        break;
      case "conversation.item.input_audio_transcription.delta":
        omni.userTranscript += ev.delta || "";
        transcript.heardDelta(ev.delta);
        break;
      case "conversation.item.input_audio_transcription.completed":
        transcript.heard(ev.transcript);
        break;
      case "conversation.item.input_audio_transcription.failed":
        transcript.notHeard();
        break;
      case "response.created":
        omni.responsesCreated++;
        assistant = transcript.add("assistant", "");
        assistant.responseId = ev.response && ev.response.id;
        latency.responseCreated(assistant.responseId);
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
      case "output_audio_buffer.started": // WebRTC: the server began playing the reply on the track
      case "output_audio_buffer.stopped":
      case "output_audio_buffer.cleared":
        callAudio.event(ev);
        break;
      case "response.output_audio.delta":
      case "response.audio.delta":
        if (accept("audio", type)) onAudio(ev);
        break;
      case "response.output_audio_transcript.delta":
      case "response.audio_transcript.delta":
        if (accept("transcript", type)) onText(ev);
        break;
      case "response.output_text.delta":
      case "response.text.delta":
        if (accept("text", type)) onText(ev);
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
    refreshButtons();
  }

  function onText(ev) {
    const delta = ev.delta;
    if (!delta) return;
    if (media) latency.textReceived(media.now(), ev.response_id);
    omni.transcript += delta;
    if (!assistant) assistant = transcript.add("assistant", "");
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
    if (!assistant) assistant = transcript.add("assistant", "");
    if (assistant.interrupted) {
      omni.lateAudioDeltas++; // audio of a reply the user already talked over: never played
      return;
    }
    if (media && media.player) {
      if (!lastAudio || lastAudio.itemId !== ev.item_id) lastAudio = { itemId: ev.item_id, startPos: media.writePos };
      media.play(pcm, latency.markReply(media.now(), ev.response_id)); // the first audio of a reply to speech: time its playback
    } else {
      latency.forgetSpeechEnd(); // nothing plays this reply: no readout for it
    }
  }

  // The player's messages: marks reached (latency), flushes (interruptions), playback progress.
  function onPlayer(msg) {
    if (msg.type === "reached") return onMarkReached(msg);
    if (msg.type === "flushed") {
      if (msg.token && omni.flushes.length < 100) { // token 0: a reconnect
        omni.flushes.push({ played: msg.played, readPos: msg.readPos, writePos: msg.writePos });
      }
      const t = truncateOn[msg.token];
      delete truncateOn[msg.token];
      if (t && connected()) { // the item keeps only what was heard: the model will not assume the rest was
        const heard = Math.max(0, msg.readPos - t.startPos);
        send({ type: "conversation.item.truncate", item_id: t.itemId, content_index: 0,
          audio_end_ms: Math.floor(heard * 1000 / RATE) });
      }
    }
    if (!rtc && (msg.type === "played" || msg.type === "flushed")) {
      omni.playedSamples = msg.played;
      refreshButtons();
    }
  }

  const callAudio = new window.OmniCallAudio(RATE, ui.reply, latency, { // the reply of a WebRTC call
    now: () => (media && media.ctx ? media.now() : null),
    reached: (msg) => onMarkReached(msg),
    heard: (n) => (omni.playedSamples += n),
    send,
  });
  async function onRemote(stream) {
    const problem = await callAudio.remote(stream, media && media.ctx ? (st, f) => media.listen(st, f) : null);
    if (problem) showError(problem);
    devices.applySink(ui.reply);
  }

  // The player started playing a marked sample (the first of a reply to speech) at AudioContext time t.
  function onMarkReached(msg) {
    const r = latency.reached(msg, (media && media.ctx.outputLatency) || 0);
    if (!r) return;
    omni.lastLatencyMs = r.ms;
    omni.latenciesMs.push(r.ms);
    if (omni.latencyDetails.length < 100) omni.latencyDetails.push(r);
    ui.latency.textContent = r.ms;
    const show = (ms) => (ms === null ? "–" : String(ms));
    ui.latText.textContent = show(r.textMs);
    ui.latReceived.textContent = show(r.receivedMs);
    ui.latPlayed.textContent = show(r.playedMs);
    plot.add(r);
  }

  // Stop the reply being heard: its queued audio is dropped at once. `byPage` (Interrupt, Esc, push to
  // talk): the page also cancels the reply and truncates the item where the player stopped. On a
  // server VAD barge-in the server does both; a second truncate from here would cut the new turn.
  function stopReply(byPage) {
    if (!(media && media.queued()) && !assistant && !callAudio.playing) return;
    if (byPage && assistant && !assistant.interrupted) send({ type: "response.cancel" });
    omni.interruptions++;
    if (assistant) {
      assistant.interrupted = true;
      assistant.li.dataset.interrupted = "1";
    }
    if (rtc) callAudio.stop(byPage);
    else if (media) {
      if (byPage && lastAudio && lastAudio.itemId) truncateOn[omni.interruptions] = lastAudio;
      lastAudio = null;
      media.flush(omni.interruptions);
    }
    refreshButtons();
  }

  // ---------------------------------------------------------------- push to talk (ptt.js)
  const ptt = new window.OmniPushToTalk(RATE, CHUNK, {
    now: () => (media ? media.now() : 0),
    send: (ev) => (rtc ? setTimeout(() => send(ev), SETTLE_MS) : send(ev)),
    held(on) {
      ui.talk.dataset.held = on ? "1" : "0";
      ui.vad.textContent = on ? "speaking" : "silent";
      ui.vad.dataset.speaking = on ? "1" : "0";
    },
    finished(samples, committed) {
      syncSenders(); // WebRTC: the tracks stop until the next press
      if (omni.pttTurns.length < 100) omni.pttTurns.push({ sentSamples: samples, committed });
      if (!committed) return showError("hold the button while you speak");
      spokenMs = Math.round(samples * 1000 / RATE);
      latency.speechEnded(latency.lastSentTime(), media && media.inputLatency); // the last sample sent
    },
  });
  function pttDown() {
    if (!ui.ptt.checked || ptt.turn || !media || !media.stream || !connected()) return;
    stopReply(true); // talking over the reply stops it
    latency.forgetSpeechEnd();
    ptt.down();
    syncSenders();
  }
  function setPushToTalk() {
    omni.pushToTalk = ui.ptt.checked;
    if (!ui.ptt.checked) ptt.finish();
    else if (connected()) send({ type: "input_audio_buffer.clear" }); // a spoken turn left open by the VAD is dropped
    const session = { type: "realtime", audio: { input: { turn_detection: turnDetection() } } };
    if (connected()) send({ type: "session.update", session });
    syncSenders();
    refreshButtons();
  }

  // ---------------------------------------------------------------- media
  function onChunk(pcm, rms, t) {
    omni.capturedChunks++;
    omni.micLevel = rms;
    if (recording && omni.recorded.length < 750) omni.recorded.push(b64FromBytes(new Uint8Array(pcm))); // <= 30 s
    ui.level.value = Math.min(1, rms * 4);
    // WebRTC: the track carries it, counted from the first packet (where the server's audio clock starts)
    if (rtc ? !(conn && conn.sendsAudio()) : !connected()) return;
    if (ui.ptt.checked && !ptt.sends(t)) return;
    if (!rtc) send({ type: "input_audio_buffer.append", audio: b64FromBytes(new Uint8Array(pcm)) });
    ptt.sent();
    omni.sentAudioChunks++;
    omni.sentAudioSamples += pcm.byteLength / 2;
    latency.chunkSent(pcm.byteLength / 2, t);
    if (omni.sentAudioChunks % 10 === 0) updateCounters();
  }

  function captureFrame() {
    if (!media || !ui.camera.checked) return;
    const f = media.frame(ui.preview, FRAME_MAX_SIDE);
    if (!f) return;
    omni.lastFrameMean = f.mean;
    if (omni.frameMeans.length < 64) omni.frameMeans.push(f.mean);
    omni.capturedFrames++;
    // push-to-talk: frames belong to the held turn only (between turns they would open one)
    if (!connected() || rtc || (ui.ptt.checked && !ptt.holding())) return; // WebRTC: the server samples the track
    if (conn.buffered() > MAX_BUFFERED) {
      omni.droppedFrames++;
      return;
    }
    const item = { type: "message", role: "user", content: [{ type: "input_image", image_url: f.url() }] };
    send({ type: "conversation.item.create", item });
    omni.sentFrames++;
    updateCounters();
  }

  function showVideo() {
    const live = !!(media && media.hasVideo());
    ui.preview.srcObject = live ? media.stream : null;
    ui.preview.parentElement.dataset.live = live ? "1" : "0";
    clearInterval(frameTimer);
    frameTimer = live ? setInterval(captureFrame, FRAME_MS) : null;
  }

  // WebRTC: what the tracks carry: the mic (and the camera, when on) while connected; with push to
  // talk only during a held turn (the server would open a turn on audio between them).
  function syncSenders() {
    if (!rtc || !conn) return;
    const on = !ui.ptt.checked || !!ptt.turn;
    const s = on && media && media.stream;
    conn.setTracks(s ? s.getAudioTracks()[0] || null : null, s && ui.camera.checked ? s.getVideoTracks()[0] || null : null);
  }

  function stopMedia() {
    const m = media;
    media = null;
    ptt.reset();
    if (!m) return;
    m.close();
    showVideo();
  }

  // ---------------------------------------------------------------- controls
  // Only ever called from a click or a form submit: capture needs the user's gesture.
  async function start() {
    ui.start.disabled = true;
    showError("");
    await auth.config;
    if (auth.missing()) {
      auth.ask();
      refreshButtons();
      return;
    }
    ui.keyForm.hidden = true;
    // WebSocket: in parallel with the media prompt (speech goes out once both are up); WebRTC: after
    // it, as the offer carries the tracks (and Chromium offers its host addresses only once allowed)
    const early = !window.OmniTransport.rtc(pageConfig, params.get("transport"));
    if (early || media) connect();
    if (media) return refreshButtons();
    const m = (media = new window.OmniMedia(RATE, CHUNK, devices, { onChunk, onPlayer }));
    m.setMuted(omni.muted);
    try {
      const note = await m.startPlayback();
      if (note) showError(note);
    } catch (e) {
      stopMedia();
      omni.errors.push({ type: "client", message: `audio output: ${e.name || e}` });
      showError(`audio output unavailable (${e.name || e}); replies are text only`);
      if (!early) connect();
      return refreshButtons();
    }
    try { // playback does not depend on it: without a mic, typed questions still get spoken replies
      const note = await m.startCapture(ui.camera.checked, params.get("aec") !== "0");
      if (note) showError(note);
      if (media === m) showVideo();
      await devices.refresh(); // labels, now that the browser allowed the devices
    } catch (e) {
      omni.errors.push({ type: "client", message: `media: ${e.name || e}` });
      showError(`microphone unavailable (${e.name || e}); you can still type`);
    }
    if (!early && media === m) connect();
    refreshButtons();
  }

  function stop() {
    disconnect();
    stopMedia();
    setState("closed");
    updateCounters();
  }

  async function pickDevice() {
    if (!media || !media.stream) return;
    try {
      await media.reopen(ui.camera.checked, params.get("aec") !== "0");
      showVideo();
      syncSenders(); // WebRTC: replaceTrack, no renegotiation
    } catch (e) {
      showError(`that device is unavailable (${e.name || e})`);
    }
  }

  ui.camera.addEventListener("change", () => {
    if (media) media.setCamera(ui.camera.checked);
    syncSenders(); // WebRTC: camera off sends nothing (not black frames the server would sample)
  });
  ui.start.addEventListener("click", start);
  ui.stop.addEventListener("click", stop);
  ui.reconnect.addEventListener("click", () => (media ? connect() : start()));
  ui.interrupt.addEventListener("click", () => stopReply(true));
  ui.mute.addEventListener("click", () => {
    omni.muted = !omni.muted;
    if (media) media.setMuted(omni.muted);
    ui.mute.setAttribute("aria-pressed", String(omni.muted));
    ui.mute.textContent = omni.muted ? "Unmute" : "Mute";
  });
  ui.ptt.addEventListener("change", setPushToTalk);
  ptt.bind(ui.talk, () => ui.ptt.checked, pttDown);
  document.addEventListener("keydown", (e) => e.key === "Escape" && stopReply(true));
  $("mic-select").addEventListener("change", pickDevice);
  $("cam-select").addEventListener("change", pickDevice);
  $("spk-select").addEventListener("change", async () => {
    const problem = (media ? await devices.applySink(media.ctx) : null) || (await devices.applySink(ui.reply));
    if (problem) showError(problem);
  });
  ui.keyForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const refused = await auth.take();
    if (refused === "") return;
    if (refused) { // the server said so (401): no connection was tried
      omni.errors.push({ type: "client", message: "API key refused" });
      setState("error", "API key refused");
      return auth.ask(`The server refused the key (${refused}).`);
    }
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
      transcript.add("user", text);
      ui.text.value = "";
    }
  });
  window.addEventListener("pagehide", stop);

  devices.refresh(); // the kinds there are (labels come once the user allows capture)
  setState("idle"); // nothing starts by itself: no autostart, whatever the URL says
})();
