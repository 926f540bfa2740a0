// omnistream browser client: window.omni, what the page did, in plain numbers (loaded before app.js).
//
// Every counter counts real work (worklet chunks, canvas frames, samples played), so the tests in
// tests/test_web.py read them rather than the page's own display; a person can read them in the
// console too. Over WebRTC the media go on tracks: sentAudio* count the microphone chunks captured
// while the track was sending, sentFrames stays 0 (the server samples the camera track: ackedFrames
// still counts its image items), receivedAudio* stay 0 (no deltas) and playedSamples counts the
// audible samples of the remote track (callaudio.js).
"use strict";

// eventLog: the event log panel's entries (eventlog.js), shown as they are.
window.OmniCounters = (eventLog) => ({
  transport: null, // "websocket" or "webrtc", from the first connection on
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
  muted: false,
  pushToTalk: false,
  pttTurns: [], // per push-to-talk turn: {sentSamples, committed}
  lastLatencyMs: null, // end of speech (VAD) -> first reply sample played, device latencies included
  latencyDetails: [], // per reply: latency.js's breakdown {ms, textMs, receivedMs, playedMs, ...}
  apiKeyRequired: null, // from the server's config.json (null: not known yet / not served)
  truncatedMs: null, // the server's conversation.item.truncated
  lastResponse: null, // the last response.done's response object
  responses: [], // per reply: {id, status, reason, deltas, samples (received), serverSamples}
  flushes: [], // per interruption: the player's {played, readPos, writePos} as it dropped its queue
  latenciesMs: [],
  transcript: "", // everything the assistant said (text and audio transcript deltas)
  userTranscript: "",
  lastFrameMean: null, // mean [r, g, b] of the last camera frame
  frameMeans: [],
  micLevel: 0,
  events: {}, // server event type -> count
  eventLog, // the panel's rows: {dir: "in" | "out", type, t (ms since load), count}
  errors: [], // server `error` events and client-side failures
});
