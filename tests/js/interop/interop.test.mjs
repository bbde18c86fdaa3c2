// Interop over Redis: herald instances, a stock Node Socket.IO 4.8 server on
// @socket.io/redis-adapter 8.3 (node-peer.mjs) and @socket.io/redis-emitter
// 5.1 share one Redis and one key prefix, and must behave as one cluster.
//
//  1. broadcasts from a herald client (`message`), from herald's HTTP API
//     ({room, event, data}) and from the Node peer (io.to(R).emit) reach the
//     clients of every server exactly once;
//  2. the Node peer's fetchSockets() and serverSideEmit() (which wait for one
//     answer per server counted by PUBSUB NUMSUB) finish in well under the
//     adapter's 5 s requestsTimeout, with herald's sockets and answers in them;
//  3. redis-emitter broadcasts (room, user:<sub> room, whole namespace) and
//     requests (socketsJoin, socketsLeave, disconnectSockets) act on herald's
//     sockets.
//
// Redis: $REDIS_URL, else a private redis-server from PATH (see fleet.mjs).
// Every describe block uses its own key prefix (HERALD_REDIS_KEY / `key`).
//
// Run:  HERALD_BIN=target/debug/herald node --test tests/js/interop/
//       (HERALD_TEST_LOGS=1 echoes herald, redis-server and node-peer output)
// Each test waits at most 5 s for a delivery and has a 10 s limit.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { collect, emitAck, http, join, openClient, publish, rand, roomName, waitFor } from '../harness.mjs';
import {
  channels,
  numsub,
  openPeerClient,
  peerJoin,
  redisClient,
  startEmitter,
  startHeraldFleet,
  startNodePeer,
  startRedis,
  uniqueKey,
  waitNumsub,
} from './fleet.mjs';

const DELIVERY_MS = 5000; // how long a broadcast may take to reach everyone
const SETTLE_MS = 300; // extra wait before asserting that nothing more (a duplicate) arrives
const TEST_MS = 10_000;

function show(v) {
  const s = JSON.stringify(v);
  return s && s.length > 400 ? `${s.slice(0, 400)}…` : s;
}

/**
 * Start collecting `event` (matching `pred`) on every named socket, run
 * `trigger`, and require every socket to get it exactly once. Reports every
 * socket that missed it in one error, with `hint`.
 */
async function expectEachOnce(sockets, event, pred, trigger, { what, hint = '' }) {
  const names = Object.keys(sockets);
  const got = names.map((n) => collect(sockets[n], event, pred));
  try {
    await trigger();
    const results = await Promise.allSettled(got.map((g) => g.until(1, DELIVERY_MS)));
    const missing = names.filter((_, i) => results[i].status === 'rejected');
    if (missing.length) {
      const seen = names.filter((_, i) => results[i].status === 'fulfilled');
      assert.fail(
        `${what}: not received within ${DELIVERY_MS} ms by ${missing.join(', ')} ` +
          `(received by: ${seen.join(', ') || 'nobody'}).${hint ? ` ${hint}` : ''}`,
      );
    }
    await sleep(SETTLE_MS);
    for (const [i, n] of names.entries()) {
      assert.equal(got[i].items.length, 1, `${what}: ${n} got it ${got[i].items.length} times: ${show(got[i].items)}`);
    }
    return Object.fromEntries(names.map((n, i) => [n, got[i].items[0]]));
  } finally {
    for (const g of got) g.stop();
  }
}

/** Assert that none of `sockets` got `event` matching `pred` while `during` ran (+ settle). */
async function expectNone(sockets, event, pred, during, what) {
  const names = Object.keys(sockets);
  const got = names.map((n) => collect(sockets[n], event, pred));
  try {
    await during();
    await sleep(SETTLE_MS);
    for (const [i, n] of names.entries()) {
      assert.equal(got[i].items.length, 0, `${what}: ${n} should not have received ${show(got[i].items)}`);
    }
  } finally {
    for (const g of got) g.stop();
  }
}

let redis;
before(
  async () => {
    redis = await startRedis();
  },
  { timeout: 15_000 },
);

// ---------------------------------------------------------------------------
// 1 + 2: two herald instances and one Node Socket.IO server
// ---------------------------------------------------------------------------

describe('interop: 2 herald + 1 Node socket.io (redis-adapter 8.3) on one Redis', { timeout: 90_000 }, () => {
  const key = uniqueKey('fleet');
  const ch = channels(key);
  const R = roomName('interop');
  const RA = roomName('herald1-only');
  let h1, h2, peer, rc;
  let a, b, c; // herald-1 client, herald-2 client, node-peer client

  before(
    async () => {
      [h1, h2] = await startHeraldFleet(redis, key, 2);
      peer = await startNodePeer(redis, key, { requestsTimeout: 5000 });
      rc = await redisClient(redis);
      a = await openClient(h1, { sub: `alice-${rand(2)}` });
      b = await openClient(h2, { sub: `bob-${rand(2)}` });
      c = await openPeerClient(peer, { user: `carol-${rand(2)}` });
      await join(a.socket, R);
      await join(a.socket, RA);
      await join(b.socket, R);
      await peerJoin(c.socket, R);
      // Best effort: give the servers a moment to SUBSCRIBE; asserted below.
      await waitNumsub(rc, ch.request, 3);
    },
    { timeout: 40_000 },
  );

  const everyone = () => ({
    'herald-1 client': a.socket,
    'herald-2 client': b.socket,
    'node-peer client': c.socket,
  });

  test('every server is subscribed to the request channel (PUBSUB NUMSUB = 3)', { timeout: TEST_MS }, async () => {
    const n = await numsub(rc, ch.request);
    assert.equal(
      n,
      3,
      `PUBSUB NUMSUB ${ch.request} = ${n}, expected 3 (2 herald + 1 node). The Node adapter counts servers this way ` +
        'and waits for (count - 1) answers to fetchSockets/serverSideEmit: each herald must SUBSCRIBE (not PSUBSCRIBE) ' +
        'to it exactly once per namespace.',
    );
    const peerCount = await peer.call('serverCount');
    assert.equal(peerCount.count, 3, `node peer's adapter.serverCount() = ${peerCount.count}, expected 3`);
  });

  test('a herald client `message` to R reaches all three clients exactly once', { timeout: TEST_MS }, async () => {
    const data = { text: `from herald-1 ${rand(3)}` };
    let ack;
    const got = await expectEachOnce(
      everyone(),
      'message',
      (m) => m?.room === R && m?.data?.text === data.text,
      async () => {
        ack = await publish(a.socket, R, data);
      },
      {
        what: 'herald-1 client message',
        hint: `herald must fan out to other herald instances and publish the socket.io broadcast [uid, {type:2, data:["message", {...}], nsp:"/"}, {rooms:["${R}"], except:[], flags:{}}] (msgpack) on ${ch.room(R)}.`,
      },
    );
    for (const [who, m] of Object.entries(got)) {
      assert.equal(m.id, ack.id, `${who}: message id`);
      assert.deepEqual(m.data, data, `${who}: message data`);
    }
    assert.deepEqual(got['node-peer client'], got['herald-1 client'], 'the Node client gets the same message object');
  });

  test("herald's HTTP API {room, event, data} reaches all three clients exactly once", { timeout: TEST_MS }, async () => {
    const data = { n: rand(3), nested: { ok: true, list: [1, 2.5, 'x', null] } };
    const got = await expectEachOnce(
      everyone(),
      'notice',
      (d) => d?.n === data.n,
      async () => {
        const res = await http(h2, 'POST', '/api/publish', { body: { room: R, event: 'notice', data } });
        assert.equal(res.status, 200, `POST /api/publish on herald-2: ${res.status} ${res.text}`);
      },
      { what: 'HTTP API event on herald-2', hint: `expected a broadcast on ${ch.room(R)}.` },
    );
    for (const [who, d] of Object.entries(got)) assert.deepEqual(d, data, `${who}: event data`);
  });

  test('the Node peer io.to(R).emit reaches all three clients exactly once', { timeout: TEST_MS }, async () => {
    const data = { news: rand(3), n: 42, f: 0.5, neg: -7, big: 2 ** 40, s: 'ü✓', t: true, z: null, arr: [[], {}] };
    const got = await expectEachOnce(
      everyone(),
      'news',
      (d) => d?.news === data.news,
      () => peer.call('emit', { room: R, event: 'news', data }),
      {
        what: 'node peer io.to(R).emit',
        hint: `herald must PSUBSCRIBE ${ch.broadcast}* (or SUBSCRIBE ${ch.room(R)}) and decode the msgpack [uid, packet, opts].`,
      },
    );
    for (const [who, d] of Object.entries(got)) assert.deepEqual(d, data, `${who}: event data`);
  });

  test('the Node peer io.emit (whole namespace, no room) reaches all three clients exactly once', { timeout: TEST_MS }, async () => {
    const data = { all: rand(3) };
    await expectEachOnce(everyone(), 'all-hands', (d) => d?.all === data.all, () => peer.call('emit', { event: 'all-hands', data }), {
      what: 'node peer io.emit',
      hint: `published on ${ch.broadcast} with rooms: [].`,
    });
  });

  test('the Node peer io.to(R).except(user room) skips the excepted herald user', { timeout: TEST_MS }, async () => {
    const data = { ex: rand(3) };
    const sockets = everyone();
    const excepted = { 'herald-1 client': sockets['herald-1 client'] };
    delete sockets['herald-1 client'];
    await expectNone(
      excepted,
      'except-test',
      (d) => d?.ex === data.ex,
      () =>
        expectEachOnce(sockets, 'except-test', (d) => d?.ex === data.ex, () => peer.call('emit', { room: R, except: `user:${a.user}`, event: 'except-test', data }), {
          what: 'node peer io.to(R).except(user:<a>)',
        }),
      `io.to(R).except("user:${a.user}")`,
    );
  });

  test("the Node peer io.to(<herald socket id>).emit reaches exactly that herald socket", { timeout: TEST_MS }, async () => {
    const data = { direct: rand(3) };
    const pred = (v) => v?.direct === data.direct;
    await expectNone(
      { 'herald-1 client': a.socket, 'node-peer client': c.socket },
      'direct',
      pred,
      () =>
        expectEachOnce({ 'herald-2 client': b.socket }, 'direct', pred, () => peer.call('emit', { room: b.session.sid, event: 'direct', data }), {
          what: 'node peer io.to(<herald-2 socket id>).emit',
          hint: `every socket is in a room named by its id (what RemoteSocket.emit uses); published on ${ch.room(b.session.sid)}.`,
        }),
      'io.to(<socket id>).emit',
    );
  });

  test('fetchSockets() from the Node peer completes fast and includes herald sockets', { timeout: TEST_MS }, async () => {
    const all = await peer.call('fetchSockets', {});
    assert.equal(all.error, undefined, `fetchSockets failed after ${all.elapsedMs} ms: ${all.error}`);
    assert.ok(
      all.elapsedMs < 2000,
      `fetchSockets took ${all.elapsedMs} ms (adapter requestsTimeout is 5000): some server counted by NUMSUB did not answer the REMOTE_FETCH request`,
    );
    const ids = all.sockets.map((s) => s.id);
    assert.equal(
      all.count,
      3,
      `fetchSockets returned ${all.count} sockets, expected 3 (one per server): ${show(all.sockets)}. ` +
        'herald must answer {"requestId", "sockets":[{id, handshake, rooms, data}]} on ' +
        `${ch.response}.`,
    );
    for (const [who, sid] of [['herald-1 client', a.session.sid], ['herald-2 client', b.session.sid]]) {
      assert.ok(ids.includes(sid), `fetchSockets ids ${show(ids)} should include the ${who}'s socket id ${sid}`);
    }

    const inR = await peer.call('fetchSockets', { room: R });
    assert.equal(inR.error, undefined, `fetchSockets(R) failed: ${inR.error}`);
    assert.ok(inR.elapsedMs < 2000, `fetchSockets(R) took ${inR.elapsedMs} ms`);
    assert.equal(inR.count, 3, `in(R).fetchSockets() returned ${inR.count}: ${show(inR.sockets)}`);
    const remote = inR.sockets.filter((s) => !s.local);
    assert.equal(remote.length, 2, `expected 2 remote (herald) sockets: ${show(inR.sockets)}`);
    for (const s of remote) {
      assert.equal(typeof s.id, 'string', `remote socket id: ${show(s)}`);
      assert.ok(s.id.length > 0, `remote socket id is empty: ${show(s)}`);
      assert.ok(Array.isArray(s.rooms) && s.rooms.includes(R), `remote socket rooms should include ${R}: ${show(s)}`);
      assert.ok(s.handshake && typeof s.handshake === 'object', `remote socket handshake should be an object: ${show(s)}`);
    }

    const none = await peer.call('fetchSockets', { room: roomName('empty') });
    assert.equal(none.error, undefined, `fetchSockets(empty room) failed: ${none.error}`);
    assert.ok(none.elapsedMs < 2000, `fetchSockets(empty room) took ${none.elapsedMs} ms: herald must answer even with no sockets`);
    assert.equal(none.count, 0, `fetchSockets(empty room): ${show(none.sockets)}`);
  });

  test('serverSideEmit with an ack from the Node peer gets one answer per herald, fast', { timeout: TEST_MS }, async () => {
    const res = await peer.call('serverSideEmit', { event: 'interop-ping', data: { at: Date.now() } });
    assert.equal(
      res.error,
      null,
      `serverSideEmit failed after ${res.elapsedMs} ms: ${res.error}. Each herald must answer ` +
        `{"type":6,"requestId":<id>,"data":<any>} on ${ch.response}.`,
    );
    assert.ok(res.elapsedMs < 2000, `serverSideEmit took ${res.elapsedMs} ms`);
    assert.equal(res.responses.length, 2, `expected one response per herald instance, got ${show(res.responses)}`);
  });

  test("allRooms() from the Node peer completes fast and includes herald's rooms", { timeout: TEST_MS }, async () => {
    const res = await peer.call('allRooms');
    assert.equal(res.error, undefined, `allRooms failed after ${res.elapsedMs} ms: ${res.error}`);
    assert.ok(res.elapsedMs < 2000, `allRooms took ${res.elapsedMs} ms: herald must answer ALL_ROOMS with {"requestId", "rooms": [...]}`);
    assert.ok(res.rooms.includes(R), `allRooms should include ${R}: ${show(res.rooms)}`);
    assert.ok(
      res.rooms.includes(RA),
      `allRooms should include ${RA}, which only a herald-1 client joined: ${show(res.rooms)}. ` +
        `herald must answer {"type":1} requests with {"requestId":<id>,"rooms":[...]} on ${ch.response}.`,
    );
  });

  after(async () => {
    await peer?.stop();
  });
});

// ---------------------------------------------------------------------------
// 3: @socket.io/redis-emitter 5.1 driving herald
// ---------------------------------------------------------------------------

describe('interop: @socket.io/redis-emitter 5.1 → herald', { timeout: 90_000 }, () => {
  const key = uniqueKey('emitter');
  const ch = channels(key);
  const R = roomName('emit');
  const R2 = roomName('emit2');
  let h1, h2, emitter;
  let a, b, d, e; // a (h1) and b (h2) in R; d (h2) in no room; e on /events (h1)

  before(
    async () => {
      [h1, h2] = await startHeraldFleet(redis, key, 2);
      ({ emitter } = await startEmitter(redis, key));
      a = await openClient(h1, { sub: `ann-${rand(2)}` });
      b = await openClient(h2, { sub: `ben-${rand(2)}` });
      d = await openClient(h2, { sub: `dan-${rand(2)}` });
      e = await openClient(h1, { sub: `eve-${rand(2)}`, ns: '/events' });
      await join(a.socket, R);
      await join(b.socket, R);
    },
    { timeout: 40_000 },
  );

  test('emitter.to(R).emit reaches the herald clients in R on both instances, and nobody else', { timeout: TEST_MS }, async () => {
    const x = { alert: rand(3) };
    const pred = (v) => v?.alert === x.alert;
    await expectNone(
      { 'herald-2 client outside R': d.socket, '/events client': e.socket },
      'alert',
      pred,
      async () => {
        const got = await expectEachOnce({ 'herald-1 client': a.socket, 'herald-2 client': b.socket }, 'alert', pred, () => emitter.to(R).emit('alert', x), {
          what: 'emitter.to(R).emit',
          hint: `published as msgpack ["emitter", {type:2, data:["alert", ...], nsp:"/"}, {rooms:["${R}"], flags:{}, except:[]}] on ${ch.room(R)}.`,
        });
        for (const [who, v] of Object.entries(got)) assert.deepEqual(v, x, `${who}: alert data`);
      },
      'emitter.to(R).emit',
    );
  });

  test("emitter.to('user:<sub>').emit reaches only that user's sockets", { timeout: TEST_MS }, async () => {
    const y = { dm: rand(3) };
    const pred = (v) => v?.dm === y.dm;
    await expectNone(
      { 'herald-2 client (other user)': b.socket, 'herald-2 client outside R': d.socket },
      'dm',
      pred,
      () =>
        expectEachOnce({ 'herald-1 client': a.socket }, 'dm', pred, () => emitter.to(`user:${a.user}`).emit('dm', y), {
          what: `emitter.to("user:${a.user}").emit`,
          hint: `published on ${ch.room(`user:${a.user}`)}; herald's personal room must match.`,
        }),
      'emitter.to(user room).emit',
    );
  });

  test("emitter.of('/').emit reaches every herald client of '/' but not '/events'", { timeout: TEST_MS }, async () => {
    const z = { everyone: rand(3) };
    const pred = (v) => v?.everyone === z.everyone;
    await expectNone(
      { '/events client': e.socket },
      'broadcast-all',
      pred,
      () =>
        expectEachOnce(
          { 'herald-1 client': a.socket, 'herald-2 client': b.socket, 'herald-2 client outside R': d.socket },
          'broadcast-all',
          pred,
          () => emitter.of('/').emit('broadcast-all', z),
          { what: "emitter.of('/').emit", hint: `published on ${ch.broadcast} with rooms: [].` },
        ),
      "emitter.of('/').emit",
    );
  });

  test("emitter.of('/events').emit reaches '/events' clients only", { timeout: TEST_MS }, async () => {
    const z = { ev: rand(3) };
    const pred = (v) => v?.ev === z.ev;
    await expectNone(
      { 'herald-1 client': a.socket, 'herald-2 client': b.socket },
      'ns-events',
      pred,
      () =>
        expectEachOnce({ '/events client': e.socket }, 'ns-events', pred, () => emitter.of('/events').emit('ns-events', z), {
          what: "emitter.of('/events').emit",
          hint: `published on ${channels(key, '/events').broadcast}.`,
        }),
      "emitter.of('/events').emit",
    );
  });

  test('emitter.in(R).socketsJoin(R2): herald sockets in R then receive R2 broadcasts; socketsLeave undoes it', { timeout: TEST_MS }, async () => {
    const inR = { 'herald-1 client': a.socket, 'herald-2 client': b.socket };
    const probePred = (v) => typeof v?.probe === 'string';
    const got = Object.fromEntries(Object.entries(inR).map(([n, s]) => [n, collect(s, 'r2', probePred)]));
    const outside = collect(d.socket, 'r2', probePred);
    try {
      emitter.in(R).socketsJoin(R2);
      // The join request and the broadcasts travel on different channels: probe
      // until both herald clients get one.
      const deadline = Date.now() + DELIVERY_MS;
      while (Object.values(got).some((g) => g.items.length === 0) && Date.now() < deadline) {
        emitter.to(R2).emit('r2', { probe: rand(3) });
        await sleep(200);
      }
      const missing = Object.entries(got)
        .filter(([, g]) => g.items.length === 0)
        .map(([n]) => n);
      assert.deepEqual(
        missing,
        [],
        `after emitter.in(R).socketsJoin(R2) (REMOTE_JOIN {"type":2,"opts":{"rooms":["${R}"],"except":[]},"rooms":["${R2}"]} on ${ch.request}), ` +
          `emitter.to(R2) broadcasts never reached: ${missing.join(', ')}`,
      );
      assert.equal(outside.items.length, 0, `a herald client outside R got R2 broadcasts: ${show(outside.items)}`);

      // herald's own API sees the joined room too.
      const viaApi = { api: rand(3) };
      await expectEachOnce(inR, 'r2-api', (v) => v?.api === viaApi.api, async () => {
        const res = await http(h1, 'POST', '/api/publish', { body: { room: R2, event: 'r2-api', data: viaApi } });
        assert.equal(res.status, 200, res.text);
      }, { what: 'HTTP API event to R2 after socketsJoin' });

      // socketsLeave
      emitter.in(R).socketsLeave(R2);
      await sleep(500); // let every herald apply the REMOTE_LEAVE request
      for (const g of Object.values(got)) g.items.length = 0;
      const sync = { sync: rand(3) };
      await expectEachOnce(inR, 'sync', (v) => v?.sync === sync.sync, async () => {
        emitter.to(R2).emit('r2', { probe: 'after-leave' });
        emitter.to(R).emit('sync', sync);
      }, { what: 'sync broadcast to R after socketsLeave' });
      for (const [n, g] of Object.entries(got)) {
        assert.equal(g.items.length, 0, `${n} still receives R2 broadcasts after emitter.in(R).socketsLeave(R2): ${show(g.items)}`);
      }
    } finally {
      for (const g of Object.values(got)) g.stop();
      outside.stop();
    }
  });

  test('emitter.in(R).disconnectSockets() disconnects herald clients in R; emitter.disconnectSockets() the rest of "/"', { timeout: TEST_MS }, async () => {
    const reasons = (s) => waitFor(s, 'disconnect', DELIVERY_MS).catch(() => null);
    const ra = reasons(a.socket);
    const rb = reasons(b.socket);
    emitter.in(R).disconnectSockets();
    const [reasonA, reasonB] = await Promise.all([ra, rb]);
    assert.deepEqual(
      { 'herald-1 client': reasonA, 'herald-2 client': reasonB },
      { 'herald-1 client': 'io server disconnect', 'herald-2 client': 'io server disconnect' },
      `emitter.in(R).disconnectSockets() (REMOTE_DISCONNECT {"type":4,"opts":{"rooms":["${R}"],"except":[]},"close":false}) ` +
        'should disconnect both herald clients in R with a DISCONNECT packet (null = still connected)',
    );
    assert.equal(d.socket.connected, true, 'the herald client outside R must stay connected');
    // d is still served: a round trip works.
    const ack = await emitAck(d.socket, 'presence', roomName('still-here'));
    assert.ok(ack && typeof ack === 'object', `herald client outside R does not answer: ${show(ack)}`);

    const rd = reasons(d.socket);
    emitter.disconnectSockets();
    assert.equal(await rd, 'io server disconnect', 'emitter.disconnectSockets() should disconnect every herald client of "/"');
    await sleep(SETTLE_MS);
    assert.equal(e.socket.connected, true, 'the /events client must not be disconnected by a "/" disconnectSockets()');
  });
});
