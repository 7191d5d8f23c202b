// scanqueue console (docs/reference.md#console) — the live event stream, read with fetch().
//
// An EventSource cannot send an Authorization header, and the contract (§4) wants that
// header on every /api/ route when a token is set; a token in the URL would end up in
// access logs, proxies and history. So the page reads GET /api/v1/events with fetch()
// and a streaming body reader, sending `Authorization: Bearer …` (when the tab has a
// token) and `Last-Event-ID` itself, parses the text/event-stream format (id:, event:,
// data:, retry:, comments, blank-line dispatch) and reconnects with backoff after a
// drop, resuming after the last id it saw. The same code path serves a server without
// a token.

import {API, authHeaders, state} from "./core.js";

const RETRY_MIN_MS = 1000;      // first reconnection delay (the server's retry: overrides)
const RETRY_MAX_MS = 10000;     // backoff ceiling: a restarted server is seen within 10 s

// -- the text/event-stream format (html.spec.whatwg.org, "Server-sent events") ----------------

class EventStreamParser {
  // Feed it decoded text in any chunking; it calls onId(id) and onEvent({type, data, id})
  // at each dispatch (onId even for an event without data, as EventSource does) and
  // onRetry(ms) for a retry: field.
  constructor({onEvent, onId, onRetry}) {
    this.onEvent = onEvent;
    this.onId = onId || (() => {});
    this.onRetry = onRetry || (() => {});
    this.buffer = "";
    this.data = "";
    this.type = "";
    this.lastId = "";
  }

  feed(text) {
    this.buffer += text;
    for (;;) {
      const m = this.buffer.match(/\r\n|\r|\n/);
      if (!m) return;
      // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
      if (m[0] === "\r" && m.index === this.buffer.length - 1) return;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return;                     // a comment (keepalive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data += value + "\n";
    else if (field === "event") this.type = value;
    else if (field === "id") { if (!value.includes("\0")) this.lastId = value; }
    else if (field === "retry") { if (/^\d+$/.test(value)) this.onRetry(Number(value)); }
  }

  dispatch() {
    const data = this.data, type = this.type || "message";
    this.data = "";
    this.type = "";
    if (this.lastId) this.onId(this.lastId);
    if (data === "") return;
    this.onEvent({type, data: data.slice(0, -1), id: this.lastId});
  }
}

// -- the connection ----------------------------------------------------------------------------

function openStream({onOpen, onEvent, onDown, onRefused}) {
  // Starts reading at once; returns {close()}. onDown() on every drop (then it
  // retries by itself), onRefused() on a 401 (then it stops: the token is wrong).
  let closed = false;
  let controller = null;
  let timer = null;
  let baseDelay = RETRY_MIN_MS;
  let delay = RETRY_MIN_MS;

  function retryLater() {
    if (closed) return;
    onDown();
    clearTimeout(timer);
    timer = setTimeout(run, delay);
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }

  async function run() {
    if (closed) return;
    controller = new AbortController();
    const headers = authHeaders({Accept: "text/event-stream"});
    if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
    let response;
    try {
      response = await fetch(API + "/events", {
        headers, cache: "no-store", credentials: "omit", signal: controller.signal,
      });
    } catch (e) { return retryLater(); }               // the server cannot be reached
    if (closed) return;
    if (response.status === 401) { closed = true; onRefused(); return; }
    const type = response.headers.get("content-type") || "";
    if (!response.ok || !type.startsWith("text/event-stream")) {
      // 503 (subscriber cap) or a 400 for an id of another stream (start from now).
      if (response.status === 400) state.lastEventId = "";
      response.body && response.body.cancel().catch(() => {});
      return retryLater();
    }
    delay = baseDelay;
    onOpen();
    const parser = new EventStreamParser({
      onId: (id) => { state.lastEventId = id; },
      onEvent,
      onRetry: (ms) => { baseDelay = delay = Math.min(Math.max(ms, 100), RETRY_MAX_MS); },
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        parser.feed(decoder.decode(value, {stream: true}));
      }
    } catch (e) { /* dropped, or closed by us */ }
    retryLater();
  }

  run();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      if (controller) controller.abort();
    },
  };
}

export {EventStreamParser, openStream, RETRY_MIN_MS, RETRY_MAX_MS};
