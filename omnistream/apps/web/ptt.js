// omnistream browser client: push to talk (loaded before app.js, no build step).
//
// With push to talk the session's turn_detection is null: the page, not the server's VAD, says
// where a turn ends. Audio (and camera frames) go out only while the button or the space bar is
// held. Times are the AudioContext's: a mic chunk goes out if it ends after the press and starts
// before the release, so the chunk that holds the release is the last; then the turn is committed
// and a reply asked for. A hold shorter than the 100 ms the server can commit is cleared instead.
"use strict";

window.OmniPushToTalk = class OmniPushToTalk {
  // hooks: {now() AudioContext time, send(event), held(bool) (the UI), finished(samples, committed)}
  constructor(rate, chunk, hooks) {
    this.rate = rate;
    this.chunk = chunk; // samples per mic chunk
    this.hooks = hooks;
    this.turn = null; // {pressT, releaseT, sent (chunks), timer}
  }

  // True while the button is held (frames belong to this turn).
  holding() {
    return !!this.turn && this.turn.releaseT === null;
  }

  down() {
    if (this.turn) return;
    this.turn = { pressT: this.hooks.now(), releaseT: null, sent: 0, timer: null };
    this.hooks.held(true);
  }

  up() {
    const turn = this.turn;
    if (!turn || turn.releaseT !== null) return;
    turn.releaseT = this.hooks.now();
    this.hooks.held(false);
    turn.timer = setTimeout(() => this.finish(), 300); // no chunk after the release (the mic stopped): finish anyway
  }

  // Whether the mic chunk that ended at capture time t goes out; the caller then calls sent().
  sends(t) {
    const turn = this.turn;
    if (!turn || t <= turn.pressT) return false;
    if (turn.releaseT !== null && t - this.chunk / this.rate >= turn.releaseT) {
      this.finish();
      return false;
    }
    return true;
  }

  sent() {
    if (this.turn) this.turn.sent++;
  }

  // The turn ends: committed with a reply asked for, or cleared when too short.
  finish() {
    const turn = this.turn;
    if (!turn) return;
    this.turn = null;
    clearTimeout(turn.timer);
    if (turn.releaseT === null) this.hooks.held(false);
    const samples = turn.sent * this.chunk;
    const committed = samples >= this.rate / 10;
    if (committed) {
      this.hooks.send({ type: "input_audio_buffer.commit" });
      this.hooks.send({ type: "response.create" });
    } else {
      this.hooks.send({ type: "input_audio_buffer.clear" });
    }
    this.hooks.finished(samples, committed);
  }

  // The inputs: holding `button` (pointer, touch) or the space bar while `enabled()`; `down()`
  // decides whether a turn may start (connected, a mic).
  bind(button, enabled, down) {
    button.addEventListener("pointerdown", (e) => {
      button.setPointerCapture(e.pointerId); // the release counts even off the button
      down();
    });
    button.addEventListener("pointerup", () => this.up());
    button.addEventListener("pointercancel", () => this.up());
    button.addEventListener("contextmenu", (e) => e.preventDefault()); // a long press on a phone
    const typing = (e) => e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement
      || e.target instanceof HTMLTextAreaElement;
    document.addEventListener("keydown", (e) => {
      if (e.code !== "Space" || !enabled() || typing(e)) return;
      e.preventDefault(); // not a click on the focused button, not a page scroll
      if (!e.repeat) down();
    });
    document.addEventListener("keyup", (e) => {
      if (e.code !== "Space" || !enabled() || typing(e)) return;
      e.preventDefault();
      this.up();
    });
    window.addEventListener("blur", () => this.up()); // a key released in another window never arrives
  }

  // A new connection or stopped media: the turn is dropped, nothing is sent.
  reset() {
    if (this.turn) clearTimeout(this.turn.timer);
    if (this.holding()) this.hooks.held(false);
    this.turn = null;
  }
};
