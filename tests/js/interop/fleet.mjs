// Helpers for interop tests: a private Redis, herald instances wired to it, a
// stock Node Socket.IO peer (node-peer.mjs) and a @socket.io/redis-emitter,
// all on one Redis and one key prefix. Builds on ../harness.mjs (which stops
// every herald and client it started); everything started here is stopped in
// an `after()` hook too, and killed on process exit as a backstop.
//
// Environment knobs:
//   REDIS_URL          use this Redis instead of starting a private one
//   REDIS_PASSWORD     password for it (also passed to herald and the peers)
//   REDIS_SERVER_BIN   redis-server to start (default: `redis-server` from PATH)
//   HERALD_TEST_LOGS   echo herald, redis-server and node-peer output to stderr

import { spawn, fork } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Emitter } from '@socket.io/redis-emitter';
import { createClient } from 'redis';
import { connect, connected, emitAck, rand, startHerald } from '../harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const NODE_PEER = path.join(HERE, 'node-peer.mjs');

const REDIS_START_TIMEOUT_MS = 10_000;
const PEER_START_TIMEOUT_MS = 10_000;

const liveRedis = new Set();
const livePeers = new Set();
const liveRedisClients = new Set();

after(async () => {
  await Promise.allSettled([...liveRedisClients].map((c) => c.quit().catch(() => c.disconnect())));
  liveRedisClients.clear();
  await Promise.allSettled([...livePeers].map((p) => p.stop()));
  await Promise.allSettled([...liveRedis].map((r) => r.stop()));
});

process.on('exit', () => {
  for (const p of livePeers) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
  for (const r of liveRedis) if (r.proc && r.proc.exitCode === null && r.proc.signalCode === null) r.proc.kill('SIGKILL');
});

/** A fresh key prefix, used as HERALD_REDIS_KEY and the adapter/emitter `key`. */
export function uniqueKey(label = 'interop') {
  return `herald-${label}-${rand(4)}`;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} (no answer within ${ms} ms)`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/**
 * Use $REDIS_URL when set, else start a private `redis-server` on a free
 * loopback port with persistence off. Resolves with
 * {url, password, external, stop(), restart(), logs}.
 * `restart()` stops the private server and starts it again on the same port
 * (same URL, empty dataset): for reconnect tests. Options: {password}.
 */
export async function startRedis({ password } = {}) {
  if (process.env.REDIS_URL) {
    const r = {
      url: process.env.REDIS_URL,
      password: process.env.REDIS_PASSWORD || undefined,
      external: true,
      logs: [],
      proc: null,
      async stop() {},
      async restart() {
        throw new Error('cannot restart an external Redis ($REDIS_URL is set); skip this test or unset REDIS_URL');
      },
    };
    return r;
  }

  const bin = process.env.REDIS_SERVER_BIN ?? 'redis-server';
  const port = await freePort();
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
  if (password) args.push('--requirepass', password);
  const logs = [];

  const r = {
    url: `redis://127.0.0.1:${port}`,
    password,
    port,
    external: false,
    logs,
    proc: null,
    async stop() {
      const proc = r.proc;
      if (!proc) return;
      r.proc = null;
      liveRedis.delete(r);
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((resolve) => proc.once('exit', resolve));
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
    async restart() {
      await r.stop();
      await launch();
    },
    tail(n = 30) {
      return logs.slice(-n).join('\n');
    },
  };

  async function launch() {
    let proc;
    try {
      proc = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      throw new Error(`cannot start ${bin}: ${err.message}`);
    }
    r.proc = proc;
    liveRedis.add(r);
    const ready = new Promise((resolve, reject) => {
      const onLine = (line) => {
        logs.push(line);
        if (process.env.HERALD_TEST_LOGS) process.stderr.write(`[redis :${port}] ${line}\n`);
        if (/Ready to accept connections/i.test(line)) resolve();
      };
      readline.createInterface({ input: proc.stdout }).on('line', onLine);
      readline.createInterface({ input: proc.stderr }).on('line', onLine);
      proc.once('error', (err) =>
        reject(
          new Error(
            err.code === 'ENOENT'
              ? `${bin} not found on PATH and REDIS_URL is not set: install Redis (apt-get install redis-server) or point REDIS_URL at one`
              : `cannot start ${bin}: ${err.message}`,
          ),
        ),
      );
      proc.once('exit', (code, signal) =>
        reject(new Error(`${bin} exited before it was ready (code=${code} signal=${signal}):\n${logs.join('\n')}`)),
      );
    });
    try {
      await withTimeout(ready, REDIS_START_TIMEOUT_MS, `${bin} on port ${port} did not get ready:\n${logs.join('\n')}`);
    } catch (err) {
      await r.stop();
      throw err;
    }
  }

  await launch();
  return r;
}

/** A connected node-redis client for direct inspection (PUBSUB NUMSUB, MONITOR…). */
export async function redisClient(redis) {
  const c = createClient({ url: redis.url, password: redis.password || undefined });
  c.on('error', () => {}); // surfaced through command failures instead
  liveRedisClients.add(c);
  await withTimeout(c.connect(), 5000, `cannot connect to Redis at ${redis.url}`);
  return c;
}

/** PUBSUB NUMSUB of one channel. */
export async function numsub(client, channel) {
  const res = await client.sendCommand(['PUBSUB', 'NUMSUB', channel]);
  return Number(res[1]);
}

/**
 * Poll PUBSUB NUMSUB of `channel` until it reaches `n` (servers may log
 * "listening" a moment before their SUBSCRIBE lands). Resolves with the last
 * count; never rejects on a count mismatch.
 */
export async function waitNumsub(client, channel, n, timeoutMs = 3000) {
  const deadline = Date.now() + timeoutMs;
  let count = await numsub(client, channel);
  while (count < n && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    count = await numsub(client, channel);
  }
  return count;
}

// ---------------------------------------------------------------------------
// Channel names (@socket.io/redis-adapter 8 classic mode)
// ---------------------------------------------------------------------------

export function channels(key, nsp = '/') {
  return {
    broadcast: `${key}#${nsp}#`,
    room: (room) => `${key}#${nsp}#${room}#`,
    request: `${key}-request#${nsp}#`,
    response: `${key}-response#${nsp}#`,
    specificResponse: (uid) => `${key}-response#${nsp}#${uid}#`,
  };
}

// ---------------------------------------------------------------------------
// herald on Redis
// ---------------------------------------------------------------------------

/**
 * Start one herald on `redis` with key prefix `key`. Fleet members share the
 * JWT secret and API key passed in `env` (see startHeraldFleet).
 */
export function startHeraldOnRedis(redis, key, env = {}) {
  return startHerald({
    REDIS_URL: redis.url,
    REDIS_PASSWORD: redis.password || undefined,
    HERALD_REDIS_KEY: key,
    HERALD_PRESENCE_TTL: '3s',
    ...env,
  });
}

/** Start `n` herald instances sharing Redis, key, JWT secret and API key. */
export async function startHeraldFleet(redis, key, n = 2, env = {}) {
  const shared = { JWT_SECRET: `fleet-${rand(24)}`, HERALD_API_KEY: `key-${rand(16)}`, ...env };
  const servers = [];
  for (let i = 0; i < n; i++) {
    servers.push(await startHeraldOnRedis(redis, key, { INSTANCE_ID: `fleet-${i + 1}-${rand(3)}`, ...shared }));
  }
  return servers;
}

// ---------------------------------------------------------------------------
// Node Socket.IO peer
// ---------------------------------------------------------------------------

/**
 * Fork node-peer.mjs on `redis` with key prefix `key`. Resolves with
 * {port, url, uid, key, call(cmd, args, timeoutMs), stop(), logs}.
 */
export async function startNodePeer(redis, key, { requestsTimeout = 5000 } = {}) {
  const logs = [];
  const proc = fork(NODE_PEER, [], {
    env: {
      ...process.env,
      REDIS_URL: redis.url,
      REDIS_PASSWORD: redis.password ?? '',
      PEER_KEY: key,
      PEER_REQUESTS_TIMEOUT: String(requestsTimeout),
      PEER_PORT: '0',
    },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  });
  for (const stream of [proc.stdout, proc.stderr]) {
    readline.createInterface({ input: stream }).on('line', (line) => {
      logs.push(line);
      if (process.env.HERALD_TEST_LOGS) process.stderr.write(`[node-peer] ${line}\n`);
    });
  }
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  const pending = new Map();
  let nextId = 1;
  proc.on('message', (msg) => {
    if (msg?.id === undefined) return;
    const p = pending.get(msg.id);
    if (!p) return;
    pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new Error(`node-peer ${p.cmd} failed: ${msg.error}`));
  });
  exited.then(({ code, signal }) => {
    for (const [, p] of pending) {
      clearTimeout(p.timer);
      p.reject(new Error(`node-peer exited (code=${code} signal=${signal}) during ${p.cmd}:\n${logs.join('\n')}`));
    }
    pending.clear();
  });

  let stopping = null;
  const peer = {
    proc,
    logs,
    key,
    port: null,
    url: null,
    uid: null,
    /** Run a control command; rejects after `timeoutMs`. */
    call(cmd, args = {}, timeoutMs = 8000) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        return Promise.reject(new Error(`node-peer is not running; log:\n${logs.join('\n')}`));
      }
      const id = nextId++;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          pending.delete(id);
          reject(new Error(`node-peer ${cmd} did not answer within ${timeoutMs} ms`));
        }, timeoutMs);
        pending.set(id, { resolve, reject, timer, cmd });
        proc.send({ id, cmd, ...args });
      });
    },
    stop() {
      if (stopping) return stopping;
      stopping = (async () => {
        livePeers.delete(peer);
        if (proc.exitCode === null && proc.signalCode === null) {
          proc.kill('SIGTERM');
          const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
          await exited;
          clearTimeout(timer);
        }
      })();
      return stopping;
    },
    tail(n = 30) {
      return logs.slice(-n).join('\n');
    },
  };
  livePeers.add(peer);

  const ready = new Promise((resolve, reject) => {
    proc.on('message', (msg) => {
      if (msg?.type === 'ready') resolve(msg);
    });
    proc.once('error', reject);
    exited.then(({ code, signal }) =>
      reject(new Error(`node-peer exited before it was ready (code=${code} signal=${signal}):\n${logs.join('\n')}`)),
    );
  });
  try {
    const info = await withTimeout(ready, PEER_START_TIMEOUT_MS, 'node-peer did not get ready');
    peer.port = info.port;
    peer.url = `http://127.0.0.1:${info.port}`;
    peer.uid = info.uid;
  } catch (err) {
    await peer.stop();
    throw err;
  }
  return peer;
}

/** A socket.io-client connected to the node peer (cleaned up by the harness). */
export async function openPeerClient(peer, { user = `peer-user-${rand(3)}`, ...opts } = {}) {
  const socket = connect(peer.url, null, { auth: { user }, ...opts });
  await connected(socket);
  return { socket, user };
}

/** Join a room on the node peer (its `join` handler acks {ok: true, room}). */
export async function peerJoin(socket, room) {
  const ack = await emitAck(socket, 'join', room);
  if (!ack?.ok) throw new Error(`node-peer join ${room} failed: ${JSON.stringify(ack)}`);
  return ack;
}

// ---------------------------------------------------------------------------
// @socket.io/redis-emitter
// ---------------------------------------------------------------------------

/** An Emitter on its own Redis connection; `emitter.of(nsp)` for others. */
export async function startEmitter(redis, key) {
  const client = await redisClient(redis);
  return { emitter: new Emitter(client, { key }), client };
}
