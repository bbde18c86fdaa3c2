// Events emitted right after io(), before the connection is established, are
// buffered by socket.io-client and flushed at CONNECT. The server must not
// lose them: `join` then `message` are both acked ok, in that order, and the
// message is delivered. Checked over websocket and polling transports and on
// the /events namespace.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { assertAck, collect, connect, join, openClient, roomName, startHerald, token } from './harness.mjs';

describe('emits before connect', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  /**
   * Open a socket and, in the same tick, emit join + message with ack
   * callbacks. Returns the acks in arrival order and what a watcher saw.
   */
  async function raceJoinAndMessage({ transports, ns = '' }) {
    const room = roomName('race');
    const watcher = await openClient(server, { sub: 'watcher', ns, transports });
    await join(watcher.socket, room);
    const watched = collect(watcher.socket, 'message', (m) => m.room === room);

    const sub = `racer-${transports.join('-')}`;
    const s = connect(`${server.url}${ns}`, token(server.secret, { sub }), { transports });
    const own = collect(s, 'message', (m) => m.room === room);
    assert.equal(s.connected, false, 'emits below happen before the connection is up');

    const order = [];
    const acked = new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`acks so far: ${JSON.stringify(order)}`)), 10_000);
      const done = (name) => (ack) => {
        order.push({ name, ack });
        if (order.length === 2) {
          clearTimeout(timer);
          resolve();
        }
      };
      s.emit('join', room, done('join'));
      s.emit('message', { room, data: 1 }, done('message'));
    });
    await acked;

    assert.deepEqual(
      order.map((o) => o.name),
      ['join', 'message'],
      'acks arrive in emit order',
    );
    assertAck(order[0].ack, { ok: true, room, offset: 0, recovered: false });
    assert.equal(order[1].ack.ok, true, `message ack: ${JSON.stringify(order[1].ack)}`);
    assert.equal(order[1].ack.offset, 1);

    await own.until(1);
    await watched.until(1);
    for (const m of [own.items[0], watched.items[0]]) {
      assert.equal(m.id, order[1].ack.id);
      assert.equal(m.offset, 1);
      assert.equal(m.from, sub);
      assert.equal(m.data, 1);
    }
  }

  test('websocket transport', async () => {
    await raceJoinAndMessage({ transports: ['websocket'] });
  });

  test('polling transport', async () => {
    await raceJoinAndMessage({ transports: ['polling'] });
  });

  test('default transports (polling, then upgrade)', async () => {
    await raceJoinAndMessage({ transports: ['polling', 'websocket'] });
  });

  test('/events namespace, websocket transport', async () => {
    await raceJoinAndMessage({ transports: ['websocket'], ns: '/events' });
  });

  test('a burst of buffered emits is fully acked and delivered', async () => {
    const room = roomName('burst');
    const s = connect(server.url, token(server.secret, { sub: 'burster' }));
    const got = collect(s, 'message', (m) => m.room === room);
    const joinAck = s.timeout(10_000).emitWithAck('join', room);
    const acks = [];
    for (let i = 1; i <= 20; i++) acks.push(s.timeout(10_000).emitWithAck('message', { room, data: i }));
    assert.equal((await joinAck).ok, true);
    const results = await Promise.all(acks);
    assert.ok(
      results.every((a) => a.ok),
      JSON.stringify(results.filter((a) => !a.ok)),
    );
    assert.deepEqual(
      results.map((a) => a.offset).sort((a, b) => a - b),
      Array.from({ length: 20 }, (_, i) => i + 1),
    );
    await got.until(20);
    assert.deepEqual(
      got.items.map((m) => m.offset),
      Array.from({ length: 20 }, (_, i) => i + 1),
    );
  });
});
