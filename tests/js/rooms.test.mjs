// Rooms over Socket.IO: join (string and object form), leave, message fan-out
// to every member including the sender with the exact field set, per-room
// offsets 1..n, presence and history acks (since / before / limit), leave
// stopping delivery, the personal `user:<sub>` room, and `/` vs `/events`
// being independent room spaces.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  MESSAGE_FIELDS,
  assertAck,
  collect,
  emitAck,
  http,
  isBarrier,
  join,
  openClient,
  publish,
  roomName,
  startHerald,
  waitFor,
} from './harness.mjs';

describe('rooms', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  test('join with a string: ack {ok, room, offset:0, recovered:false} for a fresh room', async () => {
    const { socket } = await openClient(server);
    const room = roomName('fresh');
    const ack = await emitAck(socket, 'join', room);
    assertAck(ack, { ok: true, room, offset: 0, recovered: false });
  });

  test('join with an object without since: same ack shape', async () => {
    const { socket } = await openClient(server);
    const room = roomName('obj');
    const ack = await emitAck(socket, 'join', { room });
    assertAck(ack, { ok: true, room, offset: 0, recovered: false });
  });

  test('join ack reports the latest offset of an existing room', async () => {
    const a = await openClient(server);
    const room = roomName('latest');
    await join(a.socket, room);
    for (let i = 0; i < 3; i++) await publish(a.socket, room, i);
    const b = await openClient(server);
    assertAck(await emitAck(b.socket, 'join', room), { ok: true, room, offset: 3, recovered: false });
  });

  test('message reaches every member, sender included, with the exact field set', async () => {
    const alice = await openClient(server, { sub: 'alice' });
    const bob = await openClient(server, { sub: 'bob' });
    const room = roomName('chat');
    await join(alice.socket, room);
    await join(bob.socket, room);

    const atAlice = waitFor(alice.socket, 'message', 5000, (m) => m.room === room);
    const atBob = waitFor(bob.socket, 'message', 5000, (m) => m.room === room);
    const data = { text: 'hello', n: 1, nested: { list: [1, 'two', null, true] } };
    const before = Date.now();
    const ack = await emitAck(alice.socket, 'message', { room, data });
    const after = Date.now();

    assert.equal(ack.ok, true);
    assert.equal(typeof ack.id, 'string');
    assert.ok(ack.id.length > 0);
    assert.equal(ack.offset, 1);

    for (const m of [await atAlice, await atBob]) {
      assert.deepEqual(Object.keys(m).sort(), MESSAGE_FIELDS);
      assert.deepEqual({ room: m.room, id: m.id, offset: m.offset, from: m.from, data: m.data }, {
        room,
        id: ack.id,
        offset: 1,
        from: 'alice',
        data,
      });
      assert.equal(typeof m.ts, 'number');
      assert.ok(m.ts >= before - 1000 && m.ts <= after + 1000, `ts ${m.ts} should be unix ms near ${before}`);
    }
  });

  test('any JSON value round-trips as data', async () => {
    const { socket } = await openClient(server);
    const room = roomName('types');
    await join(socket, room);
    const values = ['a string', 42, 3.5, true, false, [1, [2, [3]]], { deep: { er: { est: 'x' } } }, '', 0];
    const got = collect(socket, 'message', (m) => m.room === room);
    for (const v of values) await publish(socket, room, v);
    await got.until(values.length);
    assert.deepEqual(
      got.items.map((m) => m.data),
      values,
    );
  });

  test('offsets are 1..n per room, in ack and in delivery order', async () => {
    const alice = await openClient(server);
    const bob = await openClient(server);
    const room = roomName('offsets');
    const other = roomName('offsets-other');
    await join(alice.socket, room);
    await join(bob.socket, room);
    await join(alice.socket, other);

    const atBob = collect(bob.socket, 'message', (m) => m.room === room);
    const acks = [];
    for (let i = 1; i <= 10; i++) {
      acks.push(await publish(alice.socket, room, { i }));
      if (i % 3 === 0) await publish(alice.socket, other, { i }); // another room must not disturb the count
    }
    assert.deepEqual(
      acks.map((a) => a.offset),
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    );
    await atBob.until(10);
    assert.deepEqual(
      atBob.items.map((m) => [m.offset, m.id, m.data.i]),
      acks.map((a, i) => [a.offset, a.id, i + 1]),
    );
    assert.equal(new Set(acks.map((a) => a.id)).size, 10, 'ids are unique');
    const otherJoin = await emitAck(bob.socket, 'join', other);
    assert.equal(otherJoin.offset, 3, 'the other room counted on its own');
  });

  test('leave acks {ok, room} and stops delivery to the leaver', async () => {
    const alice = await openClient(server);
    const bob = await openClient(server);
    const room = roomName('leave');
    const sync = roomName('sync');
    for (const c of [alice, bob]) {
      await join(c.socket, room);
      await join(c.socket, sync);
    }
    const atBob = collect(bob.socket, 'message', (m) => m.room === room);
    await publish(alice.socket, room, 'before leave');
    await atBob.until(1);

    assertAck(await emitAck(bob.socket, 'leave', room), { ok: true, room });

    const atAlice = collect(alice.socket, 'message', (m) => m.room === room);
    await publish(alice.socket, room, 'after leave 1');
    await publish(alice.socket, room, 'after leave 2');
    await atAlice.until(2);
    // Both sockets share `sync`: once bob sees this, anything for him from the
    // earlier publishes would already have arrived.
    const syncSeen = waitFor(bob.socket, 'message', 5000, (m) => m.room === sync);
    await publish(alice.socket, sync, 'sync');
    await syncSeen;
    assert.deepEqual(
      atBob.items.map((m) => m.data),
      ['before leave'],
    );

    const denied = await emitAck(bob.socket, 'message', { room, data: 'let me in' });
    assert.equal(denied.ok, false);
    assert.equal(denied.error, 'not_member');
  });

  test('presence ack lists the users in the room, sorted', async () => {
    const room = roomName('who');
    const zed = await openClient(server, { sub: 'zed' });
    const amy = await openClient(server, { sub: 'amy' });
    const mike = await openClient(server, { sub: 'mike' });
    for (const c of [zed, amy, mike]) await join(c.socket, room);
    assertAck(await emitAck(zed.socket, 'presence', room), { ok: true, users: ['amy', 'mike', 'zed'] });
    await emitAck(amy.socket, 'leave', room);
    assertAck(await emitAck(zed.socket, 'presence', room), { ok: true, users: ['mike', 'zed'] });
  });

  describe('history', () => {
    let alice;
    let room;
    let live;
    before(async () => {
      alice = await openClient(server, { sub: 'historian' });
      room = roomName('hist');
      await join(alice.socket, room);
      const got = collect(alice.socket, 'message', (m) => m.room === room);
      for (let i = 1; i <= 10; i++) await publish(alice.socket, room, { i });
      live = await got.until(10);
    });

    const offsets = (ack) => ack.messages.map((m) => m.offset);

    test('without bounds: every message, ascending, identical to the live events', async () => {
      const ack = await emitAck(alice.socket, 'history', { room });
      assert.equal(ack.ok, true);
      assert.deepEqual(ack.messages, live);
    });

    test('since is an exclusive lower bound', async () => {
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, since: 3 })), [4, 5, 6, 7, 8, 9, 10]);
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, since: 10 })), []);
    });

    test('before is an exclusive upper bound', async () => {
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, before: 4 })), [1, 2, 3]);
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, before: 1 })), []);
    });

    test('since and before together', async () => {
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, since: 2, before: 6 })), [3, 4, 5]);
    });

    test('limit caps the number of messages', async () => {
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room, since: 2, limit: 3 })), [3, 4, 5]);
      const limited = offsets(await emitAck(alice.socket, 'history', { room, limit: 4 }));
      assert.equal(limited.length, 4);
      for (let i = 1; i < limited.length; i++) assert.equal(limited[i], limited[i - 1] + 1, 'contiguous, ascending');
    });

    test('limit defaults to 100', async () => {
      const big = roomName('hist-big');
      await join(alice.socket, big);
      for (let i = 1; i <= 120; i++) await publish(alice.socket, big, i);
      const ack = await emitAck(alice.socket, 'history', { room: big });
      assert.equal(ack.messages.length, 100);
      const o = offsets(ack);
      for (let i = 1; i < o.length; i++) assert.equal(o[i], o[i - 1] + 1, 'contiguous, ascending');
      assert.deepEqual(offsets(await emitAck(alice.socket, 'history', { room: big, since: 0 })).slice(0, 3), [1, 2, 3]);
    });
  });

  test('every socket is in its personal user:<sub> room', async () => {
    const tab1 = await openClient(server, { sub: 'carol' });
    const tab2 = await openClient(server, { sub: 'carol' });
    const dave = await openClient(server, { sub: 'dave' });
    const got1 = waitFor(tab1.socket, 'nudge');
    const got2 = waitFor(tab2.socket, 'nudge');
    const daveGot = collect(dave.socket, 'nudge');
    const res = await http(server, 'POST', '/api/publish', {
      body: { room: 'user:carol', event: 'nudge', data: { hi: 'carol' } },
    });
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(await got1, { hi: 'carol' });
    assert.deepEqual(await got2, { hi: 'carol' });
    // Sync dave through his own personal room.
    const daveSync = waitFor(dave.socket, 'nudge');
    await http(server, 'POST', '/api/publish', { body: { room: 'user:dave', event: 'nudge', data: 'dave' } });
    assert.equal(await daveSync, 'dave');
    assert.deepEqual(daveGot.items, ['dave']);
  });

  test('`/` and `/events` are separate room spaces', async () => {
    const room = roomName('shared');
    const root = await openClient(server, { sub: 'root-user' });
    const events = await openClient(server, { sub: 'events-user', ns: '/events' });
    const atRoot = collect(root.socket, 'message', (m) => m.room === room && !isBarrier(m));
    const atEvents = collect(events.socket, 'message', (m) => m.room === room);

    await join(root.socket, room);
    for (let i = 1; i <= 3; i++) await publish(root.socket, room, `root ${i}`);

    assertAck(await emitAck(events.socket, 'join', room), { ok: true, room, offset: 0, recovered: false });
    const evAck = await publish(events.socket, room, 'events 1');
    assert.equal(evAck.offset, 1);
    const rootAck = await publish(root.socket, room, 'root 4');
    assert.equal(rootAck.offset, 4);

    await atRoot.until(4);
    await atEvents.until(1);
    assert.deepEqual(
      atRoot.items.map((m) => [m.offset, m.data]),
      [
        [1, 'root 1'],
        [2, 'root 2'],
        [3, 'root 3'],
        [4, 'root 4'],
      ],
    );
    assert.deepEqual(
      atEvents.items.map((m) => [m.offset, m.data]),
      [[1, 'events 1']],
    );

    assertAck(await emitAck(root.socket, 'presence', room), { ok: true, users: ['root-user'] });
    assertAck(await emitAck(events.socket, 'presence', room), { ok: true, users: ['events-user'] });
    const rootHist = await emitAck(root.socket, 'history', { room });
    assert.deepEqual(
      rootHist.messages.map((m) => m.data),
      ['root 1', 'root 2', 'root 3', 'root 4'],
    );
    const evHist = await emitAck(events.socket, 'history', { room });
    assert.deepEqual(
      evHist.messages.map((m) => m.data),
      ['events 1'],
    );
  });
});
