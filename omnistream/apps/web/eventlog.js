// omnistream browser client: the event log panel (loaded before app.js, no build step).
//
// The last `max` protocol events, client (↑) and server (↓), each with its time (ms since the
// page loaded) and type. A run of the same event (25 audio appends a second, 40 ms audio deltas)
// is one row with a count, so the panel shows what happened rather than scroll away; the payload
// is not shown (audio, images, an API key in an error: nothing the user would not want on screen).
"use strict";

window.OmniEventLog = class OmniEventLog {
  constructor(list, max = 100) {
    this.list = list; // an <ol>
    this.max = max;
    this.entries = []; // plain {dir, type, t, count}, oldest first: what window.omni shows
    this.rows = []; // their <li>s
  }

  add(dir, type) {
    const t = Math.round(performance.now());
    const last = this.entries[this.entries.length - 1];
    if (last && last.dir === dir && last.type === type) {
      last.count++;
      last.t = t;
      const li = this.rows[this.rows.length - 1];
      li.lastChild.textContent = ` ×${last.count}`;
      li.firstChild.textContent = this.time(t);
      return;
    }
    const li = document.createElement("li");
    li.dataset.dir = dir;
    const time = document.createElement("time");
    time.textContent = this.time(t);
    const what = document.createElement("span");
    what.textContent = `${dir === "out" ? "↑" : "↓"} ${type}`;
    li.append(time, what, document.createTextNode(""));
    this.list.append(li);
    this.entries.push({ dir, type, t, count: 1 });
    this.rows.push(li);
    while (this.entries.length > this.max) {
      this.entries.shift();
      this.rows.shift().remove();
    }
    this.list.scrollTop = this.list.scrollHeight; // the newest in view, without scrolling the page
  }

  time(t) {
    return (t / 1000).toFixed(3).padStart(8, " ");
  }
};
