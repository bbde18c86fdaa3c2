#!/usr/bin/env node
// The Node baseline for `benches/compare-node.sh`: socket.io 4.8 on
// @socket.io/redis-adapter 8.3, serving the events `herald bench` speaks, the
// way a hand-built Node gateway would.
//
//   - The handshake's `auth.token` must be an HS256 JWT signed with JWT_SECRET
//     (checked with node:crypto, as herald checks it); its `sub` is the user.
//   - `join` (room) acks {ok, room, offset}: the room's latest offset.
//   - `message` ({room, data}) takes the next offset of the room from a Redis
//     INCR, broadcasts {room, offset, data, from, ts} to the room through the
//     adapter, and acks {ok, offset}. The sender must be in the room.
//
// Configuration (env): REDIS_URL (redis://127.0.0.1:6379), PORT (0 = any),
// JWT_SECRET (required), BENCH_KEY (Redis key prefix, "bench-node").
// Prints `node-bench listening port=<n>` once listening.

import crypto from 'node:crypto';
import http from 'node:http';
import process from 'node:process';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';
import { Server } from 'socket.io';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const PORT = Number(process.env.PORT ?? 0);
const SECRET = process.env.JWT_SECRET;
const KEY = process.env.BENCH_KEY ?? 'bench-node';
if (!SECRET) {
  console.error('node-bench: JWT_SECRET is required');
  process.exit(2);
}

/** The token's claims when its HS256 signature and expiry hold, else null. */
function verify(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  const expected = crypto.createHmac('sha256', SECRET).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], 'base64url');
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], 'base64url'));
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url'));
    if (header.alg !== 'HS256') return null;
    if (typeof claims.exp === 'number' && claims.exp * 1000 < Date.now()) return null;
    return typeof claims.sub === 'string' ? claims : null;
  } catch {
    return null;
  }
}

const pub = createClient({ url: REDIS_URL });
const sub = pub.duplicate();
for (const c of [pub, sub]) c.on('error', (err) => console.error(`node-bench redis: ${err.message}`));
await Promise.all([pub.connect(), sub.connect()]);

const httpServer = http.createServer();
const io = new Server(httpServer, { adapter: createAdapter(pub, sub, { key: `${KEY}:sio` }) });

io.use((socket, next) => {
  const claims = verify(socket.handshake.auth?.token ?? socket.handshake.query?.token);
  if (!claims) return next(new Error('unauthorized'));
  socket.data.user = claims.sub;
  next();
});

io.on('connection', (socket) => {
  socket.on('join', async (room, ack) => {
    if (typeof ack !== 'function') return;
    if (typeof room !== 'string' || room === '') return ack({ ok: false, error: 'bad_request' });
    socket.join(room);
    const offset = Number((await pub.get(`${KEY}:offset:${room}`)) ?? 0);
    ack({ ok: true, room, offset });
  });
  socket.on('message', async (msg, ack) => {
    if (typeof ack !== 'function') return;
    const room = msg?.room;
    if (typeof room !== 'string' || !socket.rooms.has(room)) {
      return ack({ ok: false, error: 'forbidden' });
    }
    try {
      const offset = await pub.incr(`${KEY}:offset:${room}`);
      io.to(room).emit('message', { room, offset, data: msg.data, from: socket.data.user, ts: Date.now() });
      ack({ ok: true, offset });
    } catch (err) {
      ack({ ok: false, error: `unavailable: ${err.message}` });
    }
  });
});

httpServer.listen(PORT, '127.0.0.1', () => {
  console.log(`node-bench listening port=${httpServer.address().port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  });
}
