// Shared harness for herald's JavaScript end-to-end tests.
//
// Starts real herald processes on ephemeral ports, mints JWTs with plain
// node:crypto, and wraps the Socket.IO client, the plain WebSocket client and
// the HTTP API with small promise-based helpers. Every server, socket and
// WebSocket created through this module is closed/stopped in an `after()` hook
// (and killed on process exit as a backstop), so nothing outlives a test file.
//
// Environment knobs:
//   HERALD_BIN        path of the binary (default <repo>/target/debug/herald)
//   HERALD_TEST_LOGS  if set, server log lines are echoed to stderr

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac, randomBytes, sign as cryptoSign } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const HERALD_BIN = process.env.HERALD_BIN ?? path.join(REPO_ROOT, 'target', 'debug', 'herald');

const STARTUP_TIMEOUT_MS = 20_000;
const STOP_GRACE_MS = 10_000;

const liveServers = new Set();
const liveClients = new Set(); // socket.io sockets and WsClients

export function rand(bytes = 6) {
  return randomBytes(bytes).toString('hex');
}

// ---------------------------------------------------------------------------
// Cleanup
// ---------------------------------------------------------------------------

after(async () => {
  for (const c of liveClients) {
    try {
      c.close();
    } catch {
      // already closed
    }
  }
  liveClients.clear();
  await Promise.allSettled([...liveServers].map((s) => s.stop()));
});

process.on('exit', () => {
  for (const s of liveServers) {
    if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill('SIGKILL');
  }
});

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

/**
 * Spawn `herald serve` on an ephemeral port and wait until it logs that it is
 * listening. `env` overrides the defaults; a value of `undefined` removes the
 * variable.
 */
export async function startHerald(env = {}) {
  if (!existsSync(HERALD_BIN)) {
    throw new Error(`herald binary not found at ${HERALD_BIN} (run \`cargo build\` or set HERALD_BIN)`);
  }
  const dataDir = mkdtempSync(path.join(tmpdir(), 'herald-js-'));

  // Start from the caller's environment, but drop herald/JWT settings that a
  // developer may have exported in their shell so runs are hermetic.
  const base = {};
  for (const [k, v] of Object.entries(process.env)) {
    if ((k.startsWith('HERALD_') && k !== 'HERALD_BIN') || k.startsWith('JWT_')) continue;
    base[k] = v;
  }
  const merged = {
    ...base,
    PORT: '0',
    HERALD_HOST: '127.0.0.1',
    JWT_SECRET: rand(24),
    HERALD_API_KEY: `key-${rand(16)}`,
    INSTANCE_ID: `js-${rand(4)}`,
    HERALD_DATA_DIR: dataDir,
    HERALD_NAMESPACES: '/,/events',
    RUST_LOG: 'info',
    HERALD_LOG_FORMAT: 'text',
    NO_COLOR: '1',
    // Every test connects from 127.0.0.1, some thousands at once; tests of the limit set it.
    HERALD_IP_CONNECT_RATE: '0',
    ...env,
  };
  const childEnv = {};
  for (const [k, v] of Object.entries(merged)) if (v !== undefined) childEnv[k] = String(v);

  const proc = spawn(HERALD_BIN, ['serve'], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = [];
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));

  let stopping = null;
  const server = {
    url: null,
    port: null,
    secret: childEnv.JWT_SECRET,
    apiKey: childEnv.HERALD_API_KEY,
    instance: childEnv.INSTANCE_ID,
    dataDir,
    proc,
    logs,
    /** SIGTERM, then SIGKILL after 10 s. Resolves with {code, signal}. */
    stop() {
      if (stopping) return stopping;
      stopping = (async () => {
        if (proc.exitCode === null && proc.signalCode === null) {
          proc.kill('SIGTERM');
          const timer = setTimeout(() => proc.kill('SIGKILL'), STOP_GRACE_MS);
          const res = await exited;
          clearTimeout(timer);
          liveServers.delete(server);
          rmSync(dataDir, { recursive: true, force: true });
          return res;
        }
        liveServers.delete(server);
        rmSync(dataDir, { recursive: true, force: true });
        return { code: proc.exitCode, signal: proc.signalCode };
      })();
      return stopping;
    },
    /** Last `n` log lines, for assertion messages. */
    tail(n = 40) {
      return logs.slice(-n).join('\n');
    },
  };
  liveServers.add(server);

  const ready = new Promise((resolve, reject) => {
    const onLine = (raw) => {
      const line = raw.replace(ANSI, '');
      logs.push(line);
      if (process.env.HERALD_TEST_LOGS) process.stderr.write(`[herald ${server.instance}] ${line}\n`);
      if (server.port === null && /\blistening\b/.test(line)) {
        const m = line.match(/addr=(\S+)/);
        const port = m && m[1].replace(/["',]/g, '').match(/:(\d+)$/);
        if (port) {
          server.port = Number(port[1]);
          server.url = `http://127.0.0.1:${server.port}`;
          resolve(server);
        }
      }
    };
    readline.createInterface({ input: proc.stdout }).on('line', onLine);
    readline.createInterface({ input: proc.stderr }).on('line', onLine);
    proc.once('error', (err) => reject(new Error(`failed to spawn ${HERALD_BIN}: ${err.message}`)));
    exited.then(({ code, signal }) => {
      if (server.port === null) {
        reject(new Error(`herald exited before listening (code=${code} signal=${signal}). Log:\n${logs.join('\n')}`));
      }
    });
  });

  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new Error(`herald did not report "listening addr=..." within ${STARTUP_TIMEOUT_MS} ms. Log:\n${logs.join('\n')}`),
        ),
      STARTUP_TIMEOUT_MS,
    );
  });
  try {
    return await Promise.race([ready, timeout]);
  } catch (err) {
    await server.stop();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------

export function b64url(input) {
  return Buffer.from(input).toString('base64url');
}

export function nowSecs() {
  return Math.floor(Date.now() / 1000);
}

/** Default claims: random sub, issued now, expires in an hour. */
export function claims(extra = {}) {
  const now = nowSecs();
  return { sub: `user-${rand(4)}`, exp: now + 3600, iat: now, ...extra };
}

/**
 * Sign `payload` as a compact JWT. `key` is the HMAC secret for HS256 and a
 * private KeyObject/PEM for RS256/ES256. `header` overrides header fields.
 */
export function signJwt(alg, key, payload, header = {}) {
  const signingInput = `${b64url(JSON.stringify({ alg, typ: 'JWT', ...header }))}.${b64url(JSON.stringify(payload))}`;
  let sig;
  switch (alg) {
    case 'HS256':
      sig = createHmac('sha256', key).update(signingInput).digest();
      break;
    case 'RS256':
      sig = cryptoSign('sha256', Buffer.from(signingInput), key);
      break;
    case 'ES256':
      sig = cryptoSign('sha256', Buffer.from(signingInput), { key, dsaEncoding: 'ieee-p1363' });
      break;
    case 'none':
      sig = Buffer.alloc(0);
      break;
    default:
      throw new Error(`unsupported alg ${alg}`);
  }
  return `${signingInput}.${b64url(sig)}`;
}

/** HS256 token with default claims merged with `extra` (e.g. {sub, rooms}). */
export function token(secret, extra = {}) {
  return signJwt('HS256', secret, claims(extra));
}

// ---------------------------------------------------------------------------
// Generic waiting helpers
// ---------------------------------------------------------------------------

function show(v) {
  try {
    const s = JSON.stringify(v);
    return s.length > 600 ? `${s.slice(0, 600)}…` : s;
  } catch {
    return String(v);
  }
}

/** Resolve with the first payload of `event` (optionally matching `pred`). */
export function waitFor(emitter, event, timeoutMs = 5000, pred = () => true) {
  return new Promise((resolve, reject) => {
    const handler = (payload) => {
      if (!pred(payload)) return;
      clearTimeout(timer);
      emitter.off(event, handler);
      resolve(payload);
    };
    const timer = setTimeout(() => {
      emitter.off(event, handler);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for "${event}"`));
    }, timeoutMs);
    emitter.on(event, handler);
  });
}

/**
 * Record every payload of `event` from now on. `until(countOrPredicate)`
 * waits until enough have arrived.
 */
export function collect(emitter, event, filter = () => true) {
  const items = [];
  let waiters = [];
  const check = () => {
    waiters = waiters.filter((w) => {
      if (!w.done()) return true;
      clearTimeout(w.timer);
      w.resolve(items);
      return false;
    });
  };
  const handler = (payload) => {
    if (!filter(payload)) return;
    items.push(payload);
    check();
  };
  emitter.on(event, handler);
  return {
    items,
    until(target, timeoutMs = 5000) {
      const done = typeof target === 'number' ? () => items.length >= target : () => target(items);
      if (done()) return Promise.resolve(items);
      return new Promise((resolve, reject) => {
        const w = { done, resolve };
        w.timer = setTimeout(() => {
          waiters = waiters.filter((x) => x !== w);
          const what = typeof target === 'number' ? `${target} "${event}" events` : `"${event}" condition`;
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; got ${items.length}: ${show(items)}`));
        }, timeoutMs);
        waiters.push(w);
      });
    },
    stop() {
      emitter.off(event, handler);
    },
  };
}

// ---------------------------------------------------------------------------
// Socket.IO
// ---------------------------------------------------------------------------

/** A socket.io-client socket; `tok` goes in `auth` unless null/undefined. */
export function connect(url, tok, opts = {}) {
  const socket = io(url, {
    ...(tok === undefined || tok === null ? {} : { auth: { token: tok } }),
    transports: opts.transports ?? ['websocket'],
    reconnection: false,
    forceNew: true,
    ...opts,
  });
  liveClients.add(socket);
  return socket;
}

/** Resolve when `socket` connects; reject with the connect_error otherwise. */
export function connected(socket, timeoutMs = 10_000) {
  if (socket.connected) return Promise.resolve(socket);
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('connect_error', onError);
    };
    const onConnect = () => {
      cleanup();
      resolve(socket);
    };
    const onError = (err) => {
      cleanup();
      reject(new Error(`connect_error: ${err?.message}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`socket did not connect within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('connect', onConnect);
    socket.on('connect_error', onError);
  });
}

/**
 * Resolve with the connect_error of a socket that must be refused; reject if it
 * connects instead.
 */
export function connectError(socket, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('connect_error', onError);
    };
    const onConnect = () => {
      cleanup();
      reject(new Error('socket connected but was expected to be refused'));
    };
    const onError = (err) => {
      cleanup();
      resolve(err);
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`no connect_error within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('connect', onConnect);
    socket.on('connect_error', onError);
  });
}

/**
 * Connect as a user and wait for both `connect` and the `session` event.
 * Options: sub, claims (extra JWT claims), ns ('/events'), plus io options.
 * Returns {socket, user, session, token}.
 */
export async function openClient(server, { sub = `user-${rand(4)}`, claims: extra = {}, ns = '', ...opts } = {}) {
  const tok = token(server.secret, { sub, ...extra });
  const socket = connect(`${server.url}${ns}`, tok, opts);
  const session = waitFor(socket, 'session', 10_000);
  await connected(socket);
  return { socket, user: sub, session: await session, token: tok };
}

/** emitWithAck with a timeout; rejects with a readable error on timeout. */
export async function emitAck(socket, event, data, timeoutMs = 5000) {
  try {
    return await socket.timeout(timeoutMs).emitWithAck(event, data);
  } catch (err) {
    throw new Error(`no ack for "${event}" ${show(data)} within ${timeoutMs} ms (${err?.message})`);
  }
}

/** emitWithAck of an event without any payload argument. */
export async function emitAckNoArgs(socket, event, timeoutMs = 5000) {
  try {
    return await socket.timeout(timeoutMs).emitWithAck(event);
  } catch (err) {
    throw new Error(`no ack for "${event}" within ${timeoutMs} ms (${err?.message})`);
  }
}

/** Join and assert the ack is ok; returns the ack. */
export async function join(socket, roomOrObj) {
  const ack = await emitAck(socket, 'join', roomOrObj);
  if (!ack?.ok) throw new Error(`join ${show(roomOrObj)} failed: ${show(ack)}`);
  return ack;
}

/** Publish and assert the ack is ok; returns the ack. */
export async function publish(socket, room, data) {
  const ack = await emitAck(socket, 'message', { room, data });
  if (!ack?.ok) throw new Error(`publish to ${room} failed: ${show(ack)}`);
  return ack;
}

/**
 * Synchronisation point without sleeping: publish a unique marker into `room`
 * from `sender` and wait until every socket in `observers` has received it.
 * Anything the server pushed to those sockets before the marker has then
 * been seen too.
 */
export async function barrier(sender, room, observers = [sender], timeoutMs = 5000) {
  const marker = `barrier-${rand(6)}`;
  const seen = observers.map((o) =>
    waitFor(o, 'message', timeoutMs, (m) => m?.room === room && m?.data?.barrier === marker),
  );
  await publish(sender, room, { barrier: marker });
  await Promise.all(seen);
}

export const isBarrier = (m) => typeof m?.data?.barrier === 'string';

// ---------------------------------------------------------------------------
// Plain WebSocket (/ws)
// ---------------------------------------------------------------------------

/**
 * JSON frame client for /ws. Emits 'frame' for every frame and additionally
 * 'ack' / 'message' / 'presence' / 'event' by type.
 */
export class WsClient extends EventEmitter {
  constructor(ws) {
    super();
    this.ws = ws;
    this.frames = [];
    this.nextId = 1;
    this.session = waitFor(this, 'event', 10_000, (f) => f.event === 'session').then((f) => f.data);
    this.session.catch(() => {});
    this.closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: String(reason) })));
    ws.on('message', (raw, isBinary) => {
      let frame;
      try {
        frame = JSON.parse(isBinary ? raw : String(raw));
      } catch {
        frame = { type: '__unparseable__', raw: String(raw) };
      }
      this.frames.push(frame);
      this.emit('frame', frame);
      if (['ack', 'message', 'presence', 'event'].includes(frame?.type)) this.emit(frame.type, frame);
    });
    ws.on('error', () => {}); // surfaced via `closed` / timeouts instead
  }

  get isOpen() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  /** Send an object as JSON, or a string verbatim. */
  send(frame) {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
  }

  /** Send a frame with a fresh id (unless given) and resolve with its ack. */
  request(frame, timeoutMs = 5000) {
    const id = frame.id ?? `req-${this.nextId++}`;
    const ack = waitFor(this, 'ack', timeoutMs, (f) => f.id === id).catch(() => {
      throw new Error(`no ack for ws frame ${show({ ...frame, id })} within ${timeoutMs} ms`);
    });
    this.send({ ...frame, id });
    return ack;
  }

  close() {
    if (this.ws.readyState === WebSocket.CONNECTING || this.ws.readyState === WebSocket.OPEN) this.ws.terminate();
  }
}

export function wsUrl(server, tok) {
  const base = `ws://127.0.0.1:${server.port}/ws`;
  return tok === undefined || tok === null ? base : `${base}?token=${encodeURIComponent(tok)}`;
}

/** Open /ws (token in the query unless `headers` carry it); resolve once open. */
export function wsConnect(server, tok, { headers, timeoutMs = 10_000 } = {}) {
  const ws = new WebSocket(wsUrl(server, tok), { headers });
  const client = new WsClient(ws);
  liveClients.add(client);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`/ws did not open within ${timeoutMs} ms`)), timeoutMs);
    ws.once('open', () => {
      clearTimeout(timer);
      resolve(client);
    });
    ws.once('unexpected-response', (_req, res) => {
      clearTimeout(timer);
      res.resume();
      ws.terminate();
      reject(new Error(`/ws upgrade refused with HTTP ${res.statusCode}`));
    });
    ws.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** Open /ws as a user and wait for the session frame. Returns {ws, user, session}. */
export async function openWs(server, { sub = `user-${rand(4)}`, claims: extra = {} } = {}) {
  const ws = await wsConnect(server, token(server.secret, { sub, ...extra }));
  return { ws, user: sub, session: await ws.session };
}

/** Attempt an upgrade that must be refused; resolves with the HTTP status. */
export function wsRefusedStatus(server, tok, { headers, timeoutMs = 10_000 } = {}) {
  const ws = new WebSocket(wsUrl(server, tok), { headers });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`/ws upgrade neither accepted nor refused in ${timeoutMs} ms`)), timeoutMs);
    ws.once('unexpected-response', (_req, res) => {
      clearTimeout(timer);
      res.resume();
      ws.terminate();
      resolve(res.statusCode);
    });
    ws.once('open', () => {
      clearTimeout(timer);
      ws.terminate();
      reject(new Error('/ws upgrade was accepted but should have been refused'));
    });
    ws.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

// ---------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------

/**
 * Call the HTTP API. `body` is sent as JSON, `rawBody` verbatim. The bearer is
 * the server's API key unless `key` is given (null = no Authorization header).
 * Resolves with {status, headers, text, json}.
 */
export async function http(server, method, pathname, { body, rawBody, key = server.apiKey, headers = {} } = {}) {
  const h = { ...headers };
  if (key !== null) h.authorization = `Bearer ${key}`;
  let payload;
  if (body !== undefined) {
    h['content-type'] = 'application/json';
    payload = JSON.stringify(body);
  } else if (rawBody !== undefined) {
    h['content-type'] ??= 'application/json';
    payload = rawBody;
  }
  const res = await fetch(`${server.url}${pathname}`, {
    method,
    headers: h,
    body: payload,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, text, json };
}

export function roomPath(room, suffix, query = {}) {
  const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined)).toString();
  return `/api/rooms/${encodeURIComponent(room)}/${suffix}${qs ? `?${qs}` : ''}`;
}

// ---------------------------------------------------------------------------
// Assertion helpers
// ---------------------------------------------------------------------------

export const MESSAGE_FIELDS = ['data', 'from', 'id', 'offset', 'room', 'ts'];

/**
 * Acks and HTTP bodies are documented as `{ok:true, ...}`: assert that every
 * documented field is present with a deep-equal value, tolerating extra
 * fields. (Message events, presence events and the session are checked for
 * their exact field set where they are asserted.)
 */
export function assertAck(actual, expected, message) {
  const picked = {};
  for (const k of Object.keys(expected)) if (actual !== null && typeof actual === 'object' && k in actual) picked[k] = actual[k];
  assert.deepEqual(picked, expected, message ?? `ack ${show(actual)} should include ${show(expected)}`);
}

/** Unique room name per call so tests sharing a server never interfere. */
export function roomName(prefix = 'room') {
  return `${prefix}:${rand(4)}`;
}
