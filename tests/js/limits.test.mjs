// Limits as a Socket.IO client sees them: refusals at connect name their code in
// connect_error (rate_limited, too_many_connections, server_full), joins beyond the room
// limit are refused with too_many_rooms, and a client that stops reading gets an `error`
// event with code slow_consumer, then an "io server disconnect".

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  collect,
  connect,
  connectError,
  emitAck,
  http,
  join,
  openClient,
  roomName,
  startHerald,
  token,
  waitFor,
} from './harness.mjs';

/** Connects as `sub`; resolves to the socket, or to the connect_error message. */
async function attempt(server, sub, opts = {}) {
  const socket = connect(server.url, token(server.secret, { sub }), opts);
  return new Promise((resolve) => {
    socket.once('connect', () => resolve({ socket }));
    socket.once('connect_error', (err) => {
      socket.close();
      resolve({ refused: err.message });
    });
  });
}

async function metric(server, name) {
  const res = await http(server, 'GET', '/metrics', { key: null });
  return res.text
    .split('\n')
    .filter((l) => l.startsWith(name))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

describe('connection limits', { timeout: 60_000 }, () => {
  test('beyond the per-IP connection rate → connect_error "rate_limited"', async () => {
    const server = await startHerald({ HERALD_IP_CONNECT_RATE: '1' });
    assert.ok((await attempt(server, 'a')).socket, 'first');
    assert.ok((await attempt(server, 'b')).socket, 'second (a burst of twice the rate)');
    assert.equal((await attempt(server, 'c')).refused, 'rate_limited');
    // A forwarded address from an untrusted peer is ignored.
    const spoofed = await attempt(server, 'd', { extraHeaders: { 'x-forwarded-for': '198.51.100.1' } });
    assert.equal(spoofed.refused, 'rate_limited');
    assert.ok(
      (await metric(server, 'herald_connections_refused_total{reason="rate_limited",transport="socketio"}')) >= 2,
    );
  });

  test('behind a trusted proxy, each forwarded client has its own rate', async () => {
    const server = await startHerald({ HERALD_IP_CONNECT_RATE: '1', HERALD_TRUSTED_PROXIES: '127.0.0.1' });
    const as = (ip) => ({ extraHeaders: { 'x-forwarded-for': ip } });
    assert.ok((await attempt(server, 'a', as('203.0.113.1'))).socket);
    assert.ok((await attempt(server, 'b', as('203.0.113.1'))).socket);
    assert.equal((await attempt(server, 'c', as('203.0.113.1'))).refused, 'rate_limited');
    assert.ok((await attempt(server, 'd', as('203.0.113.2'))).socket, 'another client behind the proxy');
  });

  test('caps per user and per instance → "too_many_connections" and "server_full"', async () => {
    const server = await startHerald({ HERALD_MAX_CONNECTIONS: '2', HERALD_MAX_USER_CONNECTIONS: '1' });
    const alice = await attempt(server, 'alice');
    assert.ok(alice.socket);
    assert.equal((await attempt(server, 'alice')).refused, 'too_many_connections');
    assert.ok((await attempt(server, 'bob')).socket);
    assert.equal((await attempt(server, 'carol')).refused, 'server_full');
    // A closed connection gives its places back.
    alice.socket.close();
    const deadline = Date.now() + 5000;
    let again;
    do {
      again = await attempt(server, 'alice');
    } while (again.refused && Date.now() < deadline && (await new Promise((r) => setTimeout(r, 50, true))));
    assert.ok(again.socket, `alice can connect again: ${again.refused}`);
  });

  test('joins beyond HERALD_MAX_ROOMS → ack error "too_many_rooms"', async () => {
    const server = await startHerald({ HERALD_MAX_ROOMS: '2' });
    const { socket } = await openClient(server, { sub: 'roomy' });
    const [a, b, c] = [roomName('a'), roomName('b'), roomName('c')];
    assert.equal((await join(socket, a)).ok, true);
    assert.equal((await join(socket, b)).ok, true);
    const refused = await emitAck(socket, 'join', c);
    assert.equal(refused.ok, false);
    assert.equal(refused.error, 'too_many_rooms');
    assert.equal((await emitAck(socket, 'join', 'user:roomy')).ok, true, 'the own room takes no place');
    await emitAck(socket, 'leave', a);
    assert.equal((await emitAck(socket, 'join', c)).ok, true, 'a left room frees its place');
  });
});

describe('slow consumers', { timeout: 90_000 }, () => {
  test('a client that stops reading gets error {code: slow_consumer}, then "io server disconnect"', async () => {
    const server = await startHerald({
      HERALD_OUTBOUND_QUEUE: '128',
      HERALD_PERSIST: 'off',
      HERALD_HISTORY_SIZE: '50',
    });
    const room = roomName('firehose');
    const slow = await openClient(server, { sub: 'slow' });
    const healthy = await openClient(server, { sub: 'healthy' });
    await join(slow.socket, room);
    await join(healthy.socket, room);
    const errors = collect(slow.socket, 'error');
    const disconnected = waitFor(slow.socket, 'disconnect', 60_000);
    const got = collect(healthy.socket, 'message');

    // Stop reading the slow client's TCP socket, as a stalled browser tab would.
    const tcp = slow.socket.io.engine.transport.ws._socket;
    tcp.pause();
    const pad = 'x'.repeat(16 * 1024);
    let sent = 0;
    const deadline = Date.now() + 45_000;
    while ((await metric(server, 'herald_slow_consumer_disconnects_total{transport="socketio"}')) < 1) {
      assert.ok(Date.now() < deadline, 'the slow client was never cut off');
      const batch = [];
      for (let i = 0; i < 100; i++) {
        batch.push(http(server, 'POST', '/api/publish', { body: { room, data: { i: sent++, pad } } }));
      }
      for (const res of await Promise.all(batch)) assert.equal(res.status, 200);
    }
    tcp.resume();
    const reason = await disconnected;
    assert.equal(reason, 'io server disconnect');
    assert.equal(errors.items.length, 1, 'one error event before the disconnect');
    assert.equal(errors.items[0].code, 'slow_consumer');
    assert.match(errors.items[0].message, /since/);
    // The healthy member got every message.
    const until = Date.now() + 20_000;
    while (got.items.length < sent && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    assert.equal(got.items.length, sent);
    assert.deepEqual(
      got.items.map((m) => m.offset),
      Array.from({ length: sent }, (_, i) => i + 1),
    );
  });
});
