// omnistream browser client: the conversation as text (loaded before app.js, no build step).
//
// One entry per turn: the user's (typed text, or "(spoke, N s)" until the server's input
// transcription replaces it with the words, if the session has transcription on) and the
// assistant's (its text or audio transcript deltas as they arrive; "(interrupted)" when cut off).
"use strict";

window.OmniTranscript = class OmniTranscript {
  constructor(list) {
    this.list = list; // the <ol role=log>
    this.user = null; // the last spoken user entry, where its transcription goes
  }

  // A new entry: {li, textNode} (the text node is what deltas extend).
  add(role, text) {
    const li = document.createElement("li");
    li.dataset.role = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "";
    const body = document.createTextNode(text || "");
    li.append(who, body);
    this.list.append(li);
    li.scrollIntoView({ block: "end" });
    return { li, textNode: body };
  }

  // A spoken user turn was committed (spokenMs: its length as the VAD or push to talk saw it, or null).
  spoke(spokenMs) {
    this.user = this.add("user", spokenMs === null ? "(spoke)" : `(spoke, ${(spokenMs / 1000).toFixed(1)} s)`);
  }

  // conversation.item.input_audio_transcription.delta / .completed / .failed for that turn.
  heardDelta(delta) {
    const u = this.user;
    if (!u || !delta) return;
    if (!u.heard) u.textNode.textContent = "";
    u.heard = true;
    u.textNode.textContent += delta;
  }

  heard(transcript) {
    if (this.user && typeof transcript === "string") {
      this.user.heard = true;
      this.user.textNode.textContent = transcript || "(silence)";
    }
  }

  notHeard() {
    if (this.user && !this.user.heard) this.user.textNode.textContent += " (not transcribed)";
  }

  // A new conversation.
  reset() {
    this.user = null;
  }
};
