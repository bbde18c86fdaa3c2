// Mixed protocols in one room: plain /ws clients and Socket.IO clients
// (websocket and polling) publish ~200 messages concurrently. Every member,
// whichever protocol it speaks, must see the identical sequence of
// (offset, id) with offsets 1, 2, 3, … without gaps, and the same content.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { assertAck, collect, join, openClient, openWs, roomName, startHerald } from './harness.mjs';

const PER_PUBLISHER = 50;

describe('Socket.IO and /ws in the same room', { timeout: 90_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  test('small exchange: each side sees the other with the same fields', async () => {
    const room = roomName('mix-small');
    const { ws } = await openWs(server, { sub: 'ws-user' });
    const sio = await openClient(server, { sub: 'sio-user' });
    assertAck(await ws.request({ type: 'join', room, id: 'j' }), {
      type: 'ack',
      id: 'j',
      ok: true,
      room,
      offset: 0,
      recovered: false,
    });
    await join(sio.socket, room);
    const atWs = collect(ws, 'message', (f) => f.room === room);
    const atSio = collect(sio.socket, 'message', (m) => m.room === room);

    const wsAck = await ws.request({ type: 'message', room, data: { from: 'ws' }, id: 'm1' });
    assert.equal(wsAck.type, 'ack');
    assert.equal(wsAck.ok, true);
    assert.equal(wsAck.id, 'm1', 'the ack carries the request id');
    assert.equal(wsAck.offset, 1);
    await atWs.until(1);
    await atSio.until(1);
    const { type, ...rest } = atWs.items[0];
    assert.equal(type, 'message');
    assert.deepEqual(rest, atSio.items[0]);
    assert.equal(rest.from, 'ws-user');
    assert.deepEqual(rest.data, { from: 'ws' });
    assert.equal(typeof rest.id, 'string');
    assert.notEqual(rest.id, 'm1', 'message id is the server-assigned id, not the request id');
  });

  test(`${4 * PER_PUBLISHER} concurrent messages from both protocols arrive identically everywhere`, async () => {
    const room = roomName('mix');

    const receivers = {
      ws: (await openWs(server, { sub: 'recv-ws' })).ws,
      sio: (await openClient(server, { sub: 'recv-sio' })).socket,
    };
    const publishers = [
      { kind: 'ws', ...(await openWs(server, { sub: 'pub-ws-1' })) },
      { kind: 'ws', ...(await openWs(server, { sub: 'pub-ws-2' })) },
      { kind: 'sio', ...(await openClient(server, { sub: 'pub-sio-ws' })) },
      { kind: 'sio', ...(await openClient(server, { sub: 'pub-sio-poll', transports: ['polling'] })) },
    ];

    assert.equal((await receivers.ws.request({ type: 'join', room })).ok, true);
    await join(receivers.sio, room);
    for (const p of publishers) {
      if (p.kind === 'ws') assert.equal((await p.ws.request({ type: 'join', room })).ok, true);
      else await join(p.socket, room);
    }

    const total = publishers.length * PER_PUBLISHER;
    const streams = {
      'recv-ws': collect(receivers.ws, 'message', (f) => f.room === room),
      'recv-sio': collect(receivers.sio, 'message', (m) => m.room === room),
    };
    for (const p of publishers) {
      streams[p.user] = collect(p.kind === 'ws' ? p.ws : p.socket, 'message', (m) => m.room === room);
    }

    // Fire everything without waiting between sends.
    const sent = [];
    for (let n = 0; n < PER_PUBLISHER; n++) {
      for (const p of publishers) {
        const data = { by: p.user, n };
        const ack =
          p.kind === 'ws'
            ? p.ws.request({ type: 'message', room, data }, 30_000)
            : p.socket.timeout(30_000).emitWithAck('message', { room, data });
        sent.push(ack.then((a) => ({ user: p.user, kind: p.kind, data, ack: a })));
      }
    }
    const results = await Promise.all(sent);
    const failed = results.filter((r) => !r.ack.ok);
    assert.deepEqual(failed, [], 'every publish is acked ok');

    for (const [who, stream] of Object.entries(streams)) {
      await stream.until(total, 30_000).catch((err) => {
        throw new Error(`${who}: ${err.message}`);
      });
    }

    const seq = (items) => items.map((m) => [m.offset, m.id]);
    const reference = seq(streams['recv-sio'].items);
    assert.deepEqual(
      reference.map(([offset]) => offset),
      Array.from({ length: total }, (_, i) => i + 1),
      'offsets strictly increase by 1 from 1',
    );
    for (const [who, stream] of Object.entries(streams)) {
      assert.equal(stream.items.length, total, `${who} got exactly ${total} messages`);
      assert.deepEqual(seq(stream.items), reference, `${who} sees the same (offset, id) sequence`);
    }

    // Acks agree with deliveries, and content is intact. (On /ws the ack's
    // `id` echoes the request id, so match by offset; on Socket.IO the ack's
    // `id` is the message id.)
    const byId = new Map(streams['recv-ws'].items.map((f) => [f.id, f]));
    assert.equal(byId.size, total, 'ids are unique');
    const byOffset = new Map(streams['recv-ws'].items.map((f) => [f.offset, f]));
    for (const { user, kind, data, ack } of results) {
      const delivered = byOffset.get(ack.offset);
      assert.ok(delivered, `acked offset ${ack.offset} was delivered`);
      if (kind === 'sio') assert.equal(delivered.id, ack.id);
      assert.equal(delivered.from, user);
      assert.deepEqual(delivered.data, data);
    }
    assert.equal(new Set(results.map((r) => r.ack.offset)).size, total, 'acked offsets are unique');
    const sioById = new Map(streams['recv-sio'].items.map((m) => [m.id, m]));
    for (const [id, frame] of byId) {
      const { type, ...rest } = frame;
      assert.equal(type, 'message');
      assert.deepEqual(rest, sioById.get(id), 'ws frame and Socket.IO event carry the same message');
    }
  });
});
