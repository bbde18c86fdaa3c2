#!/usr/bin/env node
// A stock Node Socket.IO 4.8 server on @socket.io/redis-adapter 8.3 (classic,
// not sharded): the reference peer that herald must interoperate with.
//
// Clients connect to it with an unmodified socket.io-client and join rooms
// with `socket.emit('join', room, ack)` (ack: {ok: true, room}). A test drives
// it either over IPC (started with fork(): send {id, cmd, ...args}, get
// {id, ok, result} or {id, ok: false, error}) or over HTTP
// (POST /control/<cmd> with a JSON body of args; answers the same JSON).
//
// Configuration (env or flags):
//   REDIS_URL / --redis <url>        redis://127.0.0.1:6379 by default
//   REDIS_PASSWORD / --password <pw>
//   PEER_KEY / --key <prefix>        adapter key prefix (default "socket.io")
//   PEER_REQUESTS_TIMEOUT / --requests-timeout <ms>   adapter requestsTimeout (default 5000)
//   PEER_PORT / --port <n>           listen port (default 0 = ephemeral)
//
// Once listening it prints one line `node-peer listening port=<n> uid=<uid> key=<key>`
// and, under fork(), sends {type: 'ready', port, uid, key}.
//
// Commands (all answer within the adapter's requestsTimeout at worst):
//   emit {room?|rooms?, except?, event, data}       io.to(rooms).except(except).emit(event, data)
//   emitWithAck {room?|rooms?, event, data, timeoutMs}  io.to(..).timeout(t).emitWithAck -> {responses|error, elapsedMs}
//   fetchSockets {room?|rooms?}                     -> {count, elapsedMs, sockets:[{id, rooms, data, local}]} or {error, elapsedMs}
//   serverSideEmit {event, data}                    io.serverSideEmit(event, data, cb) -> {error, responses, elapsedMs}
//   serverCount                                     -> {count} (PUBSUB NUMSUB of the request channel)
//   allRooms                                        -> {rooms, elapsedMs} or {error, elapsedMs}
//   socketsJoin {room?|rooms?, join}                io.in(rooms).socketsJoin(join)
//   socketsLeave {room?|rooms?, leave}              io.in(rooms).socketsLeave(leave)
//   disconnectSockets {room?|rooms?, close?}        io.in(rooms).disconnectSockets(close)
//   listen {event, reply?}                          record server-side events `event` (and ack them with `reply`)
//   received {event}                                -> {items} recorded for `event`
//   local                                           -> {sockets:[{id, rooms}]} sockets connected to this peer
//   close                                           close everything and exit

import http from 'node:http';
import process from 'node:process';
import { parseArgs } from 'node:util';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';
import { Server } from 'socket.io';

const { values: flags } = parseArgs({
  options: {
    redis: { type: 'string' },
    password: { type: 'string' },
    key: { type: 'string' },
    'requests-timeout': { type: 'string' },
    port: { type: 'string' },
  },
  strict: true,
});

const REDIS_URL = flags.redis ?? process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const REDIS_PASSWORD = flags.password ?? process.env.REDIS_PASSWORD ?? undefined;
const KEY = flags.key ?? process.env.PEER_KEY ?? 'socket.io';
const REQUESTS_TIMEOUT = Number(flags['requests-timeout'] ?? process.env.PEER_REQUESTS_TIMEOUT ?? 5000);
const PORT = Number(flags.port ?? process.env.PEER_PORT ?? 0);

const pubClient = createClient({ url: REDIS_URL, password: REDIS_PASSWORD || undefined });
const subClient = pubClient.duplicate();
for (const c of [pubClient, subClient]) c.on('error', (err) => console.error(`node-peer redis error: ${err.message}`));
await Promise.all([pubClient.connect(), subClient.connect()]);

const httpServer = http.createServer();
const io = new Server(httpServer, {
  adapter: createAdapter(pubClient, subClient, { key: KEY, requestsTimeout: REQUESTS_TIMEOUT }),
  // Keep ping settings default; allow both transports like a stock server.
});

io.on('connection', (socket) => {
  socket.data = { peer: 'node', user: socket.handshake.auth?.user ?? null };
  socket.on('join', (arg, ack) => {
    const room = typeof arg === 'string' ? arg : arg?.room;
    if (typeof room !== 'string' || room === '') {
      if (typeof ack === 'function') ack({ ok: false, error: 'bad_request' });
      return;
    }
    socket.join(room);
    if (typeof ack === 'function') ack({ ok: true, room });
  });
  socket.on('leave', (arg, ack) => {
    const room = typeof arg === 'string' ? arg : arg?.room;
    socket.leave(room);
    if (typeof ack === 'function') ack({ ok: true, room });
  });
});

const adapter = io.of('/').adapter;
const received = new Map(); // event -> [args]

function targets(args) {
  if (Array.isArray(args.rooms)) return args.rooms;
  if (typeof args.room === 'string') return [args.room];
  return [];
}

function operator(args) {
  let op = io.of('/');
  const rooms = targets(args);
  if (rooms.length) op = op.to(rooms);
  if (args.except !== undefined) op = op.except(args.except);
  return op;
}

const commands = {
  async emit(args) {
    operator(args).emit(args.event, args.data);
    return { published: true };
  },

  async emitWithAck(args) {
    const started = Date.now();
    try {
      const responses = await operator(args)
        .timeout(args.timeoutMs ?? 2000)
        .emitWithAck(args.event, args.data);
      return { responses, elapsedMs: Date.now() - started };
    } catch (err) {
      return { error: err.message, responses: err.responses ?? null, elapsedMs: Date.now() - started };
    }
  },

  async fetchSockets(args) {
    const started = Date.now();
    try {
      const sockets = await operator(args).fetchSockets();
      return {
        count: sockets.length,
        elapsedMs: Date.now() - started,
        sockets: sockets.map((s) => ({
          id: s.id,
          rooms: [...s.rooms],
          data: s.data ?? null,
          handshake: s.server ? null : (s.handshake ?? null),
          local: Boolean(s.server),
        })),
      };
    } catch (err) {
      return { error: err.message, elapsedMs: Date.now() - started };
    }
  },

  serverSideEmit(args) {
    const started = Date.now();
    return new Promise((resolve) => {
      io.serverSideEmit(args.event, args.data, (err, responses) => {
        resolve({ error: err ? err.message : null, responses: responses ?? [], elapsedMs: Date.now() - started });
      });
    });
  },

  async serverCount() {
    return { count: await adapter.serverCount() };
  },

  async allRooms() {
    const started = Date.now();
    try {
      const rooms = await adapter.allRooms();
      return { rooms: [...rooms], elapsedMs: Date.now() - started };
    } catch (err) {
      return { error: err.message, elapsedMs: Date.now() - started };
    }
  },

  async socketsJoin(args) {
    operator(args).socketsJoin(args.join);
    return { published: true };
  },

  async socketsLeave(args) {
    operator(args).socketsLeave(args.leave);
    return { published: true };
  },

  async disconnectSockets(args) {
    operator(args).disconnectSockets(Boolean(args.close));
    return { published: true };
  },

  async listen(args) {
    if (!received.has(args.event)) {
      received.set(args.event, []);
      io.on(args.event, (...eventArgs) => {
        const last = eventArgs[eventArgs.length - 1];
        const ack = typeof last === 'function' ? eventArgs.pop() : null;
        received.get(args.event).push(eventArgs);
        if (ack) ack(args.reply ?? { from: 'node-peer', uid: adapter.uid });
      });
    }
    return { listening: args.event };
  },

  async received(args) {
    return { items: received.get(args.event) ?? [] };
  },

  async local() {
    return { sockets: [...io.of('/').sockets.values()].map((s) => ({ id: s.id, rooms: [...s.rooms] })) };
  },

  async close() {
    setImmediate(shutdown);
    return { closing: true };
  },
};

async function run(cmd, args) {
  const fn = commands[cmd];
  if (!fn) throw new Error(`unknown command ${JSON.stringify(cmd)}`);
  return fn(args ?? {});
}

// HTTP control: POST /control/<cmd> with a JSON body. Socket.IO answers only
// under /socket.io/, everything else reaches this listener.
httpServer.on('request', (req, res) => {
  if (req.url.startsWith('/socket.io')) return;
  const m = req.url.match(/^\/control\/([A-Za-z]+)$/);
  if (!m || req.method !== 'POST') {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ ok: false, error: 'POST /control/<cmd>' }));
    return;
  }
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (chunk) => (body += chunk));
  req.on('end', async () => {
    let reply;
    try {
      reply = { ok: true, result: await run(m[1], body ? JSON.parse(body) : {}) };
    } catch (err) {
      reply = { ok: false, error: err.message };
    }
    res.writeHead(reply.ok ? 200 : 400, { 'content-type': 'application/json' });
    res.end(JSON.stringify(reply));
  });
});

// IPC control under fork().
if (process.send) {
  process.on('message', async (msg) => {
    if (!msg || typeof msg !== 'object' || msg.id === undefined) return;
    const { id, cmd, ...args } = msg;
    try {
      process.send({ id, ok: true, result: await run(cmd, args) });
    } catch (err) {
      process.send({ id, ok: false, error: err.message });
    }
  });
  // Parent gone: do not outlive it.
  process.on('disconnect', () => shutdown());
}

let shuttingDown = false;
async function shutdown() {
  if (shuttingDown) return;
  shuttingDown = true;
  const force = setTimeout(() => process.exit(0), 2000);
  force.unref();
  try {
    // io.close() closes only this peer's sockets (io.disconnectSockets() would
    // go through Redis and disconnect every server's sockets).
    await io.close();
  } catch {
    // closing anyway
  }
  await Promise.allSettled([pubClient.quit(), subClient.quit()]);
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

httpServer.listen(PORT, '127.0.0.1', () => {
  const { port } = httpServer.address();
  console.log(`node-peer listening port=${port} uid=${adapter.uid} key=${KEY}`);
  if (process.send) process.send({ type: 'ready', port, uid: adapter.uid, key: KEY });
});
