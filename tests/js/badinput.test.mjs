// Bad input never hurts anyone: unknown events, invalid room names, malformed
// payloads, oversized message data (HERALD_MAX_PAYLOAD=1024), publishing
// without joining, forbidden joins (someone else's user room, rooms outside
// the token's `rooms` claim). Each gets the documented error ack, the
// offending socket stays connected, and a healthy client keeps receiving.
// The same for /ws frames: malformed JSON and unknown types.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  assertAck,
  collect,
  emitAck,
  emitAckNoArgs,
  join,
  openClient,
  openWs,
  publish,
  roomName,
  startHerald,
  waitFor,
} from './harness.mjs';

const MAX_PAYLOAD = 1024;

/** Assert an error ack {ok:false, error:code, message:string}. */
function assertError(ack, code, context) {
  const what = `${context}: ${JSON.stringify(ack)}`;
  assert.equal(ack?.ok, false, what);
  assert.equal(ack.error, code, what);
  assert.equal(typeof ack.message, 'string', `${what} (message should be a string)`);
}

describe('bad input', { timeout: 60_000 }, () => {
  let server;
  let healthy; // a well-behaved client that must never notice anything
  let healthyRoom;
  let healthyGot;
  before(async () => {
    server = await startHerald({ HERALD_MAX_PAYLOAD: String(MAX_PAYLOAD) });
    healthy = await openClient(server, { sub: 'healthy' });
    healthyRoom = roomName('healthy');
    await join(healthy.socket, healthyRoom);
    healthyGot = collect(healthy.socket, 'message', (m) => m.room === healthyRoom);
  });

  test('unknown event → unknown_event', async () => {
    const { socket } = await openClient(server);
    assertError(await emitAck(socket, 'frobnicate', { room: 'x' }), 'unknown_event', 'frobnicate');
    assertError(await emitAck(socket, 'JOIN', 'x'), 'unknown_event', 'JOIN (case matters)');
    assert.equal(socket.connected, true);
  });

  test('invalid room names → invalid_room for every room-taking event', async () => {
    const { socket } = await openClient(server);
    const bad = ['', 'x'.repeat(129), 'bad room!', 'a#b', 'tab\there', 'emoji🙂', 'ünïcode', 'semi;colon', 'q?x', 'new\nline'];
    const attempts = (room) => [
      ['join', room],
      ['join', { room, since: 0 }],
      ['leave', room],
      ['message', { room, data: 1 }],
      ['presence', room],
      ['history', { room }],
    ];
    // Check every case before asserting, so a failure lists all deviations.
    const got = [];
    const want = [];
    for (const room of bad) {
      const label = JSON.stringify(room.length > 20 ? `${room.slice(0, 10)}…(${room.length})` : room);
      for (const [event, payload] of attempts(room)) {
        const ack = await emitAck(socket, event, payload);
        const shape = typeof payload === 'string' ? label : `{room:${label}}`;
        got.push(`${event} ${shape} → ${ack?.ok === false ? ack.error : JSON.stringify(ack)}`);
        want.push(`${event} ${shape} → invalid_room`);
      }
    }
    assert.deepEqual(got, want);
    assert.equal(socket.connected, true);
  });

  test('valid room names at the edges are accepted', async () => {
    const { socket } = await openClient(server);
    for (const room of ['x'.repeat(128), 'Aa0_-:.@/=+', 'a', 'user-db/shard=1+2@eu.west:9']) {
      const ack = await emitAck(socket, 'join', room);
      assertAck(ack, { ok: true, room, offset: 0, recovered: false }, `join ${room}`);
    }
  });

  test('malformed payloads → bad_request', async () => {
    const { socket } = await openClient(server);
    const cases = [
      ['message', 42],
      ['message', 'just a string'],
      ['message', [1, 2]],
      ['message', { data: 'no room' }],
      ['message', { room: 5, data: 1 }],
      ['join', {}],
      ['join', { since: 1 }],
      ['join', 42],
      ['join', { room: 'ok-room', since: 'yesterday' }],
      ['leave', {}],
      ['presence', { nope: true }],
      ['history', 42],
      ['history', { room: 'ok-room', limit: 'lots' }],
    ];
    // Check every case before asserting, so a failure lists all deviations.
    const got = [];
    for (const [event, payload] of cases) {
      const ack = await emitAck(socket, event, payload);
      got.push(`${event} ${JSON.stringify(payload)} → ${ack?.ok === false ? ack.error : JSON.stringify(ack)}`);
    }
    assert.deepEqual(
      got,
      cases.map(([event, payload]) => `${event} ${JSON.stringify(payload)} → bad_request`),
    );
    assertError(await emitAckNoArgs(socket, 'join'), 'bad_request', 'join without payload');
    assertError(await emitAckNoArgs(socket, 'message'), 'bad_request', 'message without payload');
    assert.equal(socket.connected, true);
  });

  test('oversized message data → payload_too_large; sender stays usable, others unaffected', async () => {
    const big = await openClient(server, { sub: 'big-sender' });
    await join(big.socket, healthyRoom);
    const before = healthyGot.items.length;

    const ack = await emitAck(big.socket, 'message', { room: healthyRoom, data: 'x'.repeat(MAX_PAYLOAD * 2) });
    assertError(ack, 'payload_too_large', 'data of 2x HERALD_MAX_PAYLOAD');
    const nested = { blob: Array.from({ length: 200 }, (_, i) => `item-${i}`) };
    assertError(
      await emitAck(big.socket, 'message', { room: healthyRoom, data: nested }),
      'payload_too_large',
      'nested object over the limit',
    );
    assert.equal(big.socket.connected, true, 'sender is still connected');

    const small = await publish(big.socket, healthyRoom, 'small is fine');
    await healthyGot.until(before + 1);
    const got = healthyGot.items.slice(before);
    assert.deepEqual(
      got.map((m) => [m.offset, m.from, m.data]),
      [[small.offset, 'big-sender', 'small is fine']],
      'the healthy client only sees the valid message',
    );
  });

  test('publishing without joining → not_member', async () => {
    const { socket } = await openClient(server, { sub: 'outsider' });
    assertError(await emitAck(socket, 'message', { room: healthyRoom, data: 'hi' }), 'not_member', 'not joined');
    const never = roomName('never-joined');
    assertError(await emitAck(socket, 'message', { room: never, data: 'hi' }), 'not_member', 'unknown room');
  });

  test("joining someone else's user room → forbidden", async () => {
    const { socket } = await openClient(server, { sub: 'eve' });
    assertError(await emitAck(socket, 'join', 'user:alice'), 'forbidden', 'user:alice');
    assertError(await emitAck(socket, 'join', { room: 'user:alice', since: 0 }), 'forbidden', '{room: user:alice}');
    assert.equal(socket.connected, true);
  });

  test('a rooms claim limits which rooms can be joined', async () => {
    const { socket } = await openClient(server, { sub: 'scoped', claims: { rooms: ['chat:*', 'support'] } });
    const chat = `chat:${roomName('general')}`;
    assert.equal((await emitAck(socket, 'join', chat)).ok, true, 'chat:* matches');
    assert.equal((await emitAck(socket, 'join', 'support')).ok, true, 'exact entry matches');
    for (const room of ['news:today', 'chat', 'support:tier2', 'xchat:1']) {
      assertError(await emitAck(socket, 'join', room), 'forbidden', `join ${room} with rooms claim`);
    }
    assert.equal(socket.connected, true);
  });

  test('after all that, the healthy client still gets its messages and newcomers work', async () => {
    const before = healthyGot.items.length;
    const friend = await openClient(server, { sub: 'friend' });
    await join(friend.socket, healthyRoom);
    const ack = await publish(friend.socket, healthyRoom, 'still there?');
    await healthyGot.until(before + 1);
    const m = healthyGot.items.at(-1);
    assert.deepEqual([m.id, m.from, m.data], [ack.id, 'friend', 'still there?']);
    assert.equal(healthy.socket.connected, true);
    assert.deepEqual(
      healthyGot.items.map((x) => x.offset),
      Array.from({ length: healthyGot.items.length }, (_, i) => i + 1),
      'no gaps: rejected publishes did not consume offsets',
    );
  });

  describe('/ws frames', () => {
    test('malformed JSON → ack with id null and bad_request; the connection stays open', async () => {
      const { ws } = await openWs(server, { sub: 'ws-bad' });
      const ack = waitFor(ws, 'ack', 5000, (f) => f.id === null);
      ws.send('{"type": "join", "room": ');
      const frame = await ack;
      assert.equal(frame.type, 'ack');
      assert.equal(frame.id, null);
      assert.equal(frame.ok, false);
      assert.equal(frame.error, 'bad_request');
      assert.equal(typeof frame.message, 'string');

      const ack2 = waitFor(ws, 'ack', 5000, (f) => f.id === null);
      ws.send('not json');
      assert.equal((await ack2).error, 'bad_request');

      assert.equal(ws.isOpen, true);
      const room = roomName('ws-ok');
      assert.equal((await ws.request({ type: 'join', room })).ok, true, 'still usable afterwards');
    });

    test('text cut inside a surrogate pair → bad_request with the request id, on /ws and Socket.IO', async () => {
      // 'a😀'.slice(0, 2) keeps only the pair's first half, which JSON.stringify escapes.
      const cut = 'a😀'.slice(0, 2);
      const room = roomName('cut');
      const { ws } = await openWs(server, { sub: 'ws-cut' });
      assert.equal((await ws.request({ type: 'join', room })).ok, true);
      const ack = await ws.request({ type: 'message', room, data: cut, id: 'cut-1' });
      assert.equal(ack.id, 'cut-1', 'the refusal names the request');
      assert.equal(ack.ok, false);
      assert.equal(ack.error, 'bad_request');
      assert.match(ack.message, /unpaired UTF-16 surrogate/);
      assert.equal(ws.isOpen, true);

      const { socket } = await openClient(server, { sub: 'sio-cut' });
      await join(socket, room);
      assertError(await emitAck(socket, 'message', { room, data: cut }), 'bad_request', 'a cut pair');
      assert.equal(socket.connected, true);
      const whole = await publish(socket, room, 'a😀');
      assert.equal(typeof whole.offset, 'number', 'a whole pair is fine');
    });

    test('unknown type → unknown_event with the request id', async () => {
      const { ws } = await openWs(server);
      const ack = await ws.request({ type: 'frobnicate', id: 'u1' });
      assert.equal(ack.type, 'ack');
      assert.equal(ack.id, 'u1');
      assert.equal(ack.ok, false);
      assert.equal(ack.error, 'unknown_event');
      assert.equal(ws.isOpen, true);
    });

    test('invalid room, bad request, not_member, forbidden and payload_too_large on /ws', async () => {
      const { ws } = await openWs(server, { sub: 'ws-eve' });
      const err = async (frame) => {
        const ack = await ws.request(frame);
        assert.equal(ack.ok, false, JSON.stringify({ frame, ack }));
        return ack.error;
      };
      assert.equal(await err({ type: 'join', room: 'bad room!' }), 'invalid_room');
      assert.equal(await err({ type: 'join' }), 'bad_request');
      assert.equal(await err({ type: 'message', room: healthyRoom, data: 1 }), 'not_member');
      assert.equal(await err({ type: 'join', room: 'user:alice' }), 'forbidden');
      assert.equal((await ws.request({ type: 'join', room: healthyRoom })).ok, true);
      const before = healthyGot.items.length;
      assert.equal(
        await err({ type: 'message', room: healthyRoom, data: 'y'.repeat(MAX_PAYLOAD * 2) }),
        'payload_too_large',
      );
      assert.equal(ws.isOpen, true);
      const ok = await ws.request({ type: 'message', room: healthyRoom, data: 'fine' });
      assert.equal(ok.ok, true);
      await healthyGot.until(before + 1);
      assert.deepEqual(
        healthyGot.items.slice(before).map((m) => [m.from, m.data]),
        [['ws-eve', 'fine']],
      );
    });
  });
});
