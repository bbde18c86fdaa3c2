// A fleet as users run it: scripts/cluster starts 3 herald instances, a persist worker, Redis,
// PostgreSQL and real nginx (deploy/nginx.conf), and real socket.io-clients connect through
// nginx on the websocket and polling transports while publishers keep traffic flowing.
//
// - routing: websocket-only clients spread over the instances; polling sessions stay sticky.
// - `kill -9` of the instance holding the polling clients: everyone reconnects through nginx,
//   recovers every missed message by offset (complete, in order, no duplicates), the dead
//   instance's presence expires, and PostgreSQL holds every message exactly once.
// - a rolling restart (SIGTERM each instance in turn, brought back by `--restart`): clients
//   see a transport close, reconnect elsewhere, and lose nothing.
//
// Uses $REDIS_URL / $DATABASE_URL when set; see cluster-harness.mjs.

import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { io } from 'socket.io-client';

import { INSTANCES, api, psql, startCluster, waitUntil } from './cluster-harness.mjs';
import { rand, token } from './harness.mjs';

function track(socket) {
  sockets.add(socket);
  return socket;
}

/**
 * A subscriber through nginx: joins `rooms`, records every message offset per room, and on
 * every reconnect re-joins each room with `since` = the last offset it saw.
 */
function subscriber(cluster, rooms, { transports, reconnection = true, sub = `user-${rand(4)}` }) {
  const socket = track(io(cluster.url, {
    auth: { token: token(cluster.secret, { sub }) },
    transports,
    reconnection,
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
    timeout: 5000,
  }));
  const client = {
    sub,
    socket,
    transports,
    instances: [],
    got: Object.fromEntries(rooms.map((r) => [r, []])),
    joins: 0,
    disconnects: [],
    // What happened to this client, for a failing assertion's message.
    trace: [],
    last: (room) => client.got[room].at(-1) ?? 0,
  };
  socket.on('session', (s) => {
    client.instances.push(s.instance);
    client.trace.push(`session ${s.instance}`);
  });
  socket.on('message', (m) => {
    if (m.room in client.got) client.got[m.room].push(m.offset);
  });
  socket.on('disconnect', (reason) => {
    client.disconnects.push(reason);
    client.trace.push(`disconnect ${reason} at ${rooms.map((r) => client.last(r))}`);
  });
  let generation = 0;
  socket.on('connect', async () => {
    const mine = ++generation;
    for (const room of rooms) {
      // socket.io-client buffers what is emitted while disconnected and sends it on the next
      // connection, where this handler joins again: a stale join would replay twice.
      if (!socket.connected || mine !== generation) return;
      try {
        const since = client.last(room);
        const ack = await socket.timeout(5000).emitWithAck('join', { room, since });
        client.trace.push(`join ${room} since ${since}: ${JSON.stringify(ack)}`);
        if (ack?.ok) client.joins++;
      } catch {
        // disconnected again before the ack; the next connect re-joins
      }
    }
  });
  return client;
}

/** Publishes to `rooms` in turn until stopped; records what was acked with an offset. */
function publisher(cluster, rooms) {
  const socket = track(io(cluster.url, {
    auth: { token: token(cluster.secret, { sub: `pub-${rand(4)}` }) },
    transports: ['websocket'],
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
  }));
  const acked = [];
  let running = true;
  const joined = new Set();
  socket.on('connect', () => joined.clear());
  const loop = (async () => {
    let seq = 0;
    while (running) {
      await sleep(15);
      if (!socket.connected) continue;
      const room = rooms[seq % rooms.length];
      try {
        if (!joined.has(room)) {
          const ack = await socket.timeout(3000).emitWithAck('join', { room });
          if (!ack?.ok) continue;
          joined.add(room);
        }
        const uid = `${socket.id}-${seq}`;
        seq++;
        const ack = await socket.timeout(3000).emitWithAck('message', { room, data: { uid } });
        if (ack?.ok && typeof ack.offset === 'number') acked.push({ room, offset: ack.offset, uid });
      } catch {
        // a timeout while an instance goes away: not acked, so not promised
      }
    }
  })();
  const handle = {
    socket,
    acked,
    async stop() {
      running = false;
      await loop;
    },
  };
  publishers.add(handle);
  return handle;
}

function highest(acked, room) {
  return acked.filter((a) => a.room === room).reduce((m, a) => Math.max(m, a.offset), 0);
}

/** The (room, offset) → uid rows of `rooms`, checked to be unique per offset and per uid. */
function storedRows(cluster, rooms) {
  const list = rooms.map((r) => `'${r}'`).join(',');
  const out = psql(
    cluster.databaseUrl(),
    `SELECT room, "offset", payload->>'uid' FROM messages WHERE room IN (${list}) ORDER BY room, "offset"`,
  );
  return out
    ? out.split('\n').map((line) => {
        const [room, offset, uid] = line.split('|');
        return { room, offset: Number(offset), uid };
      })
    : [];
}

/**
 * Waits until every subscriber and the database have caught up with the highest offset of each
 * room, then asserts completeness, order and exactly-once storage.
 */
async function assertNothingLost(cluster, rooms, subscribers, publishers) {
  const acked = publishers.flatMap((p) => p.acked);
  const top = Object.fromEntries(rooms.map((r) => [r, highest(acked, r)]));
  for (const room of rooms) assert.ok(top[room] > 20, `traffic flowed in ${room}: ${top[room]} acked`);

  // Messages published but never acked (in flight when an instance died) may exist beyond the
  // highest ack; the database tells the final offset of each room.
  await waitUntil(
    'the worker to store every message',
    () => {
      const rows = storedRows(cluster, rooms);
      return rooms.every((room) => {
        const offsets = rows.filter((r) => r.room === room).map((r) => r.offset);
        return offsets.length >= top[room] && offsets.length === Math.max(0, ...offsets);
      });
    },
    30_000,
  );
  const rows = storedRows(cluster, rooms);
  for (const room of rooms) {
    const mine = rows.filter((r) => r.room === room);
    const final = mine.length;
    assert.deepEqual(
      mine.map((r) => r.offset),
      Array.from({ length: final }, (_, i) => i + 1),
      `${room}: stored offsets are 1..${final} exactly once`,
    );
    assert.equal(new Set(mine.map((r) => r.uid)).size, final, `${room}: no message stored twice`);
    const byOffset = new Map(mine.map((r) => [r.offset, r.uid]));
    for (const a of acked.filter((x) => x.room === room)) {
      assert.equal(byOffset.get(a.offset), a.uid, `${room}: acked offset ${a.offset} holds its message`);
    }
    await waitUntil(
      `every subscriber to reach offset ${final} in ${room}`,
      () => subscribers.every((s) => s.last(room) >= final),
      30_000,
    ).catch((e) => {
      const behind = subscribers.filter((s) => s.last(room) < final).map((s) => `${s.sub}@${s.last(room)}`);
      throw new Error(`${e.message}; behind: ${behind.join(', ')}`);
    });
    const expected = Array.from({ length: final }, (_, i) => i + 1);
    for (const s of subscribers) {
      assert.deepEqual(
        s.got[room],
        expected,
        `${s.sub} (${s.transports}) got ${room} complete, in order, once; ${s.trace.join(' | ')}`,
      );
    }
  }
}

async function presenceUsers(cluster, room) {
  const body = await api(cluster, `/api/rooms/${room}/presence`);
  return body.users.map((u) => (typeof u === 'string' ? u : u.user));
}

// Every client, closed after each test whatever its outcome: a socket.io-client left
// reconnecting keeps the test process alive.
const sockets = new Set();
const publishers = new Set();
afterEach(async () => {
  await Promise.all([...publishers].map((p) => p.stop()));
  publishers.clear();
  for (const socket of sockets) socket.close();
  sockets.clear();
});

function closeAll(clients) {
  for (const c of clients) c.socket.close();
}

describe('a fleet behind nginx', { timeout: 480_000 }, () => {
  test('kill -9 of an instance: clients reconnect elsewhere and lose nothing; its presence expires', async () => {
    const cluster = await startCluster();
    const rooms = [`cl-${rand(4)}-a`, `cl-${rand(4)}-b`];
    const subscribers = [
      ...Array.from({ length: 4 }, () => subscriber(cluster, rooms, { transports: ['websocket'] })),
      ...Array.from({ length: 4 }, () => subscriber(cluster, rooms, { transports: ['polling'] })),
      ...Array.from({ length: 2 }, () => subscriber(cluster, rooms, { transports: ['polling', 'websocket'] })),
    ];
    const canary = subscriber(cluster, rooms, { transports: ['polling'], reconnection: false });
    const everyone = [...subscribers, canary];
    await waitUntil('every client to join', () => everyone.every((c) => c.joins >= rooms.length), 20_000);

    // Routing: polling sessions are sticky (every poll of a session reaches its instance, and
    // all test clients share one address); websocket-only clients spread.
    const polling = everyone.filter((c) => c.transports[0] === 'polling');
    const sticky = polling[0].instances[0];
    for (const c of polling) assert.equal(c.instances[0], sticky, 'polling sessions share the sticky instance');
    const upgraded = subscribers.filter((c) => c.transports.length === 2);
    await waitUntil('polling+websocket clients to upgrade', () => upgraded.every((c) => c.socket.io.engine.transport.name === 'websocket'), 10_000);
    const wsOnly = subscribers.filter((c) => c.transports[0] === 'websocket');
    assert.ok(new Set(wsOnly.map((c) => c.instances[0])).size >= 2, 'websocket-only clients spread over instances');
    assert.ok((await presenceUsers(cluster, rooms[0])).includes(canary.sub), 'the canary is present');

    const publishers = [publisher(cluster, rooms), publisher(cluster, rooms)];
    await sleep(2000);
    const victim = Number(sticky.replace('herald-', ''));
    process.kill(cluster.pid(victim), 'SIGKILL');
    await sleep(5000);
    await Promise.all(publishers.map((p) => p.stop()));

    for (const c of polling.filter((x) => x !== canary)) {
      assert.ok(c.instances.length >= 2 && c.instances.at(-1) !== sticky, `${c.sub} moved off the dead instance`);
    }
    await assertNothingLost(cluster, rooms, subscribers, publishers);

    // The canary did not reconnect: its entry on the dead instance expires (TTL 3 s) and its
    // user leaves the room for everyone.
    await waitUntil('the dead instance presence to expire', async () => !(await presenceUsers(cluster, rooms[0])).includes(canary.sub), 20_000);
    assert.ok((await presenceUsers(cluster, rooms[0])).includes(subscribers[0].sub), 'live users stay present');

    closeAll([...everyone, ...publishers]);
    await cluster.stop();
  });

  test('a rolling restart under traffic: clients move on a transport close and lose nothing', async () => {
    const cluster = await startCluster({ restart: true });
    const rooms = [`roll-${rand(4)}-a`, `roll-${rand(4)}-b`];
    const subscribers = [
      ...Array.from({ length: 6 }, () => subscriber(cluster, rooms, { transports: ['websocket'] })),
      ...Array.from({ length: 3 }, () => subscriber(cluster, rooms, { transports: ['polling'] })),
      ...Array.from({ length: 3 }, () => subscriber(cluster, rooms, { transports: ['polling', 'websocket'] })),
    ];
    await waitUntil('every client to join', () => subscribers.every((c) => c.joins >= rooms.length), 20_000);
    const publishers = [publisher(cluster, rooms), publisher(cluster, rooms)];
    await sleep(1500);

    for (let i = 1; i <= INSTANCES; i++) {
      const pid = cluster.pid(i);
      process.kill(pid, 'SIGTERM');
      await waitUntil(
        `herald-${i} to be restarted and ready`,
        async () => {
          if (!existsSync(path.join(cluster.dir, `herald-${i}.pid`)) || cluster.pid(i) === pid) return false;
          const res = await fetch(`http://127.0.0.1:${cluster.instancePort(i)}/ready`).catch(() => null);
          return res?.status === 200;
        },
        40_000,
      );
      await sleep(1000);
    }
    await sleep(1000);
    await Promise.all(publishers.map((p) => p.stop()));

    await assertNothingLost(cluster, rooms, subscribers, publishers);
    const reasons = subscribers.flatMap((s) => s.disconnects);
    assert.ok(reasons.length >= subscribers.length, `every client was moved at least once: ${reasons}`);
    assert.ok(!reasons.includes('io server disconnect'), `a drain never tells clients to stay away: ${reasons}`);
    const drained = readFileSync(path.join(cluster.dir, 'herald-1.log'), 'utf8');
    assert.match(drained, /closed a batch of client transports/, 'the drain closed transports in batches');

    closeAll([...subscribers, ...publishers]);
    await cluster.stop();
  });
});
