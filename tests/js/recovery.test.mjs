// Gap recovery with `join {room, since}`: missed messages are re-sent as
// ordinary `message` events, in order, before the join ack; `recovered` tells
// whether the gap was fully filled (it is not when history was capped by
// HERALD_HISTORY_SIZE, or when `since` lies beyond the room's latest offset).
// Covers Socket.IO and the plain /ws protocol.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { assertAck, collect, emitAck, join, openClient, openWs, publish, roomName, startHerald, waitFor } from './harness.mjs';

/**
 * Emit `join {room, since}` and record, in arrival order, every message event
 * for the room and the ack. Returns {log, messages, ack}.
 */
async function joinSince(socket, room, since) {
  const log = [];
  const onMessage = (m) => {
    if (m.room === room) log.push({ kind: 'message', m });
  };
  socket.on('message', onMessage);
  const ack = await emitAck(socket, 'join', { room, since });
  log.push({ kind: 'ack', ack });
  socket.off('message', onMessage);
  return { log, messages: log.filter((e) => e.kind === 'message').map((e) => e.m), ack };
}

/** A fresh room holding `n` messages ({n: 1..n}) published by user "publisher". */
async function roomWith(server, n, prefix) {
  const pub = await openClient(server, { sub: 'publisher' });
  const room = roomName(prefix);
  await join(pub.socket, room);
  const acks = [];
  for (let i = 1; i <= n; i++) acks.push(await publish(pub.socket, room, { n: i }));
  return { room, acks, pub };
}

describe('recovery with full history', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  test('since=2 after 5 messages: offsets 3,4,5 arrive before the ack, recovered:true', async () => {
    const { room, acks } = await roomWith(server, 5, 'rec');
    const late = await openClient(server, { sub: 'latecomer' });
    const { log, messages, ack } = await joinSince(late.socket, room, 2);

    assertAck(ack, { ok: true, room, offset: 5, recovered: true });
    assert.deepEqual(
      log.map((e) => (e.kind === 'ack' ? 'ack' : e.m.offset)),
      [3, 4, 5, 'ack'],
      'replayed messages come first, in order, then the ack',
    );
    assert.deepEqual(
      messages.map((m) => [m.offset, m.id, m.from, m.data]),
      acks.slice(2).map((a, i) => [a.offset, a.id, 'publisher', { n: i + 3 }]),
    );
  });

  test('since=0 replays everything', async () => {
    const { room } = await roomWith(server, 4, 'rec-zero');
    const late = await openClient(server);
    const { messages, ack } = await joinSince(late.socket, room, 0);
    assert.deepEqual(
      messages.map((m) => m.offset),
      [1, 2, 3, 4],
    );
    assertAck(ack, { ok: true, room, offset: 4, recovered: true });
  });

  test('since equal to the latest offset: nothing to replay, recovered:true', async () => {
    const { room } = await roomWith(server, 3, 'rec-uptodate');
    const late = await openClient(server);
    const { messages, ack } = await joinSince(late.socket, room, 3);
    assert.deepEqual(messages, []);
    assertAck(ack, { ok: true, room, offset: 3, recovered: true });
  });

  test('since beyond the latest offset: recovered:false, nothing replayed', async () => {
    const { room } = await roomWith(server, 3, 'rec-future');
    const late = await openClient(server);
    const { messages, ack } = await joinSince(late.socket, room, 9);
    assert.deepEqual(messages, []);
    assertAck(ack, { ok: true, room, offset: 3, recovered: false });
  });

  test('a reconnecting client catches up on what it missed and then gets live messages', async () => {
    const room = roomName('rec-reconnect');
    const pub = await openClient(server, { sub: 'pub' });
    await join(pub.socket, room);

    const first = await openClient(server, { sub: 'flaky' });
    await join(first.socket, room);
    const seen = collect(first.socket, 'message', (m) => m.room === room);
    await publish(pub.socket, room, 'a');
    await publish(pub.socket, room, 'b');
    await seen.until(2);
    first.socket.close();

    await publish(pub.socket, room, 'c (missed)');
    await publish(pub.socket, room, 'd (missed)');

    const again = await openClient(server, { sub: 'flaky' });
    const { messages, ack } = await joinSince(again.socket, room, seen.items.at(-1).offset);
    assert.deepEqual(
      messages.map((m) => [m.offset, m.data]),
      [
        [3, 'c (missed)'],
        [4, 'd (missed)'],
      ],
    );
    assert.equal(ack.recovered, true);
    const live = waitFor(again.socket, 'message', 5000, (m) => m.room === room);
    await publish(pub.socket, room, 'e');
    const m = await live;
    assert.deepEqual([m.offset, m.data], [5, 'e']);
  });

  test('/ws: join with since replays as message frames before the ack', async () => {
    const { room, acks } = await roomWith(server, 5, 'rec-ws');
    const { ws } = await openWs(server, { sub: 'ws-late' });
    const log = [];
    const onFrame = (f) => {
      if (f.type === 'message' && f.room === room) log.push(f.offset);
      if (f.type === 'ack' && f.id === 'j1') log.push('ack');
    };
    ws.on('frame', onFrame);
    const ack = await ws.request({ type: 'join', room, since: 2, id: 'j1' });
    ws.off('frame', onFrame);
    assertAck(ack, { type: 'ack', id: 'j1', ok: true, room, offset: 5, recovered: true });
    assert.deepEqual(log, [3, 4, 5, 'ack']);
    const replayed = ws.frames.filter((f) => f.type === 'message' && f.room === room);
    assert.deepEqual(
      replayed.map((f) => f.id),
      acks.slice(2).map((a) => a.id),
    );
  });
});

describe('recovery with HERALD_HISTORY_SIZE=3', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald({ HERALD_HISTORY_SIZE: '3' });
  });

  test('6 messages, since=1: the gap can no longer be filled → recovered:false', async () => {
    const { room } = await roomWith(server, 6, 'capped');
    const late = await openClient(server);
    const { messages, ack } = await joinSince(late.socket, room, 1);
    assertAck(ack, { ok: true, room, offset: 6, recovered: false });
    const offs = messages.map((m) => m.offset);
    assert.deepEqual(
      offs,
      [...offs].sort((a, b) => a - b),
      'whatever is replayed is in order',
    );
    assert.ok(
      offs.every((o) => o > 1 && o <= 6),
      `replayed offsets ${offs} must be within (1, 6]`,
    );
  });

  test('6 messages, since=3: the kept tail covers the gap → recovered:true', async () => {
    const { room } = await roomWith(server, 6, 'capped-ok');
    const late = await openClient(server);
    const { messages, ack } = await joinSince(late.socket, room, 3);
    assert.deepEqual(
      messages.map((m) => m.offset),
      [4, 5, 6],
    );
    assertAck(ack, { ok: true, room, offset: 6, recovered: true });
  });

  test('history only keeps the last 3 messages', async () => {
    const { room, pub } = await roomWith(server, 6, 'capped-hist');
    const ack = await emitAck(pub.socket, 'history', { room });
    assert.deepEqual(
      ack.messages.map((m) => [m.offset, m.data]),
      [
        [4, { n: 4 }],
        [5, { n: 5 }],
        [6, { n: 6 }],
      ],
    );
  });

  test('/ws: since=1 after 6 messages → recovered:false', async () => {
    const { room } = await roomWith(server, 6, 'capped-ws');
    const { ws } = await openWs(server);
    const ack = await ws.request({ type: 'join', room, since: 1 });
    assert.equal(ack.ok, true);
    assert.equal(ack.offset, 6);
    assert.equal(ack.recovered, false);
  });
});
