// Engine.IO transports: a polling-only client (no upgrade) can connect, get its
// session, join, publish, receive, see presence and recover history, talking
// to websocket clients in the same room; the default polling→websocket
// upgrade keeps the session working across the switch.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  assertAck,
  collect,
  connect,
  connected,
  emitAck,
  http,
  join,
  openClient,
  publish,
  roomName,
  startHerald,
  token,
  waitFor,
} from './harness.mjs';

describe('transports', { timeout: 60_000 }, () => {
  let server;
  before(async () => {
    server = await startHerald();
  });

  test('polling-only client works end to end with a websocket peer', async () => {
    const room = roomName('poll');
    const poller = await openClient(server, { sub: 'poller', transports: ['polling'] });
    assert.equal(poller.socket.io.engine.transport.name, 'polling');
    assert.equal(poller.session.user, 'poller');
    assert.equal(poller.session.instance, server.instance);

    const peer = await openClient(server, { sub: 'ws-peer' });
    assert.equal(peer.socket.io.engine.transport.name, 'websocket');

    assertAck(await emitAck(poller.socket, 'join', room), { ok: true, room, offset: 0, recovered: false });
    const peerJoined = waitFor(poller.socket, 'presence', 5000, (p) => p.room === room && p.user === 'ws-peer');
    await join(peer.socket, room);
    assert.deepEqual(await peerJoined, { room, user: 'ws-peer', status: 'join' });

    const atPoller = collect(poller.socket, 'message', (m) => m.room === room);
    const atPeer = collect(peer.socket, 'message', (m) => m.room === room);

    const a1 = await publish(poller.socket, room, { text: 'from polling' });
    const a2 = await publish(peer.socket, room, { text: 'from websocket' });
    const a3 = await publish(poller.socket, room, { text: 'x'.repeat(800) }); // a larger payload over XHR
    await atPoller.until(3);
    await atPeer.until(3);
    const expected = [
      [a1.offset, a1.id, 'poller'],
      [a2.offset, a2.id, 'ws-peer'],
      [a3.offset, a3.id, 'poller'],
    ];
    assert.deepEqual(
      atPoller.items.map((m) => [m.offset, m.id, m.from]),
      expected,
    );
    assert.deepEqual(
      atPeer.items.map((m) => [m.offset, m.id, m.from]),
      expected,
    );
    assert.deepEqual(
      [a1.offset, a2.offset, a3.offset],
      [1, 2, 3],
    );

    assertAck(await emitAck(poller.socket, 'presence', room), { ok: true, users: ['poller', 'ws-peer'] });
    const hist = await emitAck(poller.socket, 'history', { room, since: 1 });
    assert.deepEqual(
      hist.messages.map((m) => m.offset),
      [2, 3],
    );
    assert.equal(poller.socket.io.engine.transport.name, 'polling', 'never upgraded');
  });

  test('polling-only client on /events with the token in the query string', async () => {
    const room = roomName('poll-ev');
    const s = connect(`${server.url}/events`, null, {
      transports: ['polling'],
      query: { token: token(server.secret, { sub: 'poll-q' }) },
    });
    const session = waitFor(s, 'session', 10_000);
    await connected(s);
    assert.equal((await session).user, 'poll-q');
    await join(s, room);
    const got = waitFor(s, 'message', 5000, (m) => m.room === room);
    const ack = await publish(s, room, 'hello events');
    const m = await got;
    assert.deepEqual([m.id, m.offset, m.from, m.data], [ack.id, 1, 'poll-q', 'hello events']);
  });

  test('polling client receives HTTP API events and messages', async () => {
    const room = roomName('poll-api');
    const poller = await openClient(server, { sub: 'poll-api-user', transports: ['polling'] });
    await join(poller.socket, room);
    const msg = waitFor(poller.socket, 'message', 5000, (m) => m.room === room);
    const evt = waitFor(poller.socket, 'ping.custom');
    const r1 = await http(server, 'POST', '/api/publish', { body: { room, data: 'via api' } });
    assert.equal(r1.status, 200, r1.text);
    const r2 = await http(server, 'POST', '/api/publish', {
      body: { user: 'poll-api-user', event: 'ping.custom', data: [1, 2] },
    });
    assert.equal(r2.status, 200, r2.text);
    assert.equal((await msg).data, 'via api');
    assert.deepEqual(await evt, [1, 2]);
  });

  test('default transports: upgrade from polling to websocket keeps the session working', async () => {
    const room = roomName('upgrade');
    const tok = token(server.secret, { sub: 'upgrader' });
    const s = connect(server.url, tok, { transports: ['polling', 'websocket'] });
    const session = waitFor(s, 'session', 10_000);
    await connected(s);
    const upgraded =
      s.io.engine.transport.name === 'websocket' ? Promise.resolve() : waitFor(s.io.engine, 'upgrade', 10_000);
    await join(s, room);
    await upgraded;
    assert.equal(s.io.engine.transport.name, 'websocket');
    assert.equal((await session).user, 'upgrader');

    const got = collect(s, 'message', (m) => m.room === room);
    await publish(s, room, 'after upgrade');
    await got.until(1);
    assert.equal(got.items[0].data, 'after upgrade');
    assertAck(await emitAck(s, 'presence', room), { ok: true, users: ['upgrader'] });
  });

  test('a client told not to add the trailing slash (path /socket.io) works on every transport', async () => {
    for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
      const room = roomName('slash');
      const client = await openClient(server, { sub: 'no-slash', transports, addTrailingSlash: false });
      assert.equal(client.session.user, 'no-slash', transports.join('+'));
      assertAck(await emitAck(client.socket, 'join', room), { ok: true, room, offset: 0, recovered: false });
      const got = collect(client.socket, 'message', (m) => m.room === room);
      await publish(client.socket, room, transports.join('+'));
      await got.until(1);
      assert.equal(got.items[0].data, transports.join('+'));
      client.socket.close();
    }
  });
});
