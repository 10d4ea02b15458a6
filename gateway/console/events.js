// The live event stream, GET /v1/events, read with fetch() and a stream reader.
//
// EventSource cannot send an Authorization header, and the API key must never go into a
// URL (URLs end up in logs and history), so this parses the text/event-stream format
// itself (the WHATWG HTML "server-sent events" rules) and reconnects the way EventSource
// would: after a pause, with Last-Event-ID, so the gateway replays what was missed.

import { authHeaders, seg } from './api.js';

/** Incremental text/event-stream parser: `push(text)` calls `onEvent({type, data, id})`. */
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.lastEventId = '';
    this.reset();
  }

  reset() {
    this.type = '';
    this.data = [];
    this.sawData = false;
  }

  push(text) {
    this.buffer += text;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) return;
      // A lone \r at the very end may be the first half of \r\n: wait for more.
      if (m[0] === '\r' && m.index === this.buffer.length - 1) return;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') {
      if (this.sawData) {
        this.onEvent({ type: this.type || 'message', data: this.data.join('\n'), id: this.lastEventId });
      }
      this.reset();
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (name) {
      case 'event': this.type = value; break;
      case 'data': this.data.push(value); this.sawData = true; break;
      case 'id': if (!value.includes('\0')) this.lastEventId = value; break;
      default: break; // `retry` and unknown fields: ignored.
    }
  }
}

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 10000;

/**
 * One live subscription: `new EventStream({device, onEvent, onState, onResync}).start()`,
 * `.stop()`. `onEvent(type, payload)` gets parsed JSON; `onState` gets 'connecting', 'live',
 * 'reconnecting' or 'stopped'. `onResync` is called after a reconnect that could not resume
 * (no event seen before the drop, so no Last-Event-ID): what the view shows may be stale,
 * and only reading it again tells. A 401 ends the stream (the console signs out).
 */
export class EventStream {
  constructor({ device, onEvent, onState = () => {}, onResync = () => {} }) {
    this.url = device ? `/v1/events?device=${seg(device)}` : '/v1/events';
    this.onEvent = onEvent;
    this.onState = onState;
    this.onResync = onResync;
    this.connected = false;
    this.lastEventId = null;
    this.stopped = false;
    this.abort = null;
  }

  start() {
    this.loop();
    return this;
  }

  stop() {
    this.stopped = true;
    this.abort?.abort();
    this.onState('stopped');
  }

  async loop() {
    let delay = MIN_DELAY_MS;
    this.onState('connecting');
    while (!this.stopped) {
      this.abort = new AbortController();
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (this.lastEventId !== null) headers['Last-Event-ID'] = this.lastEventId;
        const resp = await fetch(this.url, { headers, signal: this.abort.signal, cache: 'no-store' });
        if (resp.status === 401) {
          window.dispatchEvent(new CustomEvent('console:unauthorized'));
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
        delay = MIN_DELAY_MS;
        this.onState('live');
        if (this.connected && this.lastEventId === null) this.onResync();
        this.connected = true;
        await this.read(resp.body);
      } catch (e) {
        if (this.stopped) return;
        if (e.name !== 'AbortError') console.debug('event stream:', e.message);
      }
      if (this.stopped) return;
      this.onState('reconnecting');
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
  }

  async read(body) {
    const parser = new SseParser((ev) => {
      if (ev.id !== '') this.lastEventId = ev.id;
      let payload;
      try { payload = JSON.parse(ev.data); } catch { return; }
      try { this.onEvent(ev.type, payload); } catch (e) { console.error('event handler:', e); }
    });
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.stopped) return;
      parser.push(value);
    }
  }
}
