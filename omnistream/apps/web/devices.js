// omnistream browser client: microphone, camera and speaker pickers (loaded before app.js).
//
// The lists come from navigator.mediaDevices.enumerateDevices(). Before the user allowed capture
// the browser gives no labels (and often one entry per kind), so the lists are filled again once
// Start got the devices, and whenever a device comes or goes (devicechange). The first option,
// "Default", asks for no particular device. The speaker is the AudioContext's output
// (AudioContext.setSinkId, Chromium 110+); where the browser cannot choose it, the picker is
// disabled and says so, rather than pretend.
"use strict";

window.OmniDevices = class OmniDevices {
  constructor(selects) {
    this.selects = selects; // {audioinput, videoinput, audiooutput}: <select> elements
    this.canSink = typeof AudioContext !== "undefined" && "setSinkId" in AudioContext.prototype;
    if (!this.canSink) {
      selects.audiooutput.disabled = true;
      selects.audiooutput.title = "this browser cannot choose the speaker";
    }
    const md = navigator.mediaDevices;
    if (md && md.addEventListener) md.addEventListener("devicechange", () => this.refresh());
  }

  // Fill the pickers, keeping each one's choice if that device is still there.
  async refresh() {
    const md = navigator.mediaDevices;
    if (!md || !md.enumerateDevices) return;
    let devices = [];
    try {
      devices = await md.enumerateDevices();
    } catch (e) {
      return; // nothing to list: the defaults stay
    }
    const names = { audioinput: "Microphone", videoinput: "Camera", audiooutput: "Speaker" };
    for (const [kind, sel] of Object.entries(this.selects)) {
      const keep = sel.value;
      const opts = [new Option("Default", "")];
      let i = 0;
      for (const d of devices) {
        if (d.kind !== kind || !d.deviceId || d.deviceId === "default") continue;
        opts.push(new Option(d.label || `${names[kind]} ${++i}`, d.deviceId));
      }
      sel.replaceChildren(...opts);
      sel.value = opts.some((o) => o.value === keep) ? keep : "";
    }
  }

  // getUserMedia constraints for the chosen mic (and camera): `base` plus the deviceId.
  audio(base) {
    const id = this.selects.audioinput.value;
    return id ? { ...base, deviceId: { exact: id } } : base;
  }

  video(base) {
    const id = this.selects.videoinput.value;
    return id ? { ...base, deviceId: { exact: id } } : base;
  }

  // Send the AudioContext's output to the chosen speaker; a one-line reason if it cannot.
  async applySink(ctx) {
    if (!this.canSink || !ctx) return null;
    try {
      await ctx.setSinkId(this.selects.audiooutput.value);
      return null;
    } catch (e) {
      return `speaker unavailable (${e.name || e})`;
    }
  }
};
