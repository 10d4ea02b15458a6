// The console's entry point: sign in and out, and the hash router that mounts one view at a
// time (`#/` the fleet, `#/devices/ID` one device, `#/browser-device` the in-page device).

import { session, get, ApiError } from './api.js';
import { h, fill, field, tickRelativeTimes } from './dom.js';
import { mountFleet } from './fleet.js';
import { mountDevice } from './device.js';
import { disconnectBrowserDevice, mountBrowserDevice } from './browser-device.js';

const view = document.getElementById('view');
const nav = document.getElementById('nav');
const sessionBar = document.getElementById('session');
const streamState = document.getElementById('stream-state');

let unmount = null;
let signedIn = false;

// Counted for the tests and for anyone debugging: the page should never trip its own policy.
let violations = 0;
document.addEventListener('securitypolicyviolation', (e) => {
  violations += 1;
  document.body.dataset.cspViolations = String(violations);
  console.warn('blocked by the Content-Security-Policy:', e.violatedDirective, e.blockedURI);
});

const STREAM_STATES = {
  connecting: ['connecting…', 'muted'],
  live: ['live', 'ok'],
  reconnecting: ['reconnecting…', 'warn'],
  stopped: ['idle', 'muted'],
};

/** Shows the state of the current view's event stream in the top bar. */
function setStreamState(state) {
  const [text, tone] = STREAM_STATES[state] ?? STREAM_STATES.stopped;
  streamState.textContent = text;
  streamState.className = `pill pill-${tone}`;
  streamState.dataset.state = state;
}

function route() {
  unmount?.();
  unmount = null;
  setStreamState('stopped');
  if (!signedIn) {
    nav.hidden = true;
    sessionBar.hidden = true;
    showSignIn();
    return;
  }
  nav.hidden = false;
  sessionBar.hidden = false;
  const hash = location.hash.replace(/^#/, '') || '/';
  const ctx = { setStreamState };
  let current = 'fleet';
  const device = /^\/devices\/(.+)$/.exec(hash);
  if (hash === '/' || hash === '/fleet') {
    unmount = mountFleet(view, ctx);
  } else if (device) {
    unmount = mountDevice(view, decodeURIComponent(device[1]), ctx);
  } else if (hash === '/browser-device') {
    current = 'browser-device';
    unmount = mountBrowserDevice(view, ctx);
  } else {
    current = '';
    fill(view, h('div', { class: 'empty' }, 'No such page. ', h('a', { href: '#/' }, 'Back to the fleet')));
  }
  for (const a of nav.querySelectorAll('a')) {
    if (a.dataset.nav === current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function showSignIn(message) {
  const input = h('input', {
    id: 'api-key', type: 'password', autocomplete: 'off', required: true,
    spellcheck: 'false', placeholder: 'API key',
  });
  const error = h('p', { class: 'form-error', id: 'sign-in-error', role: 'alert' }, message ?? '');
  const button = h('button', { class: 'btn btn-primary', type: 'submit', id: 'sign-in' }, 'Sign in');
  const form = h('form', { class: 'sign-in-form', onsubmit: (e) => { e.preventDefault(); signIn(input.value.trim(), error, button); } },
    field('Operator API key', input,
      'Kept in this browser tab only (sessionStorage), sent only to this gateway. '
      + 'It is the gateway\'s --api-key, or the file data/api-key beside its database.'),
    error,
    button);
  fill(view, h('div', { class: 'sign-in' },
    h('div', { class: 'card sign-in-card' },
      h('h1', {}, 'Sign in'),
      h('p', { class: 'muted' }, 'Watch the fleet, follow a device live, send it commands, or become a device in this page.'),
      form)));
  input.focus();
}

async function signIn(key, error, button) {
  if (!key) return;
  button.disabled = true;
  error.textContent = '';
  session.signIn(key);
  try {
    await get('/devices?limit=1');
    signedIn = true;
    route();
  } catch (e) {
    session.signOut();
    error.textContent = e instanceof ApiError && e.status === 401
      ? 'The gateway refused this key.'
      : `Cannot sign in: ${e.message}`;
    button.disabled = false;
  }
}

function signOut(message) {
  session.signOut();
  disconnectBrowserDevice();
  signedIn = false;
  unmount?.();
  unmount = null;
  if (message) {
    nav.hidden = true;
    sessionBar.hidden = true;
    setStreamState('stopped');
    showSignIn(message);
  } else {
    route();
  }
}

document.getElementById('sign-out').addEventListener('click', () => signOut());
window.addEventListener('console:unauthorized', () => {
  if (signedIn) signOut('The gateway no longer accepts this key: sign in again.');
});
window.addEventListener('hashchange', route);
tickRelativeTimes();

signedIn = session.key() !== null;
route();
