// omnistream browser client: what the server says about itself, and the API key (loaded before app.js).
//
// GET config.json tells whether the server needs an API key (a server that does not serve it, an
// older one or a plain file server, is taken to need none; one that answers 401 needs one). The
// key is asked for in the page's own form and never put in the URL. Where the server mints
// ephemeral keys (POST v1/realtime/client_secrets, authorised by the key), the page exchanges the
// key for one at once and keeps only that short-lived token: the long-lived key leaves the tab's
// memory, and a refused key is known from the HTTP status (a WebSocket handshake hides it). A
// server without the endpoint gets the key itself. What is kept stays in this tab only (memory +
// sessionStorage: it survives a reload, not the tab); app.js sends it in the WebSocket's
// `openai-insecure-api-key.<KEY>` subprotocol, since browsers cannot set headers on a WebSocket.
"use strict";

window.OmniAuth = class OmniAuth {
  // ui: {form, input, note}; onConfig(config) runs once config.json is read.
  constructor(ui, onConfig) {
    this.ui = ui;
    this.store = "omnistream.apiKey";
    this.key = null; // what the WebSocket presents: an ephemeral token, or the key itself
    this.expiresAt = null; // unix seconds (ephemeral tokens), null: does not expire
    try {
      const kept = JSON.parse(sessionStorage.getItem(this.store) || "null");
      if (kept && typeof kept.value === "string") [this.key, this.expiresAt] = [kept.value, kept.expires_at || null];
    } catch (e) { /* storage disabled or unreadable: ask again */ }
    this.config = fetch("config.json", { cache: "no-store" })
      .then((r) => (r.status === 401 ? { api_key_required: true } : r.ok ? r.json() : {}))
      .catch(() => ({}))
      .then((c) => {
        const config = c && typeof c === "object" ? c : {};
        this.required = !!config.api_key_required;
        onConfig(config);
        return config;
      });
  }

  expired() {
    return this.expiresAt !== null && Date.now() / 1000 > this.expiresAt - 5;
  }

  // The key to connect with: null when the server needs none (or there is none, or it expired).
  connectKey() {
    return this.required && !this.expired() ? this.key : null;
  }

  // True when the page must ask before connecting.
  missing() {
    return this.required && (!this.key || this.expired());
  }

  // Show the prompt: why (or, with no note, why it is needed now).
  ask(note) {
    this.ui.note.textContent = note || (this.key && this.expired() ? "The session key expired: enter the API key again."
      : "This server needs an API key.");
    this.ui.form.hidden = false;
    this.ui.input.focus();
  }

  // The form was submitted: null when a key is kept, "" when the field is empty, else the
  // server's one-line reason for refusing it.
  async take() {
    const key = this.ui.input.value.trim();
    if (!key) return "";
    this.ui.input.value = "";
    let r = null;
    if (!key.startsWith("ek_")) { // (an ephemeral key cannot mint another: it is used as it is)
      try {
        r = await fetch("v1/realtime/client_secrets", {
          method: "POST", cache: "no-store", body: "{}",
          headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        });
      } catch (e) { /* the network: the WebSocket will tell */ }
    }
    if (r && r.status === 401) return (await r.text()).split("\n")[0].slice(0, 200) || "unauthorized";
    let minted = null;
    if (r && r.ok) minted = await r.json().catch(() => null);
    if (minted && typeof minted.value === "string") this.keep(minted.value, Number(minted.expires_at) || null);
    else this.keep(key, null); // no ephemeral keys on this server: the key itself
    this.ui.form.hidden = true;
    return null;
  }

  keep(value, expiresAt) {
    [this.key, this.expiresAt] = [value, expiresAt];
    try {
      sessionStorage.setItem(this.store, JSON.stringify({ value, expires_at: expiresAt }));
    } catch (e) { /* storage disabled: memory only */ }
  }
};
