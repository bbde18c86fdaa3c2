// Presence: `presence` events are sent once per USER transition, not per
// socket. A user with two tabs produces one `join` when the first tab joins
// and one `leave` only when the last tab leaves or disconnects. The presence
// ack, GET /api/rooms/{room}/presence and /ws presence frames all agree.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  assertAck,
  barrier,
  collect,
  emitAck,
  http,
  join,
  openClient,
  openWs,
  roomName,
  roomPath,
  startHerald,
  waitFor,
} from './harness.mjs';

describe('presence', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  /** Users in `room` according to the ack and the HTTP API, asserted equal. */
  async function presenceEverywhere(socket, room, ns) {
    const ack = await emitAck(socket, 'presence', room);
    assert.equal(ack.ok, true);
    const res = await http(server, 'GET', roomPath(room, 'presence', { namespace: ns }));
    assert.equal(res.status, 200, res.text);
    assertAck(res.json, { room, users: ack.users }, 'HTTP presence agrees with the presence ack');
    return ack.users;
  }

  test('two tabs of one user: one join, and one leave only when the last tab goes', async () => {
    const room = roomName('lobby');
    const observer = await openClient(server, { sub: 'observer' });
    await join(observer.socket, room);
    const events = collect(observer.socket, 'presence', (p) => p.room === room && p.user !== 'observer');
    const seen = () => events.items.map((p) => `${p.user}:${p.status}`);

    const tab1 = await openClient(server, { sub: 'alice' });
    const tab2 = await openClient(server, { sub: 'alice' });
    const bob = await openClient(server, { sub: 'bob' });

    await join(tab1.socket, room);
    const aliceJoin = await events.until(1);
    assert.deepEqual(aliceJoin[0], { room, user: 'alice', status: 'join' });

    await join(tab2.socket, room); // second tab: no new transition
    await join(bob.socket, room);
    await events.until(2);
    await barrier(observer.socket, room);
    assert.deepEqual(seen(), ['alice:join', 'bob:join']);
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['alice', 'bob', 'observer']);

    assertAck(await emitAck(tab1.socket, 'leave', room), { ok: true, room }); // alice still has tab2
    await barrier(observer.socket, room);
    assert.deepEqual(seen(), ['alice:join', 'bob:join']);
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['alice', 'bob', 'observer']);

    tab2.socket.close(); // disconnect of the last tab counts as leave
    await events.until(3);
    assert.deepEqual(events.items[2], { room, user: 'alice', status: 'leave' });
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['bob', 'observer']);

    await emitAck(bob.socket, 'leave', room);
    await events.until(4);
    await barrier(observer.socket, room);
    assert.deepEqual(seen(), ['alice:join', 'bob:join', 'alice:leave', 'bob:leave']);
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['observer']);
  });

  test('both tabs disconnecting yields exactly one leave', async () => {
    const room = roomName('tabs');
    const observer = await openClient(server, { sub: 'watcher' });
    await join(observer.socket, room);
    const events = collect(observer.socket, 'presence', (p) => p.room === room && p.user === 'erin');

    const tab1 = await openClient(server, { sub: 'erin' });
    const tab2 = await openClient(server, { sub: 'erin' });
    await join(tab1.socket, room);
    await join(tab2.socket, room);
    await events.until(1);

    tab1.socket.close();
    await barrier(observer.socket, room);
    assert.deepEqual(
      events.items.map((p) => p.status),
      ['join'],
      'closing one of two tabs is not a leave',
    );
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['erin', 'watcher']);

    tab2.socket.close();
    await events.until(2);
    await barrier(observer.socket, room);
    assert.deepEqual(events.items, [
      { room, user: 'erin', status: 'join' },
      { room, user: 'erin', status: 'leave' },
    ]);
    assert.deepEqual(await presenceEverywhere(observer.socket, room), ['watcher']);
  });

  test('rejoining after a full leave produces a new join', async () => {
    const room = roomName('again');
    const observer = await openClient(server, { sub: 'obs2' });
    await join(observer.socket, room);
    const events = collect(observer.socket, 'presence', (p) => p.room === room && p.user === 'frank');
    const frank = await openClient(server, { sub: 'frank' });
    await join(frank.socket, room);
    await emitAck(frank.socket, 'leave', room);
    await join(frank.socket, room);
    await events.until(3);
    await barrier(observer.socket, room);
    assert.deepEqual(
      events.items.map((p) => p.status),
      ['join', 'leave', 'join'],
    );
  });

  test('presence is per room: joining another room does not notify this one', async () => {
    const room = roomName('here');
    const elsewhere = roomName('there');
    const observer = await openClient(server, { sub: 'obs3' });
    await join(observer.socket, room);
    const events = collect(observer.socket, 'presence', (p) => p.user === 'gina');
    const gina = await openClient(server, { sub: 'gina' });
    await join(gina.socket, elsewhere);
    await join(gina.socket, room);
    await events.until(1);
    await barrier(observer.socket, room);
    assert.deepEqual(events.items, [{ room, user: 'gina', status: 'join' }]);
  });

  test('HTTP presence honours ?namespace= and URL-encoded room names', async () => {
    const room = `team/alpha:${roomName('ns')}`;
    const root = await openClient(server, { sub: 'root-harry' });
    const ev = await openClient(server, { sub: 'events-ivy', ns: '/events' });
    await join(root.socket, room);
    await join(ev.socket, room);
    assert.deepEqual(await presenceEverywhere(root.socket, room), ['root-harry']);
    assert.deepEqual(await presenceEverywhere(root.socket, room, '/'), ['root-harry']);
    assert.deepEqual(await presenceEverywhere(ev.socket, room, '/events'), ['events-ivy']);
    const empty = await http(server, 'GET', roomPath(roomName('nobody-here'), 'presence'));
    assert.equal(empty.status, 200);
    assert.deepEqual(empty.json.users, []);
  });

  test('/ws clients see the same presence transitions and can ask for presence', async () => {
    const room = roomName('ws-presence');
    const { ws } = await openWs(server, { sub: 'ws-watcher' });
    assert.equal((await ws.request({ type: 'join', room })).ok, true);
    const frames = collect(ws, 'presence', (f) => f.room === room && f.user === 'jack');

    const jack1 = await openClient(server, { sub: 'jack' });
    const jack2 = await openClient(server, { sub: 'jack' });
    await join(jack1.socket, room);
    await join(jack2.socket, room);
    await frames.until(1);
    assert.deepEqual(frames.items[0], { type: 'presence', room, user: 'jack', status: 'join' });

    const ack = await ws.request({ type: 'presence', room, id: 'p1' });
    assertAck(ack, { type: 'ack', id: 'p1', ok: true, users: ['jack', 'ws-watcher'] });

    const done = waitFor(ws, 'presence', 5000, (f) => f.room === room && f.status === 'leave');
    jack1.socket.close();
    await emitAck(jack2.socket, 'leave', room);
    assert.deepEqual(await done, { type: 'presence', room, user: 'jack', status: 'leave' });
    // Barrier: once our own message comes back, no duplicate leave is pending.
    const echo = waitFor(ws, 'message', 5000, (f) => f.room === room && f.data === 'sync');
    assert.equal((await ws.request({ type: 'message', room, data: 'sync' })).ok, true);
    await echo;
    assert.deepEqual(
      frames.items.map((f) => f.status),
      ['join', 'leave'],
    );
  });
});
